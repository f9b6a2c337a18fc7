"""Budgets on the ledger (art. 27).

Each year's appropriation (configuration, at most 500,000,000 元) is moved from the fiscal authority into
`treasury:{year}:appropriation`, which funds each `program:{code}:{year}:budget`. Both carry the limit
`debits_must_not_exceed_credits`, so the ledger itself refuses to allocate more than the appropriation or
to issue more than a budget holds. Issuing draws from the program budget; expiry, revocation and clawback
return to it. Setting a budget moves the difference between the old and the new figure; shrinking stops at
what is already committed (issued and not returned), because the budget account cannot go below zero.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger.errors import LimitExceeded
from ledger.postings import Metadata, credit, debit
from ledger.service import Ledger
from vouchers.catalog import Catalog
from vouchers.errors import VoucherError
from vouchers.locking import lock


class AppropriationExceeded(VoucherError):
    """The program budgets of a year would exceed that year's appropriation."""

    code = "appropriation_exceeded"


class BudgetBelowCommitted(VoucherError):
    """A budget cannot shrink below what it has already committed."""

    code = "budget_below_committed"


def authority_account(year: int) -> str:
    return f"treasury:{year}:authority"


def appropriation_account(year: int) -> str:
    return f"treasury:{year}:appropriation"


def budget_account(code: str, year: int) -> str:
    return f"program:{code}:{year}:budget"


@dataclass(frozen=True, slots=True)
class BudgetState:
    program: str
    year: int
    budget_fen: int
    committed_fen: int
    available_fen: int


async def ensure_appropriation(conn: AsyncConnection, ledger: Ledger, year: int, amount_fen: int) -> None:
    """Fund `year`'s appropriation account with `amount_fen` (or move it to that figure if the
    configuration changed); shrinking stops at what the program budgets already hold."""
    await lock(conn, f"appropriation:{year}")
    await ledger.open_account(conn, authority_account(year))
    await ledger.open_account(conn, appropriation_account(year), limit="debits_must_not_exceed_credits")
    current = await conn.scalar(text("SELECT amount_fen FROM appropriation WHERE year = :y"), {"y": year}) or 0
    delta = amount_fen - int(current)
    if delta == 0:
        return
    key = f"appropriation:{year}:{uuid.uuid4()}"
    source, target = (authority_account(year), appropriation_account(year))
    if delta < 0:
        source, target = target, source
    try:
        await ledger.transfer(
            conn,
            key=key,
            postings=[debit(source, abs(delta)), credit(target, abs(delta))],
            memo=f"appropriation {year} set to {amount_fen} fen (art. 27)",
            metadata={"year": year, "appropriation_fen": amount_fen},
        )
    except LimitExceeded as refused:
        raise AppropriationExceeded(
            f"the {year} appropriation cannot shrink to {amount_fen} fen: program budgets hold more"
        ) from refused
    await conn.execute(
        text(
            "INSERT INTO appropriation (year, amount_fen) VALUES (:y, :a) "
            "ON CONFLICT (year) DO UPDATE SET amount_fen = excluded.amount_fen, updated_at = now()"
        ),
        {"y": year, "a": amount_fen},
    )


async def budget_state(conn: AsyncConnection, ledger: Ledger, code: str, year: int) -> BudgetState:
    budget_fen = int(
        await conn.scalar(
            text("SELECT budget_fen FROM program_budget WHERE code = :c AND year = :y"), {"c": code, "y": year}
        )
        or 0
    )
    balances = await ledger.balances(conn, codes=[budget_account(code, year)])
    available_fen = balances[0].available_fen if balances else 0
    return BudgetState(code, year, budget_fen, budget_fen - available_fen, available_fen)


async def set_budget(
    conn: AsyncConnection,
    ledger: Ledger,
    catalog: Catalog,
    *,
    code: str,
    year: int,
    amount_fen: int,
    appropriation_fen: int,
    actor: str,
) -> BudgetState:
    """Set the program-year budget to `amount_fen`, drawing from (or returning to) the appropriation."""
    catalog.for_year(code, year)  # unknown program or year outside the term (art. 28): refused here
    await ensure_appropriation(conn, ledger, year, appropriation_fen)
    await lock(conn, f"budget:{code}:{year}")
    await ledger.open_account(conn, budget_account(code, year), limit="debits_must_not_exceed_credits")
    state = await budget_state(conn, ledger, code, year)
    delta = amount_fen - state.budget_fen
    if delta != 0:
        source, target = appropriation_account(year), budget_account(code, year)
        if delta < 0:
            source, target = target, source
        try:
            await ledger.transfer(
                conn,
                key=f"budget:{code}:{year}:{uuid.uuid4()}",
                postings=[debit(source, abs(delta)), credit(target, abs(delta))],
                memo=f"{code} {year} budget set to {amount_fen} fen",
                metadata={"program": code, "year": year, "budget_fen": amount_fen, "actor": actor},
            )
        except LimitExceeded as refused:
            if delta > 0:
                raise AppropriationExceeded(
                    f"{year}'s appropriation of {appropriation_fen} fen cannot fund {delta} fen more for {code}"
                ) from refused
            raise BudgetBelowCommitted(
                f"{code} {year} has committed {state.committed_fen} fen: its budget cannot go below that"
            ) from refused
        await conn.execute(
            text(
                "INSERT INTO program_budget (code, year, budget_fen) VALUES (:c, :y, :b) "
                "ON CONFLICT (code, year) DO UPDATE SET budget_fen = excluded.budget_fen, updated_at = now()"
            ),
            {"c": code, "y": year, "b": amount_fen},
        )
    return await budget_state(conn, ledger, code, year)


def external_awards_account(year: int) -> str:
    """What the city paid in `year` under articles other than 8-11, recorded as external awards (art. 27)."""
    return f"treasury:{year}:external_awards"


async def draw_appropriation(
    conn: AsyncConnection,
    ledger: Ledger,
    *,
    year: int,
    amount_fen: int,
    appropriation_fen: int,
    key: str,
    memo: str,
    metadata: Metadata,
) -> int:
    """Draw `amount_fen` from `year`'s appropriation for support paid under another article, as a budget is
    funded: the appropriation account's limit refuses a draw beyond what the program budgets and earlier
    draws left (art. 27 covers all 28 articles). The ledger entry id; its reversal returns the draw."""
    await ensure_appropriation(conn, ledger, year, appropriation_fen)
    await ledger.open_account(conn, external_awards_account(year))
    try:
        entry = await ledger.transfer(
            conn,
            key=key,
            postings=[
                debit(appropriation_account(year), amount_fen),
                credit(external_awards_account(year), amount_fen),
            ],
            memo=memo,
            metadata=metadata,
        )
    except LimitExceeded as refused:
        raise AppropriationExceeded(
            f"{year}'s appropriation of {appropriation_fen} fen cannot pay {amount_fen} fen more: with the program "
            "budgets and the other awards drawn on it, it would be exceeded (art. 27)"
        ) from refused
    return entry.id
