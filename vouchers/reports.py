"""Reports for the people who answer for the money: a program-year's figures and an entity's statement.

Program report (one program-year, read in one snapshot; the caller runs it under REPEATABLE READ):

    budget      = what the appropriation moved into `program:{code}:{year}:budget` (net)
    issued      = what the budget gave to vouchers and payouts (its other posted debits)
    released    = what came back to the budget (its other posted credits): expiry, revocation, clawback or
                  refund after a voucher ended, payout reversal
    in_notice   = what the budget holds for awards in public notice (its debits pending)
    committed   = issued − released + in_notice
    available   = budget − committed (exactly the budget account's available balance)

and, from the voucher and payout rows with the vouchers' ledger accounts, where the committed money is:

    committed = paid_out + redeemed + held + unspent + returning + in_notice

    paid_out  = payouts whose award stands (not reversed), and reversed payouts that had been settled, less
                what has been recovered from their beneficiaries (vouchers/recovery.py)
    redeemed  = what vouchers paid providers, net of refunds and clawbacks (vouchers.py's definition; a
                clawback after settlement counts once its money is recovered)
    held      = holds in flight at providers against the vouchers
    unspent   = what active vouchers can still spend
    returning = what ended (revoked, expired) vouchers still show on their accounts, on its way back to the
                budget (the expiry sweep or the hold return has not reached it yet)

Awards count applications `issued` (a reversed award is counted apart, and of those the ones reversed for
misconduct); vouchers are counted by status as read (an active voucher past its expiry counts as expired),
with those revoked for misconduct and those on which misconduct was found.

Entity statement: every ledger entry of a calendar year (Asia/Shanghai) that touches the entity's accounts,
`entity:{id}:payable`, `provider:{id}:receivable` (what it owes back after a clawback of settled money,
a negative balance) and `voucher:{id}` of every voucher it holds, one line per (entry, account) in
(created_at, entry id, account) order; `in` is a posted credit, `out` a posted debit, `balance` the
account's posted credits less debits after the line, `pending` what holds reserve on it after the line;
and every sanction decided against the entity (art. 25), so an auditor sees why it receives nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger.service import Ledger
from vouchers import sanctions
from vouchers.budgets import appropriation_account, budget_account
from vouchers.entities import EntityNotFound
from vouchers.recovery import receivable_account
from vouchers.redemption import payable_account
from vouchers.rules import SHANGHAI, year_end
from vouchers.sanctions import Sanction
from vouchers.vouchers import voucher_account


@dataclass(frozen=True, slots=True)
class AwardCounts:
    issued: int
    reversed: int
    in_notice: int
    vouchers: int  # issued awards that are vouchers
    payouts: int  # issued awards that are payouts
    reversed_misconduct: int = 0  # of `reversed`, those reversed for misconduct (art. 25)


@dataclass(frozen=True, slots=True)
class VoucherCounts:
    active: int
    expired: int
    revoked: int
    total: int
    revoked_misconduct: int = 0  # of `revoked`, those revoked for misconduct (art. 25)
    misconduct: int = 0  # vouchers on which misconduct was found (revocation, award or redemption reversal)


@dataclass(frozen=True, slots=True)
class ProgramReport:
    program: str
    year: int
    as_of: datetime
    budget_fen: int
    issued_fen: int
    released_fen: int
    in_notice_fen: int
    committed_fen: int
    available_fen: int
    paid_out_fen: int
    redeemed_fen: int
    held_fen: int
    unspent_fen: int
    returning_fen: int
    awards: AwardCounts
    vouchers: VoucherCounts


_BUDGET_MOVES = text(
    """
    WITH moves AS (
        SELECT p.direction, p.phase, p.amount,
               EXISTS (SELECT 1 FROM ledger_posting q JOIN ledger_account qa ON qa.id = q.account_id
                        WHERE q.entry_id = p.entry_id AND qa.code = :appropriation) AS funding
          FROM ledger_posting p JOIN ledger_account a ON a.id = p.account_id
         WHERE a.code = :budget AND p.phase = 'posted')
    SELECT coalesce(sum(CASE WHEN direction = 'credit' THEN amount ELSE -amount END) FILTER (WHERE funding), 0)
               AS funded,
           coalesce(sum(amount) FILTER (WHERE NOT funding AND direction = 'debit'), 0) AS issued,
           coalesce(sum(amount) FILTER (WHERE NOT funding AND direction = 'credit'), 0) AS returned
      FROM moves
    """
)


async def program_report(
    conn: AsyncConnection, ledger: Ledger, *, program: str, year: int, now: datetime
) -> ProgramReport:
    """The program-year's figures (see the module docstring); the caller has checked program and year."""
    moves = (
        await conn.execute(
            _BUDGET_MOVES, {"budget": budget_account(program, year), "appropriation": appropriation_account(year)}
        )
    ).one()
    budget_balances = await ledger.balances(conn, codes=[budget_account(program, year)])
    in_notice = budget_balances[0].debits_pending_fen if budget_balances else 0
    available = budget_balances[0].available_fen if budget_balances else 0
    budget, issued, released = int(moves.funded), int(moves.issued), int(moves.returned)

    vouchers = (
        await conn.execute(
            text(
                "SELECT id, status, expires_at, face_value_fen, released_fen, revocation_grounds, "
                "misconduct_sanction_id FROM voucher WHERE program = :p AND year = :y"
            ),
            {"p": program, "y": year},
        )
    ).all()
    balances = {
        b.account.code: b
        for b in (await ledger.balances(conn, codes=[voucher_account(v.id) for v in vouchers]) if vouchers else [])
    }
    redeemed = held = unspent = returning = 0
    by_status = {"active": 0, "expired": 0, "revoked": 0}
    for v in vouchers:
        balance = balances[voucher_account(v.id)]
        refunded = balance.credits_posted_fen - int(v.face_value_fen)  # given back to the voucher by providers
        redeemed += balance.debits_posted_fen - int(v.released_fen) - refunded
        held += balance.debits_pending_fen
        status = "expired" if v.status == "active" and v.expires_at <= now else v.status
        by_status[status] += 1
        if status == "active":
            unspent += balance.available_fen
        else:
            returning += balance.available_fen

    payouts = (
        await conn.execute(
            text(
                "SELECT coalesce(sum(p.amount_fen) FILTER (WHERE p.reversed_at IS NULL), 0) "
                "+ coalesce(sum(r.amount_fen - r.recovered_fen), 0) AS paid "
                "FROM payout p LEFT JOIN recovery r ON r.payout_id = p.id WHERE p.program = :p AND p.year = :y"
            ),
            {"p": program, "y": year},
        )
    ).one()
    awards = (
        await conn.execute(
            text(
                "SELECT count(*) FILTER (WHERE a.status = 'issued') AS issued, "
                "count(*) FILTER (WHERE a.status = 'reversed') AS reversed, "
                "count(*) FILTER (WHERE a.reversal_grounds = 'misconduct') AS reversed_misconduct, "
                "count(*) FILTER (WHERE a.status IN ('in_notice', 'held')) AS in_notice, "
                "count(v.id) FILTER (WHERE a.status = 'issued') AS vouchers, "
                "count(p.id) FILTER (WHERE a.status = 'issued') AS payouts "
                "FROM application a LEFT JOIN voucher v ON v.application_id = a.id "
                "LEFT JOIN payout p ON p.application_id = a.id WHERE a.program = :p AND a.year = :y"
            ),
            {"p": program, "y": year},
        )
    ).one()
    return ProgramReport(
        program=program,
        year=year,
        as_of=now,
        budget_fen=budget,
        issued_fen=issued,
        released_fen=released,
        in_notice_fen=in_notice,
        committed_fen=budget - available,
        available_fen=available,
        paid_out_fen=int(payouts.paid),
        redeemed_fen=redeemed,
        held_fen=held,
        unspent_fen=unspent,
        returning_fen=returning,
        awards=AwardCounts(
            issued=int(awards.issued),
            reversed=int(awards.reversed),
            in_notice=int(awards.in_notice),
            vouchers=int(awards.vouchers),
            payouts=int(awards.payouts),
            reversed_misconduct=int(awards.reversed_misconduct),
        ),
        vouchers=VoucherCounts(
            total=len(vouchers),
            revoked_misconduct=sum(1 for v in vouchers if v.revocation_grounds == "misconduct"),
            misconduct=sum(1 for v in vouchers if v.misconduct_sanction_id is not None),
            **by_status,
        ),
    )


