"""Redemption: a provider presents a voucher token with an invoice and is paid the program's share of the
eligible lines, at most what the voucher (and the token) still hold, in one balanced entry.

Locks are taken in one order everywhere: the voucher row (FOR SHARE here; revocation and expiry take it FOR
UPDATE), the token row, then the voucher's ledger account; so a redemption and a revocation never both
spend the same fen, and concurrent redemptions of one voucher queue on its account and each sees what the
one before it left (partial redemption, then `voucher_exhausted`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Literal, NamedTuple

import asyncpg
from sqlalchemy import text
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger import driver
from ledger.postings import check_memo_and_metadata, credit, debit
from ledger.service import Ledger
from vouchers import recovery, sanctions
from vouchers.affiliation_graph import Thresholds
from vouchers.affiliations import check_affiliation_at, check_affiliation_cached, path_documents
from vouchers.applications import AffiliationChecker, new_id
from vouchers.catalog import Catalog
from vouchers.errors import VoucherError
from vouchers.keys import KeyRing
from vouchers.programs import ProgramDefinition
from vouchers.rules import SHANGHAI, share_of
from vouchers.sanctions import Grounds
from vouchers.tokens import InvalidToken, VerifiedToken, WrongProvider, verify_token
from vouchers.vouchers import VoucherExpired, VoucherNotFound, VoucherRevoked, return_value, voucher_account


class VoucherExhausted(VoucherError):
    code = "voucher_exhausted"


class AffiliatedParty(VoucherError):
    code = "affiliated_party"

    def __init__(self, detail: str, path: Sequence[Mapping[str, Any]]) -> None:
        super().__init__(detail)
        self.errors = [{"path": list(path)}]


class NotTheVendor(VoucherError):
    code = "wrong_provider"


class NothingEligible(VoucherError):
    code = "nothing_eligible"


class TokenLimitReached(VoucherError):
    code = "token_limit_reached"


class InvoiceAlreadyRedeemed(VoucherError):
    code = "conflict"


class RedemptionNotFound(VoucherError):
    code = "not_found"


class RefundTooLarge(VoucherError):
    code = "conflict"


class RedemptionSettled(VoucherError):
    """The provider was paid for this redemption: it cannot hand value back to the voucher by a refund."""

    code = "redemption_settled"


@dataclass(frozen=True, slots=True)
class Line:
    category: str
    amount_fen: int
    description: str = ""


@dataclass(frozen=True, slots=True)
class Presented:
    """What a verified voucher token says (see vouchers/tokens.py)."""

    jti: str
    voucher_id: str
    holder_entity_id: str
    max_amount_fen: int | None


@dataclass(frozen=True, slots=True)
class Redemption:
    id: str
    voucher_id: str
    provider_entity_id: str
    holder_entity_id: str
    invoice_no: str
    lines: list[dict[str, Any]]
    eligible_fen: int
    subsidy_fen: int
    holder_pays_fen: int
    excluded: list[dict[str, Any]]
    refunded_fen: int
    reversed_at: datetime | None
    hold_id: str | None
    entry_id: int
    created_at: datetime
    settlement_id: str | None = None  # the settlement that paid it; None while it is payable
    settled_fen: int = 0


def payable_account(entity_id: str) -> str:
    return f"entity:{entity_id}:payable"


@dataclass(frozen=True, slots=True)
class _Subsidy:
    eligible_fen: int
    subsidy_fen: int
    excluded: list[dict[str, Any]]


async def _voucher_for_spending(conn: AsyncConnection, voucher_id: str, now: datetime) -> Any:
    row = (
        await conn.execute(
            text(
                "SELECT id, program, year, holder_entity_id, vendor_entity_id, redemption_rate_bp, status, expires_at "
                "FROM voucher WHERE id = :id FOR SHARE"
            ),
            {"id": voucher_id},
        )
    ).first()
    if row is None:
        raise VoucherNotFound(f"no voucher {voucher_id}")
    if row.status == "revoked":
        raise VoucherRevoked(f"voucher {voucher_id} was revoked")
    if row.status == "expired" or row.expires_at <= now:
        raise VoucherExpired(f"voucher {voucher_id} expired at {row.expires_at.isoformat()}")
    return row


async def _check_provider(
    conn: AsyncConnection, catalog: Catalog, checker: AffiliationChecker, voucher: Any, provider: str, now: datetime
) -> Any:
    program = catalog.for_year(voucher.program, voucher.year)
    assert program.redemption is not None, f"{program.code} vouchers are redeemed"
    if (refusal := _vendor_refusal(program, voucher.id, voucher.vendor_entity_id, provider)) is not None:
        raise refusal
    if program.redemption.non_affiliated:
        on: date = now.astimezone(SHANGHAI).date()
        path = await checker(conn, voucher.holder_entity_id, provider, on)
        if path is not None:
            raise _affiliated(provider, voucher.holder_entity_id, on, path)
    return program


def _vendor_refusal(
    program: ProgramDefinition, voucher_id: str, vendor: str | None, provider: str
) -> NotTheVendor | None:
    """art. 11 ¶2: only the vendor named on the application supplies the first purchase."""
    assert program.redemption is not None
    if program.redemption.named_vendor_only and vendor != provider:
        return NotTheVendor(f"voucher {voucher_id} is redeemed only by {vendor}")
    return None


def _affiliated(provider: str, holder: str, on: date, path: Sequence[Mapping[str, Any]]) -> AffiliatedParty:
    return AffiliatedParty(f"provider {provider} is affiliated with the holder {holder} on {on} (arts. 8, 9)", path)


def _nothing_eligible(program: ProgramDefinition, invoice_no: str) -> NothingEligible:
    return NothingEligible(f"no line of invoice {invoice_no} is paid by {program.code}")


def _subsidy(program: Any, rate_bp: int, lines: Sequence[Line]) -> _Subsidy:
    categories = set(program.redemption.categories)
    excluded = [
        {
            "index": i,
            "category": line.category,
            "amount_fen": line.amount_fen,
            "reason": f"{line.category} is not paid by {program.code} (eligible: {', '.join(sorted(categories))})",
        }
        for i, line in enumerate(lines)
        if line.category not in categories
    ]
    eligible = sum(line.amount_fen for line in lines if line.category in categories)
    return _Subsidy(eligible, share_of(eligible, rate_bp), excluded)


async def _token_room(conn: AsyncConnection, presented: Presented) -> int | None:
    """What a narrowed token may still spend, its row locked for this transaction; None for a token with no
    limit, which is neither read nor locked (every redemption of a busy voucher would queue on it)."""
    if presented.max_amount_fen is None:
        return None
    row = (
        await conn.execute(
            text("SELECT max_amount_fen, spent_fen FROM voucher_token WHERE jti = :j FOR UPDATE"), {"j": presented.jti}
        )
    ).one()
    return None if row.max_amount_fen is None else int(row.max_amount_fen) - int(row.spent_fen)


async def redeem(
    conn: AsyncConnection,
    ledger: Ledger,
    catalog: Catalog,
    checker: AffiliationChecker,
    presented: Presented,
    *,
    provider_entity_id: str,
    invoice_no: str,
    lines: Sequence[Line],
    now: datetime,
    hold: Mapping[str, Any] | None = None,
) -> Redemption:
    voucher = await _voucher_for_spending(conn, presented.voucher_id, now)
    program = await _check_provider(conn, catalog, checker, voucher, provider_entity_id, now)
    owed = _subsidy(program, int(voucher.redemption_rate_bp), lines)
    if owed.subsidy_fen == 0:
        raise _nothing_eligible(program, invoice_no)
    room = await _token_room(conn, presented)
    if room is not None and room <= 0:
        raise TokenLimitReached(f"token {presented.jti} has spent its {presented.max_amount_fen} fen")
    if hold is None:
        available = (await ledger.locked_balance(conn, voucher_account(voucher.id))).available_fen
        if available <= 0:
            raise VoucherExhausted(f"voucher {voucher.id} has nothing left")
    else:
        available = int(hold["amount_fen"])  # a capture is capped by its hold, which already reserved it
    subsidy = min(owed.subsidy_fen, available, room if room is not None else owed.subsidy_fen)
    redemption_id = new_id("rdm_")
    await ledger.open_account(conn, payable_account(provider_entity_id))
    memo = f"{program.code}: redemption {redemption_id} of voucher {voucher.id}, invoice {invoice_no}"
    metadata = {"voucher": voucher.id, "provider": provider_entity_id, "invoice": invoice_no}
    if hold is None:
        entry = await ledger.transfer(
            conn,
            key=f"redeem:{redemption_id}",
            postings=[
                debit(voucher_account(voucher.id), subsidy),
                credit(payable_account(provider_entity_id), subsidy),
            ],
            memo=memo,
            metadata=metadata,
        )
    else:
        entry = await ledger.post_pending(
            conn,
            key=f"capture:{hold['id']}",
            pending_entry_id=int(hold["pending_entry_id"]),
            amount_fen=subsidy,
            memo=memo,
            metadata=metadata,
        )
    if room is not None:  # only a limited token keeps count of what it spent
        await conn.execute(
            text("UPDATE voucher_token SET spent_fen = spent_fen + :s WHERE jti = :j"),
            {"s": subsidy, "j": presented.jti},
        )
    total = sum(line.amount_fen for line in lines)
    # the invoice's key decides a twin: no redemption row unless this one claimed the invoice
    inserted = await conn.scalar(
        text(
            "WITH invoice AS (INSERT INTO redemption_invoice (provider_entity_id, invoice_no, redemption_id) "
            "VALUES (:p, :n, :id) ON CONFLICT DO NOTHING RETURNING redemption_id) "
            "INSERT INTO redemption (id, voucher_id, provider_entity_id, jti, hold_id, invoice_no, lines, excluded, "
            "eligible_fen, subsidy_fen, holder_pays_fen, entry_id) SELECT invoice.redemption_id, :v, :p, :j, :h, :n, "
            "CAST(:lines AS jsonb), CAST(:excluded AS jsonb), :e, :s, :hp, :entry FROM invoice RETURNING id"
        ),
        {
            "id": redemption_id,
            "v": voucher.id,
            "p": provider_entity_id,
            "j": presented.jti,
            "h": None if hold is None else hold["id"],
            "n": invoice_no,
            "lines": json.dumps([_line(line) for line in lines]),
            "excluded": json.dumps(owed.excluded),
            "e": owed.eligible_fen,
            "s": subsidy,
            "hp": total - subsidy,
            "entry": entry.id,
        },
    )
    if inserted is None:
        raise InvoiceAlreadyRedeemed(f"invoice {invoice_no} was already redeemed at {provider_entity_id}")
    return await get_redemption(conn, redemption_id)


def _line(line: Line) -> dict[str, Any]:
    return {"category": line.category, "amount_fen": line.amount_fen, "description": line.description}


_COLUMNS = """
    r.id, r.voucher_id, r.provider_entity_id, v.holder_entity_id, r.invoice_no, r.lines::text AS lines,
    r.eligible_fen, r.subsidy_fen, r.holder_pays_fen, r.excluded::text AS excluded, r.refunded_fen, r.reversed_at,
    r.hold_id, r.entry_id, r.created_at, r.settlement_id, r.settled_fen
