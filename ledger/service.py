"""The ledger's commands and queries, on a SQLAlchemy async connection.

Every write is one round trip to `ledger_post` (see the migration): it locks the limited accounts in id
order, answers idempotent replays, checks limits, and writes the entry, its postings and the cached totals.
`transfer_many` calls it once per transfer of a batch in a single statement, so a batch import pays one
round trip, not one per entry, and still meets every check a single transfer does.
Nothing here commits: the caller owns the transaction (`run_in_transaction` retries it whole on a
serialization failure or a deadlock). A `Refusal` is recorded in that transaction and must be committed.

Accounts without a limit are never locked: the sealer folds their postings into the cached totals in
batches, and reads add the few postings not yet sealed. That keeps a provider's payable account, which
thousands of redemptions credit, from becoming one lock every writer queues on.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, NamedTuple, NoReturn, TypeVar

import asyncpg
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger import chain, driver
from ledger.errors import (
    REFUSALS,
    AccountExists,
    AccountNotFound,
    AppendOnlyViolation,
    EntryNotFound,
    IdempotencyConflict,
    InvalidEntry,
    LedgerError,
    NotReversible,
    Refusal,
)
from ledger.postings import (
    Kind,
    Metadata,
    Posting,
    check_key,
    check_memo_and_metadata,
    check_postings,
    posted_from_hold,
    release_of,
    request_hash,
    reversal_of,
)

Limit = Literal["debits_must_not_exceed_credits", "credits_must_not_exceed_debits"]
T = TypeVar("T")

ACCOUNT_CODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(:[A-Za-z0-9][A-Za-z0-9._-]*)*$")
ACCOUNT_CODE_LENGTH_MAX = 200
HOLD_TIMEOUT_MAX_S = 31 * 86_400
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock detected
SEALER_LOCK_ID = 0x564C5345414C  # pg advisory lock key: one sealer at a time across processes
SEAL_BATCH_MAX = 2_000


@dataclass(frozen=True, slots=True)
class Account:
    id: int
    code: str
    currency: str
    limit: Limit | None


@dataclass(frozen=True, slots=True)
class Entry:
    id: int
    kind: Kind
    idempotency_key: str
    created_at: datetime
    postings: tuple[Posting, ...]
    pending_entry_id: int | None = None
    reverses_entry_id: int | None = None
    expires_at: datetime | None = None
    memo: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    chain_seq: int | None = None
    prev_hash: bytes | None = None
    hash: bytes | None = None
    replayed: bool = False


class Transfer(NamedTuple):
    """One transfer of a batch (`Ledger.transfer_many`): what `Ledger.transfer` takes."""

    key: str
    postings: Sequence[Posting]
    memo: str = ""
    metadata: Metadata | None = None


@dataclass(frozen=True, slots=True)
class Balance:
    account: Account
    debits_posted_fen: int
    credits_posted_fen: int
    debits_pending_fen: int
    credits_pending_fen: int

    @property
    def net_debit_fen(self) -> int:
        """Posted debits minus posted credits: positive for an asset-like balance."""
        return self.debits_posted_fen - self.credits_posted_fen

    @property
    def available_fen(self) -> int:
        """What a limited account can still give: for a debit-limited account (a budget, a voucher) the
        credits not yet debited or held; for a credit-limited one the debits not yet credited or held."""
        if self.account.limit == "debits_must_not_exceed_credits":
            return self.credits_posted_fen - self.debits_posted_fen - self.debits_pending_fen
        if self.account.limit == "credits_must_not_exceed_debits":
            return self.debits_posted_fen - self.credits_posted_fen - self.credits_pending_fen
        return self.credits_posted_fen - self.debits_posted_fen


@dataclass(frozen=True, slots=True)
class TrialBalance:
    as_of: datetime | None
    total_debits_fen: int
    total_credits_fen: int
    total_debits_pending_fen: int
    total_credits_pending_fen: int
    rows: tuple[Balance, ...]


def sqlstate(exc: BaseException) -> str | None:
    """The PostgreSQL SQLSTATE behind a SQLAlchemy/asyncpg error, wherever the adapter kept it."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return None
        state = getattr(seen, "sqlstate", None) or getattr(seen, "pgcode", None)
        if isinstance(state, str):
            return state
        seen = getattr(seen, "orig", None) or seen.__cause__
    return None


def _message(exc: BaseException) -> str:
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            break
        message = getattr(seen, "message", None)
        if isinstance(message, str):
            return message
        seen = getattr(seen, "orig", None) or seen.__cause__
    return str(exc).splitlines()[0]


def _raise_mapped(exc: Exception) -> None:
    state = sqlstate(exc)
    message = _message(exc)
    if state == "VL409":
        raise IdempotencyConflict(message) from exc
    if state == "VL404":
        raise (AccountNotFound if "account" in message else EntryNotFound)(message) from exc
    if state in ("VL002", "VL422"):
        raise InvalidEntry(message) from exc
    if state == "VL001":
        raise AppendOnlyViolation(message) from exc


