"""Settlement: what is payable to providers and award beneficiaries, paid out from the ledger in batches.

Redemptions credit a provider's `entity:{id}:payable` from the voucher; payouts credit a beneficiary's
from the budget. A settlement debits each payable account by what it holds and credits
`treasury:disbursed` (no limit) with the sum, in ONE ledger entry per batch: a batch is at most
`SETTLEMENT_ITEMS_MAX` (63) items, because an entry has at most `POSTINGS_MAX` (64) postings and the
credit takes one. A request with more items makes several batches, one `settlement` row (with its
`settlement_item` rows) per entry, all in the caller's transaction.

What is settled is exactly the balance read under the account's row lock (`Ledger.locked_balance`):
payable accounts have no limit, so `ledger_post` never locks them and a redemption may credit one while a
settlement runs. A posting committed after the read is simply not in this settlement and waits for the
next; the settlement never moves more than it read, so it never pays more than was owed when it looked.
Two settlements queue on the same rows (the second reads what the first left: nothing). Postings that
debit a payable (a refund, a payout reversal) after it was settled may take it below zero: that is what
the beneficiary owes back, and a payable at or below zero is not settled.

The sealer folds unlimited accounts' postings into their cached totals with an `UPDATE` of those rows,
which would queue on the row locks taken here, in whatever order it found them: a deadlock waiting to
happen. So a settlement first takes the sealer's advisory lock (waiting for a running batch to commit);
the sealer skips its ticks until the settlement commits, and reads stay exact (they add unsealed postings).

Nothing here commits: the caller owns the transaction.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger.postings import POSTINGS_MAX, Posting, credit, debit
from ledger.service import SEALER_LOCK_ID, Ledger
from vouchers.applications import new_id
from vouchers.errors import VoucherError

DISBURSED_ACCOUNT = "treasury:disbursed"
# one debit per payable account plus the single credit to the disbursement account
SETTLEMENT_ITEMS_MAX = POSTINGS_MAX - 1
# what one request settles at most (and how many entities it may name): bounds the transaction's length
ITEMS_PER_REQUEST_MAX = 500
_PAYABLE = re.compile(r"^entity:(ent_[a-z0-9]{24}):payable$")


class NothingToSettle(VoucherError):
    code = "nothing_to_settle"


class SettlementNotFound(VoucherError):
    code = "not_found"


def payable_account(entity_id: str) -> str:
    return f"entity:{entity_id}:payable"


@dataclass(frozen=True, slots=True)
class SettlementItem:
    entity_id: str
    account: str
    amount_fen: int


@dataclass(frozen=True, slots=True)
class Settlement:
    id: str
    entry_id: int
    total_fen: int
    items: tuple[SettlementItem, ...]
    created_by: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class SettlementRun:
    """What one request settled: its settlements in order (one per ledger entry), and whether more was
    payable than `items_max` allowed (another request settles the rest)."""

    settlements: tuple[Settlement, ...]
    has_more: bool


def batches(items: Sequence[SettlementItem], size: int = SETTLEMENT_ITEMS_MAX) -> list[list[SettlementItem]]:
    """`items` in order, cut into batches of at most `size`: one ledger entry each."""
    assert 1 <= size <= SETTLEMENT_ITEMS_MAX
    return [list(items[start : start + size]) for start in range(0, len(items), size)]


def postings_of(batch: Sequence[SettlementItem]) -> list[Posting]:
    """Each payable account debited by its amount, the disbursement account credited with the sum."""
    assert 1 <= len(batch) <= SETTLEMENT_ITEMS_MAX and all(item.amount_fen > 0 for item in batch)
    total = sum(item.amount_fen for item in batch)
    return [*(debit(item.account, item.amount_fen) for item in batch), credit(DISBURSED_ACCOUNT, total)]


def _settleable_fen(credits_posted: int, debits_posted: int, debits_pending: int) -> int:
    # posted credits less posted debits, less anything a hold is already taking out of the account
    return credits_posted - debits_posted - debits_pending


async def settle(
    conn: AsyncConnection,
    ledger: Ledger,
    *,
    entity_ids: Sequence[str] | None,
    items_max: int,
    actor: str | None,
) -> SettlementRun:
    """Settle every payable account with a positive balance (only those of `entity_ids` when given, at most
    `items_max` of them in account-code order); `NothingToSettle` when there is none (nothing written)."""
    assert 1 <= items_max <= ITEMS_PER_REQUEST_MAX
    await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": SEALER_LOCK_ID})
    if entity_ids is None:
        seen = await ledger.balances(conn, prefix="entity")
    else:
        seen = await ledger.balances(conn, codes=sorted({payable_account(e) for e in entity_ids}))
    candidates = [
        (match.group(1), b.account.code)
        for b in seen
        if (match := _PAYABLE.match(b.account.code))
        and _settleable_fen(b.credits_posted_fen, b.debits_posted_fen, b.debits_pending_fen) > 0
    ]
    registered = await _registered(conn, [entity_id for entity_id, _ in candidates])
    candidates = [(entity_id, code) for entity_id, code in candidates if entity_id in registered]
    has_more = len(candidates) > items_max
    items: list[SettlementItem] = []
    for entity_id, code in candidates[:items_max]:  # code order: every settlement locks rows in one order
        balance = await ledger.locked_balance(conn, code)
        amount = _settleable_fen(balance.credits_posted_fen, balance.debits_posted_fen, balance.debits_pending_fen)
        if amount > 0:
            items.append(SettlementItem(entity_id, code, amount))
    if not items:
        raise NothingToSettle("nothing is payable now" + ("" if entity_ids is None else " to the entities named"))
    await ledger.open_account(conn, DISBURSED_ACCOUNT)
    settlements = []
    for batch in batches(items):
        settlements.append(await _record(conn, ledger, batch, actor))
    return SettlementRun(tuple(settlements), has_more)


async def _registered(conn: AsyncConnection, entity_ids: Sequence[str]) -> set[str]:
    """The ids that name registered entities (settlement items reference them; a payable account of an
    unknown id is left alone rather than failing the whole settlement)."""
    if not entity_ids:
        return set()
    rows = await conn.execute(text("SELECT id FROM entity WHERE id = ANY(:ids)"), {"ids": list(entity_ids)})
    return {row.id for row in rows}


async def _record(
    conn: AsyncConnection, ledger: Ledger, batch: Sequence[SettlementItem], actor: str | None
) -> Settlement:
    settlement_id = new_id("stl_")
    total = sum(item.amount_fen for item in batch)
    entry = await ledger.transfer(
        conn,
        key=f"settlement:{settlement_id}",
        postings=postings_of(batch),
        memo=f"settlement {settlement_id}: {len(batch)} payable account(s) disbursed",
        metadata={"settlement": settlement_id, "items": len(batch), "by": actor},
    )
    created_at = await conn.scalar(
        text(
            "INSERT INTO settlement (id, entry_id, total_fen, items_count, created_by) "
            "VALUES (:id, :entry, :total, :n, :by) RETURNING created_at"
        ),
        {"id": settlement_id, "entry": entry.id, "total": total, "n": len(batch), "by": actor},
    )
    await conn.execute(
        text(
            "INSERT INTO settlement_item (settlement_id, entity_id, account_code, amount_fen) "
            "SELECT :id, e, c, a FROM unnest(CAST(:entities AS text[]), CAST(:codes AS text[]), "
            "CAST(:amounts AS bigint[])) AS u(e, c, a)"
        ),
        {
            "id": settlement_id,
            "entities": [item.entity_id for item in batch],
            "codes": [item.account for item in batch],
            "amounts": [item.amount_fen for item in batch],
        },
    )
    return Settlement(settlement_id, entry.id, total, tuple(batch), actor, created_at)


# -- reads ------------------------------------------------------------------------------------------

_COLUMNS = """
    s.id, s.entry_id, s.total_fen, s.created_by, s.created_at,
    (SELECT json_agg(json_build_array(i.entity_id, i.account_code, i.amount_fen) ORDER BY i.account_code)
       FROM settlement_item i WHERE i.settlement_id = s.id)::text AS items
