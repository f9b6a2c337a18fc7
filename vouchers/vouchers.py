"""Vouchers after issue: what each one holds, and how it ends (revoked, expired), and the reversal of an
issued award (clawback, 就高不重复, art. 25).

A voucher's money is its ledger account `voucher:{id}` (limit `debits_must_not_exceed_credits`): issue
credits it from the program budget, redemptions debit it towards providers, holds reserve against it
(debits pending), and ending it debits what it can still give back to the budget. The `voucher` row says
who holds it, its status and `released_fen`, the part of the face value that went back to the budget; the
amounts below are read from the ledger, never kept twice:

    available = what the account can still give (credits − debits posted − debits pending)
    held      = debits pending (holds in flight at providers)
    released  = `released_fen` (returned to the budget by revocation or expiry)
    redeemed  = debits posted − released − refunds (credits beyond the face value)

so `face_value = available + held + redeemed + released` at every moment.

Ending a voucher (revocation, expiry) returns only what is available: a hold in flight stays reserved, the
provider may still capture or void it, and the voucher is marked `awaiting_holds` until the sweeper
(`return_released_holds`) has returned whatever those holds give back. Every end runs under the voucher
row's lock and the voucher account's lock, with an idempotency key naming the voucher, so it happens once
however many sweepers or administrators race for it. Nothing here commits: the caller owns the transaction
(the sweeps run each voucher in a transaction of their own).

Read-time rule: an active voucher past `expires_at` reads as `expired` with nothing available before the
sweep has reached it; its `released_fen` then already counts what the sweep is about to return.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger.errors import AlreadyReversed, Refusal
from ledger.postings import credit, debit
from ledger.service import Balance, Ledger, run_in_transaction
from vouchers import recovery, sanctions
from vouchers.applications import ApplicationNotFound
from vouchers.budgets import budget_account
from vouchers.catalog import Catalog
from vouchers.entities import EntityNotFound
from vouchers.errors import VoucherError
from vouchers.rules import cap_for
from vouchers.sanctions import Grounds, Sanction

VoucherStatus = Literal["active", "expired", "revoked"]
SWEEP_BATCH = 200


class VoucherNotFound(VoucherError):
    code = "not_found"


class VoucherRevoked(VoucherError):
    code = "voucher_revoked"


class VoucherExpired(VoucherError):
    code = "voucher_expired"


class AwardNotReversible(VoucherError):
    """The application is not an issued award, or part of its value is already with providers."""

    code = "conflict"


def voucher_account(voucher_id: str) -> str:
    return f"voucher:{voucher_id}"


@dataclass(frozen=True, slots=True)
class Voucher:
    id: str
    program: str
    holder_entity_id: str
    year: int
    status: VoucherStatus
    face_value_fen: int
    available_fen: int
    held_fen: int
    redeemed_fen: int
    released_fen: int
    expires_at: datetime
    application_id: str
    vendor_entity_id: str | None
    redemption_rate_bp: int
    created_at: datetime
    ended_at: datetime | None
    end_reason: str | None
    revocation_grounds: str | None = None
    misconduct_sanction_id: str | None = None  # misconduct was found on it: its face value stays used


@dataclass(frozen=True, slots=True)
class ProgramBalance:
    """An entity's position in one program-year, summed over its vouchers and payouts."""

    program: str
    year: int
    cap_fen: int
    cap_applies_to: str
    cap_used_fen: int
    issued_fen: int
    available_fen: int
    held_fen: int
    redeemed_fen: int
    released_fen: int
    paid_fen: int
    vouchers: int
    payouts: int


@dataclass(frozen=True, slots=True)
class Reversal:
    application_id: str
    program: str
    holder_entity_id: str
    year: int
    kind: Literal["voucher", "payout"]
    award_id: str
    award_fen: int
    returned_fen: int  # what went back to the budget in this reversal (a settled payout: 0, owed back instead)
    entry_id: int | None  # the ledger entry that returned it (None: nothing was left to return)
    reason: str
    reversed_at: datetime
    released_documents: tuple[str, ...]
    voucher: Voucher | None
    grounds: Grounds = "administrative"
    kept_documents: tuple[str, ...] = ()  # misconduct: claimed for good
    sanction: Sanction | None = None


