"""Ledger write throughput: transfers/s and p50/p99 latency at 1, 8 and 32 concurrent connections,
spread over 10,000 accounts and all on one hot account, against the embedded PostgreSQL (durable commits).
For scale it also runs pgbench's TPC-B transaction on the same server.

    uv run python bench/ledger.py [--seconds 10] [--accounts 10000] [--no-pgbench]

Each transfer is a whole transaction through `run_in_transaction` (checkout, BEGIN, one call of
ledger_post, COMMIT), debiting a limited voucher account and crediting one of 20 unlimited provider
accounts, while the sealer runs alongside as it does in the service.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app import migrate
from app.background import seal_all
from app.db import make_engine
from app.embedded import start_embedded
from app.settings import Settings
from ledger.postings import credit, debit
from ledger.service import Ledger, run_in_transaction, run_statement

Runner = Callable[..., Awaitable[Any]]
# "statement": the transfer is the transaction (one round trip); "transaction": BEGIN, transfer, COMMIT,
# as when a command posts to the ledger inside a larger transaction of its own.
RUNNERS: dict[str, Runner] = {"statement": run_statement, "transaction": run_in_transaction}

PROVIDERS = 20


async def seed(engine: AsyncEngine, ledger: Ledger, accounts: int) -> tuple[list[str], list[str]]:
    vouchers = [f"bench:voucher:{i}" for i in range(accounts)]
    providers = [f"bench:provider:{i}:payable" for i in range(PROVIDERS)]
    async with engine.connect() as conn:
        await conn.execute(
            text(
                "INSERT INTO ledger_account (code, debits_must_not_exceed_credits) "
                "SELECT 'bench:voucher:' || i, true FROM generate_series(0, :n - 1) i"
            ),
            {"n": accounts},
        )
        await conn.execute(text("INSERT INTO ledger_account (code) VALUES ('bench:world')"))
        await conn.execute(
            text(
                "INSERT INTO ledger_account (code) SELECT 'bench:provider:' || i || :suffix "
                "FROM generate_series(0, :n - 1) i"
            ),
            {"n": PROVIDERS, "suffix": ":payable"},
        )
        await conn.commit()

    batch = 100

    async def fund(conn: AsyncConnection, chunk: list[str]) -> None:
        for code in chunk:
            await ledger.transfer(
                conn, key=f"fund:{code}", postings=[debit("bench:world", 10**12), credit(code, 10**12)]
            )

    for start in range(0, accounts, batch):
        chunk = vouchers[start : start + batch]
        await run_in_transaction(engine, lambda c, ch=chunk: fund(c, ch))  # type: ignore[misc]
    await seal_all(engine, ledger)  # no ANALYZE: a fresh deploy has only what autovacuum gives it
    return vouchers, providers


async def sealer(engine: AsyncEngine, ledger: Ledger, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await seal_all(engine, ledger)
        await asyncio.sleep(0.2)


async def scenario(
    db_url: str,
    ledger: Ledger,
    vouchers: list[str],
    providers: list[str],
    concurrency: int,
    seconds: float,
    label: str,
    runner: Runner,
) -> dict[str, float]:
    engine = make_engine(db_url, Settings(database_url=db_url, db_pool_size=concurrency + 1, db_max_overflow=0))
    latencies: list[float] = []
    errors = 0
    run_id = f"{label}:{concurrency}:{time.time_ns()}"
    counter = 0
    stop = asyncio.Event()

    async def worker(seed_value: int) -> None:
        nonlocal errors, counter
        rng = random.Random(seed_value)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            counter += 1
            key = f"{run_id}:{counter}"
            voucher = vouchers[rng.randrange(len(vouchers))]
            provider = providers[rng.randrange(len(providers))]
            started = time.perf_counter()
            try:
                await runner(
                    engine,
                    lambda c, k=key, v=voucher, p=provider: ledger.transfer(  # type: ignore[misc]
                        c, key=k, postings=[debit(v, 100), credit(p, 100)]
                    ),
                )
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)

    # warm the pool and the prepared statements
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    background = asyncio.create_task(sealer(engine, ledger, stop))
    began = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - began
    stop.set()
    await background
    await engine.dispose()
    latencies.sort()
    return {
        "tps": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("nan"),
        "errors": errors,
    }


def pgbench(server: object, data_dir: Path, seconds: int) -> float | None:
    bin_path = Path(server.bin_path)  # type: ignore[attr-defined]
    exe = bin_path / "pgbench"
    if not exe.exists():
        return None
    socket_dir = str(data_dir / "pgdata")
    base = [str(exe), "-h", socket_dir, "-U", "postgres"]
    subprocess.run([*base, "-i", "-q", "-s", "32", "postgres"], check=True, capture_output=True)
    out = subprocess.run(
        [*base, "-c", "32", "-j", "2", "-M", "prepared", "-T", str(seconds), "postgres"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for line in out.splitlines():
        if line.startswith("tps ="):
            return float(line.split()[2])
    return None


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--modes", default="statement,transaction")
    parser.add_argument("--no-pgbench", action="store_true")
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="vl-bench-"))
    db_url, server = start_embedded(data_dir)
    await asyncio.to_thread(migrate.upgrade, db_url)
    seed_engine = make_engine(db_url, Settings(database_url=db_url))
    ledger = Ledger()
    began = time.perf_counter()
    vouchers, providers = await seed(seed_engine, ledger, args.accounts)
    await seed_engine.dispose()
    print(f"seeded {len(vouchers)} voucher accounts in {time.perf_counter() - began:.1f}s")
    print(f"{'mode':<12} {'case':<8} {'conns':>5} {'transfers/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    results = {}
    for mode in args.modes.split(","):
        for label, pool in (("uniform", vouchers), ("hot", vouchers[:1])):
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                r = await scenario(db_url, ledger, pool, providers, concurrency, args.seconds, label, RUNNERS[mode])
                results[(mode, label, concurrency)] = r
                print(
                    f"{mode:<12} {label:<8} {concurrency:>5} {r['tps']:>12.0f} {r['p50_ms']:>8.2f} "
                    f"{r['p99_ms']:>8.2f} {r['errors']:>6.0f}",
                    flush=True,
                )
    check = make_engine(db_url, Settings(database_url=db_url))
    async with check.connect() as conn:
        await seal_all(check, ledger)
        mismatched = await ledger.verify_cached_balances(conn)
        chain_report = await ledger.verify_chain(conn)
    await check.dispose()
    print(
        f"after the run: cached balances {'sound' if not mismatched else mismatched[:5]}, "
        f"chain {'verifies' if chain_report.ok else chain_report.problem} ({chain_report.entries} entries)"
    )
    if not args.no_pgbench:
        tps = pgbench(server, data_dir, int(args.seconds))
        if tps:
            print(f"pgbench TPC-B (prepared, 32 clients, same server): {tps:.0f} tps")
            for (mode, label, concurrency), r in results.items():
                if label == "uniform" and concurrency == 32:
                    print(f"  ledger {mode} uniform@32 / pgbench = {r['tps'] / tps:.2f}")
    server.cleanup()
    shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
