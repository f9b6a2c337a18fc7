"""Policy work that runs without a request: issuing awards whose public notice ended (公示) and granting
免申即享 compute vouchers (art. 19). Also the affiliation checker every evaluation uses."""

from __future__ import annotations

import logging
import time
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from starlette.datastructures import State

from app.settings import Settings
from vouchers import automatic
from vouchers.affiliation_graph import Thresholds
from vouchers.affiliations import check_affiliation, path_documents
from vouchers.applications import AffiliationChecker
from vouchers.errors import VoucherError
from vouchers.notices import issue_due_notices
from vouchers.rules import program_year

log = logging.getLogger(__name__)


def thresholds_of(settings: Settings) -> Thresholds:
    return Thresholds(
        control_pct=settings.affiliation_control_pct,
        influence_pct=settings.affiliation_influence_pct,
        lookback_months=settings.affiliation_lookback_months,
    )


def affiliation_checker(settings: Settings, session: AsyncSession) -> AffiliationChecker:
    """The affiliation rule (POLICY.md) in `session`, answering the chain of relations when affiliated."""
    thresholds = thresholds_of(settings)

    async def check(_conn: AsyncConnection, a: str, b: str, on: date) -> list[dict[str, Any]] | None:
        answer = await check_affiliation(session, a, b, on, thresholds)
        if not answer.affiliated:
            return None
        return path_documents(answer.path, answer.held_on)

    return check


async def grant_automatic(state: State, entity_id: str) -> bool:
    """免申即享 for one entity, in a transaction of its own; True when a voucher was granted or topped up."""
    async with state.sessionmaker() as session:
        conn = await session.connection()
        try:
            issued = await automatic.grant(
                conn,
                state.ledger,
                state.catalog,
                affiliation_checker(state.settings, session),
                entity_id=entity_id,
                now=datetime.now(UTC),
            )
        except VoucherError as refused:
            # the budget cannot fund it yet, say: nothing is written, and the next pass tries again
            log.warning("免申即享 for %s not granted: %s", entity_id, refused.detail)
            return False
        await session.commit()
    if issued is not None:
        log.info("免申即享: %s granted %s fen to %s", issued.id, issued.amount_fen, entity_id)
    return issued is not None


async def policy_pass(state: State) -> None:
    """One round: issue awards whose notice ended; every `VL_AUTOMATIC_INTERVAL_S`, grant 免申即享 to every
    tagged entity (which also covers the start of each program year while an entity stays tagged)."""
    await issue_due_notices(state.engine, state.ledger, state.catalog)
    now = time.monotonic()
    if now < getattr(state, "next_automatic_pass", 0.0):
        return
    state.next_automatic_pass = now + state.settings.automatic_interval_s
    try:
        async with state.engine.connect() as conn:
            entities = await automatic.tagged_entities(conn, state.catalog, program_year(datetime.now(UTC)))
    except VoucherError:
        return  # a year outside the policy term (art. 28): nothing is granted
    for entity_id in entities:
        await grant_automatic(state, entity_id)
