"""Affiliated parties (关联方, arts. 8, 9): recorded relations, and the check that application review and
redemption ask on a date. The rule and its algorithm are pure, in `vouchers/affiliation_graph.py`.

    affiliation = await check_affiliation(session, a, b, on, thresholds)   # inside the request's session
    if affiliation.affiliated: refuse, naming affiliation.path

Relations are never deleted (migration 0004); the one change a relation takes is an end, `valid_to` set once.
Commands flush and never commit: the caller owns the transaction.

Caching (PERFORMANCE.md point 3). Each process keeps the whole relation graph in memory, per database,
tagged with the version of `affiliation_registry` it was built at. Every check first runs one cheap query
(the registry's version, and whether both entities exist); when the version differs from the cached one,
the graph is brought to the new version before answering. Every insert and every end sets a fresh version
in the writer's transaction, so a relation recorded in any process, this one included, is seen by the very
next check everywhere: no TTL, no stale answer. Concurrent checks wait for that one update instead of each
making it. The version is a sequence value, never reused, so a graph loaded inside a transaction that later
rolled back can never pass for a committed state.

Bringing a graph forward (issue 14). Relations are events: one is recorded, or an open one is ended. Each
row keeps the version of the statement that last inserted or ended it (`changed_version`, migration 0021),
so a graph at version V is brought to the current version V' by the rows changed after V, read in one
query, in the snapshot that also returns V', and applied to the graph in place (`_Snapshot.apply`: about
a millisecond, where loading the whole table costs seconds at 300,000 relations). That is exact because a
writer takes the registry's row lock in its first statement on relations and holds it to its commit:
writers commit one after the other, in version order, so a snapshot that shows V' shows every change made at
a version up to V' and none made after, but its own transaction's. One condition: V is in
`affiliation_version_log` as this snapshot sees it. A statement's version is there once its transaction
commits (and for that transaction itself before), so then the graph's state is part of the snapshot's, and
V' is V or later. A graph built inside a
transaction that rolled back (its relations nobody else will see), or later than the snapshot (an older
REPEATABLE READ one), fails it and the graph is loaded whole: one query returning the relations as column
arrays, and the build in a thread. So it is on the first check, and when more than `_CHANGES_MAX` rows
changed (a process idle through a bulk import).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import string
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from sqlalchemy import and_, column, or_, select, table, text, tuple_
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from vouchers.affiliation_graph import (
    KINDS,
    Affiliation,
    AffiliationGraph,
    Effect,
    Kind,
    Relation,
    RelationTable,
    Thresholds,
    months_before,
)
from vouchers.errors import VoucherError

__all__ = [
    "ID_PATTERN",
    "SOURCE_LENGTH_MAX",
    "Affiliation",
    "AffiliationAlreadyEnded",
    "AffiliationError",
    "AffiliationNotFound",
    "AffiliationRecord",
    "Effect",
    "InvalidAffiliation",
    "Kind",
    "NewAffiliation",
    "Relation",
    "Thresholds",
    "UnknownEntity",
    "check_affiliation",
    "check_affiliation_at",
    "end_affiliation",
    "get_affiliation",
    "list_affiliations",
    "months_before",
    "parse_equity_pct",
    "path_documents",
    "record_affiliation",
    "validate_new",
]

ID_PATTERN = re.compile(r"aff_[a-z0-9]{24}")
SOURCE_LENGTH_MAX = 500  # matched by a CHECK in migration 0004
_ID_ALPHABET = string.ascii_lowercase + string.digits
_PCT_TEXT = re.compile(r"[0-9]{1,3}(\.[0-9]+)?")
_HUNDREDTH = Decimal("0.01")


class AffiliationError(VoucherError):
    code = "affiliation_error"


class InvalidAffiliation(AffiliationError):
    """The request cannot be recorded as it stands; `field` names the culprit."""

    code = "validation_error"

    def __init__(self, detail: str, *, field: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.reason = detail


class AffiliationNotFound(AffiliationError):
    code = "not_found"

    def __init__(self, affiliation_id: str) -> None:
        super().__init__(f"no affiliation {affiliation_id}")


class AffiliationAlreadyEnded(AffiliationError):
    code = "conflict"

    def __init__(self, affiliation_id: str, valid_to: date) -> None:
        super().__init__(f"affiliation {affiliation_id} already ends on {valid_to.isoformat()}; an end is final")


class UnknownEntity(AffiliationError):
    code = "not_found"

    def __init__(self, entity_id: str) -> None:
        super().__init__(f"no entity {entity_id}")
        self.entity_id = entity_id


# --------------------------------------------------------------------------------------------------------
# Records and their validation (pure)


@dataclass(frozen=True, slots=True)
class NewAffiliation:
    from_entity_id: str
    to_entity_id: str
    kind: Kind
    valid_from: date
    equity_pct: Decimal | None = None
    valid_to: date | None = None
    source: str | None = None


@dataclass(frozen=True, slots=True)
class AffiliationRecord:
    id: str
    from_entity_id: str
    to_entity_id: str
    kind: Kind
    equity_pct: Decimal | None
    valid_from: date
    valid_to: date | None
    source: str | None
    created_at: datetime
    ended_at: datetime | None

    def relation(self) -> Relation:
        return Relation(
            self.id,
            self.from_entity_id,
            self.to_entity_id,
            self.kind,
            self.equity_pct,
            self.valid_from,
            self.valid_to,
        )


def parse_equity_pct(value: object) -> Decimal:
    """A percentage of equity, exactly: an integer, a Decimal (JSON parsed with `parse_float=Decimal`) or a
    string of digits; never a float (binary fractions cannot say 33.33). Above 0, at most 100, and at most
    two decimals of value (20.000 is 20.00; 20.001 is refused rather than rounded, as numeric(5,2) would)."""
    if isinstance(value, bool) or not isinstance(value, int | Decimal | str):
        raise ValueError('equity_pct must be a number or a string like "20.00"')
    if isinstance(value, str):
        if not _PCT_TEXT.fullmatch(value):
            raise ValueError('equity_pct must be a percentage like "20.00"')
        value = Decimal(value)
    try:
        pct = Decimal(value)
        if not pct.is_finite() or not Decimal(0) < pct <= Decimal(100):
            raise ValueError("equity_pct must be above 0 and at most 100")
        if pct != pct.quantize(_HUNDREDTH):
            raise ValueError("equity_pct has at most two decimals")
        return pct.quantize(_HUNDREDTH)
    except InvalidOperation:
        raise ValueError("equity_pct must be above 0 and at most 100") from None


def validate_new(new: NewAffiliation) -> None:
    """The rules of a relation that need no database (the database checks them again)."""
    if new.kind not in KINDS:
        raise InvalidAffiliation(f"must be one of {', '.join(KINDS)}", field="kind")
    if new.from_entity_id == new.to_entity_id:
        raise InvalidAffiliation("an entity is not related to itself", field="to_entity_id")
    if new.kind == "equity":
        if new.equity_pct is None:
            raise InvalidAffiliation("an equity relation needs its percentage", field="equity_pct")
        try:
            parse_equity_pct(new.equity_pct)
        except ValueError as exc:
            raise InvalidAffiliation(str(exc).removeprefix("equity_pct "), field="equity_pct") from None
    elif new.equity_pct is not None:
        raise InvalidAffiliation(f"only equity has a percentage, not {new.kind}", field="equity_pct")
    if new.valid_to is not None and new.valid_to < new.valid_from:
        raise InvalidAffiliation("ends before valid_from", field="valid_to")
    if new.source is not None and not 1 <= len(new.source) <= SOURCE_LENGTH_MAX:
        raise InvalidAffiliation(f"1 to {SOURCE_LENGTH_MAX} characters", field="source")


# --------------------------------------------------------------------------------------------------------
# Commands and reads (they flush; the caller commits)

_COLUMNS = (
    "id",
    "from_entity_id",
    "to_entity_id",
    "kind",
    "equity_pct",
    "valid_from",
    "valid_to",
    "source",
    "created_at",
    "ended_at",
)
_RETURNING = (
    " RETURNING id, from_entity_id, to_entity_id, kind, equity_pct, valid_from, valid_to, source, created_at, ended_at"
)
_SELECT = (
    "SELECT id, from_entity_id, to_entity_id, kind, equity_pct, valid_from, valid_to, source, created_at,"
    " ended_at FROM affiliation WHERE id = :id"
)
_INSERT = text(
    "INSERT INTO affiliation (id, from_entity_id, to_entity_id, kind, equity_pct, valid_from, valid_to, source) "
    "VALUES (:id, :from_entity_id, :to_entity_id, :kind, :equity_pct, :valid_from, :valid_to, :source)" + _RETURNING
)
_ENTITIES = text("SELECT id, kind FROM entity WHERE id = ANY(:ids)")
_GET = text(_SELECT)
_GET_FOR_UPDATE = text(_SELECT + " FOR UPDATE")
_END = text(
    "UPDATE affiliation SET valid_to = :valid_to, ended_at = now() WHERE id = :id"  # noqa: S608 (constants only)
    + _RETURNING
)

_affiliation = table(
    "affiliation",
    *(column(name) for name in _COLUMNS),
)


def _record(row: Any) -> AffiliationRecord:
    return AffiliationRecord(
        id=row.id,
        from_entity_id=row.from_entity_id,
        to_entity_id=row.to_entity_id,
        kind=row.kind,
        equity_pct=row.equity_pct,
        valid_from=row.valid_from,
        valid_to=row.valid_to,
        source=row.source,
        created_at=row.created_at,
        ended_at=row.ended_at,
    )


def _new_id() -> str:
    return "aff_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


async def record_affiliation(session: AsyncSession, new: NewAffiliation) -> AffiliationRecord:
    """Record a relation. An unknown entity is the request's fault: `InvalidAffiliation` naming the field.
    A natural person (POLICY.md) is where a relation starts, never where it ends: nobody holds equity in, or
    controls, a person, and a person's office is recorded from the person to the company."""
    validate_new(new)
    ids = [new.from_entity_id, new.to_entity_id]
    known = {row.id: row.kind for row in await session.execute(_ENTITIES, {"ids": ids})}
    for name, entity_id in (("from_entity_id", new.from_entity_id), ("to_entity_id", new.to_entity_id)):
        if entity_id not in known:
            raise InvalidAffiliation(f"no entity {entity_id}", field=name)
    if known[new.to_entity_id] == "person":
        raise InvalidAffiliation(
            f"{new.to_entity_id} is a natural person: a relation starts from a person (as shareholder, controller "
            "or officer) and ends at an organisation; record it from the person",
            field="to_entity_id",
        )
    row = (
        await session.execute(
            _INSERT,
            {
                "id": _new_id(),
                "from_entity_id": new.from_entity_id,
                "to_entity_id": new.to_entity_id,
                "kind": new.kind,
                "equity_pct": None if new.equity_pct is None else parse_equity_pct(new.equity_pct),
                "valid_from": new.valid_from,
                "valid_to": new.valid_to,
                "source": new.source,
            },
        )
    ).one()
    return _record(row)


