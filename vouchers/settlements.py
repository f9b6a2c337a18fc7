"""Settlement: what is payable to providers and award beneficiaries, paid out from the ledger in batches.

Redemptions credit a provider's `entity:{id}:payable` from the voucher; payouts credit a beneficiary's
from the budget. A settlement pays each payee exactly the redemptions and payouts it marks as settled by it
(`redemption.settlement_id`, `payout.settlement_id`), never a balance with no rows behind it: a settled
redemption can no longer be refunded (`redemption_settled`), and clawing it back books a receivable
(vouchers/recovery.py), so no fen of a voucher is paid out twice. What the payee owes back from earlier
clawbacks is netted first: its payable account is debited by what it is owed, its receivable credited by
what that recovers, `treasury:disbursed` (no limit) credited with the rest; the recovered value then flows
from `treasury:clawback` back to the vouchers (or budgets) it was clawed back from, oldest recovery first.

One ledger entry per batch of payees: an entry has at most `POSTINGS_MAX` (64) postings, a payee takes one
or two (its payable, and its receivable when something is recovered) and the disbursement one more. A request
with more payees makes several batches, one `settlement` row (with its `settlement_item` rows) per entry, all
in the caller's transaction.

Locks, in this order: the sealer's advisory lock (the sealer folds unlimited accounts' postings into their
cached totals with an `UPDATE` of those rows, which would queue on the payable rows locked here in another
order), then, payee by payee in id order, its unsettled redemption and payout rows (a refund or an award
reversal holds the same row, so each happens wholly before or wholly after the settlement), its payable
account and its receivable account; the vouchers and budgets that recovered value returns to come last.
A redemption committed after its payee's rows were read is not in this settlement and waits for the next.
A settlement never takes a payable account below zero: what an earlier refund after settlement (before
migration 0014) left owing there is netted.

Nothing here commits: the caller owns the transaction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger.postings import POSTINGS_MAX, Posting, credit, debit
from ledger.service import SEALER_LOCK_ID, Ledger
from vouchers import recovery
from vouchers.applications import new_id
from vouchers.budgets import budget_account
from vouchers.errors import VoucherError
from vouchers.vouchers import return_value

DISBURSED_ACCOUNT = "treasury:disbursed"
# the most payees one entry can settle: a payable debit each, plus the single credit to the disbursement account
SETTLEMENT_ITEMS_MAX = POSTINGS_MAX - 1
# what one request settles at most (and how many entities it may name): bounds the transaction's length
ITEMS_PER_REQUEST_MAX = 500


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
    amount_fen: int  # paid out to the payee
    recovered_fen: int = 0  # kept back against what the payee owed from clawbacks after settlement


@dataclass(frozen=True, slots=True)
class Settlement:
    id: str
    entry_id: int
    total_fen: int
    items: tuple[SettlementItem, ...]
    created_by: str | None
    created_at: datetime
    recovered_fen: int = 0


@dataclass(frozen=True, slots=True)
class SettlementRun:
    """What one request settled: its settlements in order (one per ledger entry), and whether more was
    payable than `items_max` allowed (another request settles the rest)."""

    settlements: tuple[Settlement, ...]
    has_more: bool


@dataclass(slots=True)
class _Due:
    """One payee's part of a settlement: its item and the rows it pays."""

    item: SettlementItem
    redemption_ids: list[str] = field(default_factory=list)
    payout_ids: list[str] = field(default_factory=list)


def _postings_per_item(item: SettlementItem) -> int:
    return 2 if item.recovered_fen else 1


def batches(items: Sequence[SettlementItem]) -> list[list[SettlementItem]]:
    """`items` in order, cut so that each batch's entry has at most `POSTINGS_MAX` postings."""
    out: list[list[SettlementItem]] = []
    used = POSTINGS_MAX  # forces a first batch
    for item in items:
        cost = _postings_per_item(item)
        if used + cost > POSTINGS_MAX - 1:  # one posting is kept for the disbursement credit
            out.append([])
            used = 0
        out[-1].append(item)
        used += cost
    return out


