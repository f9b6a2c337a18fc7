"""Grounds of a revocation or reversal, and the sanctions misconduct brings (POLICY.md, "Grounds of a
revocation or reversal", art. 25).

Every revocation or reversal names its grounds. `administrative` (an error, or the applicant's choice of a
higher award, 就高) returns the cap room and frees the basis documents. `misconduct` (fraud, misuse, false
documents) keeps both used for good and records a sanction against the beneficiary: no new award under any
program from `decided_on` (the Asia/Shanghai date of the decision) to the day before `until`, which is
`decided_on` plus `sanction_years`; `until` is the first day the entity may be awarded again. An
unrestricted admin may lift a sanction once, with a reason. Each imposition and lifting is an event in the
entity's history.

The rule "misconduct keeps the cap room used" has its one home here (`cap_used_by_program`): a voucher on
which misconduct was found counts its whole face value against the entity-year cap, whatever went back to
the budget; any other voucher counts what was issued less what was released.

Nothing here commits: the caller owns the transaction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from vouchers.errors import VoucherError
from vouchers.locking import lock
from vouchers.rules import SHANGHAI

Grounds = Literal["administrative", "misconduct"]
SourceKind = Literal["voucher", "application", "redemption", "external_award"]
GROUNDS: tuple[Grounds, ...] = ("administrative", "misconduct")


class EntitySanctioned(VoucherError):
    """The entity is under a sanction in force: no new award under any program (art. 25)."""

    code = "entity_sanctioned"

    def __init__(self, detail: str, sanction: dict[str, Any]) -> None:
        super().__init__(detail)
        self.errors = [{"sanction": sanction}]


class SanctionNotFound(VoucherError):
    code = "not_found"


class SanctionAlreadyLifted(VoucherError):
    code = "sanction_already_lifted"


@dataclass(frozen=True, slots=True)
class Sanction:
    id: str
    entity_id: str
    decided_on: date
    until: date  # the first day the entity is free again
    reason: str
    source_kind: str
    source_id: str
    decided_by: str | None
    created_at: datetime
    lifted_at: datetime | None
    lifted_by: str | None
    lift_reason: str | None

    def in_force(self, on: date) -> bool:
        return self.lifted_at is None and self.decided_on <= on < self.until

    @property
    def source(self) -> dict[str, str]:
        return {"kind": self.source_kind, "id": self.source_id}

    def public(self) -> dict[str, Any]:
        """What a refusal names: the decision, its dates and its reason."""
        return {
            "id": self.id,
            "decided_on": self.decided_on.isoformat(),
            "until": self.until.isoformat(),
            "reason": self.reason,
            "source": self.source,
        }


def shanghai_date(moment: datetime) -> date:
    """The calendar date in Asia/Shanghai, the date a decision is taken on."""
    assert moment.tzinfo is not None, "an instant, not a wall-clock time"
    return moment.astimezone(SHANGHAI).date()


def sanction_until(decided_on: date, years: int) -> date:
    """`years` after the decision, the first free day. A decision of 29 February ends on 1 March: the
    anniversary does not exist in a common year, and the period is never shortened."""
    assert years >= 1
    try:
        return decided_on.replace(year=decided_on.year + years)
    except ValueError:
        return decided_on.replace(year=decided_on.year + years, month=2, day=28) + timedelta(days=1)


_COLUMNS = (
    "id, entity_id, decided_on, until, reason, source_kind, source_id, decided_by, created_at, lifted_at, "
    "lifted_by, lift_reason"
)


def _sanction(row: Any) -> Sanction:
    return Sanction(
        id=row.id,
        entity_id=row.entity_id,
        decided_on=row.decided_on,
        until=row.until,
        reason=row.reason,
        source_kind=row.source_kind,
        source_id=row.source_id,
        decided_by=row.decided_by,
        created_at=row.created_at,
        lifted_at=row.lifted_at,
        lifted_by=row.lifted_by,
        lift_reason=row.lift_reason,
    )


async def _event(
    conn: AsyncConnection, entity_id: str, kind: str, change: dict[str, Any], reason: str, actor: str | None
) -> None:
    await conn.execute(
        text(
            "INSERT INTO entity_event (entity_id, kind, change, reason, actor_key_id) "
            "VALUES (:e, :k, CAST(:c AS jsonb), :r, :by)"
        ),
        {"e": entity_id, "k": kind, "c": json.dumps(change), "r": reason, "by": actor},
    )


async def impose(
    conn: AsyncConnection,
    *,
    entity_id: str,
    reason: str,
    source_kind: SourceKind,
    source_id: str,
    years: int,
    actor: str | None,
    now: datetime,
) -> Sanction:
    """Record a misconduct decision against `entity_id`, in force from today (Asia/Shanghai) for `years`.
    Takes the entity's sanction lock, as an approval's check does, so no award slips between the two."""
    # imported here: vouchers.applications asks this module whether an entity is sanctioned
    from vouchers.applications import new_id

    await lock(conn, f"sanction:{entity_id}")
    decided_on = shanghai_date(now)
    sanction_id = new_id("san_")
    row = (
        await conn.execute(
            text(
                "INSERT INTO sanction (id, entity_id, decided_on, until, reason, source_kind, source_id, decided_by) "  # noqa: S608
                f"VALUES (:id, :e, :d, :u, :r, :k, :s, :by) RETURNING {_COLUMNS}"
            ),
            {
                "id": sanction_id,
                "e": entity_id,
                "d": decided_on,
                "u": sanction_until(decided_on, years),
                "r": reason[:1000],
                "k": source_kind,
                "s": source_id,
                "by": actor,
            },
        )
    ).one()
    sanction = _sanction(row)
    await _event(conn, entity_id, "sanctioned", {"before": None, "after": sanction.public()}, sanction.reason, actor)
    return sanction


async def get_sanction(conn: AsyncConnection, sanction_id: str, *, for_update: bool = False) -> Sanction:
    lock_clause = " FOR UPDATE" if for_update else ""
    row = (
        await conn.execute(
            text(f"SELECT {_COLUMNS} FROM sanction WHERE id = :id{lock_clause}"),  # noqa: S608 (constants only)
            {"id": sanction_id},
        )
    ).first()
    if row is None:
        raise SanctionNotFound(f"no sanction {sanction_id}")
    return _sanction(row)


async def for_entity(conn: AsyncConnection, entity_id: str) -> list[Sanction]:
    """Every sanction ever decided against the entity, oldest first (lifted and ended ones too)."""
    rows = await conn.execute(
        text(f"SELECT {_COLUMNS} FROM sanction WHERE entity_id = :e ORDER BY decided_on, created_at, id"),  # noqa: S608
        {"e": entity_id},
    )
    return [_sanction(row) for row in rows]


async def for_entities(conn: AsyncConnection, entity_ids: list[str]) -> dict[str, list[Sanction]]:
    """`for_entity` for many entities at once (a page of the registry)."""
    found: dict[str, list[Sanction]] = {entity_id: [] for entity_id in entity_ids}
    rows = await conn.execute(
        text(f"SELECT {_COLUMNS} FROM sanction WHERE entity_id = ANY(:e) ORDER BY decided_on, created_at, id"),  # noqa: S608
        {"e": entity_ids},
    )
    for row in rows:
        found[row.entity_id].append(_sanction(row))
    return found


async def in_force(conn: AsyncConnection, entity_id: str, *, on: date) -> Sanction | None:
    """The sanction in force on `on` that ends last, or None."""
    row = (
        await conn.execute(
            text(
                f"SELECT {_COLUMNS} FROM sanction WHERE entity_id = :e AND lifted_at IS NULL "  # noqa: S608
                "AND decided_on <= :on AND until > :on ORDER BY until DESC, id LIMIT 1"
            ),
            {"e": entity_id, "on": on},
        )
    ).first()
    return None if row is None else _sanction(row)


def describe(sanction: Sanction) -> str:
    return (
        f"sanction {sanction.id} decided on {sanction.decided_on.isoformat()} for misconduct ({sanction.reason}): "
        f"no new award under any program until {sanction.until.isoformat()} (art. 25)"
    )


async def refuse_if_sanctioned(conn: AsyncConnection, entity_id: str, *, now: datetime) -> None:
    """Raise `EntitySanctioned` naming the decision when a sanction is in force today (Asia/Shanghai).
    Waits for a sanction being imposed on the entity at this moment, so its answer is the committed one."""
    await lock(conn, f"sanction:{entity_id}")
    sanction = await in_force(conn, entity_id, on=shanghai_date(now))
    if sanction is not None:
        raise EntitySanctioned(f"{entity_id} receives no new award: {describe(sanction)}", sanction.public())


async def lift(conn: AsyncConnection, *, sanction_id: str, reason: str, actor: str) -> Sanction:
    """Lift a sanction, once, with a reason; recorded in the entity's history."""
    sanction = await get_sanction(conn, sanction_id, for_update=True)
    if sanction.lifted_at is not None:
        raise SanctionAlreadyLifted(
            f"sanction {sanction_id} was lifted at {sanction.lifted_at.isoformat()}: {sanction.lift_reason}"
        )
    row = (
        await conn.execute(
            text(
                "UPDATE sanction SET lifted_at = now(), lifted_by = :by, lift_reason = :r WHERE id = :id "  # noqa: S608
                f"RETURNING {_COLUMNS}"
            ),
            {"by": actor, "r": reason[:1000], "id": sanction_id},
        )
    ).one()
    lifted = _sanction(row)
    await _event(
        conn,
        lifted.entity_id,
        "sanction_lifted",
        {"before": lifted.public(), "after": {**lifted.public(), "lifted_at": row.lifted_at.isoformat()}},
        reason,
        actor,
    )
    return lifted


