"""`GET /v1/exports/journal`: the sealed journal, streamed, for auditors and administrators.

The rows come from a server-side cursor on a connection of the export's own, in one REPEATABLE READ
snapshot (every line, and the manifest, describe the same moment), and are written out a batch at a time:
memory stays flat however long the journal. Serialization is `ledger.export`, which the offline verifier
(`voucher-ledger verify-export`) shares.

- `from`/`to` (RFC 3339 with an offset) select a contiguous stretch of the chain: from the first sealed
  entry created at or after `from` to the last created before `to`. Entries are sealed in commit order and
  stamped when their transaction began, so the stretch can hold at its edges a few entries stamped just
  outside the range; in exchange every time-ranged export still links as a chain.
- `program`, `entity_id` and `account_prefix` select entries out of the chain (the manifest records them
  and says `contiguous: false`): each entry's hash still verifies, its neighbours' links cannot.

Limits, all checked before the first byte is sent (a `422 validation_error` naming the field, a `429
rate_limited` from app/ratelimit.py), so an export is never cut short by its own parameters:

- `from` and `to` lie between 1970-01-01 and 9999-01-01 UTC, and `from` is before `to`. Outside those
  years an instant is a typing mistake, and near the ends of Python's calendar it cannot even be converted
  to UTC.
- The stretch of the chain a range covers holds at most `VL_EXPORT_ENTRIES_MAX` entries (default
  5,000,000: about 85 s and 4.6 GB of jsonl, 3 minutes of csv, at the figures of bench/export.py). An
  export is a single HTTP response: one this long is already hard to retry and to check, and a bigger
  journal reads better as consecutive ranges, each of which still links as a chain. With filters the
  stretch is what is scanned, so it is what is bounded. The stretch is found once, before the response
  starts; the rows are then read in their own snapshot, which holds all of them (the sealed chain only
  grows at its end).
- Each key may start `VL_RATE_LIMITS`' `export` allowance (default 6 a minute, a burst of 5).
- The whole service runs at most `VL_EXPORTS_CONCURRENT_MAX` exports at once (default 2), whatever the
  keys: slots held in PostgreSQL (app/export_slots.py), taken before anything is read, else `429
  rate_limited` with `Retry-After`. The export reads on a connection of the exports' own small pool, never
  the request pool, and each of its statements is cancelled after `VL_EXPORT_STATEMENT_TIMEOUT_S` (before
  the response starts, a `503 service_unavailable`; later, the stream is cut and the manifest is missing).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.dependencies import AdminOrAuditorCaller, SettingsDep
from app.errors import ServiceUnavailable, ValidationFailed, problem_responses
from app.export_slots import ExportResponse, ExportSlots
from app.ratelimit import ExportRate
from app.schemas import Rfc3339Time
from ledger import chain, export
from ledger.service import _ENTRY_COLUMNS
from vouchers.keys import KeyRing

router = APIRouter(prefix="/exports", tags=["exports"], responses=problem_responses(401, 403, 422, 429, 503))

BATCH_ROWS = 1_000
MEDIA_TYPES = {
    "jsonl": "application/x-ndjson",
    "csv": "text/csv; charset=utf-8",
    "ledger": "text/plain; charset=utf-8",
}
EXTENSIONS = {"jsonl": "jsonl", "csv": "csv", "ledger": "journal"}
# the instants a range may name: outside, a mistake (and near year 1 or 9999, not convertible to UTC)
RANGE_EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
RANGE_LATEST = datetime(9999, 1, 1, tzinfo=UTC)

# the stretch of the chain a time range selects (without a bound: the chain's own end, by its primary key)
_FIRST_SEQ = "SELECT min(chain_seq) FROM ledger_seal"
_LAST_SEQ = "SELECT max(chain_seq) FROM ledger_seal"
_FIRST_SEQ_FROM = """
    SELECT min(s.chain_seq) FROM ledger_seal s JOIN ledger_entry e ON e.id = s.entry_id
     WHERE e.created_at >= :at