# -- reads ------------------------------------------------------------------------------------------

_COLUMNS = """
    v.id, v.program, v.holder_entity_id, v.year, v.status, v.face_value_fen, v.released_fen, v.expires_at,
    v.application_id, v.vendor_entity_id, v.redemption_rate_bp, v.created_at, v.ended_at, v.end_reason,
    v.awaiting_holds, (a.status = 'reversed') AS award_reversed, v.revocation_grounds, v.misconduct_sanction_id
"""
_FROM = "FROM voucher v JOIN application a ON a.id = v.application_id"
# the read-time rule: an active voucher past its expiry is expired whether or not the sweep has run
_EFFECTIVE_STATUS = "CASE WHEN v.status = 'active' AND v.expires_at <= :now THEN 'expired' ELSE v.status END"


def _effective_status(row: Any, now: datetime) -> VoucherStatus:
    if row.status == "active" and row.expires_at <= now:
        return "expired"
    status: VoucherStatus = row.status
    return status


def _voucher(row: Any, balance: Balance, now: datetime) -> Voucher:
    assert balance.account.limit == "debits_must_not_exceed_credits", f"voucher {row.id} has a limited account"
    face, released = int(row.face_value_fen), int(row.released_fen)
    refunded = balance.credits_posted_fen - face  # value providers gave back after a redemption
    held = balance.debits_pending_fen
    redeemed = balance.debits_posted_fen - released - refunded
    available = balance.available_fen
    status = _effective_status(row, now)
    if status != "active":
        # an ended voucher spends nothing; what it still shows is on its way back to the budget
        released, available = released + available, 0
    assert min(available, held, redeemed, released) >= 0, f"voucher {row.id}: amounts are never negative"
    return Voucher(
        id=row.id,
        program=row.program,
        holder_entity_id=row.holder_entity_id,
        year=row.year,
        status=status,
        face_value_fen=face,
        available_fen=available,
        held_fen=held,
        redeemed_fen=redeemed,
        released_fen=released,
        expires_at=row.expires_at,
        application_id=row.application_id,
        vendor_entity_id=row.vendor_entity_id,
        redemption_rate_bp=row.redemption_rate_bp,
        created_at=row.created_at,
        ended_at=row.ended_at,
        end_reason=row.end_reason,
        revocation_grounds=row.revocation_grounds,
        misconduct_sanction_id=row.misconduct_sanction_id,
    )


async def _with_balances(conn: AsyncConnection, ledger: Ledger, rows: Sequence[Any], now: datetime) -> list[Voucher]:
    if not rows:
        return []
    balances = {b.account.code: b for b in await ledger.balances(conn, codes=[voucher_account(r.id) for r in rows])}
    return [_voucher(row, balances[voucher_account(row.id)], now) for row in rows]


async def get_voucher(conn: AsyncConnection, ledger: Ledger, voucher_id: str, *, now: datetime) -> Voucher:
    row = (await conn.execute(text(f"SELECT {_COLUMNS} {_FROM} WHERE v.id = :id"), {"id": voucher_id})).first()
    if row is None:
        raise VoucherNotFound(f"no voucher {voucher_id}")
    return (await _with_balances(conn, ledger, [row], now))[0]


async def list_vouchers(
    conn: AsyncConnection,
    ledger: Ledger,
    *,
    now: datetime,
    after: tuple[datetime, str] | None = None,
    limit: int | None = None,
    holder_entity_id: str | None = None,
    program: str | None = None,
    year: int | None = None,
    status: VoucherStatus | None = None,
) -> list[Voucher]:
    """Vouchers oldest first (created_at, id), filtered; `status` is the status as read (expiry applied)."""
    rows = (
        await conn.execute(
            text(
                f"SELECT {_COLUMNS} {_FROM} WHERE (CAST(:after_at AS timestamptz) IS NULL "
                "OR (v.created_at, v.id) > (CAST(:after_at AS timestamptz), CAST(:after_id AS text))) "
                "AND (CAST(:holder AS text) IS NULL OR v.holder_entity_id = :holder) "
                "AND (CAST(:program AS text) IS NULL OR v.program = :program) "
                "AND (CAST(:year AS integer) IS NULL OR v.year = :year) "
                f"AND (CAST(:status AS text) IS NULL OR {_EFFECTIVE_STATUS} = :status) "
                "ORDER BY v.created_at, v.id LIMIT :n"
            ),
            {
                "now": now,
                "after_at": after[0] if after else None,
                "after_id": after[1] if after else None,
                "holder": holder_entity_id,
                "program": program,
                "year": year,
                "status": status,
                "n": limit,
            },
        )
    ).all()
    return await _with_balances(conn, ledger, rows, now)