"""


def _redemption(row: Any) -> Redemption:
    return Redemption(
        id=row.id,
        voucher_id=row.voucher_id,
        provider_entity_id=row.provider_entity_id,
        holder_entity_id=row.holder_entity_id,
        invoice_no=row.invoice_no,
        lines=json.loads(row.lines),
        eligible_fen=int(row.eligible_fen),
        subsidy_fen=int(row.subsidy_fen),
        holder_pays_fen=int(row.holder_pays_fen),
        excluded=json.loads(row.excluded),
        refunded_fen=int(row.refunded_fen),
        reversed_at=row.reversed_at,
        hold_id=row.hold_id,
        entry_id=int(row.entry_id),
        created_at=row.created_at,
        settlement_id=row.settlement_id,
        settled_fen=int(row.settled_fen),
    )


async def get_redemption(conn: AsyncConnection, redemption_id: str, *, for_update: bool = False) -> Redemption:
    query = _REDEMPTION_FOR_UPDATE if for_update else _REDEMPTION
    row = (await conn.execute(query, {"id": redemption_id})).first()
    if row is None:
        raise RedemptionNotFound(f"no redemption {redemption_id}")
    return _redemption(row)


_REDEMPTION = text(f"SELECT {_COLUMNS} FROM redemption r JOIN voucher v ON v.id = r.voucher_id WHERE r.id = :id")
_REDEMPTION_FOR_UPDATE = text(
    f"SELECT {_COLUMNS} FROM redemption r JOIN voucher v ON v.id = r.voucher_id WHERE r.id = :id FOR UPDATE OF r"
)


async def list_redemptions(
    conn: AsyncConnection,
    *,
    after: tuple[datetime, str] | None,
    limit: int,
    provider_entity_id: str | None = None,
    holder_entity_id: str | None = None,
    voucher_id: str | None = None,
) -> list[Redemption]:
    rows = await conn.execute(
        text(
            f"SELECT {_COLUMNS} FROM redemption r JOIN voucher v ON v.id = r.voucher_id "
            "WHERE (CAST(:after_at AS timestamptz) IS NULL "
            "OR (r.created_at, r.id) > (CAST(:after_at AS timestamptz), CAST(:after_id AS text))) "
            "AND (CAST(:provider AS text) IS NULL OR r.provider_entity_id = :provider) "
            "AND (CAST(:holder AS text) IS NULL OR v.holder_entity_id = :holder) "
            "AND (CAST(:voucher AS text) IS NULL OR r.voucher_id = :voucher) "
            "ORDER BY r.created_at, r.id LIMIT :n"
        ),
        {
            "after_at": after[0] if after else None,
            "after_id": after[1] if after else None,
            "provider": provider_entity_id,
            "holder": holder_entity_id,
            "voucher": voucher_id,
            "n": limit,
        },
    )
    return [_redemption(row) for row in rows]


async def give_back(
    conn: AsyncConnection,
    ledger: Ledger,
    redemption: Redemption,
    amount_fen: int,
    *,
    key: str,
    memo: str,
    now: datetime,
    metadata: dict[str, Any] | None = None,
) -> int:
    """Return `amount_fen` of an unsettled redemption's subsidy from the provider's payable account (see
    `vouchers.vouchers.return_value`). The entry id."""
    entry_id = await return_value(
        conn,
        ledger,
        voucher_id=redemption.voucher_id,
        debit_account=payable_account(redemption.provider_entity_id),
        amount_fen=amount_fen,
        key=key,
        memo=memo,
        metadata={"redemption": redemption.id, "voucher": redemption.voucher_id, **(metadata or {})},
        now=now,
    )
    await conn.execute(
        text("UPDATE redemption SET refunded_fen = refunded_fen + :a WHERE id = :id"),
        {"a": amount_fen, "id": redemption.id},
    )
    return entry_id


async def refund(
    conn: AsyncConnection,
    ledger: Ledger,
    *,
    redemption_id: str,
    provider_entity_id: str,
    amount_fen: int | None,
    reason: str,
    now: datetime,
) -> tuple[Redemption, str, int]:
    """The provider that redeemed returns value for work not delivered. (refund id, amount)."""
    redemption = await get_redemption(conn, redemption_id, for_update=True)
    if redemption.provider_entity_id != provider_entity_id:
        raise RedemptionNotFound(f"no redemption {redemption_id}")
    if redemption.settlement_id is not None:
        raise RedemptionSettled(
            f"redemption {redemption_id} was paid to you by settlement {redemption.settlement_id}: a refund would "
            "give the voucher back value you keep; ask the program office to claw it back instead"
        )
    left = redemption.subsidy_fen - redemption.refunded_fen
    amount = left if amount_fen is None else amount_fen
    if amount <= 0 or amount > left:
        raise RefundTooLarge(f"redemption {redemption_id} has {left} fen that can still be returned, not {amount}")
    refund_id = new_id("rfd_")
    entry_id = await give_back(
        conn, ledger, redemption, amount, key=f"refund:{refund_id}", memo=f"refund {refund_id}: {reason}", now=now
    )
    await conn.execute(
        text(
            "INSERT INTO redemption_refund (id, redemption_id, amount_fen, reason, entry_id) "
            "VALUES (:id, :r, :a, :why, :e)"
        ),
        {"id": refund_id, "r": redemption_id, "a": amount, "why": reason, "e": entry_id},
    )
    return await get_redemption(conn, redemption_id), refund_id, amount


async def reverse(
    conn: AsyncConnection,
    ledger: Ledger,
    *,
    redemption_id: str,
    reason: str,
    grounds: Grounds,
    actor: str | None,
    sanction_years: int,
    now: datetime,
) -> Redemption:
    """Clawback by a compensating entry; the redemption is marked reversed with its grounds. Unsettled,
    everything of it not yet refunded goes back from the provider's payable account (to the voucher, or to
    the budget if the voucher has ended). Settled, the provider has the money: what it was paid is booked as
    owed by it and the voucher regains value only as that is recovered (vouchers/recovery.py).

    Misconduct (art. 25): the voucher's holder is sanctioned and the voucher marked, so the clawed-back
    value (now, or as it is recovered) goes to the program budget, never back to the voucher of the entity
    found misusing it, and its face value stays used against the cap."""
    redemption = await get_redemption(conn, redemption_id, for_update=True)
    if redemption.reversed_at is not None:
        raise RefundTooLarge(f"redemption {redemption_id} was already reversed")
    if redemption.settlement_id is None and redemption.subsidy_fen - redemption.refunded_fen <= 0:
        raise RefundTooLarge(f"redemption {redemption_id} was refunded in full already")
    sanction_id = None
    if grounds == "misconduct":
        sanction = await sanctions.impose(
            conn,
            entity_id=redemption.holder_entity_id,
            reason=reason,
            source_kind="redemption",
            source_id=redemption_id,
            years=sanction_years,
            actor=actor,
            now=now,
        )
        sanction_id = sanction.id
        await sanctions.mark_voucher(conn, redemption.voucher_id, sanction.id)
    audit = {"grounds": grounds, "sanction": sanction_id}
    if redemption.settlement_id is not None:
        voucher = (
            await conn.execute(text("SELECT program, year FROM voucher WHERE id = :id"), {"id": redemption.voucher_id})
        ).one()
        entry_id = await recovery.book_receivable(
            conn,
            ledger,
            debtor_entity_id=redemption.provider_entity_id,
            amount_fen=redemption.settled_fen,
            program=voucher.program,
            year=voucher.year,
            reason=reason,
            key=f"reverse:{redemption_id}",
            redemption_id=redemption_id,
            voucher_id=redemption.voucher_id,
            metadata=audit,
        )
    else:
        left = redemption.subsidy_fen - redemption.refunded_fen
        entry_id = await give_back(
            conn,
            ledger,
            redemption,
            left,
            key=f"reverse:{redemption_id}",
            memo=f"clawback ({grounds}): {reason}",
            now=now,
            metadata=audit,
        )
    await conn.execute(
        text(
            "UPDATE redemption SET reversed_at = now(), reversal_entry_id = :e, reversal_grounds = :g, "
            "sanction_id = :s WHERE id = :id"
        ),
        {"e": entry_id, "g": grounds, "s": sanction_id, "id": redemption_id},
    )
    return await get_redemption(conn, redemption_id)


# -- holds for metered work ------------------------------------------------------------------------------

HOLD_DEFAULT_S = 24 * 3600
HOLD_MAX_S = 7 * 24 * 3600


class HoldNotFound(VoucherError):
    code = "not_found"


class HoldNotPending(VoucherError):
    code = "conflict"


class HoldExpired(VoucherError):
    code = "hold_expired"


@dataclass(frozen=True, slots=True)
class Hold:
    id: str
    voucher_id: str
    provider_entity_id: str
    amount_fen: int
    status: str
    expires_at: datetime
    pending_entry_id: int
    jti: str


async def create_hold(
    conn: AsyncConnection,
    ledger: Ledger,
    catalog: Catalog,
    checker: AffiliationChecker,
    presented: Presented,
    *,
    provider_entity_id: str,
    amount_fen: int,
    expires_in_s: int,
    now: datetime,
) -> Hold:
    """Reserve `amount_fen` of subsidy for metered work (a pending ledger entry with a timeout)."""
    voucher = await _voucher_for_spending(conn, presented.voucher_id, now)
    await _check_provider(conn, catalog, checker, voucher, provider_entity_id, now)
    room = await _token_room(conn, presented)
    if room is not None and amount_fen > room:
        raise TokenLimitReached(f"token {presented.jti} may spend {room} fen more, not {amount_fen}")
    available = (await ledger.locked_balance(conn, voucher_account(voucher.id))).available_fen
    if available < amount_fen:
        raise VoucherExhausted(f"voucher {voucher.id} has {available} fen available, not {amount_fen}")
    hold_id = new_id("hld_")
    await ledger.open_account(conn, payable_account(provider_entity_id))
    pending = await ledger.hold(
        conn,
        key=f"hold:{hold_id}",
        postings=[
            debit(voucher_account(voucher.id), amount_fen),
            credit(payable_account(provider_entity_id), amount_fen),
        ],
        timeout_s=expires_in_s,
        memo=f"hold {hold_id} of voucher {voucher.id} for {provider_entity_id}",
        metadata={"voucher": voucher.id, "provider": provider_entity_id, "hold": hold_id},
    )
    await conn.execute(
        text(
            "INSERT INTO subsidy_hold (id, voucher_id, provider_entity_id, jti, amount_fen, pending_entry_id, "
            "expires_at) SELECT :id, :v, :p, :j, :a, e.id, e.expires_at FROM ledger_entry e WHERE e.id = :e"
        ),
        {"id": hold_id, "v": voucher.id, "p": provider_entity_id, "j": presented.jti, "a": amount_fen, "e": pending.id},
    )
    return await get_hold(conn, hold_id, now=now)


_HOLD = text(
    "SELECT id, voucher_id, provider_entity_id, jti, amount_fen, status, expires_at, pending_entry_id "
    "FROM subsidy_hold WHERE id = :id"
)
_HOLD_FOR_UPDATE = text(
    "SELECT id, voucher_id, provider_entity_id, jti, amount_fen, status, expires_at, pending_entry_id "
    "FROM subsidy_hold WHERE id = :id FOR UPDATE"
)


async def get_hold(conn: AsyncConnection, hold_id: str, *, now: datetime, for_update: bool = False) -> Hold:
    row = (await conn.execute(_HOLD_FOR_UPDATE if for_update else _HOLD, {"id": hold_id})).first()
    if row is None:
        raise HoldNotFound(f"no hold {hold_id}")
    status = "expired" if row.status == "pending" and row.expires_at <= now else row.status  # read-time expiry
    return Hold(
        row.id,
        row.voucher_id,
        row.provider_entity_id,
        int(row.amount_fen),
        status,
        row.expires_at,
        int(row.pending_entry_id),
        row.jti,
    )


async def _pending_hold(conn: AsyncConnection, hold_id: str, provider_entity_id: str, now: datetime) -> Any:
    hold = await get_hold(conn, hold_id, now=now, for_update=True)
    if hold.provider_entity_id != provider_entity_id:
        raise HoldNotFound(f"no hold {hold_id}")  # another provider's hold does not exist for this caller
    if hold.status == "expired":
        raise HoldExpired(f"hold {hold_id} expired at {hold.expires_at.isoformat()}")
    if hold.status != "pending":
        raise HoldNotPending(f"hold {hold_id} was {hold.status}")
    return hold


async def capture_hold(
    conn: AsyncConnection,
    ledger: Ledger,
    catalog: Catalog,
    checker: AffiliationChecker,
    *,
    hold_id: str,
    provider_entity_id: str,
    invoice_no: str,
    lines: Sequence[Line],
    now: datetime,
) -> Redemption:
    """The final invoice: the subsidy is computed as a redemption's, capped by the hold; the rest of the
    hold is released in the same entry."""
    hold = await _pending_hold(conn, hold_id, provider_entity_id, now)
    token = (
        await conn.execute(
            text(
                "SELECT t.jti, t.voucher_id, v.holder_entity_id, t.max_amount_fen FROM voucher_token t "
                "JOIN voucher v ON v.id = t.voucher_id WHERE t.jti = :j"
            ),
            {"j": hold.jti},
        )
    ).one()
    presented = Presented(token.jti, token.voucher_id, token.holder_entity_id, token.max_amount_fen)
    redemption = await redeem(
        conn,
        ledger,
        catalog,
        checker,
        presented,
        provider_entity_id=provider_entity_id,
        invoice_no=invoice_no,
        lines=lines,
        now=now,
        hold={"id": hold.id, "amount_fen": hold.amount_fen, "pending_entry_id": hold.pending_entry_id},
    )
    await conn.execute(
        text("UPDATE subsidy_hold SET status = 'captured', resolved_at = now() WHERE id = :id"), {"id": hold_id}
    )
    return redemption


async def void_hold(
    conn: AsyncConnection, ledger: Ledger, *, hold_id: str, provider_entity_id: str, now: datetime
) -> Hold:
    hold = await _pending_hold(conn, hold_id, provider_entity_id, now)
    await ledger.void_pending(
        conn,
        key=f"void:{hold_id}",
        pending_entry_id=hold.pending_entry_id,
        memo=f"hold {hold_id} voided by the provider",
    )
    await conn.execute(
        text("UPDATE subsidy_hold SET status = 'voided', resolved_at = now() WHERE id = :id"), {"id": hold_id}
    )
    return await get_hold(conn, hold_id, now=now)


# -- a redemption in one round trip ----------------------------------------------------------------------
#
# `redeem` above takes about a dozen statements; `POST /v1/redemptions` instead asks the database once,
# through `voucher_redeem` (vouchers/sql/voucher_redeem.sql), which checks and writes in the same order
# under the same locks. What needs no database is decided here first, from what cannot change while a token lives: its
# verified claims and its voucher's terms (program, year, holder, named vendor, rate). Whatever can change
# (the token's revocation, the voucher's status and balance, the token's spending, the affiliation
# registry, the invoice) the function reads under its locks.

REDEEMABLE_CACHE_SIZE_MAX = 100_000
_ATTEMPTS_MAX = 3  # a stale affiliation graph or a concurrent twin invoice: look again, twice at most
_INVOICE_ONCE = "redemption_invoice_pkey"  # one redemption per provider and invoice number (migration 0019)
# A twin request that commits first, while this one runs: with another key and the same invoice (the
# invoice's unique index), or with the same key (the stored answer's primary key; voucher_redeem reads the
# stored answer and takes the key's lock in one statement).
_TWIN_COMMITTED_FIRST = frozenset({_INVOICE_ONCE, "idempotency_record_pkey"})
_UNIQUE_VIOLATION = "23505"


@dataclass(frozen=True, slots=True)
class Redeemable:
    """A token whose signature, claims and row agreed, with its voucher's fixed terms."""

    token: VerifiedToken
    program: str
    year: int
    vendor_entity_id: str | None
    rate_bp: int
    exp_s: float