"""
_LAST_SEQ_BEFORE = """
    SELECT max(s.chain_seq) FROM ledger_seal s JOIN ledger_entry e ON e.id = s.entry_id
     WHERE e.created_at < :at
"""

# An entry concerns a program when its metadata names it, or it touches the program's accounts or one of
# its vouchers; an entity, when it touches the entity's accounts or a voucher the entity holds.
_ROWS = f"""
    SELECT {_ENTRY_COLUMNS}
      FROM ledger_seal s JOIN ledger_entry e ON e.id = s.entry_id
     WHERE s.chain_seq BETWEEN :lo AND :hi
       AND (CAST(:prefix AS text) IS NULL OR EXISTS (
            SELECT 1 FROM ledger_posting p JOIN ledger_account a ON a.id = p.account_id
             WHERE p.entry_id = e.id
               AND (a.code = CAST(:prefix AS text) OR starts_with(a.code, CAST(:prefix AS text) || ':'))))
       AND (CAST(:program AS text) IS NULL OR e.metadata ->> 'program' = CAST(:program AS text) OR EXISTS (
            SELECT 1 FROM ledger_posting p JOIN ledger_account a ON a.id = p.account_id
              LEFT JOIN voucher v ON starts_with(a.code, 'voucher:') AND v.id = substr(a.code, 9)
             WHERE p.entry_id = e.id
               AND (starts_with(a.code, 'program:' || CAST(:program AS text) || ':')
                    OR v.program = CAST(:program AS text))))
       AND (CAST(:entity AS text) IS NULL OR EXISTS (
            SELECT 1 FROM ledger_posting p JOIN ledger_account a ON a.id = p.account_id
              LEFT JOIN voucher v ON starts_with(a.code, 'voucher:') AND v.id = substr(a.code, 9)
             WHERE p.entry_id = e.id
               AND (a.code = 'entity:' || CAST(:entity AS text)
                    OR starts_with(a.code, 'entity:' || CAST(:entity AS text) || ':')
                    OR v.holder_entity_id = CAST(:entity AS text))))
     ORDER BY s.chain_seq
"""  # noqa: S608 (constants only)

# jsonl lines are built by PostgreSQL: serializing in Python cost ~31 µs an entry (bench/export.py), and
# the line only has to carry the fields each hash is computed from (ledger/chain.py), in the same forms
# `export.entry_record` gives them (ids as strings, RFC 3339 UTC with microseconds, hashes in hex);
# tests/test_exports.py checks the two agree.
_RFC3339 = '\'YYYY-MM-DD"T"HH24:MI:SS.US"Z"\''
_JSONL_COLUMNS = f"""
    json_build_object(
        'chain_seq', s.chain_seq, 'id', e.id::text, 'kind', e.kind, 'idempotency_key', e.idempotency_key,
        'pending_entry_id', e.pending_entry_id::text, 'reverses_entry_id', e.reverses_entry_id::text,
        'expires_at', to_char(e.expires_at AT TIME ZONE 'UTC', {_RFC3339}),
        'created_at', to_char(e.created_at AT TIME ZONE 'UTC', {_RFC3339}),
        'memo', e.memo, 'metadata', e.metadata,
        'postings', (SELECT json_agg(json_build_object(
                             'account', a.code,
                             'debit_fen', CASE WHEN p.direction = 'debit' THEN p.amount ELSE 0 END,
                             'credit_fen', CASE WHEN p.direction = 'credit' THEN p.amount ELSE 0 END,
                             'phase', p.phase) ORDER BY p.seq)
                       FROM ledger_posting p JOIN ledger_account a ON a.id = p.account_id
                      WHERE p.entry_id = e.id),
        'prev_hash', encode(s.prev_hash, 'hex'), 'hash', encode(s.hash, 'hex'))::text AS line,
    s.chain_seq, encode(s.prev_hash, 'hex') AS prev_hash, encode(s.hash, 'hex') AS hash
