"""免申即享 (art. 19): an entity tagged `innovation_team` receives its compute voucher without applying.

When an entity is tagged, and on every pass of the background loop while it is tagged, its compute
entitlement for the current program year is worked out from the sales providers reported to it in the
previous year (only those not already supporting an award), by the same rule as any application. When that
is owed something, an application is created on its behalf and approved in the same transaction, so an
automatic grant is all or nothing and never leaves a half-made application behind. Reported sales that
arrive later top the voucher up on a later pass; invoices already supporting an award are never counted
twice. An advisory lock per entity-year keeps two processes from granting at once.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger.service import Ledger
from vouchers import sanctions
from vouchers.applications import AffiliationChecker, Issued, approve, build_context, parse_basis, submit
from vouchers.catalog import Catalog
from vouchers.evaluation import evaluate
from vouchers.locking import try_lock
from vouchers.rules import program_year

log = logging.getLogger(__name__)

PROGRAM = "compute.purchase"


def automatic_tags(catalog: Catalog) -> frozenset[str]:
    """Tags that make an entity an automatic beneficiary in any version of the compute program."""
    return frozenset(tag for d in catalog.definitions if d.code == PROGRAM for tag in d.automatic_for_tags)


async def tagged_entities(conn: AsyncConnection, catalog: Catalog, year: int) -> list[str]:
    """Entities whose tags make them automatic beneficiaries of the compute program this year."""
    program = catalog.for_year(PROGRAM, year)
    if not program.automatic_for_tags:
        return []
    rows = await conn.execute(
        text("SELECT id FROM entity WHERE tags && CAST(:tags AS text[]) ORDER BY id"),
        {"tags": list(program.automatic_for_tags)},
    )
    return list(rows.scalars())


async def _reported_basis(conn: AsyncConnection, entity_id: str, year: int) -> dict[str, Any] | None:
    rows = (
        await conn.execute(
            text(
                "SELECT p.provider_entity_id, p.invoice_no, p.category, p.amount_fen, p.purchased_on FROM purchase p "
                "WHERE p.buyer_entity_id = :e AND p.purchased_on >= make_date(:y - 1, 1, 1) "
                "AND p.purchased_on < make_date(:y, 1, 1) AND NOT EXISTS (SELECT 1 FROM basis_claim c "
                "WHERE c.released_at IS NULL "
                # bases.document_id, and a `number:` claim of unknown counterparty (migration 0015)
                "AND c.document IN ('doc:' || p.provider_entity_id || ':' || p.invoice_no, 'number:' || p.invoice_no)) "
                "ORDER BY p.purchased_on, p.id LIMIT 500"
            ),
            {"e": entity_id, "y": year},
        )
    ).all()
    if not rows:
        return None
    return {
        "purchases": [
            {
                "provider_entity_id": r.provider_entity_id,
                "invoice_no": r.invoice_no,
                "category": r.category,
                "amount_fen": int(r.amount_fen),
                "purchased_on": r.purchased_on.isoformat(),
            }
            for r in rows
        ]
    }


async def grant(
    conn: AsyncConnection,
    ledger: Ledger,
    catalog: Catalog,
    checker: AffiliationChecker,
    *,
    entity_id: str,
    now: datetime,
) -> Issued | None:
    """Grant (or top up) the entity's compute voucher for the current program year when anything is owed;
    None when nothing is, or another process is granting it right now. The caller commits."""
    year = program_year(now)
    program = catalog.for_year(PROGRAM, year)
    if not await try_lock(conn, f"automatic:{entity_id}:{year}"):
        return None
    sanction = await sanctions.in_force(conn, entity_id, on=sanctions.shanghai_date(now))
    if sanction is not None:
        # art. 25: no new award under any program, the automatic one included
        log.info("免申即享 skips %s: %s", entity_id, sanctions.describe(sanction))
        return None
    basis = await _reported_basis(conn, entity_id, year)
    if basis is None:
        return None
    parsed = parse_basis(PROGRAM, basis)
    owed = evaluate(program, parsed, await build_context(conn, checker, program, parsed, entity_id, year))
    if owed.award_fen <= 0:
        return None
    application = await submit(
        conn,
        catalog,
        checker,
        program=PROGRAM,
        applicant_entity_id=entity_id,
        year=year,
        basis=basis,
        actor=None,
        automatic=True,
    )
    return await approve(
        conn, ledger, catalog, checker, application_id=application.id, award_fen=None, actor="免申即享", now=now
    )