class RedeemableCache:
    """Redeemables by SHA-256 of their token, until the token's `exp`; bounded, oldest out first. What a
    cached token may do is still checked by the database on every use (revocation, spending, balance)."""

    def __init__(self, size_max: int = REDEEMABLE_CACHE_SIZE_MAX) -> None:
        self._size_max = size_max
        self._entries: OrderedDict[bytes, Redeemable] = OrderedDict()

    def get(self, digest: bytes, now_s: float) -> Redeemable | None:
        found = self._entries.get(digest)
        if found is not None and found.exp_s <= now_s:
            del self._entries[digest]
            return None
        return found

    def put(self, digest: bytes, redeemable: Redeemable) -> None:
        while len(self._entries) >= self._size_max:
            self._entries.popitem(last=False)
        self._entries[digest] = redeemable

    def __len__(self) -> int:
        return len(self._entries)


class Outcome(NamedTuple):
    """What the database answered: an answer to send (`answer`, with the stored or new JSON body), or
    that the key was used for another request, or that its first request is still running."""

    kind: Literal["answer", "key_reused", "in_progress"]
    status_code: int = 0
    body: str = ""


async def _redeemable(
    reads: _Reads, keyring: KeyRing, cache: RedeemableCache, token: str, provider: str, now: datetime
) -> Redeemable:
    """The token's redeemable terms: from the cache, or verified in full (signature, claims, row) and read
    with its voucher's terms. A read leaves its connection in a transaction (the caller ends it)."""
    now_s = now.timestamp()
    digest = hashlib.sha256(token.encode()).digest()
    found = cache.get(digest, now_s)
    if found is None:
        conn = await reads.conn()
        verified = await verify_token(conn, keyring, token, caller_entity_id=provider, now=now)
        row = (
            await conn.execute(
                text("SELECT program, year, vendor_entity_id, redemption_rate_bp FROM voucher WHERE id = :id"),
                {"id": verified.voucher_id},
            )
        ).one()
        found = Redeemable(
            verified,
            row.program,
            int(row.year),
            row.vendor_entity_id,
            int(row.redemption_rate_bp),
            verified.expires_at.timestamp(),
        )
        cache.put(digest, found)
    elif found.token.audience_entity_id is not None and found.token.audience_entity_id != provider:
        raise WrongProvider("this token is narrowed to another provider")
    return found


