"""Whether the journal's size is in a redemption's cost (issue 14: the rate at 1,000,000 journal entries
within 15% of the rate at 10,000), on one fresh deploy as an operator runs it.

    .venv/bin/python bench/journal_size.py [--small 10000] [--large 1000000] [--seconds 60] [--segment 20]

Each step, on the embedded PostgreSQL with durable commits and `voucher-ledger serve --workers 2`, as
bench/redeem_load.py starts them (its helpers, not copies; no ANALYZE and no restart anywhere):
1. seeds 1,000 vouchers through the API, then redeems for a few seconds over all of them, unmeasured, so
   that every token has reached both workers (each verifies a token in full the first time it sees it): left
   in, that first contact would lower the small journal's rate and flatter the ratio;
2. opens the import's accounts (`--sources` limited accounts funded from one world account, and `--sinks`
   without a limit: many payers and payees, not one hot pair) and tops the journal up to `--small` entries
   with the ledger's bulk path (`Ledger.transfer_many`), through connections of its own while the service
   runs, as a batch import would;
3. waits until the service's sealer has sealed every entry (an operator's import is done when it is), then
   measures redemptions for `--seconds` over all the vouchers, in segments of `--segment` seconds;
4. seeds the journal to `--large` entries the same way (`--seeders` connections at once, each over its own
   sources, so they never wait on each other's locks), saying how fast the bulk path went, waits for the
   sealer again, and measures again exactly as in step 3;
5. stops the service, checks the books (trial balance, cached balances, the whole chain, the redemptions
   against the provider's payable account), and runs pgbench's TPC-B on the same server.

The figure is the large journal's rate over the small one's (both over every segment). Both cores are shared
with whatever else runs, which moves the rates, so beside it the bench prints the load average at each step
and what a redemption cost at each size, which that load does not move: CPU ms of the service and of
PostgreSQL a redemption, and by table the rows read and buffers touched a redemption (pg_stat_user_tables,
pg_statio_user_tables; every backend's, the sealer's included): a read that grows with the journal shows
there. It also says when autovacuum last analyzed the journal's tables: the small journal is usually
measured before their first analyze and the large one after.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.db import make_engine
from app.settings import Settings
from bench.ledger import pgbench
from bench.redeem_load import (
    SHANGHAI,
    WARMUP_PER_VOUCHER_S,
    Service,
    admin_key,
    check_books,
    cpu_seconds,
    drive,
    fresh_deploy,
    seed,
)
from ledger.postings import credit, debit
from ledger.service import Entry, Ledger, Transfer, run_in_transaction

LIMITED = "debits_must_not_exceed_credits"
SOURCE_FUNDS_FEN = 10**15
AMOUNT_MAX_FEN = 10_000
SEALED_TIMEOUT_S = 1_800
TARGET_RATIO = 0.85


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


async def open_import_accounts(engine: AsyncEngine, ledger: Ledger, run: str, sources: int, sinks: int) -> None:
    """The import's accounts, each limited source funded from the world account in one batch."""
    world = f"bench:import:{run}:world"
    codes = [f"bench:import:{run}:source:{i}" for i in range(sources)]

    async def work(conn: AsyncConnection) -> None:
        await ledger.open_account(conn, world)
        for code in codes:
            await ledger.open_account(conn, code, limit=LIMITED)
        for i in range(sinks):
            await ledger.open_account(conn, f"bench:import:{run}:sink:{i}")
        funding = [
            Transfer(f"{code}:funding", [debit(world, SOURCE_FUNDS_FEN), credit(code, SOURCE_FUNDS_FEN)])
            for code in codes
        ]
        assert all(isinstance(o, Entry) for o in await ledger.transfer_many(conn, funding))

    await run_in_transaction(engine, work)