async def run_in_transaction(
    engine: AsyncEngine,
    work: Callable[[AsyncConnection], Awaitable[T]],
    *,
    attempts: int = 8,
) -> T:
    """Run `work` in a transaction of its own and commit it; retry the whole of it, with jittered
    backoff, when PostgreSQL reports a serialization failure or a deadlock. A `Refusal` is committed
    (it is an outcome) and re-raised; any other error rolls back."""
    for attempt in range(1, attempts + 1):
        try:
            async with engine.connect() as conn:
                try:
                    result = await work(conn)
                except Refusal:
                    await conn.commit()
                    raise
                await conn.commit()
                return result
        except (DBAPIError, asyncpg.PostgresError) as exc:
            if sqlstate(exc) not in RETRYABLE_SQLSTATES or attempt == attempts:
                raise
            await asyncio.sleep(random.uniform(0, 0.002 * 2**attempt))
    raise AssertionError("unreachable: the last attempt returns or raises")


async def run_statement(
    engine: AsyncEngine,
    work: Callable[[AsyncConnection], Awaitable[T]],
    *,
    attempts: int = 8,
) -> T:
    """Like `run_in_transaction`, for work that writes with a single statement (one ledger command and
    nothing else): PostgreSQL runs that statement as its own transaction, which saves the BEGIN and
    COMMIT round trips. The commit is as durable as any other."""
    for attempt in range(1, attempts + 1):
        try:
            async with engine.connect() as conn:
                await conn.execution_options(isolation_level="AUTOCOMMIT")
                return await work(conn)
        except (DBAPIError, asyncpg.PostgresError) as exc:
            if sqlstate(exc) not in RETRYABLE_SQLSTATES or attempt == attempts:
                raise
            await asyncio.sleep(random.uniform(0, 0.002 * 2**attempt))
    raise AssertionError("unreachable: the last attempt returns or raises")


_POST = """
    SELECT outcome, entry_id, created_at, code, detail
      FROM ledger_post($1, $2, $3, $4, $5,
                       CASE WHEN $6::integer IS NULL THEN NULL ELSE now() + make_interval(secs => $6::integer) END,
                       $7, $8::jsonb, $9, $10, $11, $12)
"""

# A batch of transfers as one statement: `ledger_post` for each, in the caller's order, each call seeing what
# the ones before it wrote (the same key twice is answered as if sent one after the other). The postings
# come as flat arrays; entry i's are the slice [lo_i, hi_i].
_POST_MANY = """
    SELECT r.outcome, r.entry_id, r.created_at, r.code, r.detail
      FROM unnest($1::text[], $2::bytea[], $3::text[], $4::text[], $5::integer[], $6::integer[])
           WITH ORDINALITY AS t(key, request_hash, memo, metadata, lo, hi, ord)
     CROSS JOIN LATERAL ledger_post(t.key, t.request_hash, 'transfer', NULL, NULL, NULL, t.memo, t.metadata::jsonb,
                                    ($7::bigint[])[t.lo:t.hi], ($8::text[])[t.lo:t.hi], ($9::text[])[t.lo:t.hi],
                                    ($10::bigint[])[t.lo:t.hi]) r
     ORDER BY t.ord
"""

# An entry's postings name their accounts by code: each posting's account is looked up by its id in a subquery
# of its own (OFFSET 0 keeps the planner from folding it into a join). Joined, it was a hash join over every
# account whenever the statistics put many postings in an entry (none at all, on a journal never analyzed):
# the sealer read all of ledger_account for each entry it sealed.
_ENTRY_COLUMNS = """
    e.id, e.kind, e.idempotency_key, e.pending_entry_id, e.reverses_entry_id, e.expires_at, e.memo,
    e.metadata::text AS metadata, e.created_at, s.chain_seq, s.prev_hash, s.hash,
    (SELECT json_agg(json_build_array(a.code, p.direction, p.phase, p.amount) ORDER BY p.seq)
       FROM ledger_posting p
      CROSS JOIN LATERAL (SELECT code FROM ledger_account WHERE id = p.account_id OFFSET 0) a
      WHERE p.entry_id = e.id)::text AS postings
"""

# Per-account sums of a set of postings `p`, as the cached totals count them.
_SUMS = """
    sum(p.amount) FILTER (WHERE p.direction = 'debit' AND p.phase = 'posted') AS dp,
    sum(p.amount) FILTER (WHERE p.direction = 'credit' AND p.phase = 'posted') AS cp,
    sum(CASE WHEN p.phase = 'pending' THEN p.amount WHEN p.phase = 'release' THEN -p.amount END)
        FILTER (WHERE p.direction = 'debit') AS dq,
    sum(CASE WHEN p.phase = 'pending' THEN p.amount WHEN p.phase = 'release' THEN -p.amount END)
        FILTER (WHERE p.direction = 'credit') AS cq
"""

_LIMITED = "(a.debits_must_not_exceed_credits OR a.credits_must_not_exceed_debits)"

# The sealer's first statement: its lock and, for the rest of its transaction, the settings its statements are
# planned under. The sealer runs beside redemptions from a service's first second, before autovacuum has
# analyzed anything, and keeps its statements' plans (asyncpg prepares them; after five runs PostgreSQL may keep
# a generic plan for the connection's life). Every row it reads it finds by a key (the queue's, an entry's,
# a posting's, an account's), so no sequential scan is allowed it: without statistics the planner read all of
# ledger_account for every batch it sealed (a hash join over a sequential scan), a read that grew with the
# number of accounts. jit = off: the planner's estimates for a journal it has not analyzed put the read's
# cost above jit_above_cost, and a server with JIT compiled it again at every batch. Each setting is set here,
# before any of the sealer's statements is planned, so every plan of them, the first included, is made under it.
_SEALER_LOCK = """
    SELECT locked, CASE WHEN locked THEN set_config('enable_seqscan', 'off', true) END,
           CASE WHEN locked THEN set_config('jit', 'off', true) END
      FROM pg_try_advisory_xact_lock($1) AS locked
"""