async def end_affiliation(session: AsyncSession, affiliation_id: str, valid_to: date) -> AffiliationRecord:
    """End a relation on `valid_to` (its last related day). Once: a second end is `AffiliationAlreadyEnded`,
    as is ending a relation recorded with an end."""
    row = (await session.execute(_GET_FOR_UPDATE, {"id": affiliation_id})).one_or_none()
    if row is None:
        raise AffiliationNotFound(affiliation_id)
    if row.valid_to is not None:
        raise AffiliationAlreadyEnded(affiliation_id, row.valid_to)
    if valid_to < row.valid_from:
        raise InvalidAffiliation(f"ends before valid_from {row.valid_from.isoformat()}", field="valid_to")
    ended = (await session.execute(_END, {"id": affiliation_id, "valid_to": valid_to})).one()
    return _record(ended)


async def get_affiliation(session: AsyncSession, affiliation_id: str) -> AffiliationRecord:
    row = (await session.execute(_GET, {"id": affiliation_id})).one_or_none()
    if row is None:
        raise AffiliationNotFound(affiliation_id)
    return _record(row)


async def list_affiliations(
    session: AsyncSession,
    *,
    entity_id: str | None,
    after: tuple[datetime, str] | None,
    limit: int,
) -> list[AffiliationRecord]:
    """Relations in the order they were recorded, of one entity (either end) or all."""
    a = _affiliation.c
    query = select(_affiliation).order_by(a.created_at, a.id).limit(limit)
    if entity_id is not None:
        query = query.where(or_(a.from_entity_id == entity_id, a.to_entity_id == entity_id))
    if after is not None:
        query = query.where(and_(tuple_(a.created_at, a.id) > tuple_(*after)))
    return [_record(row) for row in (await session.execute(query)).all()]


