"""External awards: support given under another policy (or another article of this one) on a basis
document, recorded so the same document earns nothing here again (就高不重复, art. 25).

An external award can be reversed, on the grounds of vouchers/sanctions.py: `administrative` frees its
document, so 就高 can choose a higher award here over a smaller one elsewhere; `misconduct` keeps the
document claimed for good and sanctions the entity. One the city pays under articles other than 8-11
(`draws_appropriation`) is drawn on the ledger from the appropriation of its year (the Asia/Shanghai year of
`awarded_on`, vouchers/budgets.py), so program budgets plus these draws never exceed the appropriation
(art. 27); its reversal returns the draw. Nothing here commits: the caller owns the transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger.service import Ledger
from vouchers import sanctions
from vouchers.budgets import draw_appropriation
from vouchers.errors import VoucherError
from vouchers.sanctions import Grounds, Sanction


class ExternalAwardNotFound(VoucherError):
    code = "not_found"


class ExternalAwardReversed(VoucherError):
    code = "conflict"


@dataclass(frozen=True, slots=True)
class ExternalAward:
    id: str
    entity_id: str
    basis_ref: str
    policy: str
    amount_fen: int
    awarded_on: date
    draws_appropriation: bool
    draw_entry_id: int | None
    created_at: datetime
    reversed_at: datetime | None
    reversal_reason: str | None
    reversal_grounds: Grounds | None
    return_entry_id: int | None
    sanction_id: str | None
    documents: tuple[str, ...] = ()  # the documents it claims (released ones too)
    released_documents: tuple[str, ...] = ()


_COLUMNS = (
    "id, entity_id, basis_ref, policy, amount_fen, awarded_on, draws_appropriation, draw_entry_id, created_at, "
    "reversed_at, reversal_reason, reversal_grounds, return_entry_id, sanction_id"
)


async def get(conn: AsyncConnection, award_id: str, *, for_update: bool = False) -> ExternalAward:
    lock_clause = " FOR UPDATE" if for_update else ""
    row = (
        await conn.execute(
            text(f"SELECT {_COLUMNS} FROM external_award WHERE id = :id{lock_clause}"),  # noqa: S608 (constants only)
            {"id": award_id},
        )
    ).first()
    if row is None:
        raise ExternalAwardNotFound(f"no external award {award_id}")
    claims = (
        await conn.execute(
            text("SELECT document, released_at FROM basis_claim WHERE external_award_id = :id ORDER BY document"),
            {"id": award_id},
        )
    ).all()
    return ExternalAward(
        id=row.id,
        entity_id=row.entity_id,
        basis_ref=row.basis_ref,
        policy=row.policy,
        amount_fen=int(row.amount_fen),
        awarded_on=row.awarded_on,
        draws_appropriation=row.draws_appropriation,
        draw_entry_id=row.draw_entry_id,
        created_at=row.created_at,
        reversed_at=row.reversed_at,
        reversal_reason=row.reversal_reason,
        reversal_grounds=row.reversal_grounds,
        return_entry_id=row.return_entry_id,
        sanction_id=row.sanction_id,
        documents=tuple(c.document for c in claims),
        released_documents=tuple(c.document for c in claims if c.released_at is not None),
    )


async def draw(
    conn: AsyncConnection, ledger: Ledger, *, award_id: str, appropriation_fen: int, now: datetime
) -> ExternalAward:
    """Pay a just-recorded external award from its year's appropriation. The city pays no new award to a
    sanctioned entity under any article (art. 25): refused `entity_sanctioned`."""
    award = await get(conn, award_id, for_update=True)
    assert not award.draws_appropriation, f"external award {award_id} already drew on the appropriation"
    await sanctions.refuse_if_sanctioned(conn, award.entity_id, now=now)
    year = award.awarded_on.year  # a date: already the calendar day in Asia/Shanghai
    entry_id = await draw_appropriation(
        conn,
        ledger,
        year=year,
        amount_fen=award.amount_fen,
        appropriation_fen=appropriation_fen,
        key=f"external:{award_id}:draw",
        memo=f"external award {award_id} ({award.policy[:200]}) paid from the {year} appropriation (art. 27)",
        metadata={"external_award": award_id, "entity": award.entity_id, "year": year},
    )
    await conn.execute(
        text("UPDATE external_award SET draws_appropriation = true, draw_entry_id = :e WHERE id = :id"),
        {"e": entry_id, "id": award_id},
    )
    return await get(conn, award_id)


async def reverse(
    conn: AsyncConnection,
    ledger: Ledger,
    *,
    award_id: str,
    reason: str,
    grounds: Grounds,
    actor: str,
    sanction_years: int,
    now: datetime,
) -> tuple[ExternalAward, Sanction | None]:
    """Reverse an external award once: its draw on the appropriation (if any) is returned by a compensating
    entry; administrative grounds free its document, misconduct keeps it claimed and sanctions the entity."""
    award = await get(conn, award_id, for_update=True)
    if award.reversed_at is not None:
        raise ExternalAwardReversed(
            f"external award {award_id} was reversed at {award.reversed_at.isoformat()} ({award.reversal_grounds}): "
            f"{award.reversal_reason}"
        )
    sanction = None
    if grounds == "misconduct":
        sanction = await sanctions.impose(
            conn,
            entity_id=award.entity_id,
            reason=reason,
            source_kind="external_award",
            source_id=award_id,
            years=sanction_years,
            actor=actor,
            now=now,
        )
    sanction_id = None if sanction is None else sanction.id
    return_entry_id = None
    if award.draw_entry_id is not None:
        metadata: dict[str, Any] = {
            "external_award": award_id,
            "entity": award.entity_id,
            "grounds": grounds,
            "sanction": sanction_id,
        }
        entry = await ledger.reverse(
            conn,
            key=f"external:{award_id}:return",
            entry_id=award.draw_entry_id,
            memo=f"external award {award_id} reversed ({grounds}): its draw returns to the appropriation",
            metadata=metadata,
        )
        return_entry_id = entry.id
    await conn.execute(
        text(
            "UPDATE external_award SET reversed_at = now(), reversed_by = :by, reversal_reason = :r, "
            "reversal_grounds = :g, return_entry_id = :ret, sanction_id = :s WHERE id = :id"
        ),
        {"by": actor, "r": reason, "g": grounds, "ret": return_entry_id, "s": sanction_id, "id": award_id},
    )
    if grounds == "administrative":
        await conn.execute(
            text("UPDATE basis_claim SET released_at = now() WHERE external_award_id = :id AND released_at IS NULL"),
            {"id": award_id},
        )
    return await get(conn, award_id), sanction


__all__ = ["ExternalAward", "ExternalAwardNotFound", "ExternalAwardReversed", "draw", "get", "reverse"]