# -- the entity statement ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StatementAccount:
    account: str
    voucher_id: str | None  # None: the entity's payable account, or its receivable (negative: what it owes back)
    opening_balance_fen: int  # posted credits less debits at the start of the year
    in_fen: int
    out_fen: int
    closing_balance_fen: int  # at the end of the year (or now, for the current year)
    opening_pending_fen: int
    closing_pending_fen: int


@dataclass(frozen=True, slots=True)
class StatementLine:
    entry_id: int
    created_at: datetime
    kind: str
    memo: str
    account: str
    in_fen: int
    out_fen: int
    balance_fen: int
    pending_change_fen: int
    pending_fen: int


# (created_at, entry id, account code) of the last line of a page
StatementKey = tuple[datetime, int, str]


@dataclass(frozen=True, slots=True)
class Statement:
    entity_id: str
    year: int
    period_from: datetime
    period_to: datetime
    accounts: list[StatementAccount]
    lines: list[StatementLine]  # up to `limit` lines after the cursor
    sanctions: list[Sanction] = field(default_factory=list)  # every sanction decided against it (art. 25)


def year_start(year: int) -> datetime:
    return datetime(year, 1, 1, tzinfo=SHANGHAI)


_ACCOUNTS = """
    acct AS (
        SELECT a.id, a.code FROM ledger_account a
         WHERE a.code IN (:payable, :receivable)
            OR a.code IN (SELECT 'voucher:' || v.id FROM voucher v WHERE v.holder_entity_id = :entity))
"""
_SIGNED = """
    CASE WHEN p.phase <> 'posted' THEN 0 WHEN p.direction = 'credit' THEN p.amount ELSE -p.amount END
"""
_PENDING = """
    CASE p.phase WHEN 'pending' THEN p.amount WHEN 'release' THEN -p.amount ELSE 0 END
"""