async def _policy_refusal(
    engine: AsyncEngine,
    reads: _Reads,
    program: ProgramDefinition,
    terms: Redeemable,
    provider: str,
    owed: _Subsidy,
    invoice_no: str,
    thresholds: Thresholds,
    now: datetime,
    *,
    reload: bool,
) -> tuple[VoucherError | None, int | None]:
    """What the program's rules refuse (named vendor, affiliation, nothing eligible), and the affiliation
    registry version the answer rests on (None when the program does not ask)."""
    assert program.redemption is not None, f"{program.code} vouchers are redeemed"
    voucher_id, holder = terms.token.voucher_id, terms.token.holder_entity_id
    if (refusal := _vendor_refusal(program, voucher_id, terms.vendor_entity_id, provider)) is not None:
        return refusal, None
    version = None
    if program.redemption.non_affiliated:
        on: date = now.astimezone(SHANGHAI).date()
        cached = None if reload else check_affiliation_cached(engine, holder, provider, on, thresholds)
        if cached is None:
            cached = await check_affiliation_at(await reads.conn(), holder, provider, on, thresholds, reload=reload)
        version, answer = cached
        if answer.affiliated:
            return _affiliated(provider, holder, on, path_documents(answer.path, answer.held_on)), version
    if owed.subsidy_fen == 0:
        return _nothing_eligible(program, invoice_no), version
    return None, version