def postings_of(batch: Sequence[SettlementItem]) -> list[Posting]:
    """Each payable debited by what it is owed; what that recovers credits the payee's receivable, the rest
    the disbursement account."""
    assert batch and all(item.amount_fen >= 0 and item.amount_fen + item.recovered_fen > 0 for item in batch)
    postings: list[Posting] = []
    for item in batch:
        postings.append(debit(item.account, item.amount_fen + item.recovered_fen))
        if item.recovered_fen:
            postings.append(credit(recovery.receivable_account(item.entity_id), item.recovered_fen))
    paid = sum(item.amount_fen for item in batch)
    if paid:
        postings.append(credit(DISBURSED_ACCOUNT, paid))
    assert len(postings) <= POSTINGS_MAX
    return postings


async def settle(
    conn: AsyncConnection,
    ledger: Ledger,
    *,
    entity_ids: Sequence[str] | None,
    items_max: int,
    actor: str | None,
    now: datetime,
) -> SettlementRun:
    """Settle every payee with unsettled redemptions or payouts (only those of `entity_ids` when given, at
    most `items_max` of them in id order); `NothingToSettle` when there is none (nothing written)."""
    assert 1 <= items_max <= ITEMS_PER_REQUEST_MAX
    await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": SEALER_LOCK_ID})
    payees = await _payees(conn, entity_ids)
    has_more = len(payees) > items_max
    dues = [due for entity_id in payees[:items_max] if (due := await _due(conn, ledger, entity_id)) is not None]
    if not dues:
        raise NothingToSettle("nothing is payable now" + ("" if entity_ids is None else " to the entities named"))
    await ledger.open_account(conn, DISBURSED_ACCOUNT)
    by_entity = {due.item.entity_id: due for due in dues}
    settlements = []
    for batch in batches([due.item for due in dues]):
        settlement = await _record(conn, ledger, batch, actor)
        await _mark_settled(conn, settlement.id, [by_entity[item.entity_id] for item in batch])
        settlements.append(settlement)
    for due in dues:
        if due.item.recovered_fen:
            await _return_recovered(conn, ledger, due.item, now)
    return SettlementRun(tuple(settlements), has_more)


async def _payees(conn: AsyncConnection, entity_ids: Sequence[str] | None) -> list[str]:
    """Entities with a redemption or a payout not yet settled, in id order (the order rows are locked in)."""
    rows = await conn.execute(
        text(
            "SELECT provider_entity_id AS e FROM redemption WHERE settlement_id IS NULL "
            "AND subsidy_fen > refunded_fen AND (CAST(:ids AS text[]) IS NULL OR provider_entity_id = ANY(:ids)) "
            "UNION SELECT beneficiary_entity_id FROM payout WHERE settlement_id IS NULL AND reversed_at IS NULL "
            "AND (CAST(:ids AS text[]) IS NULL OR beneficiary_entity_id = ANY(:ids)) ORDER BY 1"
        ),
        {"ids": None if entity_ids is None else list(entity_ids)},
    )
    return [row.e for row in rows]


async def _due(conn: AsyncConnection, ledger: Ledger, entity_id: str) -> _Due | None:
    """What settling `entity_id` pays and recovers now, its rows and accounts locked; None for nothing."""
    redemptions = (
        await conn.execute(
            text(
                "SELECT id, subsidy_fen - refunded_fen AS net FROM redemption WHERE provider_entity_id = :e "
                "AND settlement_id IS NULL AND subsidy_fen > refunded_fen ORDER BY id FOR UPDATE"
            ),
            {"e": entity_id},
        )
    ).all()
    payouts = (
        await conn.execute(
            text(
                "SELECT id, amount_fen AS net FROM payout WHERE beneficiary_entity_id = :e "
                "AND settlement_id IS NULL AND reversed_at IS NULL ORDER BY id FOR UPDATE"
            ),
            {"e": entity_id},
        )
    ).all()
    earned = sum(int(row.net) for row in (*redemptions, *payouts))
    if earned == 0:
        return None
    code = payable_account(entity_id)
    # read after the rows were locked: every row counted here has its credit in the balance
    balance = await ledger.locked_balance(conn, code)
    held = balance.credits_posted_fen - balance.debits_posted_fen - balance.debits_pending_fen
    due = min(earned, max(held, 0))
    if due == 0:  # a payable left below zero before migration 0014: its rows wait until it is whole again
        return None
    recovered = min(due, await recovery.owed_fen(conn, ledger, entity_id))
    return _Due(
        SettlementItem(entity_id, code, due - recovered, recovered),
        redemption_ids=[row.id for row in redemptions],
        payout_ids=[row.id for row in payouts],
    )