_SUMMARY = text(
    f"""
    WITH {_ACCOUNTS}
    SELECT acct.code,
           coalesce(sum({_SIGNED}) FILTER (WHERE e.created_at < :from), 0) AS opening,
           coalesce(sum({_PENDING}) FILTER (WHERE e.created_at < :from), 0) AS opening_pending,
           coalesce(sum(p.amount) FILTER (WHERE e.created_at >= :from AND p.phase = 'posted'
                                            AND p.direction = 'credit'), 0) AS in_fen,
           coalesce(sum(p.amount) FILTER (WHERE e.created_at >= :from AND p.phase = 'posted'
                                            AND p.direction = 'debit'), 0) AS out_fen,
           coalesce(sum({_PENDING}) FILTER (WHERE e.created_at >= :from), 0) AS pending_change,
           count(*) FILTER (WHERE e.created_at >= :from) AS moved
      FROM acct JOIN ledger_posting p ON p.account_id = acct.id JOIN ledger_entry e ON e.id = p.entry_id
     WHERE e.created_at < :to
     GROUP BY acct.code
     ORDER BY acct.code
    """,  # noqa: S608 (constant fragments only; every value is a bound parameter)
)

_OPENING_AT_CURSOR = text(
    f"""
    WITH {_ACCOUNTS}
    SELECT acct.code, coalesce(sum({_SIGNED}), 0) AS balance, coalesce(sum({_PENDING}), 0) AS pending
      FROM acct JOIN ledger_posting p ON p.account_id = acct.id JOIN ledger_entry e ON e.id = p.entry_id
     WHERE (e.created_at, e.id, acct.code) <= (CAST(:at AS timestamptz), CAST(:id AS bigint), CAST(:code AS text))
     GROUP BY acct.code
    """,  # noqa: S608 (constant fragments only; every value is a bound parameter)
)