_REDEEM = """
    SELECT outcome, status_code, body, detail
      FROM voucher_redeem($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18::jsonb,
                          $19::jsonb, $20, $21::jsonb, $22::jsonb)
"""
# Several redemptions as one statement, one transaction: `voucher_redeem` called for each, in voucher order
# (every batch locks vouchers in the same order, so two batches cannot deadlock on them), each call seeing
# what the ones before it wrote (the same voucher twice, the same key twice, the same invoice twice: they
# are answered as if sent one after the other).
_REDEEM_BATCH = """
    SELECT k.ord, r.outcome, r.status_code, r.body, r.detail
      FROM (SELECT *
              FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::text[], $6::boolean[], $7::text[],
                          $8::text[], $9::text[], $10::text[], $11::text[], $12::boolean[], $13::bigint[],
                          $14::bigint[], $15::bigint[], $16::bigint[], $17::text[], $18::jsonb[], $19::jsonb[],
                          $20::text[], $21::jsonb[], $22::jsonb[])
                   WITH ORDINALITY AS u(caller, key, route, request_hash, jti, limited, voucher_id, voucher_account,
                                        payable_account, provider, invoice_no, refused, affiliation_version,
                                        owed_fen, total_fen, eligible_fen, redemption_id, lines, excluded, memo,
                                        metadata, response, ord)
             ORDER BY u.voucher_id, u.ord) k
     CROSS JOIN LATERAL voucher_redeem(k.caller, k.key, k.route, k.request_hash, k.jti, k.limited, k.voucher_id,
                                       k.voucher_account, k.payable_account, k.provider, k.invoice_no, k.refused,
                                       k.affiliation_version, k.owed_fen, k.total_fen, k.eligible_fen,
                                       k.redemption_id, k.lines, k.excluded, k.memo, k.metadata, k.response) r
"""


