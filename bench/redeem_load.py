"""Redemptions through the HTTP app: redemptions/s and p50/p99 latency with 32 concurrent clients posting
`POST /v1/redemptions`, spread over 1,000 vouchers and all on one voucher, against the service as it runs
(`voucher-ledger serve --workers 2`) on the embedded PostgreSQL (durable commits, sealer running). For scale
it also runs pgbench's TPC-B transaction on the same server.

    uv run python bench/redeem.py [--seconds 15] [--vouchers 1000] [--clients 32] [--no-pgbench]

What it does, all on loopback, in a temp folder it removes at the end:
1. starts the embedded PostgreSQL in the temp folder and migrates it (as bench/ledger.py does);
2. starts `voucher-ledger serve --workers 2 --port <free>` as a separate process with `DATABASE_URL`
   pointing at that server and `VL_DATA_DIR` at the temp folder (its key-encryption-key file lives there);
3. makes an admin key with `voucher-ledger apikey create`, then seeds through the HTTP API only, 16
   requests at a time: a compute budget, one provider entity and its key (`POST /v1/api-keys`), and for each
   of 1,000 holders an entity, a compute application, its approval (10,000 元 each; the hot voucher, the
   first, gets its full 1,000,000 元) and a token. Nothing is inserted with SQL: an issued voucher is a
   budget commitment, ledger accounts and entries, and application claims, which only the API makes right;
4. ANALYZE, then restarts the service so its pooled connections plan on the seeded tables (PERFORMANCE.md,
   point 5);
5. drives `POST /v1/redemptions` from this process: `--clients` workers, each its own `httpx.AsyncClient`
   (one keep-alive HTTP/1.1 connection), for `--seconds`, after a short unmeasured warm-up; every request a
   fresh Idempotency-Key and invoice number and one compute line of 1 元; first uniform over the vouchers,
   then all on the hot one;
6. stops the service, seals what is left, checks the books (trial balance, cached balances against the
   postings, the chain, and the redemptions against the provider's payable account), runs pgbench.

Redemptions/s counts 201s only; the latency percentiles are over 201s; other answers are counted by status.
The load generator shares the machine's cores with the service and PostgreSQL: its CPU use is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
from sqlalchemy import text

from app import migrate
from app.background import seal_all
from app.db import make_engine
from app.embedded import start_embedded
from app.settings import Settings
from bench.ledger import pgbench
from ledger.service import Ledger
from vouchers.uscc import make_uscc

VOUCHER_LEDGER = str(Path(sys.executable).with_name("voucher-ledger"))
YUAN = 100
PROGRAM = "compute.purchase"
FACE_FEN = 10_000 * YUAN  # each uniform voucher; a redemption takes 1 元
HOT_FACE_FEN = 1_000_000 * YUAN  # the hot voucher: the application's full award
PURCHASE_FEN = 2_000_000 * YUAN  # last year's compute purchases: above the 1,000,000 元 threshold
LINE_FEN = 1 * YUAN
SEED_CONCURRENCY = 16
WARMUP_S = 2.0
REQUEST_TIMEOUT_S = 30.0
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
SHANGHAI = timezone(timedelta(hours=8))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Service:
    """`voucher-ledger serve` in its own process group, its output in a log file in the temp folder."""

    def __init__(self, env: dict[str, str], workers: int, log_path: Path) -> None:
        self.env, self.workers, self.log_path = env, workers, log_path
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        command = [VOUCHER_LEDGER, "serve", "--host", "127.0.0.1", "--port", str(self.port), "--workers"]
        with self.log_path.open("ab") as log:
            return subprocess.Popen(
                [*command, str(self.workers)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() signals the workers too
            )

    async def start(self) -> None:
        self.process = self._spawn()
        deadline = time.monotonic() + START_TIMEOUT_S
        async with httpx.AsyncClient(base_url=self.base_url, timeout=2.0) as client:
            ready = 0
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the service exited with {self.process.returncode}: see {self.log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get("/readyz")).status_code == 200:
                        ready += 1
                        if ready >= 2 * self.workers:  # a few answers, so likely from every worker
                            return
                        continue
                await asyncio.sleep(0.2)
        raise RuntimeError(f"the service was not ready within {START_TIMEOUT_S:g} s: see {self.log_path}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=STOP_TIMEOUT_S)


_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: str) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state, ppid, pgrp, ..., utime at [11], stime at [12]), None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_seconds(service_group: int, postmaster: int) -> tuple[float, float, float]:
    """CPU seconds so far of the service's process group, of PostgreSQL (the postmaster and its children),
    and of the whole machine (busy time from /proc/stat), to see where a case's CPU went."""
    service = database = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or (fields := _stat(entry.name)) is None:
            continue
        used = (int(fields[11]) + int(fields[12])) / _TICK
        if int(fields[2]) == service_group:
            service += used
        elif int(entry.name) == postmaster or int(fields[1]) == postmaster:
            database += used
    cpu = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    busy = (sum(cpu) - cpu[3] - cpu[4]) / _TICK  # all but idle and iowait
    return service, database, busy