async def entity_balances(
    conn: AsyncConnection, ledger: Ledger, catalog: Catalog, *, entity_id: str, year: int, now: datetime
) -> list[ProgramBalance]:
    """Per program the entity holds anything in for `year` (vouchers it holds, payouts it receives), in
    program order. `cap_fen` is the cap that governs the program for this entity (raised by its tags where
    the definition says). `cap_used_fen` is, for a cap per entity-year, what was issued less what was
    released (what approvals count); for a cap per project, contract, dataset, scenario or filing, the
    amount issued on awards that stand (each award is within its own cap; the sum is for information).
    Cap use per entity-year follows the one rule of vouchers/sanctions.py (misconduct keeps it used)."""
    tags = await conn.scalar(text("SELECT tags FROM entity WHERE id = :id"), {"id": entity_id})
    if tags is None:
        raise EntityNotFound(f"no entity {entity_id}")
    vouchers = await list_vouchers(conn, ledger, now=now, holder_entity_id=entity_id, year=year)
    reversed_awards = {
        row.id
        for row in await conn.execute(
            text(
                "SELECT v.id FROM voucher v JOIN application a ON a.id = v.application_id "
                "WHERE v.holder_entity_id = :e AND v.year = :y AND a.status = 'reversed'"
            ),
            {"e": entity_id, "y": year},
        )
    }
    payouts = (
        await conn.execute(
            text(
                "SELECT p.program, p.amount_fen, (a.status = 'reversed') AS award_reversed FROM payout p "
                "JOIN application a ON a.id = p.application_id WHERE p.beneficiary_entity_id = :e AND p.year = :y"
            ),
            {"e": entity_id, "y": year},
        )
    ).all()
    programs = sorted({v.program for v in vouchers} | {p.program for p in payouts})
    entity_year_used = await sanctions.cap_used_by_program(conn, entity_id, year)
    result = []
    for code in programs:
        definition = catalog.for_year(code, year)
        cap = cap_for(definition, tags=tags)
        mine = [v for v in vouchers if v.program == code]
        paid = [p for p in payouts if p.program == code]
        standing_fen = sum(v.face_value_fen for v in mine if v.id not in reversed_awards)
        paid_fen = sum(int(p.amount_fen) for p in paid if not p.award_reversed)
        issued_fen = sum(v.face_value_fen for v in mine) + sum(int(p.amount_fen) for p in paid)
        released_fen = sum(v.released_fen for v in mine) + sum(int(p.amount_fen) for p in paid if p.award_reversed)
        entity_year = cap.applies_to == "entity_year"
        cap_used = entity_year_used.get(code, 0) if entity_year else standing_fen + paid_fen
        result.append(
            ProgramBalance(
                program=code,
                year=year,
                cap_fen=cap.cap_fen,
                cap_applies_to=cap.applies_to,
                cap_used_fen=cap_used,
                issued_fen=issued_fen,
                available_fen=sum(v.available_fen for v in mine),
                held_fen=sum(v.held_fen for v in mine),
                redeemed_fen=sum(v.redeemed_fen for v in mine),
                released_fen=released_fen,
                paid_fen=paid_fen,
                vouchers=len(mine),
                payouts=len(paid),
            )
        )
    return result


# -- ending a voucher ---------------------------------------------------------------------------------


async def _locked_row(conn: AsyncConnection, voucher_id: str) -> Any:
    return (
        await conn.execute(text(f"SELECT {_COLUMNS} {_FROM} WHERE v.id = :id FOR UPDATE OF v"), {"id": voucher_id})
    ).first()