# The sealer's read: the oldest queued entries, as `_ENTRY_COLUMNS` gives them (not yet sealed, so no seal
# columns). Each entry is fetched by its id in a subquery of its own: OFFSET 0 keeps the planner from
# folding it into a join. Folded, as the read was written before, it was a merge join whenever the
# statistics put many rows in the queue (a queue table bloated by a burst, analyzed then), and a merge join
# walks the journal's index from its first entry: an EXPLAIN ANALYZE taken during a load read 87,783 index
# entries in 78 ms to seal 169, so sealing cost more the longer the journal. Looked up by id, a batch costs
# the same whatever the journal's length or the statistics.
_UNSEALED = f"""
    SELECT e.*
      FROM (SELECT entry_id FROM ledger_unsealed ORDER BY entry_id LIMIT $1) u
     CROSS JOIN LATERAL (
           SELECT {_ENTRY_COLUMNS}
             FROM ledger_entry e LEFT JOIN ledger_seal s ON false
            WHERE e.id = u.entry_id
           OFFSET 0) e
     ORDER BY u.entry_id
"""

# The sealer's write, one statement: the seals in chain order (the insert trigger checks each link), the
# entries off the queue, and their postings folded into the cached totals of the accounts without a limit
# (a limited account's totals are kept by each write under its lock). The accounts are named by their ids
# (`a.id = ANY(...)`) besides the join, so every way left to read them (sequential scans are off, see
# `_SEALER_LOCK`) looks those ids up in the primary key: with the join alone, and no statistics, the planner
# read every account to keep the batch's.
_SEAL_WRITE = f"""
    WITH sealed AS (
        INSERT INTO ledger_seal (chain_seq, entry_id, prev_hash, hash)
        SELECT s, e, p, h FROM unnest($1::bigint[], $2::bigint[], $3::bytea[], $4::bytea[]) AS u(s, e, p, h)
         ORDER BY s),
    dequeued AS (
        DELETE FROM ledger_unsealed WHERE entry_id = ANY($2::bigint[])),
    moved AS (
        SELECT p.account_id, {_SUMS} FROM ledger_posting p WHERE p.entry_id = ANY($2::bigint[]) GROUP BY p.account_id)
    UPDATE ledger_account a
       SET debits_posted = a.debits_posted + coalesce(d.dp, 0),
           credits_posted = a.credits_posted + coalesce(d.cp, 0),
           debits_pending = a.debits_pending + coalesce(d.dq, 0),
           credits_pending = a.credits_pending + coalesce(d.cq, 0)
      FROM moved d
     WHERE a.id = d.account_id AND a.id = ANY(ARRAY(SELECT account_id FROM moved)) AND NOT {_LIMITED}
"""

_CURRENT_BALANCES = f"""
    WITH unsealed AS (
        SELECT p.account_id, {_SUMS}
          FROM ledger_unsealed u JOIN ledger_posting p ON p.entry_id = u.entry_id
         GROUP BY p.account_id),
    expired AS (
        SELECT p.account_id,
               sum(p.amount) FILTER (WHERE p.direction = 'debit') AS d,
               sum(p.amount) FILTER (WHERE p.direction = 'credit') AS c
          FROM ledger_pending_open o JOIN ledger_posting p ON p.entry_id = o.entry_id AND p.phase = 'pending'
         WHERE o.expires_at <= now()
         GROUP BY p.account_id)
    SELECT a.id, a.code, a.currency, a.debits_must_not_exceed_credits, a.credits_must_not_exceed_debits,
           a.debits_posted + CASE WHEN {_LIMITED} THEN 0 ELSE coalesce(u.dp, 0) END AS dp,
           a.credits_posted + CASE WHEN {_LIMITED} THEN 0 ELSE coalesce(u.cp, 0) END AS cp,
           a.debits_pending + CASE WHEN {_LIMITED} THEN 0 ELSE coalesce(u.dq, 0) END - coalesce(x.d, 0) AS dq,
           a.credits_pending + CASE WHEN {_LIMITED} THEN 0 ELSE coalesce(u.cq, 0) END - coalesce(x.c, 0) AS cq
      FROM ledger_account a
      LEFT JOIN unsealed u ON u.account_id = a.id
      LEFT JOIN expired x ON x.account_id = a.id
"""

_AS_OF_BALANCES = f"""
    WITH moved AS (
        SELECT p.account_id, {_SUMS}
          FROM ledger_posting p JOIN ledger_entry e ON e.id = p.entry_id
         WHERE e.created_at <= :as_of
         GROUP BY p.account_id),
    expired AS (
        -- a hold past its timeout at as_of no longer reserves anything, released or not
        SELECT p.account_id,
               sum(p.amount) FILTER (WHERE p.direction = 'debit') AS d,
               sum(p.amount) FILTER (WHERE p.direction = 'credit') AS c
          FROM ledger_entry h JOIN ledger_posting p ON p.entry_id = h.id AND p.phase = 'pending'
         WHERE h.kind = 'pending' AND h.created_at <= :as_of AND h.expires_at <= :as_of
           AND NOT EXISTS (SELECT 1 FROM ledger_entry r
                            WHERE r.pending_entry_id = h.id AND r.created_at <= :as_of)
         GROUP BY p.account_id)
    SELECT a.id, a.code, a.currency, a.debits_must_not_exceed_credits, a.credits_must_not_exceed_debits,
           coalesce(m.dp, 0) AS dp, coalesce(m.cp, 0) AS cp,
           coalesce(m.dq, 0) - coalesce(x.d, 0) AS dq, coalesce(m.cq, 0) - coalesce(x.c, 0) AS cq
      FROM ledger_account a
      LEFT JOIN moved m ON m.account_id = a.id
      LEFT JOIN expired x ON x.account_id = a.id
     WHERE a.created_at <= :as_of
"""