def admin_key(env: dict[str, str]) -> str:
    out = subprocess.run(
        [VOUCHER_LEDGER, "apikey", "create", "--role", "admin", "--name", "bench"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return out.strip().splitlines()[-1]


def expect(response: httpx.Response, status: int) -> dict[str, Any]:
    if response.status_code != status:
        request = response.request
        raise RuntimeError(f"{request.method} {request.url.path}: {response.status_code} {response.text}")
    body: dict[str, Any] = response.json()
    return body


async def bounded(concurrency: int, jobs: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    gate = asyncio.Semaphore(concurrency)

    async def one(job: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            return await job()

    return await asyncio.gather(*(one(job) for job in jobs))


async def seed(base_url: str, admin: str, vouchers: int, year: int) -> tuple[str, str, list[str], list[str]]:
    """Through the API: (provider entity, provider key, voucher ids, tokens); the first voucher is the hot one."""
    auth = {"Authorization": f"Bearer {admin}"}
    limits = httpx.Limits(max_connections=SEED_CONCURRENCY, max_keepalive_connections=SEED_CONCURRENCY)
    async with httpx.AsyncClient(base_url=base_url, headers=auth, limits=limits, timeout=REQUEST_TIMEOUT_S) as client:
        path = f"/v1/programs/{PROGRAM}/budgets/{year}"
        current = expect(await client.get(path), 200)["budget_fen"]
        needed = HOT_FACE_FEN + (vouchers - 1) * FACE_FEN
        expect(await client.put(path, json={"amount_fen": current + needed}), 200)

        async def entity(kind: str, label: str) -> str:
            uscc = make_uscc("440106")  # 天河区, Guangzhou
            body = {"uscc": uscc, "name": f"bench {label} {uscc}", "kind": kind, "tags": []}
            return str(expect(await client.post("/v1/entities", json=body), 201)["id"])

        seller = await entity("provider", "seller")
        provider = await entity("provider", "provider")
        created = await client.post(
            "/v1/api-keys", json={"role": "provider", "name": "bench provider", "entity_id": provider}
        )
        provider_key = str(expect(created, 201)["key"])

        async def voucher(i: int) -> tuple[str, str]:
            holder = await entity("enterprise", f"holder {i}")
            purchase = {
                "provider_entity_id": seller,
                "invoice_no": f"BENCH-{i}",
                "category": "compute",
                "amount_fen": PURCHASE_FEN,
                "purchased_on": f"{year - 1}-05-01",
            }
            application = {
                "program": PROGRAM,
                "applicant_entity_id": holder,
                "year": year,
                "basis": {"purchases": [purchase]},
            }
            submitted = expect(await client.post("/v1/applications", json=application), 201)
            decision = None if i == 0 else {"award_fen": FACE_FEN}
            issued = expect(await client.post(f"/v1/applications/{submitted['id']}/approve", json=decision), 201)
            voucher_id = str(issued["id"])
            token = expect(await client.post(f"/v1/vouchers/{voucher_id}/token"), 201)["token"]
            return voucher_id, str(token)

        made = await bounded(SEED_CONCURRENCY, [lambda i=i: voucher(i) for i in range(vouchers)])
        hot = expect(await client.get(f"/v1/vouchers/{made[0][0]}"), 200)
        assert hot["available_fen"] == HOT_FACE_FEN, hot
    return provider, provider_key, [v for v, _ in made], [t for _, t in made]


async def drive(
    base_url: str,
    provider_key: str,
    tokens: list[str],
    clients: int,
    seconds: float,
    label: str,
    probe: Callable[[], tuple[float, float, float]],
) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    samples: dict[str, str] = {}  # the first answer of each error status
    numbers: Iterator[int] = itertools.count()
    run = f"{label}-{time.time_ns()}"

    async def worker(index: int) -> None:
        rng = random.Random(index)
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        headers = {"Authorization": f"Bearer {provider_key}"}
        async with httpx.AsyncClient(
            base_url=base_url, headers=headers, limits=limits, timeout=REQUEST_TIMEOUT_S
        ) as client:
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                n = next(numbers)
                body = {
                    "token": tokens[rng.randrange(len(tokens))],
                    "invoice_no": f"{run}-{n}",
                    "lines": [{"category": "compute", "amount_fen": LINE_FEN, "description": "GPU hours"}],
                }
                started = time.perf_counter()
                try:
                    response = await client.post(
                        "/v1/redemptions", json=body, headers={"Idempotency-Key": f"{run}-{n}"}
                    )
                except httpx.HTTPError as exc:
                    statuses[type(exc).__name__] += 1
                    continue
                elapsed = time.perf_counter() - started
                statuses[str(response.status_code)] += 1
                if response.status_code == 201:
                    latencies.append(elapsed)
                else:
                    samples.setdefault(str(response.status_code), response.text[:300])

    cpu, before = time.process_time(), probe()
    began = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(clients)))
    wall = time.perf_counter() - began
    cpu, after = time.process_time() - cpu, probe()
    service, database, busy = (a - b for a, b in zip(after, before, strict=True))
    latencies.sort()
    per = 1000 / max(len(latencies), 1)
    return {
        "rps": len(latencies) / wall,
        "ok": len(latencies),
        "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("nan"),
        "errors": {k: v for k, v in sorted(statuses.items()) if k != "201"},
        "samples": samples,
        "client_cpu": cpu / wall,
        # CPU ms per redemption: the service's processes, PostgreSQL's, and everything else on the machine
        "service_ms": service * per,
        "database_ms": database * per,
        "other_ms": (busy - service - database - cpu) * per,
        "cores_busy": busy / wall,
    }


async def check_books(db_url: str, provider: str, redeemed: int) -> bool:
    """`redeemed`: the 201s this process received (warm-up and both cases)."""
    engine = make_engine(db_url, Settings(database_url=db_url))
    ledger = Ledger()
    try:
        await seal_all(engine, ledger)
        async with engine.connect() as conn:
            trial = await ledger.trial_balance(conn)
            mismatched = await ledger.verify_cached_balances(conn)
            chain = await ledger.verify_chain(conn)
            count, paid = (await conn.execute(_PAID, {"p": provider})).one()
            payable = await ledger.balance(conn, f"entity:{provider}:payable")
    finally:
        await engine.dispose()
    balanced = (
        trial.total_debits_fen == trial.total_credits_fen
        and trial.total_debits_pending_fen == trial.total_credits_pending_fen
    )
    owed = payable.credits_posted_fen - payable.debits_posted_fen
    paid_ok = count == redeemed and int(paid) == redeemed * LINE_FEN == owed
    print(
        f"books: trial balance {'balances' if balanced else 'DOES NOT BALANCE'} "
        f"({trial.total_debits_fen:,} fen debited and credited); cached balances "
        f"{'equal the postings' if not mismatched else mismatched[:5]}; chain "
        f"{'verifies' if chain.ok else chain.problem} ({chain.entries:,} entries); "
        f"{count:,} redemptions for {redeemed:,} 201s, {int(paid):,} fen = the provider's payable {owed:,} fen: "
        f"{'yes' if paid_ok else 'NO'}"
    )
    return balanced and not mismatched and chain.ok and paid_ok


_PAID = text("SELECT count(*), coalesce(sum(subsidy_fen), 0) FROM redemption WHERE provider_entity_id = :p")


def print_row(label: str, clients: int, r: dict[str, Any]) -> None:
    errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
    print(
        f"{label:<8} {clients:>7} {r['ok']:>8} {r['rps']:>14.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
        f"{r['service_ms']:>8.1f} {r['database_ms']:>6.1f} {100 * r['client_cpu']:>7.0f}% "
        f"{r['other_ms']:>6.1f} {r['cores_busy']:>6.2f}  {errors}",
        flush=True,
    )
    for status, body in r["samples"].items():
        print(f"         first {status}: {body}")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--vouchers", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="`serve --workers`")
    parser.add_argument("--no-pgbench", action="store_true")
    args = parser.parse_args()
    if not (0 < args.seconds <= 600 and 1 <= args.vouchers <= 100_000 and 1 <= args.clients <= 1000):
        parser.error("--seconds in (0, 600], --vouchers in [1, 100000], --clients in [1, 1000]")

    data_dir = Path(tempfile.mkdtemp(prefix="vl-bench-redeem-"))
    server: Any = None
    service: Service | None = None
    ok = False
    try:
        db_url, server = start_embedded(data_dir)
        await asyncio.to_thread(migrate.upgrade, db_url)
        env = {
            **os.environ,
            "DATABASE_URL": db_url,
            "VL_DATA_DIR": str(data_dir),
            "XDG_RUNTIME_DIR": os.environ["XDG_RUNTIME_DIR"],  # set by start_embedded
        }
        service = Service(env, args.workers, data_dir / "service.log")
        await service.start()
        admin = await asyncio.to_thread(admin_key, env)
        year = datetime.now(SHANGHAI).year + 1
        began = time.perf_counter()
        provider, provider_key, vouchers, tokens = await seed(service.base_url, admin, args.vouchers, year)
        print(f"seeded {len(vouchers)} vouchers of {year} through the API in {time.perf_counter() - began:.1f}s")
        engine = make_engine(db_url, Settings(database_url=db_url))
        async with engine.connect() as conn:
            await conn.execute(text("ANALYZE"))
            await conn.commit()
        await engine.dispose()
        service.stop()
        await service.start()  # fresh pools: plans made on the analyzed tables

        postmaster = int((data_dir / "pgdata" / "postmaster.pid").read_text().split()[0])

        def probe() -> tuple[float, float, float]:
            assert service is not None and service.process is not None
            return cpu_seconds(service.process.pid, postmaster)

        warmup = await drive(service.base_url, provider_key, tokens, args.clients, WARMUP_S, "warmup", probe)
        print(
            "CPU columns: ms of CPU per redemption in the service's processes and in PostgreSQL, this load "
            "generator's share of a core, ms per redemption used by anything else on the machine, cores busy"
        )
        print(
            f"{'case':<8} {'clients':>7} {'201s':>8} {'redemptions/s':>14} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'service':>8} {'PG':>6} {'client':>8} {'other':>6} {'cores':>6}  errors by status"
        )
        results = {}
        for label, pool in (("uniform", tokens), ("hot", tokens[:1])):
            r = await drive(service.base_url, provider_key, pool, args.clients, args.seconds, label, probe)
            results[label] = r
            print_row(label, args.clients, r)
        service.stop()
        redeemed = warmup["ok"] + sum(r["ok"] for r in results.values())
        ok = await check_books(db_url, provider, redeemed)
        if not args.no_pgbench:
            tps = await asyncio.to_thread(pgbench, server, data_dir, int(args.seconds))
            if tps:
                print(f"pgbench TPC-B (prepared, 32 clients, scale 32, same server): {tps:.0f} tps")
                for label, r in results.items():
                    print(f"  redemptions {label} / pgbench = {r['rps'] / tps:.2f}")
    finally:
        if service is not None:
            service.stop()
        if server is not None:
            server.cleanup()
        shutil.rmtree(data_dir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