async def _locked_balance(conn: AsyncConnection, ledger: Ledger, voucher_id: str) -> Balance:
    """The voucher account's balance, its row locked as `ledger_post` locks it (FOR NO KEY UPDATE) until the
    transaction ends: a redemption posting between this read and the return would otherwise make the
    return exceed the account, and a refusal is recorded for good under the return's idempotency key."""
    return await ledger.locked_balance(conn, voucher_account(voucher_id))


async def _return_to_budget(
    conn: AsyncConnection,
    ledger: Ledger,
    row: Any,
    amount_fen: int,
    *,
    key: str,
    memo: str,
    metadata: dict[str, Any] | None = None,
) -> int | None:
    """Move `amount_fen` from the voucher to its program budget; the entry id, or None for nothing."""
    if amount_fen == 0:
        return None
    try:
        entry = await ledger.transfer(
            conn,
            key=key,
            postings=[
                debit(voucher_account(row.id), amount_fen),
                credit(budget_account(row.program, row.year), amount_fen),
            ],
            memo=memo,
            metadata={
                "voucher": row.id,
                "program": row.program,
                "year": row.year,
                "holder": row.holder_entity_id,
                **(metadata or {}),
            },
        )
    except Refusal as refused:
        # impossible under the account lock; never let the refusal be committed under this key
        raise AssertionError(f"returning {amount_fen} fen from voucher {row.id} was refused: {refused}") from refused
    assert not entry.replayed, f"{key} was posted before, yet voucher {row.id} had not ended"
    return entry.id


async def _end(
    conn: AsyncConnection,
    ledger: Ledger,
    row: Any,
    *,
    status: Literal["expired", "revoked"],
    reason: str,
    now: datetime,
    grounds: Grounds | None = None,
    sanction_id: str | None = None,
) -> tuple[int, int | None]:
    """End an active voucher whose row the caller has locked: return what is available to the budget
    (holds in flight stay reserved), record the status (and, for a revocation, its grounds, which the
    ledger entry's metadata carries with the sanction it brought). Returns (fen returned, ledger entry id)."""
    assert (grounds is not None) == (status == "revoked")
    assert row.status == "active"
    balance = await _locked_balance(conn, ledger, row.id)
    amount = balance.available_fen
    key = f"expire:{row.id}" if status == "expired" else f"revoke:{row.id}"
    entry_id = await _return_to_budget(
        conn,
        ledger,
        row,
        amount,
        key=key,
        memo=f"voucher {row.id} {status}: unspent value returns to the budget",
        metadata=None if grounds is None else {"grounds": grounds, "sanction": sanction_id},
    )
    await conn.execute(
        text(
            "UPDATE voucher SET status = :s, released_fen = released_fen + :a, ended_at = :now, end_reason = :r, "
            "awaiting_holds = :held, revocation_grounds = :g WHERE id = :id AND status = 'active'"
        ),
        {
            "s": status,
            "a": amount,
            "now": now,
            "r": reason,
            "held": balance.debits_pending_fen > 0,
            "g": grounds,
            "id": row.id,
        },
    )
    return amount, entry_id


def _refuse_if_ended(row: Any, now: datetime) -> None:
    status = _effective_status(row, now)
    if status == "revoked":
        raise VoucherRevoked(f"voucher {row.id} was revoked at {row.ended_at.isoformat()}")
    if status == "expired":
        raise VoucherExpired(f"voucher {row.id} expired at {row.expires_at.isoformat()}")


async def revoke(
    conn: AsyncConnection,
    ledger: Ledger,
    *,
    voucher_id: str,
    reason: str | None,
    grounds: Grounds,
    actor: str | None,
    sanction_years: int,
    now: datetime,
) -> Voucher:
    """Revoke an active voucher: its available value returns to the program budget at once, holds in flight
    stay reserved (see the module docstring). Administrative grounds give the holder's cap room back by
    what was returned; misconduct keeps the whole face value used and sanctions the holder (art. 25)."""
    row = await _locked_row(conn, voucher_id)
    if row is None:
        raise VoucherNotFound(f"no voucher {voucher_id}")
    _refuse_if_ended(row, now)
    why = reason or "revoked by an administrator"
    sanction_id = None
    if grounds == "misconduct":
        sanction = await sanctions.impose(
            conn,
            entity_id=row.holder_entity_id,
            reason=why,
            source_kind="voucher",
            source_id=voucher_id,
            years=sanction_years,
            actor=actor,
            now=now,
        )
        sanction_id = sanction.id
        await sanctions.mark_voucher(conn, voucher_id, sanction.id)
    await _end(conn, ledger, row, status="revoked", reason=why, now=now, grounds=grounds, sanction_id=sanction_id)
    return await get_voucher(conn, ledger, voucher_id, now=now)