async def import_entries(
    engine: AsyncEngine, ledger: Ledger, args: argparse.Namespace, run: str, count: int
) -> tuple[float, int]:
    """`count` transfers from random sources to random sinks, `args.batch` per statement and transaction,
    over `args.seeders` connections at once (seeder k pays from the sources i with i % seeders == k);
    (seconds taken, entries posted)."""
    done = 0

    async def seeder(k: int, share: int) -> None:
        nonlocal done
        rng = random.Random(f"{run}:{k}:{count}")
        mine = [f"bench:import:{run}:source:{i}" for i in range(k, args.sources, args.seeders)]
        sinks = [f"bench:import:{run}:sink:{i}" for i in range(args.sinks)]
        for start in range(0, share, args.batch):
            transfers = []
            for n in range(start, min(share, start + args.batch)):
                amount = rng.randint(1, AMOUNT_MAX_FEN)
                transfers.append(
                    Transfer(
                        f"bench:import:{run}:{count}:{k}:{n}",
                        [debit(rng.choice(mine), amount), credit(rng.choice(sinks), amount)],
                        "import",
                    )
                )
            posted = await run_in_transaction(engine, lambda c, t=transfers: ledger.transfer_many(c, t))
            assert all(isinstance(o, Entry) and not o.replayed for o in posted), posted[:3]
            done += len(posted)

    shares = [count // args.seeders + (k < count % args.seeders) for k in range(args.seeders)]
    began = time.perf_counter()
    await asyncio.gather(*(seeder(k, share) for k, share in enumerate(shares) if share))
    return time.perf_counter() - began, done


async def scalar(engine: AsyncEngine, sql: str) -> Any:
    async with engine.connect() as conn:
        return await conn.scalar(text(sql))


async def wait_sealed(engine: AsyncEngine) -> float:
    """Seconds until the service's sealer has emptied its queue."""
    began = time.perf_counter()
    while await scalar(engine, "SELECT EXISTS (SELECT 1 FROM ledger_unsealed)"):
        if time.perf_counter() - began > SEALED_TIMEOUT_S:
            raise RuntimeError(f"the sealer did not catch up within {SEALED_TIMEOUT_S} s")
        await asyncio.sleep(1.0)
    return time.perf_counter() - began


async def grow(engine: AsyncEngine, ledger: Ledger, args: argparse.Namespace, run: str, target: int) -> None:
    """Bulk-post entries until the journal holds `target`, wait for the sealer, say how long each took."""
    have = int(await scalar(engine, "SELECT count(*) FROM ledger_entry"))
    if have < target:
        seconds, posted = await import_entries(engine, ledger, args, run, target - have)
        print(
            f"bulk path: {posted:,} entries in {seconds:.1f} s = {posted / seconds:,.0f} entries/s "
            f"({args.seeders} connections, {args.batch} a statement; load {load()})",
            flush=True,
        )
    print(f"sealer caught up {await wait_sealed(engine):.1f} s later", flush=True)


async def statistics_of(engine: AsyncEngine) -> str:
    """When autovacuum last analyzed the journal's tables, and the rows it counted then."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT c.relname, s.last_autoanalyze, c.reltuples::bigint AS counted"
                "  FROM pg_class c JOIN pg_stat_user_tables s ON s.relid = c.oid"
                " WHERE c.relname IN ('ledger_entry', 'ledger_posting') ORDER BY c.relname"
            )
        )
        return "; ".join(
            f"{r.relname} never analyzed"
            if r.last_autoanalyze is None
            else f"{r.relname} last analyzed {r.last_autoanalyze:%H:%M:%S} UTC at {r.counted:,} rows"
            for r in rows
        )


_READS = """
    SELECT s.relname, s.seq_tup_read + coalesce(s.idx_tup_fetch, 0) AS rows,
           io.heap_blks_hit + io.heap_blks_read + coalesce(io.idx_blks_hit + io.idx_blks_read, 0) AS blocks
      FROM pg_stat_user_tables s JOIN pg_statio_user_tables io USING (relid)
"""


async def reads(engine: AsyncEngine) -> dict[str, tuple[int, int]]:
    """Rows read and buffers touched so far, by table, as the backends have reported them (a busy backend
    reports about once a second)."""
    async with engine.connect() as conn:
        return {r.relname: (int(r.rows), int(r.blocks)) for r in await conn.execute(text(_READS))}


async def measure(
    engine: AsyncEngine,
    args: argparse.Namespace,
    service: Service,
    provider_key: str,
    tokens: list[str],
    data_dir: Path,
    label: str,
) -> dict[str, Any]:
    """Redemptions over every voucher for `--seconds`, segment by segment: the rate over all segments, the
    201s and segments, CPU ms a redemption (service, PostgreSQL, everything else) and, by table, rows read
    and buffers touched a redemption (the sealer's and every other backend's included)."""
    postmaster = int((data_dir / "pgdata" / "postmaster.pid").read_text().split()[0])

    def probe() -> tuple[float, float, float]:
        assert service.process is not None
        return cpu_seconds(service.process.pid, postmaster)

    entries = int(await scalar(engine, "SELECT count(*) FROM ledger_entry"))
    print(f"{label}: {entries:,} journal entries, load {load()}; {await statistics_of(engine)}")
    before = await reads(engine)
    ok, seconds, segments = 0, 0.0, 0
    cpu = {"service_ms": 0.0, "database_ms": 0.0, "other_ms": 0.0}
    began = time.perf_counter()
    while time.perf_counter() - began < args.seconds - 1:
        at = time.perf_counter() - began
        r = await asyncio.to_thread(
            drive, service.base_url, provider_key, tokens, args.clients, args.segment, "size", data_dir, probe
        )
        ok += r["ok"]
        seconds += r["ok"] / r["rps"] if r["ok"] else args.segment
        segments += 1
        for name in cpu:
            cpu[name] += r[name] * r["ok"]
        errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
        print(
            f"{label:<6} {at:>6.0f} {r['ok']:>8} {r['rps']:>14.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
            f"{r['service_ms']:>8.1f} {r['database_ms']:>6.1f} {r['other_ms']:>6.1f} {r['cores_busy']:>6.2f}  {errors}",
            flush=True,
        )
        if r["errors"]:
            raise RuntimeError(f"redemptions failed: {r['errors']} {r['samples']}")
    after = await reads(engine)
    per = 1 / max(ok, 1)
    tables = {
        name: ((rows - before.get(name, (0, 0))[0]) * per, (blocks - before.get(name, (0, 0))[1]) * per)
        for name, (rows, blocks) in after.items()
    }
    print(f"{label}: {ok / seconds:.0f} redemptions/s over {segments} segments, load {load()}", flush=True)
    return {
        "rate": ok / seconds,
        "ok": ok,
        "segments": segments,
        **{name: total * per for name, total in cpu.items()},
        "tables": tables,
    }


def compare(small: dict[str, Any], large: dict[str, Any]) -> None:
    """Where a redemption's cost went at each size: CPU by process group, and reads by table."""
    for label, m in (("small", small), ("large", large)):
        print(
            f"  {label}: CPU ms a redemption: service {m['service_ms']:.2f}, PostgreSQL {m['database_ms']:.2f}, "
            f"everything else on the machine {m['other_ms']:.2f}"
        )
    ours = (large["service_ms"] + large["database_ms"]) / (small["service_ms"] + small["database_ms"])
    print(f"  service and PostgreSQL CPU a redemption, large / small: {ours:.2f}")
    print(f"  {'table':<28} {'rows read a redemption':>24} {'buffers touched a redemption':>30}")
    for name in sorted(set(small["tables"]) | set(large["tables"])):
        (rs, bs), (rl, bl) = small["tables"].get(name, (0, 0)), large["tables"].get(name, (0, 0))
        if max(rs, rl, bs, bl) >= 0.5:
            print(f"  {name:<28} {rs:>11.1f} -> {rl:>10.1f} {bs:>15.1f} -> {bl:>10.1f}")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=10_000, help="journal entries for the first measurement")
    parser.add_argument("--large", type=int, default=1_000_000, help="journal entries for the second")
    parser.add_argument("--seconds", type=float, default=60.0, help="each measurement's length")
    parser.add_argument("--segment", type=float, default=20.0)
    parser.add_argument("--vouchers", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--sources", type=int, default=300, help="limited accounts the import pays from")
    parser.add_argument("--sinks", type=int, default=100, help="accounts without a limit it pays into")
    parser.add_argument("--seeders", type=int, default=2, help="connections posting the import at once")
    parser.add_argument("--batch", type=int, default=1_000, help="transfers a statement")
    parser.add_argument("--pgbench-seconds", type=int, default=30)
    args = parser.parse_args()
    if not (0 < args.small < args.large and 1 <= args.seeders <= args.sources and args.segment <= args.seconds):
        parser.error("--small below --large, --seeders at most --sources, --segment at most --seconds")

    print(f"load average before: {load()}")
    engine: AsyncEngine | None = None
    async with fresh_deploy("vl-bench-journal-", 2) as (data_dir, db_url, server, env, service):
        try:
            await service.start()
            admin = await asyncio.to_thread(admin_key, env)
            year = datetime.now(SHANGHAI).year
            began = time.perf_counter()
            provider, provider_key, vouchers, tokens = await seed(service.base_url, admin, args.vouchers, year)
            print(f"seeded {len(vouchers)} vouchers through the API in {time.perf_counter() - began:.1f} s")
            warmup = await asyncio.to_thread(
                drive,
                service.base_url,
                provider_key,
                tokens,
                args.clients,
                WARMUP_PER_VOUCHER_S * len(tokens),
                "warmup",
                data_dir,
                lambda: (0.0, 0.0, 0.0),
            )
            redeemed, runs = warmup["ok"], 1

            engine = make_engine(db_url, Settings(database_url=db_url))
            ledger = Ledger()
            run = f"{time.time_ns():x}"
            await open_import_accounts(engine, ledger, run, args.sources, args.sinks)
            print(
                f"{'case':<6} {'from s':>6} {'201s':>8} {'redemptions/s':>14} {'p50 ms':>8} {'p99 ms':>8} "
                f"{'service':>8} {'PG':>6} {'other':>6} {'cores':>6}  errors by status"
            )
            measured = {}
            for label, target in (("small", args.small), ("large", args.large)):
                await grow(engine, ledger, args, run, target)
                measured[label] = m = await measure(engine, args, service, provider_key, tokens, data_dir, label)
                redeemed, runs = redeemed + m["ok"], runs + m["segments"]
            rates = {label: m["rate"] for label, m in measured.items()}
            await engine.dispose()
            engine = None
            service.stop()
            books = await check_books(db_url, provider, redeemed, args.clients * runs)
            ratio = rates["large"] / rates["small"]
            print(
                f"journal size: {rates['small']:.0f} redemptions/s near {args.small:,} entries, {rates['large']:.0f}/s "
                f"near {args.large:,}: large/small = {ratio:.2f} (target at least {TARGET_RATIO:.2f}: "
                f"{'met' if ratio >= TARGET_RATIO else 'NOT met'})"
            )
            compare(measured["small"], measured["large"])
            tps = await asyncio.to_thread(pgbench, server, data_dir, args.pgbench_seconds)
            if tps:
                print(
                    f"pgbench TPC-B (prepared, 32 clients, scale 32, same server, after): {tps:.0f} tps; "
                    f"small / TPC-B = {rates['small'] / tps:.2f}, large / TPC-B = {rates['large'] / tps:.2f}"
                )
            print(f"load average after: {load()}")
            return 0 if books else 1
        finally:
            if engine is not None:
                await engine.dispose()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