async def _mark_settled(conn: AsyncConnection, settlement_id: str, dues: Sequence[_Due]) -> None:
    redemption_ids = [rid for due in dues for rid in due.redemption_ids]
    payout_ids = [pid for due in dues for pid in due.payout_ids]
    if redemption_ids:
        await conn.execute(
            text(
                "UPDATE redemption SET settlement_id = :s, settled_fen = subsidy_fen - refunded_fen "
                "WHERE id = ANY(:ids)"
            ),
            {"s": settlement_id, "ids": redemption_ids},
        )
    if payout_ids:
        await conn.execute(
            text("UPDATE payout SET settlement_id = :s WHERE id = ANY(:ids)"), {"s": settlement_id, "ids": payout_ids}
        )


async def _return_recovered(conn: AsyncConnection, ledger: Ledger, item: SettlementItem, now: datetime) -> None:
    """What was recovered from the payee goes back where it was clawed back from, oldest recovery first."""
    owed = await recovery.outstanding(conn, item.entity_id)
    for outstanding, amount in recovery.allocate(item.recovered_fen, owed):
        key = f"recovered:{outstanding.id}:{outstanding.owed_fen}"
        memo = f"recovery {outstanding.id}: {amount} fen recovered from {item.entity_id} at settlement"
        metadata = {"recovery": outstanding.id, "voucher": outstanding.voucher_id}
        if outstanding.voucher_id is not None:
            await return_value(
                conn,
                ledger,
                voucher_id=outstanding.voucher_id,
                debit_account=recovery.CLAWBACK_ACCOUNT,
                amount_fen=amount,
                key=key,
                memo=memo,
                metadata=metadata,
                now=now,
            )
        else:
            await ledger.transfer(
                conn,
                key=key,
                postings=[
                    debit(recovery.CLAWBACK_ACCOUNT, amount),
                    credit(budget_account(outstanding.program, outstanding.year), amount),
                ],
                memo=memo,
                metadata=metadata,
            )
        await recovery.mark_recovered(conn, outstanding.id, amount)


async def _record(
    conn: AsyncConnection, ledger: Ledger, batch: Sequence[SettlementItem], actor: str | None
) -> Settlement:
    settlement_id = new_id("stl_")
    total = sum(item.amount_fen for item in batch)
    recovered = sum(item.recovered_fen for item in batch)
    entry = await ledger.transfer(
        conn,
        key=f"settlement:{settlement_id}",
        postings=postings_of(batch),
        memo=f"settlement {settlement_id}: {len(batch)} payable account(s) settled",
        metadata={"settlement": settlement_id, "items": len(batch), "by": actor},
    )
    created_at = await conn.scalar(
        text(
            "INSERT INTO settlement (id, entry_id, total_fen, recovered_fen, items_count, created_by) "
            "VALUES (:id, :entry, :total, :recovered, :n, :by) RETURNING created_at"
        ),
        {"id": settlement_id, "entry": entry.id, "total": total, "recovered": recovered, "n": len(batch), "by": actor},
    )
    await conn.execute(
        text(
            "INSERT INTO settlement_item (settlement_id, entity_id, account_code, amount_fen, recovered_fen) "
            "SELECT :id, e, c, a, r FROM unnest(CAST(:entities AS text[]), CAST(:codes AS text[]), "
            "CAST(:amounts AS bigint[]), CAST(:recovered AS bigint[])) AS u(e, c, a, r)"
        ),
        {
            "id": settlement_id,
            "entities": [item.entity_id for item in batch],
            "codes": [item.account for item in batch],
            "amounts": [item.amount_fen for item in batch],
            "recovered": [item.recovered_fen for item in batch],
        },
    )
    return Settlement(settlement_id, entry.id, total, tuple(batch), actor, created_at, recovered)


# -- reads ------------------------------------------------------------------------------------------

_COLUMNS = """
    s.id, s.entry_id, s.total_fen, s.recovered_fen, s.created_by, s.created_at,
    (SELECT json_agg(json_build_array(i.entity_id, i.account_code, i.amount_fen, i.recovered_fen)
       ORDER BY i.account_code)
       FROM settlement_item i WHERE i.settlement_id = s.id)::text AS items
"""


def _settlement(row: Any) -> Settlement:
    items = tuple(SettlementItem(e, c, int(a), int(r)) for e, c, a, r in json.loads(row.items or "[]"))
    return Settlement(
        row.id, int(row.entry_id), int(row.total_fen), items, row.created_by, row.created_at, int(row.recovered_fen)
    )


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