# --------------------------------------------------------------------------------------------------------
# The check, and the per-process graph cache

_PROBE = text(
    "SELECT version, EXISTS (SELECT FROM entity WHERE id = :a) AS a_known, "
    "EXISTS (SELECT FROM entity WHERE id = :b) AS b_known FROM affiliation_registry"
)
_VERSION = text("SELECT version FROM affiliation_registry")
# The relations of a query's rows as column arrays (`_table_of`). Days are proleptic ordinals (PostgreSQL's
# calendar is proleptic Gregorian, like Python's).
_ARRAYS = """
       array_agg(id) AS ids,
       array_agg(from_entity_id) AS from_ids,
       array_agg(to_entity_id) AS to_ids,
       array_agg(kind) AS kinds,
       array_agg((equity_pct * 100)::integer) AS pcts,
       array_agg(valid_from - DATE '0001-01-01' + 1) AS first_days,
       array_agg(valid_to - DATE '0001-01-01' + 1) AS last_days
"""
# One round trip, one snapshot: the version read is exactly the state of the relations returned.
_LOAD = text(
    "SELECT (SELECT version FROM affiliation_registry) AS version,"  # noqa: S608 (constants only)
    + _ARRAYS
    + "FROM (SELECT * FROM affiliation ORDER BY id) AS r"
)
# The same for the rows changed after a version, with whether that version is part of this snapshot's
# history. Ordered by version and limited, so the index on changed_version reads them whatever the
# statistics say (a fresh deploy has none), and so a long way behind costs no more than a reload.
_CHANGES = text(
    "SELECT (SELECT version FROM affiliation_registry) AS version,"  # noqa: S608 (constants only)
    " EXISTS (SELECT FROM affiliation_version_log WHERE version = :since) AS follows,"
    + _ARRAYS
    + "FROM (SELECT * FROM affiliation WHERE changed_version > :since ORDER BY changed_version LIMIT :most) AS r"
)
# More changes than this since a graph's version, and it is loaded whole: applying them holds the event loop
# (tens of microseconds a change), a load builds in a thread.
_CHANGES_MAX = 2_000
# Cached member trees (thousands of members each) or answers freed between two turns of the event loop.
_FREE_SLICE = 64
# Graphs kept per loaded snapshot: one per threshold set in use (normally one).
_GRAPHS_PER_SNAPSHOT_MAX = 4


