"""Redemption latency with and without journal exports running beside it (issue 12, section 5): p50/p99 of
`POST /v1/redemptions` at a steady offered rate, first alone, then while 30 clients over 6 auditor keys
export the journal over and over.

    .venv/bin/python bench/export_contention.py [--entries 13000] [--seconds 15] [--rate 100] [--exports 30]
        [--keys 6] [--exports-max N] [--export-pool N]

`--exports-max` and `--export-pool` set `VL_EXPORTS_CONCURRENT_MAX` and `VL_EXPORT_DB_POOL_SIZE` for the
service (unset: its defaults); `--exports-max 30 --export-pool 16` lets all 30 run at once, as before the
service-wide bound. What it does, all on loopback, in a temp folder it removes:
1. starts the embedded PostgreSQL there and migrates it, builds a journal of `--entries` transfers through
   `ledger_post` and seals it (bench/export.py's builder); no ANALYZE, as on a fresh deploy;
2. starts `voucher-ledger serve --workers 2` with every key's own export rate opened wide
   (`VL_RATE_LIMITS`), so that only the service-wide bound can refuse an export; seeds through the API 50
   compute vouchers with tokens and a provider key (bench/redeem_load.py's seeding), makes `--keys` auditor
   keys;
3. offers redemptions open-loop at `--rate` a second (each a fresh Idempotency-Key and invoice, 1 元 on a
   random voucher; latency from the moment it was due, so a stall counts in full) for a warm-up of 3 s,
   then `--seconds` alone;
4. starts `--exports` export clients in a separate process (its CPU is not this process's), each streaming
   `GET /v1/exports/journal?format=jsonl` to the end and starting again, or after a 429 waiting 1 s (not
   the 10 s `Retry-After` says: the pressure stays on); after 2 s, offers redemptions as in 3 for
   `--seconds` more, then stops the exports;
5. prints a table: redemptions answered 201 per second, p50, p99 and max latency, other answers; exports
   finished, refused (429) and failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from app import migrate
from app.db import make_engine
from app.embedded import start_embedded
from app.settings import Settings
from bench.export import auditor_key, build, seal
from bench.redeem_load import SHANGHAI, Service, admin_key, seed
from ledger.service import Ledger

WARMUP_S = 3.0
EXPORTS_RAMP_S = 2.0
REFUSED_PAUSE_S = 1.0
OUTSTANDING_MAX = 2_000  # redemptions in flight from this client, at most (past it one is counted as dropped)
VOUCHERS = 50
MS = 1_000.0


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def offer_redemptions(base_url: str, key: str, tokens: list[str], rate: float, seconds: float) -> dict[str, Any]:
    """Redemptions due every 1/rate s for `seconds`, each sent when due whatever the others are doing."""
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    dropped = 0
    run = f"{time.time_ns():x}"
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=60.0) as client:

        async def one(n: int, due: float) -> None:
            body = {
                "token": random.choice(tokens),
                "invoice_no": f"C-{run}-{n}",
                "lines": [{"category": "compute", "amount_fen": 100, "description": "GPU hours"}],
            }
            try:
                response = await client.post("/v1/redemptions", json=body, headers={"Idempotency-Key": f"c-{run}-{n}"})
                status = response.status_code
            except httpx.HTTPError:
                status = 0
            statuses[status] = statuses.get(status, 0) + 1
            if status == 201:
                latencies.append(time.perf_counter() - due)

        tasks: set[asyncio.Task[None]] = set()
        began = time.perf_counter()
        n = 0
        while (due := began + n / rate) < began + seconds:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            if len(tasks) >= OUTSTANDING_MAX:
                dropped += 1
            else:
                task = asyncio.create_task(one(n, due))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            n += 1
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - began
    return {
        "offered": n,
        "ok_per_s": statuses.get(201, 0) / wall,
        "p50": percentile(latencies, 50) * MS,
        "p99": percentile(latencies, 99) * MS,
        "max": max(latencies, default=float("nan")) * MS,
        "other": {s: c for s, c in statuses.items() if s != 201},
        "dropped": dropped,
    }


def export_driver(base_url: str, keys: list[str], clients: int, stop: Any, results: Any) -> None:
    """In its own process: `clients` export loops until `stop` is set; puts their counts on `results`."""

    async def main() -> dict[str, int]:
        counts = {"finished": 0, "refused": 0, "failed": 0, "mb": 0}
        timeout = httpx.Timeout(30.0, read=120.0)

        async def loop(i: int) -> None:
            headers = {"Authorization": f"Bearer {keys[i % len(keys)]}", "Accept-Encoding": "identity"}
            async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout) as client:
                while not stop.is_set():
                    try:
                        async with client.stream("GET", "/v1/exports/journal", params={"format": "jsonl"}) as r:
                            if r.status_code == 429:
                                await r.aread()
                                counts["refused"] += 1
                                await asyncio.sleep(REFUSED_PAUSE_S)
                                continue
                            if r.status_code != 200:
                                await r.aread()
                                counts["failed"] += 1
                                await asyncio.sleep(REFUSED_PAUSE_S)
                                continue
                            async for chunk in r.aiter_raw():
                                counts["mb"] += len(chunk)
                            counts["finished"] += 1
                    except httpx.HTTPError:
                        counts["failed"] += 1

        loops = [asyncio.create_task(loop(i)) for i in range(clients)]
        await asyncio.to_thread(stop.wait)  # a multiprocessing Event: waited for off the loop
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        counts["mb"] //= 1_000_000
        return counts

    results.put(asyncio.run(main()))


def print_table(rows: list[tuple[str, dict[str, Any], dict[str, int] | None]], rate: float) -> None:
    print(
        f"\n{'case':<34} {'offered/s':>9} {'201/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'other answers':<16} {'exports done':>12} {'429':>5} {'failed':>6}"
    )
    for label, r, e in rows:
        other = json.dumps(r["other"]) if r["other"] else "-"
        if r["dropped"]:
            other += f" dropped {r['dropped']}"
        done, refused, failed = (e["finished"], e["refused"], e["failed"]) if e else ("-", "-", "-")
        print(
            f"{label:<34} {rate:>9.0f} {r['ok_per_s']:>7.0f} {r['p50']:>8.1f} {r['p99']:>8.1f} {r['max']:>8.1f} "
            f"{other:<16} {done!s:>12} {refused!s:>5} {failed!s:>6}",
            flush=True,
        )


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=13_000)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rate", type=float, default=100.0, help="redemptions offered a second")
    parser.add_argument("--exports", type=int, default=30, help="export clients")
    parser.add_argument("--keys", type=int, default=6, help="auditor keys the export clients share")
    parser.add_argument("--exports-max", type=int, help="VL_EXPORTS_CONCURRENT_MAX (default: the service's)")
    parser.add_argument("--export-pool", type=int, help="VL_EXPORT_DB_POOL_SIZE (default: the service's)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if not (
        1 <= args.entries <= 1_000_000
        and 0 < args.seconds <= 300
        and 0 < args.rate <= 5_000
        and 1 <= args.exports <= 200
        and 1 <= args.keys <= args.exports
        and 1 <= args.workers <= 4
    ):
        parser.error("--entries in [1, 1e6], --seconds in (0, 300], --rate in (0, 5000], --exports in [1, 200]")

    data_dir = Path(tempfile.mkdtemp(prefix="vl-bench-contention-"))
    server: Any = None
    service: Service | None = None
    try:
        db_url, server = start_embedded(data_dir)
        await asyncio.to_thread(migrate.upgrade, db_url)
        engine = make_engine(db_url, Settings(database_url=db_url))
        try:
            ledger = Ledger()
            made = await build(engine, ledger, args.entries, 5_000, 300)
            sealed = await seal(engine, ledger, made)
        finally:
            await engine.dispose()
        print(f"journal: {sealed:,} sealed entries", flush=True)

        wide = {"rate_per_s": 1000, "burst": 1000}
        env = {
            **os.environ,
            "DATABASE_URL": db_url,
            "VL_DATA_DIR": str(data_dir),
            "XDG_RUNTIME_DIR": os.environ["XDG_RUNTIME_DIR"],  # set by start_embedded
            "VL_RATE_LIMITS": json.dumps({"auditor": {"export": wide}, "admin": {"export": wide}}),
        }
        if args.exports_max is not None:
            env["VL_EXPORTS_CONCURRENT_MAX"] = str(args.exports_max)
        if args.export_pool is not None:
            env["VL_EXPORT_DB_POOL_SIZE"] = str(args.export_pool)
        service = Service(env, args.workers, data_dir / "service.log")
        await service.start()
        admin = await asyncio.to_thread(admin_key, env)
        year = datetime.now(SHANGHAI).year  # an award is approved only inside its own program year
        _provider, provider_key, _vouchers, tokens = await seed(service.base_url, admin, VOUCHERS, year)
        auditors = [await asyncio.to_thread(auditor_key, env) for _ in range(args.keys)]
        bound = env.get("VL_EXPORTS_CONCURRENT_MAX", "default")
        pool = env.get("VL_EXPORT_DB_POOL_SIZE", "default")
        print(
            f"service: --workers {args.workers}, VL_EXPORTS_CONCURRENT_MAX={bound}, VL_EXPORT_DB_POOL_SIZE={pool}; "
            f"{len(tokens)} vouchers; {args.keys} auditor keys",
            flush=True,
        )

        print("load average (1, 5, 15 min) before the load: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
        await offer_redemptions(service.base_url, provider_key, tokens, args.rate, WARMUP_S)
        alone = await offer_redemptions(service.base_url, provider_key, tokens, args.rate, args.seconds)

        context = multiprocessing.get_context("spawn")
        stop = context.Event()
        results = context.Queue()
        driver = context.Process(
            target=export_driver, args=(service.base_url, auditors, args.exports, stop, results), daemon=True
        )
        driver.start()
        await asyncio.sleep(EXPORTS_RAMP_S)
        beside = await offer_redemptions(service.base_url, provider_key, tokens, args.rate, args.seconds)
        stop.set()
        exports = await asyncio.to_thread(results.get, True, 120)
        await asyncio.to_thread(driver.join, 30)

        print_table(
            [
                ("alone", alone, None),
                (f"beside {args.exports} export clients", beside, exports),
            ],
            args.rate,
        )
        print(f"exports streamed {exports['mb']:,} MB in {args.seconds + EXPORTS_RAMP_S:.0f} s")
        print("load average (1, 5, 15 min) at the end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    finally:
        if service is not None:
            service.stop()
        if server is not None:
            server.cleanup()
        shutil.rmtree(data_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