class RedemptionQueueFull(PoolTimeoutError):
    """More redemptions wait in this process for a place in a batch than it queues: the database is
    behind. Answered as when no pooled connection is to be had (503 service_unavailable, Retry-After), before
    anything was sent, so the same Idempotency-Key may be retried."""


class RedeemBatcher:
    """Redemptions that arrive while others are with the database go to it together, as one statement and
    one commit (`_REDEEM_BATCH`), instead of each holding a connection and a commit of its own.

    perf put most of a redemption's database time in per-statement and per-transaction work (executor
    start-up, constraint and trigger set-up, the commit), and the load's 32 connections in 40 busy backends
    contending for two cores; a batch pays those once. Nothing waits to fill a batch: a call goes at once
    when fewer than `in_flight_max` batches are out, else it joins the next one, which leaves as soon as one
    comes back. So an idle service answers a lone redemption as before, and a busy one sends bigger batches.

    A batch commits or fails whole. When its statement fails (a twin's unique key committed first, a
    deadlock, a missing account), no redemption of it happened, and each is sent again on its own, so
    each gets its own answer or error exactly as if it had come alone. A lost connection fails them all.
    Every call's outcome is the database's answer; nothing here decides one.

    The queue is bounded: with every batch out and `queue_max` calls already waiting, a call is refused at
    once (`RedemptionQueueFull`). A flood, even from one key the rate limit lets through, then waits at most
    about `queue_max` redemptions' worth of database time, instead of queueing without end while every
    caller's latency grows."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        batch_max: int,
        in_flight_max: int,
        on_error: Callable[[AsyncConnection, BaseException], Awaitable[bool]],
        queue_max: int | None = None,
    ) -> None:
        """`on_error(conn, exc)` answers whether `exc` means the connection is lost (and invalidates it).
        `queue_max`: calls that may wait while every batch is out (None: no bound)."""
        self._engine = engine
        self._batch_max = batch_max
        self._in_flight_max = in_flight_max
        self._queue_max = queue_max
        self._on_error = on_error
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # statements sent, and redemptions in them: for tests
        self.calls = 0

    async def call(self, args: tuple[Any, ...]) -> Any:
        """`voucher_redeem`'s row for these arguments (or its error)."""
        if (
            self._queue_max is not None
            and self._in_flight >= self._in_flight_max
            and len(self._pending) >= self._queue_max
        ):
            raise RedemptionQueueFull(f"{len(self._pending)} redemptions already wait for the database in this process")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((args, future))
        if self._in_flight < self._in_flight_max:
            self._in_flight += 1
            task = asyncio.create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def aclose(self) -> None:
        """Wait for the batches still out (their callers may already have their answers: a batch answers
        before it gives its connection back), so that the engine can be disposed of with nothing checked
        out."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self._batch_max]
                del self._pending[: self._batch_max]
                await self._send(batch)
        finally:
            self._in_flight -= 1

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        self.batches += 1
        self.calls += len(batch)
        try:
            async with self._engine.connect() as conn:
                try:
                    if len(batch) == 1:
                        _settle(batch[0][1], await driver.fetchrow_alone(conn, _REDEEM, *batch[0][0]))
                        return
                    rows = await driver.fetch_alone(
                        conn, _REDEEM_BATCH, *(list(column) for column in zip(*(a for a, _ in batch), strict=True))
                    )
                except Exception as exc:
                    if len(batch) == 1 or await self._on_error(conn, exc):
                        for _args, future in batch:
                            _fail(future, exc)
                        return
                    for args, future in batch:  # each on its own, for its own answer
                        try:
                            _settle(future, await driver.fetchrow_alone(conn, _REDEEM, *args))
                        except Exception as one:
                            await self._on_error(conn, one)
                            _fail(future, one)
                    return
                for row in rows:
                    _settle(batch[row["ord"] - 1][1], row)
        except Exception as exc:  # no connection to be had: every call fails with that
            for _args, future in batch:
                _fail(future, exc)


def _settle(future: asyncio.Future[Any], row: Any) -> None:
    if not future.done():  # a caller that went away no longer waits
        future.set_result(row)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class _Reads:
    """The connection for the reads a first use needs (a token to verify, an affiliation graph to load),
    opened on first use and given back before the redemption's own statement: a call waiting for its batch
    holds no connection, so calls waiting cannot starve their batches of the pool."""

    def __init__(self, engine: AsyncEngine, on_error: Callable[[AsyncConnection, BaseException], Awaitable[bool]]):
        self._engine = engine
        self._on_error = on_error
        self._conn: AsyncConnection | None = None

    async def conn(self) -> AsyncConnection:
        if self._conn is None:
            self._conn = await self._engine.connect()
        return self._conn

    async def __aenter__(self) -> _Reads:
        return self

    async def __aexit__(self, _type: object, exc: BaseException | None, _tb: object) -> None:
        await self.close(exc)

    async def close(self, exc: BaseException | None = None) -> None:
        """Give the connection back: its reads' transaction ended, or, after `exc`, invalidated when `exc`
        says it is lost."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if exc is not None:
                await self._on_error(conn, exc)
            elif conn.in_transaction():
                await conn.commit()  # reads only: the redemption's statement is a transaction of its own
        finally:
            await conn.close()


