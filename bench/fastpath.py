"""Does the redemption fast path earn its place (issue 14, part 4)? The same service, the same database and the
same load, with `app/fastpath.py` on and off (`VL_REDEMPTION_FAST_PATH`), in alternating rounds of one run.

    .venv/bin/python bench/fastpath.py [--rounds 4] [--segment 20] [--vouchers 200] [--clients 32]

The embedded PostgreSQL and `voucher-ledger serve --workers 2` in a temp folder, seeded through the API as
bench/redeem_load.py does (its helpers, one home), then `--rounds` rounds of two segments, on then off in
odd rounds and off then on in even ones, so a trend in the machine or the database (the journal grows)
weighs on both alike. Before each segment the service is started afresh in that mode and given an
unmeasured warm-up (every token verified by both workers). Each segment is wrk with `--clients`
connections over all the vouchers. The figures: redemptions/s, and the service's CPU per redemption (what the
fast path saves), each side's median over the rounds. The books are checked at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.redeem_load import (
    SHANGHAI,
    WARMUP_PER_VOUCHER_S,
    WARMUP_S,
    admin_key,
    check_books,
    cpu_seconds,
    drive,
    fresh_deploy,
    seed,
)

MODES = {"on": "true", "off": "false"}


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--segment", type=float, default=20.0, metavar="SECONDS")
    parser.add_argument("--vouchers", type=int, default=200)
    parser.add_argument("--clients", type=int, default=32)
    args = parser.parse_args()

    async with fresh_deploy("vl-bench-fastpath-", 2) as (data_dir, db_url, _server, env, service):
        await service.start()
        admin = await asyncio.to_thread(admin_key, env)
        provider, provider_key, _vouchers, tokens = await seed(
            service.base_url, admin, args.vouchers, datetime.now(SHANGHAI).year
        )
        service.stop()
        postmaster = int((data_dir / "pgdata" / "postmaster.pid").read_text().split()[0])

        def probe() -> tuple[float, float, float]:
            assert service.process is not None
            return cpu_seconds(service.process.pid, postmaster)

        print(
            f"{'round':>5} {'fast path':>9} {'201s':>8} {'redemptions/s':>14} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'service':>8} {'PG':>6} {'cores':>6}  errors"
        )
        results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
        redeemed = runs = 0
        for round_no in range(1, args.rounds + 1):
            for mode in ("on", "off") if round_no % 2 else ("off", "on"):
                service.env = {**env, "VL_REDEMPTION_FAST_PATH": MODES[mode]}
                await service.start()
                warmup_s = max(WARMUP_S, WARMUP_PER_VOUCHER_S * len(tokens))
                warm = await asyncio.to_thread(
                    drive, service.base_url, provider_key, tokens, args.clients, warmup_s, "warmup", data_dir, probe
                )
                r = await asyncio.to_thread(
                    drive, service.base_url, provider_key, tokens, args.clients, args.segment, mode, data_dir, probe
                )
                service.stop()
                redeemed += warm["ok"] + r["ok"]
                runs += 2
                results[mode].append(r)
                errors = ", ".join(f"{k}: {v}" for k, v in {**warm["errors"], **r["errors"]}.items()) or "0"
                print(
                    f"{round_no:>5} {mode:>9} {r['ok']:>8} {r['rps']:>14.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
                    f"{r['service_ms']:>8.2f} {r['database_ms']:>6.2f} {r['cores_busy']:>6.2f}  {errors}",
                    flush=True,
                )
        ok = await check_books(db_url, provider, redeemed, args.clients * runs)
        rps = {mode: statistics.median(r["rps"] for r in rs) for mode, rs in results.items()}
        cpu = {mode: statistics.median(r["service_ms"] for r in rs) for mode, rs in results.items()}
        print(
            f"median redemptions/s: on {rps['on']:.0f}, off {rps['off']:.0f} (on/off {rps['on'] / rps['off']:.2f}); "
            f"service CPU ms a redemption: on {cpu['on']:.2f}, off {cpu['off']:.2f} "
            f"(saved {1 - cpu['on'] / cpu['off']:.0%})"
        )
        errors = sum(sum(r["errors"].values()) for rs in results.values() for r in rs)
        return 0 if ok and errors == 0 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