"""


def _settlement(row: Any) -> Settlement:
    items = tuple(SettlementItem(e, c, int(a)) for e, c, a in json.loads(row.items or "[]"))
    return Settlement(row.id, int(row.entry_id), int(row.total_fen), items, row.created_by, row.created_at)


async def get_settlement(conn: AsyncConnection, settlement_id: str) -> Settlement:
    row = (
        await conn.execute(
            text(f"SELECT {_COLUMNS} FROM settlement s WHERE s.id = :id"),  # noqa: S608 (constants only)
            {"id": settlement_id},
        )
    ).first()
    if row is None:
        raise SettlementNotFound(f"no settlement {settlement_id}")
    return _settlement(row)


async def list_settlements(
    conn: AsyncConnection,
    *,
    after: tuple[datetime, str] | None,
    limit: int,
    entity_id: str | None = None,
) -> list[Settlement]:
    """Settlements oldest first, after the (created_at, id) key; only those paying `entity_id` when given."""
    rows = await conn.execute(
        text(
            f"SELECT {_COLUMNS} FROM settlement s "  # noqa: S608 (constants only)
            "WHERE (CAST(:after_at AS timestamptz) IS NULL "
            "OR (s.created_at, s.id) > (CAST(:after_at AS timestamptz), CAST(:after_id AS text))) "
            "AND (CAST(:entity AS text) IS NULL OR EXISTS (SELECT 1 FROM settlement_item i "
            "WHERE i.settlement_id = s.id AND i.entity_id = :entity)) "
            "ORDER BY s.created_at, s.id LIMIT :n"
        ),
        {
            "after_at": None if after is None else after[0],
            "after_id": None if after is None else after[1],
            "entity": entity_id,
            "n": limit,
        },
    )
    return [_settlement(row) for row in rows]