async def redeem_at_once(
    engine: AsyncEngine,
    *,
    keyring: KeyRing,
    catalog: Catalog,
    thresholds: Thresholds,
    cache: RedeemableCache,
    caller_key_id: str,
    idempotency_key: str,
    route: str,
    request_hash: bytes,
    token: str,
    provider_entity_id: str,
    invoice_no: str,
    lines: Sequence[Line],
    now: datetime,
    on_error: Callable[[AsyncConnection, BaseException], Awaitable[bool]],
    batcher: RedeemBatcher | None = None,
) -> Outcome:
    """`redeem`, answering the idempotency key, in one database round trip when the token and the
    affiliation graph are cached (a first use reads them first). Created and replayed answers are stored by
    the database; a refusal is raised (a `VoucherError`), and the caller stores it under the key.

    Connections come from `engine`: one for the reads of a first use, given back before the redemption's
    statement, which `batcher` sends (or, without one, a connection of its own). `on_error(conn, exc)`
    invalidates a connection that `exc` says is lost."""
    async with _Reads(engine, on_error) as reads:
        terms = await _redeemable(reads, keyring, cache, token, provider_entity_id, now)
        program = catalog.for_year(terms.program, terms.year)
        owed = _subsidy(program, terms.rate_bp, lines)
        voucher_id, jti = terms.token.voucher_id, terms.token.jti
        redemption_id = new_id("rdm_")
        memo = f"{program.code}: redemption {redemption_id} of voucher {voucher_id}, invoice {invoice_no}"
        metadata = {"voucher": voucher_id, "provider": provider_entity_id, "invoice": invoice_no}
        check_memo_and_metadata(memo, metadata)
        line_documents = [_line(line) for line in lines]
        response = {
            "id": redemption_id,
            "voucher_id": voucher_id,
            "provider_entity_id": provider_entity_id,
            "invoice_no": invoice_no,
            "eligible_fen": owed.eligible_fen,
            "excluded": owed.excluded,
            "lines": line_documents,
            "refunded_fen": 0,
            "reversed_at": None,
            "hold_id": None,
        }
        for attempt in range(1, _ATTEMPTS_MAX + 1):
            refusal, version = await _policy_refusal(
                engine, reads, program, terms, provider_entity_id, owed, invoice_no, thresholds, now, reload=attempt > 1
            )
            args = (
                caller_key_id,
                idempotency_key,
                route,
                request_hash,
                jti,
                terms.token.max_amount_fen is not None,
                voucher_id,
                voucher_account(voucher_id),
                payable_account(provider_entity_id),
                provider_entity_id,
                invoice_no,
                refusal is not None,
                version,
                owed.subsidy_fen,
                sum(line.amount_fen for line in lines),
                owed.eligible_fen,
                redemption_id,
                json.dumps(line_documents, ensure_ascii=False),
                json.dumps(owed.excluded, ensure_ascii=False),
                memo,
                json.dumps(metadata, sort_keys=True, ensure_ascii=False),
                json.dumps(response, ensure_ascii=False),
            )
            try:
                if batcher is not None:
                    await reads.close()
                    row = await batcher.call(args)
                else:
                    conn = await reads.conn()
                    if conn.in_transaction():
                        await conn.commit()  # the reads above: the function's statement is a transaction of its own
                    row = await driver.fetchrow_alone(conn, _REDEEM, *args)
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name in _TWIN_COMMITTED_FIRST and attempt < _ATTEMPTS_MAX:
                    continue  # a twin committed first: the next call answers its stored answer or the invoice
                raise
            outcome: str = row["outcome"]
            if outcome in ("created", "replayed"):
                return Outcome("answer", int(row["status_code"]), row["body"])
            if outcome == "stale_affiliations" and attempt < _ATTEMPTS_MAX:
                continue
            if outcome == "key_reused":
                return Outcome("key_reused")
            if outcome == "in_progress":
                return Outcome("in_progress")
            raise _refusal(outcome, row["detail"], refusal, terms, invoice_no, provider_entity_id)
        raise AssertionError("unreachable: the last attempt answers or raises")