async def _expire_one(ledger: Ledger, voucher_id: str, now: datetime, conn: AsyncConnection) -> bool:
    row = await _locked_row(conn, voucher_id)
    # re-checked under the lock: another sweeper, a revocation or a reversal may have ended it meanwhile
    if row is None or row.status != "active" or row.expires_at > now:
        return False
    await _end(conn, ledger, row, status="expired", reason="expired at the end of its validity", now=now)
    return True


async def expire_due_vouchers(
    engine: AsyncEngine, ledger: Ledger, now: datetime, *, limit: int = SWEEP_BATCH
) -> list[str]:
    """Expire active vouchers whose `expires_at` is at or before `now` (POLICY.md, Expiry), each in a
    transaction of its own, oldest expiry first, at most `limit` a call; returns the ids this call
    expired. Any number of sweepers may run at once: each voucher is expired exactly once."""
    async with engine.connect() as conn:
        due = (
            await conn.execute(
                text(
                    "SELECT id FROM voucher WHERE status = 'active' AND expires_at <= :now "
                    "ORDER BY expires_at, id LIMIT :n"
                ),
                {"now": now, "n": limit},
            )
        ).all()
    expired = []
    for (voucher_id,) in due:
        if await run_in_transaction(engine, functools.partial(_expire_one, ledger, voucher_id, now)):
            expired.append(voucher_id)
    return expired


async def _return_one(ledger: Ledger, voucher_id: str, conn: AsyncConnection) -> int:
    row = (
        await conn.execute(
            text(f"SELECT {_COLUMNS} {_FROM} WHERE v.id = :id AND v.awaiting_holds FOR UPDATE OF v"),
            {"id": voucher_id},
        )
    ).first()
    if row is None:
        return 0
    balance = await _locked_balance(conn, ledger, voucher_id)
    amount = balance.available_fen
    # released_fen only grows, so it names this step uniquely: a retry of the same step replays nothing twice
    await _return_to_budget(
        conn,
        ledger,
        row,
        amount,
        key=f"{row.status}:{voucher_id}:after:{row.released_fen}",
        memo=f"voucher {voucher_id} {row.status}: a hold in flight at its end gave value back",
    )
    await conn.execute(
        text("UPDATE voucher SET released_fen = released_fen + :a, awaiting_holds = :held WHERE id = :id"),
        {"a": amount, "held": balance.debits_pending_fen > 0, "id": voucher_id},
    )
    return amount


async def return_released_holds(engine: AsyncEngine, ledger: Ledger, *, limit: int = SWEEP_BATCH) -> int:
    """For ended vouchers that had holds in flight: return to the budget what a voided, expired or partly
    captured hold gave back to the voucher, and stop watching once no hold is left. Returns the fen moved."""
    async with engine.connect() as conn:
        waiting = (
            await conn.execute(text("SELECT id FROM voucher WHERE awaiting_holds ORDER BY id LIMIT :n"), {"n": limit})
        ).all()
    total = 0
    for (voucher_id,) in waiting:
        total += await run_in_transaction(engine, functools.partial(_return_one, ledger, voucher_id))
    return total