"""  # noqa: S608 (constants only)
_JSONL_ROWS = _ROWS.replace(f"SELECT {_ENTRY_COLUMNS}", f"SELECT {_JSONL_COLUMNS}", 1)
assert _JSONL_ROWS != _ROWS

Format = Literal["jsonl", "csv", "ledger"]
Code = Annotated[str | None, Query(max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


def _stamp(moment: datetime | None, default: str) -> str:
    return default if moment is None else moment.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


# PostgreSQL's SQLSTATE for a statement cancelled by statement_timeout (or a cancel request)
_QUERY_CANCELED = "57014"


@asynccontextmanager
async def _connection(source: AsyncEngine | AsyncConnection) -> AsyncIterator[AsyncConnection]:
    if isinstance(source, AsyncConnection):
        yield source
    else:
        async with source.connect() as conn:
            yield conn


async def _rows(
    source: AsyncEngine | AsyncConnection, params: dict[str, Any]
) -> AsyncGenerator[list[dict[str, Any]], None]:
    """Batches of sealed entries in chain order, from one snapshot, through a server-side cursor."""
    async with _connection(source) as conn, aclosing(_batches(conn, params, _ROWS)) as batches:
        async for batch in batches:
            yield [export.entry_record(dict(row._mapping)) for row in batch]


async def _stretch(conn: AsyncConnection, from_ts: datetime | None, to_ts: datetime | None) -> tuple[int, int] | None:
    """The first and last `chain_seq` of the stretch a time range selects; None when it is empty."""
    lo = await conn.scalar(text(_FIRST_SEQ if from_ts is None else _FIRST_SEQ_FROM), {"at": from_ts})
    hi = await conn.scalar(text(_LAST_SEQ if to_ts is None else _LAST_SEQ_BEFORE), {"at": to_ts})
    if lo is None or hi is None or lo > hi:
        return None
    return int(lo), int(hi)


async def _batches(conn: AsyncConnection, params: dict[str, Any], query: str) -> AsyncGenerator[Sequence[Any], None]:
    """`params["stretch"]`, when given, is the route's, found before the response started."""
    await conn.execution_options(isolation_level="REPEATABLE READ")
    async with conn.begin():
        if "stretch" in params:
            stretch = params["stretch"]
        else:
            stretch = await _stretch(conn, params["from_ts"], params["to_ts"])
        if stretch is None:
            return
        lo, hi = stretch
        binds = {name: value for name, value in params.items() if name != "stretch"}
        result = await conn.stream(text(query), {**binds, "lo": lo, "hi": hi})
        async for batch in result.partitions(BATCH_ROWS):
            yield batch


def _body(
    fmt: Format, conn: AsyncConnection, params: dict[str, Any], sign: Callable[[export.ManifestBuilder], bytes] | None
) -> AsyncIterator[bytes]:
    filters = {
        "from": None if params["from_ts"] is None else chain.rfc3339(params["from_ts"]),
        "to": None if params["to_ts"] is None else chain.rfc3339(params["to_ts"]),
        "program": params["program"],
        "entity_id": params["entity"],
        "account_prefix": params["prefix"],
    }

    async def jsonl() -> AsyncIterator[bytes]:
        builder = export.ManifestBuilder(filters)
        async with aclosing(_batches(conn, params, _JSONL_ROWS)) as batches:
            async for batch in batches:
                out = []
                for row in batch:
                    line = row.line.encode() + b"\n"
                    builder.add({"chain_seq": row.chain_seq, "hash": row.hash, "prev_hash": row.prev_hash}, line)
                    out.append(line)
                yield b"".join(out)
        assert sign is not None
        yield sign(builder)

    async def csv() -> AsyncIterator[bytes]:
        yield export.csv_header().encode()
        async with aclosing(_rows(conn, params)) as batches:
            async for batch in batches:
                yield "".join(export.csv_rows(record) for record in batch).encode()

    async def ledger() -> AsyncIterator[bytes]:
        yield export.hledger_header().encode()
        async with aclosing(_rows(conn, params)) as batches:
            async for batch in batches:
                yield "".join(export.hledger_transaction(record) for record in batch).encode()

    return {"jsonl": jsonl, "csv": csv, "ledger": ledger}[fmt]()


