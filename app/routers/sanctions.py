"""`/v1/sanctions/{id}/lift`: lifting a misconduct sanction (art. 25).

A sanction bars an entity from every program, so only an admin limited to no voucher type lifts it (API.md,
"Admin scope"), once, with a reason that the entity's history keeps. Sanctions are read on the entity
(`GET /v1/entities/{id}`, `sanctions`) and in its history and statement.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Path
from pydantic import Field, StringConstraints

from app.dependencies import SessionDep, UnrestrictedAdminCaller
from app.errors import problem_responses
from app.schemas import RequestModel, ResponseModel
from vouchers import sanctions as service
from vouchers.sanctions import Sanction

router = APIRouter(tags=["sanctions"], responses=problem_responses(401, 403, 422))

SanctionId = Annotated[str, Path(pattern=r"^san_[a-z0-9]{24}$")]


class SanctionSource(ResponseModel):
    kind: Literal["voucher", "application", "redemption", "external_award"]
    id: str


class SanctionOut(ResponseModel):
    id: str
    entity_id: str
    decided_on: date = Field(description="the date of the misconduct decision (Asia/Shanghai)")
    until: date = Field(
        description="the first day the entity may be awarded again: no new award from `decided_on` to the day "
        "before `until` (`sanction_years` after the decision)"
    )
    reason: str
    source: SanctionSource = Field(description="the revocation or reversal that found the misconduct")
    decided_by: str | None
    lifted_at: datetime | None
    lifted_by: str | None
    lift_reason: str | None

    @classmethod
    def of(cls, sanction: Sanction) -> SanctionOut:
        return cls(
            id=sanction.id,
            entity_id=sanction.entity_id,
            decided_on=sanction.decided_on,
            until=sanction.until,
            reason=sanction.reason,
            source=SanctionSource.model_validate(sanction.source),
            decided_by=sanction.decided_by,
            lifted_at=sanction.lifted_at,
            lifted_by=sanction.lifted_by,
            lift_reason=sanction.lift_reason,
        )


class LiftIn(RequestModel):
    reason: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=1000)]


@router.post(
    "/sanctions/{sanction_id}/lift",
    summary="Lift a sanction, once, with a reason (an admin limited to no voucher type)",
    responses=problem_responses(404, 409),
)
async def lift(
    sanction_id: SanctionId, body: LiftIn, session: SessionDep, caller: UnrestrictedAdminCaller
) -> SanctionOut:
    lifted = await service.lift(
        await session.connection(), sanction_id=sanction_id, reason=body.reason, actor=caller.key_id
    )
    await session.commit()
    return SanctionOut.of(lifted)