async def return_value(
    conn: AsyncConnection,
    ledger: Ledger,
    *,
    voucher_id: str,
    debit_account: str,
    amount_fen: int,
    key: str,
    memo: str,
    metadata: dict[str, Any],
    now: datetime,
) -> int:
    """Give `amount_fen` of a voucher's spent value back from `debit_account` (a provider's payable after a
    refund, the clawback account after a recovery): to the voucher while it can still be spent, else to its
    program budget, counted as released. A voucher on which misconduct was found gets nothing back: the
    value goes to the budget (art. 25; the holder is not handed back what it misused). Locks the voucher row
    as ending it does. The entry id."""
    voucher = (
        await conn.execute(
            text(
                "SELECT id, program, year, status, expires_at, misconduct_sanction_id FROM voucher "
                "WHERE id = :id FOR UPDATE"
            ),
            {"id": voucher_id},
        )
    ).one()
    active = voucher.status == "active" and voucher.expires_at > now and voucher.misconduct_sanction_id is None
    target = voucher_account(voucher.id) if active else budget_account(voucher.program, voucher.year)
    entry = await ledger.transfer(
        conn,
        key=key,
        postings=[debit(debit_account, amount_fen), credit(target, amount_fen)],
        memo=memo,
        metadata=metadata,
    )
    if not active:
        await conn.execute(
            text("UPDATE voucher SET released_fen = released_fen + :a WHERE id = :id"),
            {"a": amount_fen, "id": voucher.id},
        )
    return entry.id


# -- reversing an award --------------------------------------------------------------------------------


async def application_program(conn: AsyncConnection, application_id: str) -> tuple[str, int] | None:
    """(program, year) of an application, to decide who may act on it; None when there is none."""
    row = (
        await conn.execute(text("SELECT program, year FROM application WHERE id = :id"), {"id": application_id})
    ).first()
    return None if row is None else (row.program, row.year)