@router.get(
    "/journal",
    summary="The sealed journal in chain order, streamed: jsonl (signed manifest), csv or an hledger journal",
    response_class=StreamingResponse,
    responses={200: {"content": {media: {} for media in MEDIA_TYPES.values()}}},
    dependencies=[ExportRate],
)
async def export_journal(
    request: Request,
    _caller: AdminOrAuditorCaller,
    settings: SettingsDep,
    format: Format = "jsonl",
    # RFC 3339 text only: a bare `AwareDatetime` takes a number as seconds since 1970 (`?to=0.5`)
    from_: Annotated[
        Rfc3339Time | None, Query(alias="from", description="RFC 3339 with an offset; default: the first entry")
    ] = None,
    to: Annotated[Rfc3339Time | None, Query(description="RFC 3339 with an offset, exclusive; default: now")] = None,
    program: Code = None,
    entity_id: Code = None,
    account_prefix: Annotated[str | None, Query(max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")] = None,
) -> StreamingResponse:
    for name, moment in (("from", from_), ("to", to)):
        if moment is not None and not RANGE_EARLIEST <= moment <= RANGE_LATEST:
            raise ValidationFailed(f"{name} must be between 1970-01-01 and 9999-01-01 UTC", loc=("query", name))
    if from_ is not None and to is not None and from_ >= to:
        raise ValidationFailed("from must be before to", loc=("query", "from"))
    slots: ExportSlots = request.app.state.export_slots
    lease = await slots.acquire()  # 429 when the service runs as many exports as it may
    conn = lease.conn
    sign: Callable[[export.ManifestBuilder], bytes] | None = None
    # the stretch, and for jsonl the signing key, are read before the first byte: a range too long or a
    # missing key is an error response, not a cut export
    try:
        async with conn.begin():
            stretch = await _stretch(conn, from_, to)
            covered = 0 if stretch is None else stretch[1] - stretch[0] + 1
            if covered > settings.export_entries_max:
                raise ValidationFailed(
                    f"the range covers {covered:,} entries of the chain, more than the"
                    f" {settings.export_entries_max:,} one export may hold: export it as consecutive ranges (from, to)",
                    loc=("query", "to"),
                )
            if format == "jsonl":
                keyring: KeyRing = request.app.state.keyring
                kid, key = await keyring.signer(conn)

                def sign(builder: export.ManifestBuilder) -> bytes:
                    return builder.signed_line(kid, key, datetime.now(UTC))

    except BaseException as exc:
        await lease.release()
        if isinstance(exc, DBAPIError) and getattr(exc.orig, "sqlstate", None) == _QUERY_CANCELED:
            raise ServiceUnavailable(
                f"the export's first query ran longer than {settings.export_statement_timeout_s:g} s"
                " (VL_EXPORT_STATEMENT_TIMEOUT_S); retry later, or export a shorter range",
                retry_after_s=10,
            ) from exc
        raise
    now = datetime.now(UTC)
    params = {
        "from_ts": from_,
        "to_ts": to,
        "program": program,
        "entity": entity_id,
        "prefix": account_prefix,
        "stretch": stretch,
    }
    filename = f"journal-{_stamp(from_, 'start')}-{_stamp(to, now.strftime('%Y%m%dT%H%M%SZ'))}.{EXTENSIONS[format]}"
    return ExportResponse(
        _body(format, conn, params, sign),
        lease,
        media_type=MEDIA_TYPES[format],
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
        },
    )