@dataclass(slots=True)
class _Snapshot:
    version: int
    table: RelationTable
    graphs: dict[Thresholds, AffiliationGraph] = field(default_factory=dict)

    def apply(self, version: int, rows: Iterable[tuple[Any, ...]]) -> list[OrderedDict[Any, Any]]:
        """Bring this snapshot to `version` by `rows`, the relations changed since, in place (the graph
        module says why), and return the caches its graphs dropped. Safe because every reader of a snapshot
        is in this event loop's thread, and none holds it across an await (a check gets the graph and
        answers at once): this runs in that thread, with no await, so no check sees it half done; and the
        one thread that reads it, building the graph of another threshold set, holds the cache's lock, as
        the caller of this does (a build left running by a cancelled check is thrown away)."""
        changed = self.table.apply(rows)
        dropped = [cache for graph in self.graphs.values() for cache in graph.apply(changed)]
        self.version = version
        return dropped


def _rows_of(row: Any) -> Iterable[tuple[Any, ...]]:
    if row.ids is None:  # no relation
        return ()
    return zip(row.ids, row.from_ids, row.to_ids, row.kinds, row.pcts, row.first_days, row.last_days, strict=True)


async def _free_gradually(caches: list[OrderedDict[Any, Any]]) -> None:
    """Empty `caches` a slice at a time, yielding to the event loop between slices. After a few thousand
    checks a graph's caches hold millions of group members; dropped at once, they held the loop for 100 ms,
    the first check after a change with it (bench/affiliations.py)."""
    for cache in caches:
        while cache:
            for _ in range(min(len(cache), _FREE_SLICE)):
                cache.popitem()
            await asyncio.sleep(0)