# -- the cap room a misconduct keeps used -------------------------------------------------------------

_CAP_USED = text(
    """
    SELECT program, sum(used) AS used FROM (
        SELECT program,
               CASE WHEN misconduct_sanction_id IS NOT NULL THEN face_value_fen
                    ELSE face_value_fen - released_fen END AS used
          FROM voucher WHERE holder_entity_id = :e AND year = :y
           AND (CAST(:p AS text) IS NULL OR program = :p)
        UNION ALL
        SELECT p.program,
               CASE WHEN p.reversed_at IS NULL OR a.reversal_grounds = 'misconduct' THEN p.amount_fen ELSE 0 END
          FROM payout p JOIN application a ON a.id = p.application_id
         WHERE p.beneficiary_entity_id = :e AND p.year = :y AND (CAST(:p AS text) IS NULL OR p.program = :p)
    ) issued GROUP BY program
    """
)


async def cap_used_by_program(
    conn: AsyncConnection, entity_id: str, year: int, *, program: str | None = None
) -> dict[str, int]:
    """Per program, what the entity's awards of `year` use of its entity-year cap: issued less released,
    except where misconduct was found (a voucher marked so, a payout reversed for misconduct), which keeps
    its whole amount used (art. 25)."""
    rows = await conn.execute(_CAP_USED, {"e": entity_id, "y": year, "p": program})
    return {row.program: int(row.used) for row in rows}


async def mark_voucher(conn: AsyncConnection, voucher_id: str, sanction_id: str) -> None:
    """Misconduct was found on this voucher: its face value stays used, and value clawed back from it goes
    to the program budget (vouchers.vouchers.return_value). The first finding stays the mark."""
    await conn.execute(
        text("UPDATE voucher SET misconduct_sanction_id = coalesce(misconduct_sanction_id, :s) WHERE id = :id"),
        {"s": sanction_id, "id": voucher_id},
    )


__all__ = [
    "GROUNDS",
    "EntitySanctioned",
    "Grounds",
    "Sanction",
    "SanctionAlreadyLifted",
    "SanctionNotFound",
    "SourceKind",
    "cap_used_by_program",
    "describe",
    "for_entities",
    "for_entity",
    "get_sanction",
    "impose",
    "in_force",
    "lift",
    "mark_voucher",
    "refuse_if_sanctioned",
    "sanction_until",
    "shanghai_date",
]