def _limit_of(debits_limited: bool, credits_limited: bool) -> Limit | None:
    if debits_limited:
        return "debits_must_not_exceed_credits"
    if credits_limited:
        return "credits_must_not_exceed_debits"
    return None


def _postings_from_json(raw: str | None) -> tuple[Posting, ...]:
    if raw is None:
        return ()
    return tuple(Posting(code, direction, int(amount), phase) for code, direction, phase, amount in json.loads(raw))


def _entry_from_row(row: Any, replayed: bool = False) -> Entry:
    return Entry(
        id=row.id,
        kind=row.kind,
        idempotency_key=row.idempotency_key,
        created_at=row.created_at,
        postings=_postings_from_json(row.postings),
        pending_entry_id=row.pending_entry_id,
        reverses_entry_id=row.reverses_entry_id,
        expires_at=row.expires_at,
        memo=row.memo,
        metadata=json.loads(row.metadata),
        chain_seq=row.chain_seq,
        prev_hash=None if row.prev_hash is None else bytes(row.prev_hash),
        hash=None if row.hash is None else bytes(row.hash),
        replayed=replayed,
    )


def _balance_from_row(row: Any) -> Balance:
    account = Account(
        row.id,
        row.code,
        row.currency.strip(),
        _limit_of(row.debits_must_not_exceed_credits, row.credits_must_not_exceed_debits),
    )
    return Balance(account, int(row.dp), int(row.cp), int(row.dq), int(row.cq))