def _table_of(row: Any) -> RelationTable:
    table = RelationTable()
    for relation in _rows_of(row):
        table.add(*relation)
    return table


class _GraphCache:
    """The graph of one database, in this process."""

    def __init__(self) -> None:
        self.snapshot: _Snapshot | None = None
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self._freeing: set[asyncio.Task[None]] = set()

    def _loop_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    async def graph(
        self, session: AsyncSession | AsyncConnection, version: int, thresholds: Thresholds
    ) -> tuple[int, AffiliationGraph]:
        """The graph at `version` or newer, with the version it was built from."""
        snapshot = self.snapshot
        if snapshot is None or snapshot.version != version:
            async with self._loop_lock():
                snapshot = self.snapshot
                if snapshot is None or snapshot.version != version:
                    snapshot = self.snapshot = await self._refreshed(session, snapshot)
        graph = snapshot.graphs.get(thresholds)
        if graph is None:
            async with self._loop_lock():
                graph = snapshot.graphs.get(thresholds)
                if graph is None:
                    graph = await asyncio.to_thread(AffiliationGraph, snapshot.table, thresholds)
                    if len(snapshot.graphs) >= _GRAPHS_PER_SNAPSHOT_MAX:
                        snapshot.graphs.clear()
                    snapshot.graphs[thresholds] = graph
        return snapshot.version, graph

    async def _refreshed(self, session: AsyncSession | AsyncConnection, snapshot: _Snapshot | None) -> _Snapshot:
        """The relations as `session` sees them now: `snapshot` brought forward by the rows changed since its
        version when it can be (module docstring), else loaded whole. A write may have committed since the
        caller read the version: the snapshot returned carries its own."""
        if snapshot is not None:
            row = (await session.execute(_CHANGES, {"since": snapshot.version, "most": _CHANGES_MAX + 1})).one()
            if row.version == snapshot.version:
                return snapshot
            if row.follows and len(row.ids or ()) <= _CHANGES_MAX:
                try:
                    dropped = snapshot.apply(row.version, _rows_of(row))
                except BaseException:
                    self.snapshot = None  # half applied: never answer with it
                    raise
                freeing = asyncio.create_task(_free_gradually(dropped))
                self._freeing.add(freeing)  # the loop keeps only a weak reference to a task
                freeing.add_done_callback(self._freeing.discard)
                return snapshot
        row = (await session.execute(_LOAD)).one()
        return _Snapshot(row.version, await asyncio.to_thread(_table_of, row))

    def cached(self, thresholds: Thresholds) -> tuple[int, AffiliationGraph] | None:
        snapshot = self.snapshot
        graph = None if snapshot is None else snapshot.graphs.get(thresholds)
        return None if snapshot is None or graph is None else (snapshot.version, graph)


