"""Public notice (公示): an approved award in a program with a notice period waits, listed publicly, until the
period ends; an objection holds it until an administrator resolves it (POLICY.md, "Public notice").

Through the notice the award's budget is a hold on the ledger (budget -> the voucher's or payable account,
pending), so that caps, budgets and yearly limits were settled at approval and nothing else can take the
money. When the period ends with no open objection the hold is posted and the voucher or payout issued; an
upheld objection voids the hold, releases the basis documents and rejects the application, and so does a
sanction imposed on the applicant during the notice (no new award while one is in force, art. 25).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger.errors import LimitExceeded, PendingExpired, PendingResolved
from ledger.postings import credit, debit
from ledger.service import Ledger, run_in_transaction
from vouchers.applications import (
    ApplicationNotPending,
    BudgetExhausted,
    Issued,
    get,
    new_id,
    open_target,
    parse_basis,
    record_issue,
)
from vouchers.budgets import budget_account
from vouchers.catalog import Catalog
from vouchers.errors import VoucherError
from vouchers.sanctions import EntitySanctioned, refuse_if_sanctioned

log = logging.getLogger(__name__)


class ObjectionNotFound(VoucherError):
    code = "not_found"


class ObjectionResolved(VoucherError):
    code = "conflict"


@dataclass(frozen=True, slots=True)
class Objection:
    id: str
    application_id: str
    reason: str
    status: str
    note: str | None
    created_at: datetime
    resolved_at: datetime | None


@dataclass(frozen=True, slots=True)
class Notice:
    application_id: str
    program: str
    year: int
    beneficiary_entity_id: str
    beneficiary_name: str
    amount_fen: int
    notice_ends_at: datetime
    status: str


async def raise_objection(conn: AsyncConnection, *, application_id: str, reason: str, actor: str) -> Objection:
    application = await get(conn, application_id, for_update=True)
    if application.status not in ("in_notice", "held"):
        raise ApplicationNotPending(f"application {application_id} is not in public notice ({application.status})")
    objection_id = new_id("obj_")
    await conn.execute(
        text("INSERT INTO objection (id, application_id, reason, raised_by) VALUES (:id, :app, :r, :by)"),
        {"id": objection_id, "app": application_id, "r": reason, "by": actor},
    )
    await conn.execute(
        text("UPDATE application SET status = 'held', updated_at = now() WHERE id = :id"), {"id": application_id}
    )
    return await get_objection(conn, objection_id)


_OBJECTION = text(
    "SELECT id, application_id, reason, status, note, created_at, resolved_at FROM objection WHERE id = :id"
)
_OBJECTION_FOR_UPDATE = text(
    "SELECT id, application_id, reason, status, note, created_at, resolved_at FROM objection WHERE id = :id FOR UPDATE"
)


async def get_objection(conn: AsyncConnection, objection_id: str, *, for_update: bool = False) -> Objection:
    query = _OBJECTION_FOR_UPDATE if for_update else _OBJECTION
    row = (await conn.execute(query, {"id": objection_id})).first()
    if row is None:
        raise ObjectionNotFound(f"no objection {objection_id}")
    return Objection(row.id, row.application_id, row.reason, row.status, row.note, row.created_at, row.resolved_at)


async def resolve_objection(
    conn: AsyncConnection,
    ledger: Ledger,
    catalog: Catalog,
    *,
    objection_id: str,
    outcome: Literal["upheld", "dismissed"],
    note: str,
    actor: str,
) -> Objection:
    objection = await get_objection(conn, objection_id)
    application = await get(conn, objection.application_id, for_update=True)  # application first, then objection
    objection = await get_objection(conn, objection_id, for_update=True)
    if objection.status != "open":
        raise ObjectionResolved(f"objection {objection_id} was already {objection.status}")
    await conn.execute(
        text("UPDATE objection SET status = :s, note = :n, resolved_by = :by, resolved_at = now() WHERE id = :id"),
        {"s": outcome, "n": note, "by": actor, "id": objection_id},
    )
    if application.status != "held":
        return await get_objection(conn, objection_id)  # the application was decided already
    if outcome == "upheld":
        await _refuse_in_notice(
            conn,
            ledger,
            application,
            key=f"objection:{application.id}",
            reason=f"objection {objection_id} upheld during public notice: {note}",
        )
        return await get_objection(conn, objection_id)
    still_open = await conn.scalar(
        text("SELECT count(*) FROM objection WHERE application_id = :id AND status = 'open'"), {"id": application.id}
    )
    if not still_open:
        await conn.execute(
            text("UPDATE application SET status = 'in_notice', updated_at = now() WHERE id = :id"),
            {"id": application.id},
        )
        if application.notice_ends_at is not None and application.notice_ends_at <= await _now(conn):
            await issue_from_notice(conn, ledger, catalog, application_id=application.id)
    return await get_objection(conn, objection_id)


async def _refuse_in_notice(conn: AsyncConnection, ledger: Ledger, application: Any, *, key: str, reason: str) -> None:
    """Reject an award still in notice: void its budget hold, free its basis documents, say why."""
    assert application.notice_hold_entry_id is not None
    # a hold that already lapsed reserves nothing any more
    with contextlib.suppress(PendingResolved, PendingExpired):
        await ledger.void_pending(conn, key=key, pending_entry_id=application.notice_hold_entry_id, memo=reason[:500])
    await conn.execute(
        text("UPDATE basis_claim SET released_at = now() WHERE application_id = :id AND released_at IS NULL"),
        {"id": application.id},
    )
    await conn.execute(
        text(
            "UPDATE application SET status = 'rejected', award_fen = NULL, decision_reason = :r, "
            "notice_ends_at = NULL, updated_at = now() WHERE id = :id"
        ),
        {"r": reason, "id": application.id},
    )


async def _now(conn: AsyncConnection) -> datetime:
    now: datetime = await conn.scalar(text("SELECT now()"))
    return now


async def issue_from_notice(
    conn: AsyncConnection, ledger: Ledger, catalog: Catalog, *, application_id: str
) -> Issued | None:
    """Issue an award whose notice ended without an open objection: post its hold (or, if the hold lapsed
    while an objection was being resolved, draw from the budget anew). None when the applicant was
    sanctioned meanwhile: the award is rejected, naming the sanction, and its hold voided."""
    application = await get(conn, application_id, for_update=True)
    if application.status != "in_notice":
        raise ApplicationNotPending(f"application {application_id} is {application.status}, not in notice")
    assert application.award_fen is not None and application.issue_id is not None
    assert application.notice_hold_entry_id is not None
    try:
        await refuse_if_sanctioned(conn, application.applicant_entity_id, now=await _now(conn))
    except EntitySanctioned as sanctioned:
        await _refuse_in_notice(
            conn, ledger, application, key=f"sanctioned:{application_id}", reason=f"not issued: {sanctioned}"
        )
        return None
    program = catalog.version(application.program, application.definition_version)
    try:
        entry = await ledger.post_pending(
            conn, key=f"issue:{application_id}", pending_entry_id=application.notice_hold_entry_id
        )
    except (PendingExpired, PendingResolved):
        target = await open_target(conn, ledger, program, application.applicant_entity_id, application.issue_id)
        try:
            entry = await ledger.transfer(
                conn,
                key=f"issue-after-hold:{application_id}",
                postings=[
                    debit(budget_account(program.code, application.year), application.award_fen),
                    credit(target, application.award_fen),
                ],
                memo=f"{program.code}: issued after the notice of application {application_id}",
            )
        except LimitExceeded as refused:
            raise BudgetExhausted(
                f"the hold of application {application_id} lapsed and the budget can no longer fund it"
            ) from refused
    basis = parse_basis(program.code, application.basis)
    # approved inside its year, issued when the notice ends (perhaps in January): the validity floor runs
    # from this issue, so the voucher is never born expired
    return await record_issue(
        conn,
        program,
        basis,
        application_id,
        application.issue_id,
        application.award_fen,
        entry.id,
        issued_at=await _now(conn),
        min_validity_days=catalog.policy.min_validity_days,
    )


async def issue_due_notices(engine: AsyncEngine, ledger: Ledger, catalog: Catalog, limit: int = 100) -> int:
    """Issue every award whose notice period has ended, each in its own transaction."""
    async with engine.connect() as conn:
        due = (
            (
                await conn.execute(
                    text(
                        "SELECT id FROM application WHERE status = 'in_notice' AND notice_ends_at <= now() "
                        "ORDER BY notice_ends_at LIMIT :n"
                    ),
                    {"n": limit},
                )
            )
            .scalars()
            .all()
        )
    issued = 0
    for application_id in due:
        try:
            if await run_in_transaction(engine, functools.partial(_issue_one, ledger, catalog, application_id)):
                issued += 1
        except ApplicationNotPending:
            pass  # an objection or another sweeper got there first
        except BudgetExhausted:
            log.warning("application %s could not be issued after its notice: budget exhausted", application_id)
    return issued


async def _issue_one(ledger: Ledger, catalog: Catalog, application_id: str, conn: AsyncConnection) -> Issued | None:
    return await issue_from_notice(conn, ledger, catalog, application_id=application_id)


async def list_notices(conn: AsyncConnection, *, after: tuple[datetime, str] | None, limit: int) -> list[Notice]:
    rows = await conn.execute(
        text(
            "SELECT a.id, a.program, a.year, a.applicant_entity_id, e.name, a.award_fen, a.notice_ends_at, a.status "
            "FROM application a JOIN entity e ON e.id = a.applicant_entity_id "
            "WHERE a.status IN ('in_notice', 'held') AND (CAST(:after_at AS timestamptz) IS NULL "
            "OR (a.notice_ends_at, a.id) > (CAST(:after_at AS timestamptz), CAST(:after_id AS text))) "
            "ORDER BY a.notice_ends_at, a.id LIMIT :n"
        ),
        {"after_at": after[0] if after else None, "after_id": after[1] if after else None, "n": limit},
    )
    return [
        Notice(r.id, r.program, r.year, r.applicant_entity_id, r.name, r.award_fen, r.notice_ends_at, r.status)
        for r in rows
    ]


__all__ = [
    "Notice",
    "Objection",
    "issue_due_notices",
    "issue_from_notice",
    "list_notices",
    "raise_objection",
    "resolve_objection",
]