class Ledger:
    """One per database: it caches account identities (code, id, currency and limit never change)."""

    def __init__(self, on_sealed: Callable[[Kind], None] | None = None) -> None:
        """`on_sealed` is told the kind of each entry the sealer seals: every committed entry, once."""
        self._by_code: dict[str, Account] = {}
        self._on_sealed = on_sealed

    # -- accounts ----------------------------------------------------------------------------------

    async def open_account(
        self,
        conn: AsyncConnection,
        code: str,
        *,
        currency: str = "CNY",
        limit: Limit | None = None,
        metadata: Metadata | None = None,
    ) -> Account:
        """Open an account, or return it when it exists with the same currency and limit."""
        if not isinstance(code, str) or len(code) > ACCOUNT_CODE_LENGTH_MAX or not ACCOUNT_CODE.match(code):
            raise InvalidEntry(f"account code {code!r}: segments of letters, digits, '.', '_' or '-', joined by ':'")
        if not re.fullmatch(r"[A-Z]{3}", currency):
            raise InvalidEntry(f"currency {currency!r} is not an ISO 4217 code")
        check_memo_and_metadata("", metadata or {})
        row = (
            await conn.execute(
                text(
                    """
                    INSERT INTO ledger_account (code, currency, debits_must_not_exceed_credits,
                                                credits_must_not_exceed_debits, metadata)
                    VALUES (:code, :currency, :dl, :cl, CAST(:metadata AS jsonb))
                    ON CONFLICT (code) DO NOTHING
                    RETURNING id
                    """
                ),
                {
                    "code": code,
                    "currency": currency,
                    "dl": limit == "debits_must_not_exceed_credits",
                    "cl": limit == "credits_must_not_exceed_debits",
                    "metadata": json.dumps(dict(metadata or {})),
                },
            )
        ).first()
        if row is not None:
            account = Account(row.id, code, currency, limit)
        else:
            # read it afresh: a cached id may be from a creation that was rolled back
            fetched = await self._fetch(conn, [code])
            if code not in fetched:
                raise AccountNotFound(f"unknown account: {code}")
            account = fetched[code]
            if account.currency != currency or account.limit != limit:
                raise AccountExists(f"account {code} exists in {account.currency} with limit {account.limit or 'none'}")
        self._by_code[code] = account
        return account

    async def accounts(self, conn: AsyncConnection, codes: Iterable[str]) -> dict[str, Account]:
        """Resolve codes to accounts (cached); an unknown code is `AccountNotFound`.

        The answer is built from what this call saw, never by re-reading the shared cache after an await:
        another task may evict an entry meanwhile (see `open_account`), and that must not make a known
        account look unknown."""
        wanted = set(codes)
        found = {code: account for code in wanted if (account := self._by_code.get(code)) is not None}
        missing = [code for code in wanted if code not in found]
        if missing:
            found.update(await self._fetch(conn, missing))
        unknown = sorted(code for code in wanted if code not in found)
        if unknown:
            raise AccountNotFound(f"unknown account(s): {', '.join(unknown)}")
        return found

    async def _fetch(self, conn: AsyncConnection, codes: Sequence[str]) -> dict[str, Account]:
        """Read accounts from the database (committed or written by this transaction) and cache them."""
        rows = await conn.execute(
            text(
                """
                SELECT id, code, currency, debits_must_not_exceed_credits, credits_must_not_exceed_debits
                  FROM ledger_account WHERE code = ANY(:codes)
                """
            ),
            {"codes": list(codes)},
        )
        fetched = {
            row.code: Account(
                row.id,
                row.code,
                row.currency.strip(),
                _limit_of(row.debits_must_not_exceed_credits, row.credits_must_not_exceed_debits),
            )
            for row in rows
        }
        self._by_code.update(fetched)
        return fetched

    # -- writes ------------------------------------------------------------------------------------

    async def transfer(
        self,
        conn: AsyncConnection,
        *,
        key: str,
        postings: Sequence[Posting],
        memo: str = "",
        metadata: Metadata | None = None,
    ) -> Entry:
        """Post a balanced entry now."""
        check_key(key)
        if any(p.phase != "posted" for p in postings):
            raise InvalidEntry("a transfer's postings are all in the posted phase")
        return await self._post(
            conn, key=key, kind="transfer", postings=postings, memo=memo, metadata=metadata or {}, fields={}
        )

    async def transfer_many(self, conn: AsyncConnection, transfers: Sequence[Transfer]) -> list[Entry | Refusal]:
        """Post a batch of balanced entries in one round trip, as `transfer` would one after the other in
        the caller's transaction; one outcome per transfer, in order.

        Each transfer is checked as `transfer` checks it: one that is malformed or names an unknown account
        fails the whole batch with the error `transfer` raises, before anything is sent. A refusal (a limit)
        is an outcome, as there: recorded under its key and answered in the transfer's place, not raised, so
        the batch's other entries stand. A replayed key answers the entry first recorded, marked `replayed`.
        Limited accounts stay locked until the caller's transaction ends, each entry locking its own in id
        order: a batch that locks many may deadlock a concurrent writer, which `run_in_transaction` retries."""
        if not transfers:
            return []
        for t in transfers:
            check_key(t.key)
            if any(p.phase != "posted" for p in t.postings):
                raise InvalidEntry("a transfer's postings are all in the posted phase")
            check_postings(t.postings)
            check_memo_and_metadata(t.memo, t.metadata or {})
        accounts = await self.accounts(conn, (p.account for t in transfers for p in t.postings))
        keys: list[str] = []
        fingerprints: list[bytes] = []
        memos: list[str] = []
        metadata: list[str] = []
        los: list[int] = []
        his: list[int] = []
        for t in transfers:
            if len({accounts[p.account].currency for p in t.postings}) != 1:
                raise InvalidEntry("an entry cannot mix currencies")
            meta = dict(t.metadata or {})
            keys.append(t.key)
            fingerprints.append(request_hash("transfer", {"memo": t.memo, "metadata": meta}, t.postings))
            memos.append(t.memo)
            metadata.append(json.dumps(meta, sort_keys=True))
            los.append(his[-1] + 1 if his else 1)
            his.append(los[-1] + len(t.postings) - 1)
        postings = [p for t in transfers for p in t.postings]
        try:
            rows = await driver.fetch(
                conn,
                _POST_MANY,
                keys,
                fingerprints,
                memos,
                metadata,
                los,
                his,
                [accounts[p.account].id for p in postings],
                [p.direction for p in postings],
                [p.phase for p in postings],
                [p.amount_fen for p in postings],
            )
        except (DBAPIError, asyncpg.PostgresError) as exc:
            self._raise_posting_error(exc, postings)
        replayed = await self._entries_by_id(conn, [row["entry_id"] for row in rows if row["outcome"] == "existing"])
        outcomes: list[Entry | Refusal] = []
        for t, row in zip(transfers, rows, strict=True):
            if row["outcome"] == "refused":
                outcomes.append(REFUSALS.get(row["code"], Refusal)(row["detail"]))
            elif row["outcome"] == "existing":
                entry = replayed[row["entry_id"]]
                outcomes.append(Entry(**{**{f: getattr(entry, f) for f in Entry.__slots__}, "replayed": True}))
            else:
                outcomes.append(
                    Entry(
                        id=row["entry_id"],
                        kind="transfer",
                        idempotency_key=t.key,
                        created_at=row["created_at"],
                        postings=tuple(t.postings),
                        memo=t.memo,
                        metadata=dict(t.metadata or {}),
                    )
                )
        return outcomes

    async def hold(
        self,
        conn: AsyncConnection,
        *,
        key: str,
        postings: Sequence[Posting],
        timeout_s: int,
        memo: str = "",
        metadata: Metadata | None = None,
    ) -> Entry:
        """Reserve against the accounts' limits until posted, voided or `timeout_s` has passed."""
        check_key(key)
        if type(timeout_s) is not int or not 1 <= timeout_s <= HOLD_TIMEOUT_MAX_S:
            raise InvalidEntry(f"a hold times out after 1 to {HOLD_TIMEOUT_MAX_S} seconds")
        pending = [Posting(p.account, p.direction, p.amount_fen, "pending") for p in postings]
        return await self._post(
            conn,
            key=key,
            kind="pending",
            postings=pending,
            memo=memo,
            metadata=metadata or {},
            fields={"timeout_s": timeout_s},
            timeout_s=timeout_s,
        )

    async def post_pending(
        self,
        conn: AsyncConnection,
        *,
        key: str,
        pending_entry_id: int,
        amount_fen: int | None = None,
        memo: str = "",
        metadata: Metadata | None = None,
    ) -> Entry:
        """Post a hold in full, or `amount_fen` of it (never more); the rest is released."""
        check_key(key)
        held = await self._hold_postings(conn, pending_entry_id)
        postings = release_of(held) + posted_from_hold(held, amount_fen)
        return await self._post(
            conn,
            key=key,
            kind="post_pending",
            postings=postings,
            memo=memo,
            metadata=metadata or {},
            pending_entry_id=pending_entry_id,
            fields={"pending_entry_id": pending_entry_id, "amount_fen": amount_fen},
        )

    async def void_pending(self, conn: AsyncConnection, *, key: str, pending_entry_id: int, memo: str = "") -> Entry:
        """Release a hold entirely."""
        check_key(key)
        held = await self._hold_postings(conn, pending_entry_id)
        return await self._post(
            conn,
            key=key,
            kind="void_pending",
            postings=release_of(held),
            memo=memo,
            metadata={},
            pending_entry_id=pending_entry_id,
            fields={"pending_entry_id": pending_entry_id},
        )

    async def reverse(
        self,
        conn: AsyncConnection,
        *,
        key: str,
        entry_id: int,
        memo: str = "",
        metadata: Metadata | None = None,
    ) -> Entry:
        """A compensating entry that undoes every posted movement of `entry_id` (at most once)."""
        check_key(key)
        original = await self.entry(conn, entry_id)
        if original.kind not in ("transfer", "post_pending"):
            raise NotReversible(f"a {original.kind} entry cannot be reversed; void or let a hold expire instead")
        return await self._post(
            conn,
            key=key,
            kind="reversal",
            postings=reversal_of(original.postings),
            memo=memo,
            metadata=metadata or {},
            reverses_entry_id=entry_id,
            fields={"reverses_entry_id": entry_id},
        )

    async def expire_pending(self, conn: AsyncConnection, pending_entry_id: int) -> int | None:
        """Release a hold whose timeout has passed; None when it was already resolved."""
        try:
            entry_id = await conn.scalar(text("SELECT ledger_expire_pending(:id)"), {"id": pending_entry_id})
        except DBAPIError as exc:
            _raise_mapped(exc)
            raise
        return None if entry_id is None else int(entry_id)

    async def due_holds(self, conn: AsyncConnection, limit: int = 100) -> list[int]:
        rows = await conn.execute(
            text("SELECT entry_id FROM ledger_pending_open WHERE expires_at <= now() ORDER BY expires_at LIMIT :n"),
            {"n": limit},
        )
        return [int(row.entry_id) for row in rows]

    async def _hold_postings(self, conn: AsyncConnection, pending_entry_id: int) -> tuple[Posting, ...]:
        entry = await self.entry(conn, pending_entry_id)
        if entry.kind != "pending":
            raise EntryNotFound(f"entry {pending_entry_id} is not a hold")
        return entry.postings

    def _raise_posting_error(self, exc: Exception, postings: Sequence[Posting]) -> NoReturn:
        """`exc`, raised by `ledger_post`, as the ledger's own error. An unknown account (VL404) means ids
        cached from a creation that was rolled back: they are forgotten first, so the caller may retry."""
        if sqlstate(exc) == "VL404":
            for posting in postings:
                self._by_code.pop(posting.account, None)
        _raise_mapped(exc)
        raise exc

    async def _post(
        self,
        conn: AsyncConnection,
        *,
        key: str,
        kind: Kind,
        postings: Sequence[Posting],
        memo: str,
        metadata: Metadata,
        fields: dict[str, object],
        pending_entry_id: int | None = None,
        reverses_entry_id: int | None = None,
        timeout_s: int | None = None,
    ) -> Entry:
        check_postings(postings)
        check_memo_and_metadata(memo, metadata)
        accounts = await self.accounts(conn, (p.account for p in postings))
        if len({a.currency for a in accounts.values()}) != 1:
            raise InvalidEntry("an entry cannot mix currencies")
        fingerprint = request_hash(kind, {**fields, "memo": memo, "metadata": dict(metadata)}, postings)
        try:
            row = await driver.fetchrow(
                conn,
                _POST,
                key,
                fingerprint,
                kind,
                pending_entry_id,
                reverses_entry_id,
                timeout_s,
                memo,
                json.dumps(dict(metadata), sort_keys=True),
                [accounts[p.account].id for p in postings],
                [p.direction for p in postings],
                [p.phase for p in postings],
                [p.amount_fen for p in postings],
            )
        except (DBAPIError, asyncpg.PostgresError) as exc:
            self._raise_posting_error(exc, postings)
        assert row is not None
        if row["outcome"] == "refused":
            raise REFUSALS.get(row["code"], Refusal)(row["detail"])
        if row["outcome"] == "existing":
            # the key's first request succeeded: answer with the entry as recorded
            entry = await self.entry(conn, row["entry_id"])
            return Entry(**{**{f: getattr(entry, f) for f in Entry.__slots__}, "replayed": True})
        return Entry(
            id=row["entry_id"],
            kind=kind,
            idempotency_key=key,
            created_at=row["created_at"],
            postings=tuple(postings),
            pending_entry_id=pending_entry_id,
            reverses_entry_id=reverses_entry_id,
            memo=memo,
            metadata=dict(metadata),
        )

    # -- the hash chain ------------------------------------------------------------------------------

    async def seal(self, conn: AsyncConnection, batch_size: int = 1_000) -> int:
        """Seal committed entries into the chain, oldest id first, and fold their postings into the
        cached totals of accounts without a limit. One sealer at a time (advisory lock); returns how
        many entries it sealed. The caller commits.

        Four round trips whatever the batch: the lock, the chain's head, the entries (`_UNSEALED`), and one
        statement that writes the seals, dequeues the entries and folds their postings (`_SEAL_WRITE`). Once it
        holds the lock, the rest of the transaction runs without sequential scans and without JIT
        (`_SEALER_LOCK`): give the sealer a transaction of its own, as `app.background.seal_all` does."""
        batch_size = max(1, min(batch_size, SEAL_BATCH_MAX))
        if not (await driver.fetchrow(conn, _SEALER_LOCK, SEALER_LOCK_ID))["locked"]:
            return 0
        last = await driver.fetchrow(conn, "SELECT chain_seq, hash FROM ledger_seal ORDER BY chain_seq DESC LIMIT 1")
        seq, prev = (0, chain.GENESIS_HASH) if last is None else (int(last["chain_seq"]), bytes(last["hash"]))
        rows = await driver.fetch(conn, _UNSEALED, batch_size)
        if not rows:
            return 0
        ids, seqs, prevs, hashes = [], [], [], []
        for row in rows:
            seq += 1
            digest = chain.link_hash(prev, _chain_document(row, seq))
            ids.append(row["id"])
            seqs.append(seq)
            prevs.append(prev)
            hashes.append(digest)
            prev = digest
        await driver.execute(conn, _SEAL_WRITE, seqs, ids, prevs, hashes)
        if self._on_sealed is not None:
            for row in rows:
                self._on_sealed(row["kind"])
        return len(ids)

    async def verify_chain(
        self, conn: AsyncConnection, *, from_seq: int = 1, batch_size: int = 2_000
    ) -> chain.ChainReport:
        """Recompute every seal from `from_seq` on (default: all) from the entries as stored, in chain order;
        and check that every entry is either sealed or queued for the sealer."""
        prev, seq, total = chain.GENESIS_HASH, max(1, from_seq), 0
        if seq > 1:
            start = await conn.scalar(text("SELECT prev_hash FROM ledger_seal WHERE chain_seq = :s"), {"s": seq})
            if start is None:
                return chain.ChainReport(True, 0, prev)
            prev = bytes(start)
        while True:
            rows = (
                await conn.execute(
                    text(
                        f"""
                        SELECT {_ENTRY_COLUMNS}
                          FROM ledger_seal s JOIN ledger_entry e ON e.id = s.entry_id
                         WHERE s.chain_seq >= :from_seq ORDER BY s.chain_seq LIMIT :n
                        """
                    ),
                    {"from_seq": seq, "n": batch_size},
                )
            ).all()
            if not rows:
                break
            documents = [
                {**_chain_document(row._mapping, row.chain_seq), "prev_hash": row.prev_hash, "hash": row.hash}
                for row in rows
            ]
            report = chain.verify(documents, start_hash=prev, start_seq=seq)
            total += report.entries
            if not report.ok:
                return chain.ChainReport(False, total, report.last_hash, report.problem)
            prev, seq = report.last_hash, seq + report.entries
        orphans = await conn.scalar(
            text(
                """
                SELECT count(*) FROM ledger_entry e
                 WHERE NOT EXISTS (SELECT 1 FROM ledger_seal s WHERE s.entry_id = e.id)
                   AND NOT EXISTS (SELECT 1 FROM ledger_unsealed u WHERE u.entry_id = e.id)
                """
            )
        )
        if orphans:
            return chain.ChainReport(False, total, prev, f"{orphans} entries are neither sealed nor queued")
        return chain.ChainReport(True, total, prev)

    # -- reads ---------------------------------------------------------------------------------------

    async def entry(self, conn: AsyncConnection, entry_id: int) -> Entry:
        row = (
            await conn.execute(
                text(
                    f"SELECT {_ENTRY_COLUMNS} FROM ledger_entry e "
                    "LEFT JOIN ledger_seal s ON s.entry_id = e.id WHERE e.id = :id"
                ),
                {"id": entry_id},
            )
        ).first()
        if row is None:
            raise EntryNotFound(f"no ledger entry {entry_id}")
        return _entry_from_row(row)

    async def _entries_by_id(self, conn: AsyncConnection, ids: Sequence[int]) -> dict[int, Entry]:
        if not ids:
            return {}
        rows = await conn.execute(
            text(
                f"SELECT {_ENTRY_COLUMNS} FROM ledger_entry e "
                "LEFT JOIN ledger_seal s ON s.entry_id = e.id WHERE e.id = ANY(:ids)"
            ),
            {"ids": list(ids)},
        )
        return {row.id: _entry_from_row(row) for row in rows}

    async def entries(
        self,
        conn: AsyncConnection,
        *,
        after_id: int | None = None,
        limit: int = 50,
        account_prefix: str | None = None,
    ) -> list[Entry]:
        """Entries in id order after `after_id`, optionally only those touching accounts under a prefix."""
        rows = await conn.execute(
            text(
                f"""
                SELECT {_ENTRY_COLUMNS}
                  FROM ledger_entry e LEFT JOIN ledger_seal s ON s.entry_id = e.id
                 WHERE e.id > :after
                   AND (CAST(:prefix AS text) IS NULL OR EXISTS (
                        SELECT 1 FROM ledger_posting p JOIN ledger_account a ON a.id = p.account_id
                         WHERE p.entry_id = e.id
                           AND (a.code = :prefix OR starts_with(a.code, CAST(:prefix AS text) || ':'))))
                 ORDER BY e.id
                 LIMIT :n
                """
            ),
            {"after": after_id or 0, "prefix": account_prefix, "n": limit},
        )
        return [_entry_from_row(row) for row in rows]

    async def balances(
        self,
        conn: AsyncConnection,
        *,
        codes: Sequence[str] | None = None,
        prefix: str | None = None,
        after_code: str | None = None,
        limit: int | None = None,
        as_of: datetime | None = None,
    ) -> list[Balance]:
        """Balances ordered by code: current (cached totals, plus postings not yet sealed on accounts
        without a limit, less holds past their timeout) or, with `as_of`, recomputed from the entries."""
        base = _CURRENT_BALANCES if as_of is None else _AS_OF_BALANCES
        joiner = "WHERE" if as_of is None else "AND"
        query = f"""
            {base}
            {joiner} (CAST(:codes AS text[]) IS NULL OR a.code = ANY(CAST(:codes AS text[])))
              AND (CAST(:prefix AS text) IS NULL OR a.code = :prefix
                   OR starts_with(a.code, CAST(:prefix AS text) || ':'))
              AND (CAST(:after AS text) IS NULL OR a.code > :after)
            ORDER BY a.code
            LIMIT :n
        """
        rows = await conn.execute(
            text(query),
            {
                "codes": None if codes is None else list(codes),
                "prefix": prefix,
                "after": after_code,
                "n": limit,
                "as_of": as_of,
            },
        )
        return [_balance_from_row(row) for row in rows]

    async def balance(self, conn: AsyncConnection, code: str, as_of: datetime | None = None) -> Balance:
        found = await self.balances(conn, codes=[code], as_of=as_of)
        if not found:
            raise AccountNotFound(f"unknown account: {code}")
        return found[0]

    async def locked_balance(self, conn: AsyncConnection, code: str) -> Balance:
        """The account's balance with its row locked until the caller's transaction ends (the lock
        ledger_post takes): read-then-move decisions (return what is left, say) cannot race a posting."""
        locked = await conn.scalar(text("SELECT id FROM ledger_account WHERE code = :c FOR NO KEY UPDATE"), {"c": code})
        if locked is None:
            raise AccountNotFound(f"unknown account: {code}")
        return await self.balance(conn, code)

    async def trial_balance(self, conn: AsyncConnection, as_of: datetime | None = None) -> TrialBalance:
        rows = tuple(await self.balances(conn, as_of=as_of))
        return TrialBalance(
            as_of=as_of,
            total_debits_fen=sum(r.debits_posted_fen for r in rows),
            total_credits_fen=sum(r.credits_posted_fen for r in rows),
            total_debits_pending_fen=sum(r.debits_pending_fen for r in rows),
            total_credits_pending_fen=sum(r.credits_pending_fen for r in rows),
            rows=rows,
        )

    async def verify_cached_balances(self, conn: AsyncConnection) -> list[str]:
        """Codes of accounts whose cached totals disagree with their postings (empty when sound)."""
        rows = await conn.execute(
            text(
                f"""
                WITH truth AS (SELECT p.account_id, {_SUMS} FROM ledger_posting p GROUP BY p.account_id),
                unsealed AS (SELECT p.account_id, {_SUMS}
                               FROM ledger_unsealed u JOIN ledger_posting p ON p.entry_id = u.entry_id
                              GROUP BY p.account_id)
                SELECT a.code FROM ledger_account a
                  LEFT JOIN truth t ON t.account_id = a.id
                  LEFT JOIN unsealed u ON u.account_id = a.id AND NOT {_LIMITED}
                 WHERE a.debits_posted + coalesce(u.dp, 0) <> coalesce(t.dp, 0)
                    OR a.credits_posted + coalesce(u.cp, 0) <> coalesce(t.cp, 0)
                    OR a.debits_pending + coalesce(u.dq, 0) <> coalesce(t.dq, 0)
                    OR a.credits_pending + coalesce(u.cq, 0) <> coalesce(t.cq, 0)
                 ORDER BY a.code
                """
            )
        )
        return [row.code for row in rows]


def _chain_document(row: Mapping[Any, Any], chain_seq: int) -> dict[str, Any]:
    """What `ledger.chain` hashes of an entry, from a row as `_ENTRY_COLUMNS` gives it."""
    return {
        "chain_seq": chain_seq,
        "id": row["id"],
        "kind": row["kind"],
        "idempotency_key": row["idempotency_key"],
        "pending_entry_id": row["pending_entry_id"],
        "reverses_entry_id": row["reverses_entry_id"],
        "expires_at": row["expires_at"],
        "memo": row["memo"],
        "metadata": json.loads(row["metadata"]),
        "created_at": row["created_at"],
        "postings": [
            {"account": account, "direction": direction, "phase": phase, "amount_fen": amount}
            for account, direction, phase, amount in json.loads(row["postings"] or "[]")
        ],
    }


__all__ = [
    "Account",
    "Balance",
    "Entry",
    "Ledger",
    "LedgerError",
    "Limit",
    "Transfer",
    "TrialBalance",
    "run_in_transaction",
    "run_statement",
    "sqlstate",
]