_CACHES: dict[str, _GraphCache] = {}
_BY_ENGINE: weakref.WeakKeyDictionary[Engine, _GraphCache] = weakref.WeakKeyDictionary()


def _cache_of(session: AsyncSession | AsyncConnection) -> _GraphCache:
    bind = session.engine if isinstance(session, AsyncConnection) else session.get_bind().engine
    return _cache_for(bind)


def _cache_for(engine: AsyncEngine | Engine) -> _GraphCache:
    """The graph cache of `engine`'s database (engines on one database share it). Found by the engine
    object itself after the first time: rendering or hashing its URL on every check cost a redemption
    about 4 % of a worker's CPU (py-spy)."""
    sync = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    cache = _BY_ENGINE.get(sync)
    if cache is None:
        key = sync.url.render_as_string(hide_password=True)
        cache = _CACHES.get(key)
        if cache is None:
            cache = _CACHES[key] = _GraphCache()
        _BY_ENGINE[sync] = cache
    return cache


async def check_affiliation(session: AsyncSession, a: str, b: str, on: date, thresholds: Thresholds) -> Affiliation:
    """Are entities `a` and `b` affiliated on `on` (POLICY.md, arts. 8, 9)? The answer names the relations
    that make them so, as a walk from `a` to `b`. `UnknownEntity` when either is not an entity.

    Runs inside the caller's session (one cheap query, plus one to bring the graph forward after a change) and
    reads relations the session itself has recorded but not yet committed."""
    probe = (await session.execute(_PROBE, {"a": a, "b": b})).one()
    for entity_id, known in ((a, probe.a_known), (b, probe.b_known)):
        if not known:
            raise UnknownEntity(entity_id)
    _version, graph = await _cache_of(session).graph(session, probe.version, thresholds)
    return graph.check(a, b, on)


def path_documents(path: list[Relation], held_on: date | None = None) -> list[dict[str, Any]]:
    """The relations of an affiliation's walk as an answer shows them (a refusal's `errors[0].path`), each
    with `held_on`, the day they held together (the look-back names a day before the one asked about)."""
    return [
        {
            "id": r.id,
            "from_entity_id": r.from_entity_id,
            "to_entity_id": r.to_entity_id,
            "kind": r.kind,
            "equity_pct": None if r.equity_pct is None else f"{r.equity_pct:.2f}",
            **({} if held_on is None else {"held_on": held_on.isoformat()}),
        }
        for r in path
    ]


def check_affiliation_cached(
    engine: AsyncEngine, a: str, b: str, on: date, thresholds: Thresholds
) -> tuple[int, Affiliation] | None:
    """`check_affiliation_at`'s answer when this process has the graph loaded, with no connection at all;
    None when it has not (then `check_affiliation_at` loads it)."""
    found = _cache_for(engine).cached(thresholds)
    if found is None:
        return None
    version, graph = found
    return version, graph.check(a, b, on)


async def check_affiliation_at(
    conn: AsyncConnection, a: str, b: str, on: date, thresholds: Thresholds, *, reload: bool = False
) -> tuple[int, Affiliation]:
    """`check_affiliation` against this process's cached graph, with no query when one is loaded (and
    not `reload`), and the registry version that graph was built from: the caller must confirm, in the
    transaction that acts on the answer, that the registry is still at that version (or check again with
    `reload`). Both parties must be known entities (the caller knows them from rows that reference them).
    A load runs on `conn` and leaves its transaction open."""
    cache = _cache_of(conn)
    found = None if reload else cache.cached(thresholds)
    if found is None:
        current = int(await conn.scalar(_VERSION))
        found = await cache.graph(conn, current, thresholds)
    version, graph = found
    return version, graph.check(a, b, on)
