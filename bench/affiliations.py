"""Affiliation checks at scale: 100,000 entities and 300,000 relations on the embedded PostgreSQL, then the
service's `check_affiliation` (one version query per check, then the in-memory graph) timed per check.

    uv run python bench/affiliations.py [--pairs 5000] [--known 1000] [--seed 42]

The relations: 400 holding chains of depth 25, 10 groups of 3,000 members under one ultimate controller,
60,000 entities in small groups of up to 20, 500 control relations between random entities (entities with
two ultimate controllers, and some control cycles), 120,000 influence (20-50 %) and 80,000 personnel links
between random entities, 20,000 equity stakes below influence, and a share of relations ended or not yet
started. Checks run one after another, each in its own session (a request's), on three sets of pairs:
random pairs as of one day, random pairs on random days of a year (cold group caches), and pairs known to
be affiliated (chain ends, members of one big group, linked pairs).

Then a change, as the service makes one: a relation recorded, and later one ended (a control inside a big
group). The first check after each brings the cached graph forward by the rows changed (issue 14: it
reloaded all of them, 1.71 s); the checks after it run on empty member-tree caches. The whole load is timed
again for comparison. Like the other benches, this measures a fresh deploy: the tables are never ANALYZEd
by hand, so the plans are those made before or without autovacuum's first statistics.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app import migrate
from app.db import make_engine
from app.embedded import start_embedded
from app.settings import Settings
from vouchers.affiliations import (
    NewAffiliation,
    Thresholds,
    _cache_for,
    check_affiliation,
    end_affiliation,
    record_affiliation,
)

ENTITIES = 100_000
CHAINS, CHAIN_DEPTH = 400, 25
BIG_GROUPS, BIG_GROUP_SIZE = 10, 3_000
SMALL_BLOCK = 20
CROSS_CONTROLS = 500
INFLUENCE, PERSONNEL = 120_000, 80_000
RELATIONS = 300_000  # the rest are equity stakes below influence (about 20,000)
AS_OF = date(2026, 6, 1)


def entity_id(i: int) -> str:
    return f"ent_{i:024d}"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def generate(rng: random.Random) -> tuple[list[tuple[Any, ...]], list[tuple[int, int]]]:
    """The relations as COPY records, and pairs known to be affiliated on AS_OF."""
    records: list[tuple[Any, ...]] = []
    known: list[tuple[int, int]] = []
    start = date(2018, 1, 1)

    def add(f: int, t: int, kind: str, pct: Decimal | None, valid_from: date = start, valid_to: date | None = None):
        records.append(
            (f"aff_{len(records):024d}", entity_id(f), entity_id(t), kind, pct, valid_from, valid_to, "bench")
        )

    def control(f: int, t: int) -> None:
        if rng.random() < 0.5:
            add(f, t, "control", None)
        else:
            add(f, t, "equity", Decimal(rng.randrange(5001, 10001)) / 100)

    # deep holding chains: entities [0, 10,000)
    for c in range(CHAINS):
        top = c * CHAIN_DEPTH
        for k in range(CHAIN_DEPTH - 1):
            control(top + k, top + k + 1)
        known.append((top + CHAIN_DEPTH - 1, top))
    first = CHAINS * CHAIN_DEPTH
    # big groups: random recursive trees of 3,000 under one root
    for g in range(BIG_GROUPS):
        root = first + g * BIG_GROUP_SIZE
        for j in range(1, BIG_GROUP_SIZE):
            control(root + rng.randrange(0, j), root + j)
        for _ in range(50):
            known.append((root + rng.randrange(BIG_GROUP_SIZE), root + rng.randrange(BIG_GROUP_SIZE)))
    first += BIG_GROUPS * BIG_GROUP_SIZE
    # small groups for the rest
    for block in range(first, ENTITIES, SMALL_BLOCK):
        for j in range(1, min(SMALL_BLOCK, ENTITIES - block)):
            if rng.random() < 0.7:
                control(block + rng.randrange(0, j), block + j)
    for _ in range(CROSS_CONTROLS):
        f, t = rng.sample(range(ENTITIES), 2)
        add(f, t, "control", None)

    def dates() -> tuple[date, date | None]:
        x = rng.random()
        if x < 0.08:  # ended before AS_OF
            return start, date(2024, 1, 1) + timedelta(days=rng.randrange(0, 700))
        if x < 0.12:  # not yet started
            return date(2026, 7, 1), None
        return start + timedelta(days=rng.randrange(0, 2000)), None

    weak = RELATIONS - len(records) - INFLUENCE - PERSONNEL
    for n in range(INFLUENCE + PERSONNEL + weak):
        f, t = rng.sample(range(ENTITIES), 2)
        valid_from, valid_to = dates()
        if n < INFLUENCE:
            add(f, t, "equity", Decimal(rng.randrange(2000, 5001)) / 100, valid_from, valid_to)
        elif n < INFLUENCE + PERSONNEL:
            add(f, t, "personnel", None, valid_from, valid_to)
        else:
            add(f, t, "equity", Decimal(rng.randrange(1, 2000)) / 100, valid_from, valid_to)
        holds = valid_from <= AS_OF and (valid_to is None or valid_to >= AS_OF)
        if n % 2000 == 0 and holds and n < INFLUENCE + PERSONNEL:
            known.append((f, t))
    return records, known


async def seed(engine: AsyncEngine, records: list[tuple[Any, ...]]) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO entity (id, uscc, name, kind, division_code, guangzhou_registered, eligible) "
                "SELECT 'ent_' || lpad(i::text, 24, '0'), '91440106' || lpad(i::text, 10, '0'), "
                "'bench entity ' || i, 'enterprise', '440106', true, true FROM generate_series(0, :n - 1) AS i"
            ),
            {"n": ENTITIES},
        )
        raw = await conn.get_raw_connection()
        driver: Any = raw.driver_connection
        await driver.copy_records_to_table(
            "affiliation",
            records=records,
            columns=["id", "from_entity_id", "to_entity_id", "kind", "equity_pct", "valid_from", "valid_to", "source"],
        )


async def timed_checks(
    sessions: async_sessionmaker[AsyncSession],
    pairs: Sequence[tuple[int, int, date]],
    thresholds: Thresholds,
) -> tuple[list[float], int]:
    latencies = []
    affiliated = 0
    for a, b, on in pairs:
        began = time.perf_counter()
        async with sessions() as session:
            answer = await check_affiliation(session, entity_id(a), entity_id(b), on, thresholds)
        latencies.append(time.perf_counter() - began)
        affiliated += answer.affiliated
    return latencies, affiliated


async def first_check_after(
    change: str,
    sessions: async_sessionmaker[AsyncSession],
    pair: tuple[int, int, bool | None],
    after: Sequence[tuple[int, int, date]],
    thresholds: Thresholds,
) -> None:
    """The first check after `change` (the graph brought forward), on a pair and its expected answer if
    known, then the next checks."""
    a, b, expected = pair
    began = time.perf_counter()
    async with sessions() as session:
        answer = await check_affiliation(session, entity_id(a), entity_id(b), AS_OF, thresholds)
    first_ms = 1000 * (time.perf_counter() - began)
    assert expected is None or answer.affiliated is expected, answer
    latencies, _affiliated = await timed_checks(sessions, after, thresholds)
    ordered = sorted(latencies)
    print(
        f"first check after {change}: {first_ms:.1f} ms; the next {len(ordered)}: "
        f"p50 {1000 * statistics.median(ordered):.2f} ms, p99 {1000 * ordered[int(0.99 * (len(ordered) - 1))]:.2f} ms",
        flush=True,
    )


def report(label: str, latencies: list[float], affiliated: int) -> None:
    ordered = sorted(latencies)
    p50 = 1000 * statistics.median(ordered)
    p99 = 1000 * ordered[int(0.99 * (len(ordered) - 1))]
    total = sum(latencies)
    print(
        f"{label:<34} {len(ordered):>6} {len(ordered) / total:>9.0f} {p50:>8.2f} {p99:>8.2f} "
        f"{1000 * ordered[-1]:>8.1f} {affiliated:>10}",
        flush=True,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=5_000)
    parser.add_argument("--known", type=int, default=1_000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--lookback-months", type=int, default=12, help="the service's default; 0: the day alone")
    args = parser.parse_args()
    rng = random.Random(args.seed)

    data_dir = Path(tempfile.mkdtemp(prefix="vl-bench-aff-"))
    db_url, server = start_embedded(data_dir)
    try:
        await asyncio.to_thread(migrate.upgrade, db_url)
        engine = make_engine(db_url, Settings(database_url=db_url, db_pool_size=2, db_max_overflow=0))
        began = time.perf_counter()
        records, known = generate(rng)
        await seed(engine, records)
        print(f"seeded {ENTITIES:,} entities and {len(records):,} relations in {time.perf_counter() - began:.1f}s")
        del records
        gc.collect()
        sessions = async_sessionmaker(engine, expire_on_commit=False)
        thresholds = Thresholds(Decimal("50"), Decimal("20"), lookback_months=args.lookback_months)

        rss_before = rss_mb()
        began = time.perf_counter()
        async with sessions() as session:  # the first check loads the graph
            await check_affiliation(session, entity_id(0), entity_id(1), AS_OF, thresholds)
        load_s = time.perf_counter() - began
        gc.collect()
        print(f"graph load (query, table, adjacency): {load_s:.2f}s, process memory +{rss_mb() - rss_before:.0f} MB")

        today = [(rng.randrange(ENTITIES), rng.randrange(ENTITIES), AS_OF) for _ in range(args.pairs)]
        year = [
            (rng.randrange(ENTITIES), rng.randrange(ENTITIES), AS_OF - timedelta(days=rng.randrange(365)))
            for _ in range(args.pairs)
        ]
        sure = [(a, b, AS_OF) for a, b in rng.sample(known, min(args.known, len(known)))]
        header = (
            f"{'pairs':<34} {'checks':>6} {'checks/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'affiliated':>10}"
        )
        print(header)
        for label, pairs in (
            ("random, one day (first pass)", today),
            ("random, one day (again)", today),
            ("random, random days of a year", year),
            ("known affiliated", sure),
            ("all of the above, shuffled", rng.sample(today + year + sure, len(today + year + sure))),
        ):
            latencies, affiliated = await timed_checks(sessions, pairs, thresholds)
            report(label, latencies, affiliated)
            if label == "known affiliated":
                assert affiliated == len(pairs), f"{len(pairs) - affiliated} known pairs not affiliated"

        # the version query alone, for scale
        samples = []
        for _ in range(2000):
            began = time.perf_counter()
            async with sessions() as session:
                await session.execute(text("SELECT version FROM affiliation_registry"))
            samples.append(time.perf_counter() - began)
        print(f"version query alone (session, round trip): p50 {1000 * statistics.median(samples):.2f} ms")

        # a change: the first check after it brings the graph forward, the next ones refill the caches
        after = rng.sample(today, min(2_000, len(today)))
        recorded = NewAffiliation(entity_id(7), entity_id(99_999), "personnel", date(2020, 1, 1))
        async with sessions() as session:
            await record_affiliation(session, recorded)
            await session.commit()
        await first_check_after("a new relation", sessions, (7, 99_999, True), after, thresholds)
        # ended: a control inside the first big group, so the ultimate controllers below it move
        ended = f"aff_{CHAINS * (CHAIN_DEPTH - 1) + 1_000:024d}"
        async with sessions() as session:
            end = await end_affiliation(session, ended, AS_OF - timedelta(days=1))
            await session.commit()
        pair = (int(end.to_entity_id.removeprefix("ent_")), CHAINS * CHAIN_DEPTH, None)  # and the group's root
        await first_check_after("an ended control", sessions, pair, after, thresholds)

        _cache_for(engine).snapshot = None  # forgotten: the next check loads the whole table, as before
        began = time.perf_counter()
        async with sessions() as session:
            await check_affiliation(session, entity_id(0), entity_id(1), AS_OF, thresholds)
        print(f"whole load, for comparison (query, table, adjacency): {time.perf_counter() - began:.2f}s")
        await engine.dispose()
    finally:
        server.cleanup()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
