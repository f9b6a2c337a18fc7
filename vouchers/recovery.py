"""What a payee owes back after settlement (API.md, "Money after settlement").

Once a settlement has paid a redemption or a payout, the money is with the payee: clawing it back cannot
give the voucher or the budget its value again, or the same fen would be paid twice. So a clawback of a
settled redemption (or the reversal of a settled payout) books a receivable instead:

    debit  provider:{debtor}:receivable   (what the payee owes; limit credits_must_not_exceed_debits, so
                                           no more is ever recovered than was owed)
    credit treasury:clawback              (value clawed back, owed to vouchers and budgets once recovered)

and records a `recovery` row. The next settlement of the payee nets what it owes from what is payable to it
(vouchers/settlements.py), and only what was recovered flows back, oldest recovery first, from
`treasury:clawback` to the voucher (or to its program budget once the voucher has ended, or to the budget
for a payout). Invariant: for every voucher, what was settled for it minus what was recovered never
exceeds its face value.

Nothing here commits: the caller owns the transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger.errors import AccountNotFound
from ledger.postings import credit, debit
from ledger.service import Ledger
from vouchers.applications import new_id

CLAWBACK_ACCOUNT = "treasury:clawback"


def receivable_account(entity_id: str) -> str:
    """API.md names it for providers; a payout's beneficiary owes back on an account of the same name."""
    return f"provider:{entity_id}:receivable"


@dataclass(frozen=True, slots=True)
class Outstanding:
    """A recovery not yet recovered in full, as read under its row lock."""

    id: str
    voucher_id: str | None
    program: str
    year: int
    owed_fen: int


async def book_receivable(
    conn: AsyncConnection,
    ledger: Ledger,
    *,
    debtor_entity_id: str,
    amount_fen: int,
    program: str,
    year: int,
    reason: str,
    key: str,
    redemption_id: str | None = None,
    payout_id: str | None = None,
    voucher_id: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> int:
    """Book `amount_fen` as owed by `debtor_entity_id` and record the recovery; the ledger entry id.
    `metadata` adds to the entry's (a clawback's grounds and sanction, say)."""
    assert amount_fen > 0 and (redemption_id is None) != (payout_id is None)
    recovery_id = new_id("rcv_")
    await ledger.open_account(conn, receivable_account(debtor_entity_id), limit="credits_must_not_exceed_debits")
    await ledger.open_account(conn, CLAWBACK_ACCOUNT)
    source = f"redemption {redemption_id}" if redemption_id else f"payout {payout_id}"
    entry = await ledger.transfer(
        conn,
        key=key,
        postings=[debit(receivable_account(debtor_entity_id), amount_fen), credit(CLAWBACK_ACCOUNT, amount_fen)],
        memo=f"clawback of settled {source}: {amount_fen} fen owed back by {debtor_entity_id}",
        metadata={
            "recovery": recovery_id,
            "redemption": redemption_id,
            "payout": payout_id,
            "voucher": voucher_id,
            **(metadata or {}),
        },
    )
    await conn.execute(
        text(
            "INSERT INTO recovery (id, debtor_entity_id, redemption_id, payout_id, voucher_id, program, year, "
            "amount_fen, entry_id, reason) VALUES (:id, :debtor, :r, :p, :v, :program, :year, :a, :e, :why)"
        ),
        {
            "id": recovery_id,
            "debtor": debtor_entity_id,
            "r": redemption_id,
            "p": payout_id,
            "v": voucher_id,
            "program": program,
            "year": year,
            "a": amount_fen,
            "e": entry.id,
            "why": reason[:1000],
        },
    )
    return entry.id


async def owed_fen(conn: AsyncConnection, ledger: Ledger, debtor_entity_id: str) -> int:
    """What the debtor owes now, its receivable account locked until the transaction ends (a clawback
    booked meanwhile waits, so what is netted is exactly what was read); 0 when it never owed anything."""
    try:
        return (await ledger.locked_balance(conn, receivable_account(debtor_entity_id))).available_fen
    except AccountNotFound:
        return 0


async def outstanding(conn: AsyncConnection, debtor_entity_id: str) -> list[Outstanding]:
    """The debtor's recoveries not yet recovered in full, oldest first, locked for the caller to settle."""
    rows = await conn.execute(
        text(
            "SELECT id, voucher_id, program, year, amount_fen - recovered_fen AS owed FROM recovery "
            "WHERE debtor_entity_id = :d AND recovered_fen < amount_fen ORDER BY created_at, id FOR UPDATE"
        ),
        {"d": debtor_entity_id},
    )
    return [Outstanding(r.id, r.voucher_id, r.program, int(r.year), int(r.owed)) for r in rows]


async def mark_recovered(conn: AsyncConnection, recovery_id: str, amount_fen: int) -> None:
    await conn.execute(
        text("UPDATE recovery SET recovered_fen = recovered_fen + :a WHERE id = :id"),
        {"a": amount_fen, "id": recovery_id},
    )


def allocate(recovered_fen: int, owed: Sequence[Outstanding]) -> list[tuple[Outstanding, int]]:
    """Spread what was recovered over the recoveries, oldest first; each gets at most what it is owed."""
    assert 0 <= recovered_fen <= sum(o.owed_fen for o in owed)
    shares = []
    left = recovered_fen
    for item in owed:
        if left == 0:
            break
        share = min(left, item.owed_fen)
        shares.append((item, share))
        left -= share
    return shares