def _refusal(
    outcome: str,
    detail: str | None,
    policy: VoucherError | None,
    terms: Redeemable,
    invoice_no: str,
    provider: str,
) -> VoucherError:
    voucher_id, jti = terms.token.voucher_id, terms.token.jti
    if outcome == "refused" and policy is not None:
        return policy
    if outcome == "token_revoked":
        return InvalidToken("the token has been revoked")
    if outcome == "voucher_not_found":
        return VoucherNotFound(f"no voucher {voucher_id}")
    if outcome == "voucher_revoked":
        return VoucherRevoked(f"voucher {voucher_id} was revoked")
    if outcome == "voucher_expired":
        return VoucherExpired(f"voucher {voucher_id} expired at {detail}")
    if outcome == "token_limit_reached":
        return TokenLimitReached(f"token {jti} has spent its {terms.token.max_amount_fen} fen")
    if outcome == "voucher_exhausted":
        return VoucherExhausted(f"voucher {voucher_id} has nothing left")
    if outcome == "invoice_redeemed":
        return InvoiceAlreadyRedeemed(f"invoice {invoice_no} was already redeemed at {provider}")
    # `stale_affiliations` three times running: the registry changes faster than it can be read
    raise RuntimeError(f"voucher_redeem answered {outcome!r}")