async def reverse_award(
    conn: AsyncConnection,
    ledger: Ledger,
    *,
    application_id: str,
    reason: str,
    grounds: Grounds,
    actor: str,
    sanction_years: int,
    now: datetime,
) -> Reversal:
    """Reverse an issued award (clawback; 就高 is explicit, art. 25): a voucher is revoked (its unspent value
    returns to the budget) and refused when any of its value was redeemed or is held at a provider, since
    that value must first be clawed back from the providers; a payout not yet settled is undone by a
    compensating ledger entry (payable -> budget), a settled one is booked as owed back by the beneficiary
    (vouchers/recovery.py). The application becomes `reversed`. On administrative grounds its basis documents
    are released, so each may support another award (就高), and the cap room comes back; on misconduct the
    documents stay claimed for good, the cap room stays used and the applicant is sanctioned (art. 25).
    Both the award and its reversal stay in the journal, the reversal's entry naming grounds and sanction."""
    application = (
        await conn.execute(
            text(
                "SELECT id, program, year, applicant_entity_id, status, award_fen FROM application "
                "WHERE id = :id FOR UPDATE"
            ),
            {"id": application_id},
        )
    ).first()
    if application is None:
        raise ApplicationNotFound(f"no application {application_id}")
    if application.status != "issued":
        raise AwardNotReversible(
            f"application {application_id} is {application.status}: only an issued award is reversed"
        )
    voucher_row = (
        await conn.execute(
            text(f"SELECT {_COLUMNS} {_FROM} WHERE v.application_id = :id FOR UPDATE OF v"), {"id": application_id}
        )
    ).first()
    memo = f"award {application_id} reversed ({grounds}): {reason}"[:500]
    voucher: Voucher | None = None
    entry_id: int | None = None
    sanction: Sanction | None = None
    if voucher_row is not None:
        current = _voucher(voucher_row, await _locked_balance(conn, ledger, voucher_row.id), now)
        if current.redeemed_fen or current.held_fen:
            raise AwardNotReversible(
                f"voucher {voucher_row.id} has {current.redeemed_fen} fen redeemed and {current.held_fen} fen held at "
                "providers: that value is clawed back from the providers first (reverse the redemptions, let the "
                "holds end), then the award can be reversed"
            )
    if grounds == "misconduct":
        sanction = await sanctions.impose(
            conn,
            entity_id=application.applicant_entity_id,
            reason=reason,
            source_kind="application",
            source_id=application_id,
            years=sanction_years,
            actor=actor,
            now=now,
        )
    sanction_id = None if sanction is None else sanction.id
    if voucher_row is not None:
        kind: Literal["voucher", "payout"] = "voucher"
        award_id = voucher_row.id
        if sanction is not None:
            await sanctions.mark_voucher(conn, voucher_row.id, sanction.id)
        returned = 0
        if voucher_row.status == "active":
            # a voucher past its expiry that the sweep has not reached is expired here, as the sweep would
            status: Literal["expired", "revoked"] = "expired" if voucher_row.expires_at <= now else "revoked"
            returned, entry_id = await _end(
                conn,
                ledger,
                voucher_row,
                status=status,
                reason=f"award reversed: {reason}" if status == "revoked" else "expired at the end of its validity",
                now=now,
                grounds=grounds if status == "revoked" else None,
                sanction_id=sanction_id if status == "revoked" else None,
            )
    else:
        # locked as a settlement locks it: the payout is reversed either before it is paid or after
        payout = (
            await conn.execute(
                text(
                    "SELECT id, beneficiary_entity_id, amount_fen, entry_id, settlement_id FROM payout "
                    "WHERE application_id = :id FOR UPDATE"
                ),
                {"id": application_id},
            )
        ).first()
        assert payout is not None, f"issued application {application_id} has a voucher or a payout"
        kind, award_id = "payout", payout.id
        if payout.settlement_id is None:
            returned = int(payout.amount_fen)
            try:
                entry = await ledger.reverse(
                    conn,
                    key=f"reverse:{application_id}",
                    entry_id=int(payout.entry_id),
                    memo=memo,
                    metadata={
                        "application": application_id,
                        "payout": payout.id,
                        "actor": actor,
                        "grounds": grounds,
                        "sanction": sanction_id,
                    },
                )
            except AlreadyReversed as refused:
                raise AwardNotReversible(f"payout {payout.id}'s issuing entry was already reversed") from refused
            entry_id = entry.id
        else:
            # paid out already: the beneficiary owes it back, and the budget regains it only as it is recovered
            returned = 0
            entry_id = await recovery.book_receivable(
                conn,
                ledger,
                debtor_entity_id=payout.beneficiary_entity_id,
                amount_fen=int(payout.amount_fen),
                program=application.program,
                year=application.year,
                reason=reason,
                key=f"reverse:{application_id}",
                payout_id=payout.id,
                metadata={"application": application_id, "grounds": grounds, "sanction": sanction_id},
            )
        await conn.execute(text("UPDATE payout SET reversed_at = now() WHERE id = :id"), {"id": payout.id})
    reversed_at = (
        await conn.execute(
            text(
                "UPDATE application SET status = 'reversed', reversed_at = now(), reversed_by = :by, "
                "reversal_reason = :r, reversal_grounds = :g, sanction_id = :s, updated_at = now() "
                "WHERE id = :id RETURNING reversed_at"
            ),
            {"by": actor, "r": reason, "g": grounds, "s": sanction_id, "id": application_id},
        )
    ).scalar_one()
    released: list[str] = []
    kept: list[str] = []
    if grounds == "administrative":
        released = list(
            (
                await conn.execute(
                    text(
                        "UPDATE basis_claim SET released_at = now() WHERE application_id = :id "
                        "AND released_at IS NULL RETURNING document"
                    ),
                    {"id": application_id},
                )
            ).scalars()
        )
    else:
        # misconduct: the documents stay claimed for ever, so the same papers never earn an award again
        kept = list(
            (
                await conn.execute(
                    text("SELECT document FROM basis_claim WHERE application_id = :id AND released_at IS NULL"),
                    {"id": application_id},
                )
            ).scalars()
        )
    if voucher_row is not None:
        voucher = await get_voucher(conn, ledger, voucher_row.id, now=now)
    return Reversal(
        application_id=application_id,
        program=application.program,
        holder_entity_id=application.applicant_entity_id,
        year=application.year,
        kind=kind,
        award_id=award_id,
        award_fen=int(application.award_fen),
        returned_fen=returned,
        entry_id=entry_id,
        reason=reason,
        reversed_at=reversed_at,
        released_documents=tuple(sorted(released)),
        voucher=voucher,
        grounds=grounds,
        kept_documents=tuple(sorted(kept)),
        sanction=sanction,
    )


__all__ = [
    "AwardNotReversible",
    "ProgramBalance",
    "Reversal",
    "Voucher",
    "VoucherExpired",
    "VoucherNotFound",
    "VoucherRevoked",
    "VoucherStatus",
    "application_program",
    "entity_balances",
    "expire_due_vouchers",
    "get_voucher",
    "list_vouchers",
    "return_released_holds",
    "return_value",
    "reverse_award",
    "revoke",
    "voucher_account",
]