_LINES = text(
    f"""
    WITH {_ACCOUNTS}
    SELECT e.id AS entry_id, e.created_at, e.kind, e.memo, acct.code,
           coalesce(sum(p.amount) FILTER (WHERE p.phase = 'posted' AND p.direction = 'credit'), 0) AS in_fen,
           coalesce(sum(p.amount) FILTER (WHERE p.phase = 'posted' AND p.direction = 'debit'), 0) AS out_fen,
           coalesce(sum({_PENDING}), 0) AS pending_change
      FROM acct JOIN ledger_posting p ON p.account_id = acct.id JOIN ledger_entry e ON e.id = p.entry_id
     WHERE e.created_at >= :from AND e.created_at < :to
       AND (CAST(:at AS timestamptz) IS NULL
            OR (e.created_at, e.id, acct.code) > (CAST(:at AS timestamptz), CAST(:id AS bigint), CAST(:code AS text)))
     GROUP BY e.id, e.created_at, e.kind, e.memo, acct.code
     ORDER BY e.created_at, e.id, acct.code
     LIMIT :n
    """,  # noqa: S608 (constant fragments only; every value is a bound parameter)
)


def _voucher_id(code: str) -> str | None:
    return code.removeprefix("voucher:") if code.startswith("voucher:") else None


async def statement(
    conn: AsyncConnection, *, entity_id: str, year: int, after: StatementKey | None, limit: int
) -> Statement:
    """The entity's statement for `year` (see the module docstring): the accounts' totals for the year and up
    to `limit` lines after `after`, each with the account's running balance and pending amount."""
    if await conn.scalar(text("SELECT 1 FROM entity WHERE id = :id"), {"id": entity_id}) is None:
        raise EntityNotFound(f"no entity {entity_id}")
    period_from, period_to = year_start(year), year_end(year)
    scope: dict[str, Any] = {
        "payable": payable_account(entity_id),
        "receivable": receivable_account(entity_id),
        "entity": entity_id,
    }
    summary = (await conn.execute(_SUMMARY, {**scope, "from": period_from, "to": period_to})).all()
    accounts = [
        StatementAccount(
            account=row.code,
            voucher_id=_voucher_id(row.code),
            opening_balance_fen=int(row.opening),
            in_fen=int(row.in_fen),
            out_fen=int(row.out_fen),
            closing_balance_fen=int(row.opening) + int(row.in_fen) - int(row.out_fen),
            opening_pending_fen=int(row.opening_pending),
            closing_pending_fen=int(row.opening_pending) + int(row.pending_change),
        )
        for row in summary
        if row.moved or row.opening or row.opening_pending
    ]
    if after is None:
        running = {a.account: (a.opening_balance_fen, a.opening_pending_fen) for a in accounts}
    else:
        at, entry_id, code = after
        running = {
            row.code: (int(row.balance), int(row.pending))
            for row in await conn.execute(_OPENING_AT_CURSOR, {**scope, "at": at, "id": entry_id, "code": code})
        }
    cursor = (
        {"at": None, "id": None, "code": None} if after is None else dict(zip(("at", "id", "code"), after, strict=True))
    )
    rows = await conn.execute(_LINES, {**scope, **cursor, "from": period_from, "to": period_to, "n": limit})
    lines = []
    for row in rows:
        balance, pending = running.get(row.code, (0, 0))
        balance += int(row.in_fen) - int(row.out_fen)
        pending += int(row.pending_change)
        running[row.code] = (balance, pending)
        lines.append(
            StatementLine(
                entry_id=int(row.entry_id),
                created_at=row.created_at,
                kind=row.kind,
                memo=row.memo,
                account=row.code,
                in_fen=int(row.in_fen),
                out_fen=int(row.out_fen),
                balance_fen=balance,
                pending_change_fen=int(row.pending_change),
                pending_fen=pending,
            )
        )
    return Statement(
        entity_id, year, period_from, period_to, accounts, lines, await sanctions.for_entity(conn, entity_id)
    )


__all__ = [
    "AwardCounts",
    "ProgramReport",
    "Statement",
    "StatementAccount",
    "StatementKey",
    "StatementLine",
    "VoucherCounts",
    "program_report",
    "statement",
    "year_start",
]
