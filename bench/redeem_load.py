"""Redemptions under load, against the database's own ceiling: redemptions/s, p50/p99 latency and errors of
`POST /v1/redemptions` at 32 connections, over 1,000 vouchers and all on one voucher, against the service as
it runs (`voucher-ledger serve --workers 2`) on the embedded PostgreSQL with durable commits, and pgbench's
TPC-B transaction on the same server in the same run; the ratio of the two is the figure (issue 6: at least
0.30 with no errors, and the hot voucher at no less than a third of the uniform rate).

    .venv/bin/python bench/redeem_load.py [--seconds 15] [--vouchers 1000] [--clients 32] [--no-pgbench]
    .venv/bin/python bench/redeem_load.py --soak 300 [--segment 30]      # issue 14: as an operator runs it

`--soak SECONDS` measures what an operator gets from a fresh deploy with no warm-up either: redemptions for
SECONDS over the first 40
vouchers and then for SECONDS over all of them, each printed per `--segment` seconds, then pgbench. Its
figures: the slowest segment against TPC-B, and the last segment of each case against its first.

Needs wrk (Debian: `apt-get install wrk`). What it does, all on loopback, in a temp folder it removes:
1. starts the embedded PostgreSQL in the temp folder and migrates it (as bench/ledger.py does), and says
   whether commits are durable (`synchronous_commit`, `fsync`: both stay on);
2. starts `voucher-ledger serve --workers 2 --port <free>` as a separate process with `DATABASE_URL`
   pointing at that server and `VL_DATA_DIR` at the temp folder (its key-encryption-key file lives there);
3. makes an admin key with `voucher-ledger apikey create`, then seeds through the HTTP API only, 16
   requests at a time: a compute budget, one provider entity and its key (`POST /v1/api-keys`), and for each
   of 1,000 holders an entity, a compute application, its approval (10,000 元 each; the hot voucher, the
   first, gets its full 1,000,000 元) and a token. Nothing is inserted with SQL: an issued voucher is a
   budget commitment, ledger accounts and entries, and application claims, which only the API makes right;
4. no ANALYZE and no restart: a fresh deploy has only the statistics autovacuum gives it, and every
   statement on the redemption path reads by key whatever they are (issue 14, tests/test_plans.py);
5. drives `POST /v1/redemptions` with wrk from its own process (one thread, `--clients` keep-alive
   connections, a Lua script: every request a fresh Idempotency-Key and invoice number and one compute line
   of 1 元, a random token of the case), after a short unmeasured warm-up of each case (each worker verifies
   a token in full the first time it sees it); first uniform over the vouchers, then all on the hot one;
6. stops the service, seals what is left, checks the books (trial balance, cached balances against the
   postings, the chain, and the redemptions against the provider's payable account and the 201s counted),
   runs pgbench (TPC-B, prepared, 32 clients, scale 32) on the same server.

Redemptions/s counts 201s only; every other answer is an error, counted by status (and socket errors).
wrk's latency percentiles are over every answer. The CPU columns say where the machine's two cores went.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
from sqlalchemy import text
from sqlalchemy.engine import make_url

from app import migrate
from app.background import seal_all
from app.db import make_engine
from app.embedded import start_embedded
from app.settings import Settings
from bench.ledger import pgbench
from ledger.service import Ledger
from vouchers.uscc import make_uscc

VOUCHER_LEDGER = str(Path(sys.executable).with_name("voucher-ledger"))
WRK = shutil.which("wrk") or "wrk"
YUAN = 100
PROGRAM = "compute.purchase"
FACE_FEN = 10_000 * YUAN  # each uniform voucher; a redemption takes 1 元
HOT_FACE_FEN = 1_000_000 * YUAN  # the hot voucher: the application's full award
PURCHASE_FEN = 2_000_000 * YUAN  # last year's compute purchases: above the 1,000,000 元 threshold
LINE_FEN = 1 * YUAN
SEED_CONCURRENCY = 16
WARMUP_S = 2.0
# each worker verifies a token in full the first time it sees it (then caches it): the uniform warm-up is
# long enough for every token to reach both workers a few times, so the measured run is the steady state
WARMUP_PER_VOUCHER_S = 0.006
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


class Deploy(NamedTuple):
    data_dir: Path
    db_url: str
    server: Any  # the embedded PostgreSQL's handle
    env: dict[str, str]  # the service's environment
    service: Service


@contextlib.asynccontextmanager
async def fresh_deploy(prefix: str, workers: int) -> AsyncIterator[Deploy]:
    """What an operator deploys, in a temp folder removed at the end: the embedded PostgreSQL, migrated, with
    its durability said, and `voucher-ledger serve --workers N` ready to start against it (not started)."""
    data_dir = Path(tempfile.mkdtemp(prefix=prefix))
    server: Any = None
    service: Service | None = None
    try:
        db_url, server = start_embedded(data_dir)
        await asyncio.to_thread(migrate.upgrade, db_url)
        await say_durability(db_url)
        env = {
            **os.environ,
            "DATABASE_URL": db_url,
            "VL_DATA_DIR": str(data_dir),
            "XDG_RUNTIME_DIR": os.environ["XDG_RUNTIME_DIR"],  # set by start_embedded
        }
        service = Service(env, workers, data_dir / "service.log")
        yield Deploy(data_dir, db_url, server, env, service)
    finally:
        if service is not None:
            service.stop()
        if server is not None:
            server.cleanup()
        shutil.rmtree(data_dir, ignore_errors=True)


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


WRK_SCRIPT = r"""
-- one redemption per request: a fresh Idempotency-Key and invoice number, a random token of the case
local tokens = dofile(TOKENS_FILE)
local counter = 0
statuses, sample = {}, nil  -- globals: done() reads them from each thread with thread:get
local threads = {}

function setup(thread)
    thread:set("id", #threads + 1)
    table.insert(threads, thread)
end

function init(args)
    math.randomseed(id * 7919)
end

function request()
    counter = counter + 1
    local n = RUN .. "-" .. id .. "-" .. counter
    local body = '{"token":"' .. tokens[math.random(#tokens)] .. '","invoice_no":"' .. n
        .. '","lines":[{"category":"compute","amount_fen":LINE_FEN,"description":"GPU hours"}]}'
    return wrk.format("POST", "/v1/redemptions",
        {["Authorization"] = AUTHORIZATION, ["Content-Type"] = "application/json", ["Idempotency-Key"] = n}, body)
end

function response(status, headers, body)
    statuses[status] = (statuses[status] or 0) + 1
    if status ~= 201 and sample == nil then sample = body:sub(1, 300) end
end

function done(summary, latency, requests)
    local all, first = {}, nil
    for _, thread in ipairs(threads) do
        for status, n in pairs(thread:get("statuses")) do all[status] = (all[status] or 0) + n end
        first = first or thread:get("sample")
    end
    local parts = {}
    for status, n in pairs(all) do table.insert(parts, string.format('"%d":%d', status, n)) end
    local e = summary.errors
    io.write(string.format(
        '\nRESULT {"duration_us":%d,"requests":%d,"p50_us":%d,"p99_us":%d,"statuses":{%s},'
        .. '"socket_errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d},"sample":%q}\n',
        summary.duration, summary.requests, latency:percentile(50), latency:percentile(99),
        table.concat(parts, ","), e.connect, e.read, e.write, e.timeout, first or ""))
end
"""


def wrk_script(folder: Path, provider_key: str, tokens: list[str], label: str) -> Path:
    """The Lua script for one case, and the token list it reads, in `folder`."""
    tokens_file = folder / f"tokens-{label}.lua"
    tokens_file.write_text("return {\n" + "".join(f'"{t}",\n' for t in tokens) + "}\n")
    header = (
        f'local TOKENS_FILE = "{tokens_file}"\n'
        f'local RUN = "{label}-{time.time_ns()}"\n'
        f'local AUTHORIZATION = "Bearer {provider_key}"\n'
    )
    script = folder / f"redeem-{label}.lua"
    script.write_text(header + WRK_SCRIPT.replace("LINE_FEN", str(LINE_FEN)))
    return script


def drive(
    base_url: str,
    provider_key: str,
    tokens: list[str],
    clients: int,
    seconds: float,
    label: str,
    folder: Path,
    probe: Callable[[], tuple[float, float, float]],
) -> dict[str, Any]:
    """One case: wrk (one thread, `clients` keep-alive connections) for `seconds`, from its own process."""
    script = wrk_script(folder, provider_key, tokens, label)
    command = [WRK, "-t", "1", "-c", str(clients), "-d", f"{max(1, round(seconds))}s", "--timeout", "30s"]
    before = probe()
    began = time.perf_counter()
    ran = subprocess.run(
        [*command, "-s", str(script), base_url], capture_output=True, text=True, timeout=seconds + 120, check=False
    )
    if ran.returncode != 0:
        raise RuntimeError(f"wrk failed ({ran.returncode}): {ran.stdout[-2000:]} {ran.stderr[-2000:]}")
    out = ran.stdout
    wall = time.perf_counter() - began
    after = probe()
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT ")).removeprefix("RESULT "))
    service, database, busy = (a - b for a, b in zip(after, before, strict=True))
    ok = int(result["statuses"].get("201", 0))
    duration = result["duration_us"] / 1e6
    per = 1000 / max(ok, 1)
    errors = {status: n for status, n in result["statuses"].items() if status != "201"}
    errors.update({f"socket {k}": n for k, n in result["socket_errors"].items() if n})
    return {
        "rps": ok / duration,
        "ok": ok,
        "p50_ms": result["p50_us"] / 1000,
        "p99_ms": result["p99_us"] / 1000,
        "errors": errors,
        "samples": {"first non-201": result["sample"]} if result["sample"] else {},
        # CPU ms per redemption: the service's processes, PostgreSQL's, and everything else (wrk included)
        "service_ms": service * per,
        "database_ms": database * per,
        "other_ms": (busy - service - database) * per,
        "cores_busy": busy / wall,
    }


async def check_books(db_url: str, provider: str, redeemed: int, in_flight_max: int) -> bool:
    """`redeemed`: the 201s wrk counted (warm-ups and both cases). wrk stops at its deadline without reading
    the answers still on their way, so up to `in_flight_max` more redemptions committed than it counted."""
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
    paid_ok = redeemed <= count <= redeemed + in_flight_max and int(paid) == count * LINE_FEN == owed
    print(
        f"books: trial balance {'balances' if balanced else 'DOES NOT BALANCE'} "
        f"({trial.total_debits_fen:,} fen debited and credited); cached balances "
        f"{'equal the postings' if not mismatched else mismatched[:5]}; chain "
        f"{'verifies' if chain.ok else chain.problem} ({chain.entries:,} entries); "
        f"{count:,} redemptions for {redeemed:,} 201s counted (+ at most {in_flight_max} in flight at wrk's "
        f"deadlines), {int(paid):,} fen = the provider's payable {owed:,} fen: "
        f"{'yes' if paid_ok else 'NO'}"
    )
    return balanced and not mismatched and chain.ok and paid_ok


REDEEM_SQL = r"""
\set n random(1, {count})
SELECT r.outcome FROM bench_token b, LATERAL (SELECT gen_random_uuid()::text AS u) k,
    LATERAL voucher_redeem('bench-sql', k.u, 'POST /v1/redemptions', sha256(convert_to(k.u, 'UTF8')), b.jti, false,
        b.voucher_id, 'voucher:' || b.voucher_id, 'entity:{provider}:payable', '{provider}', k.u, false, NULL,
        {line}, {line}, {line}, 'rdm_' || substr(md5(k.u), 1, 24), '[]'::jsonb, '[]'::jsonb, 'bench', '{{}}'::jsonb,
        '{{}}'::jsonb) r
 WHERE b.n = :n;
"""


def pgbench_redeem(
    server: object, data_dir: Path, database: str, seconds: int, provider: str, tokens: int
) -> float | None:
    """`voucher_redeem` itself, with no HTTP and no Python: pgbench calls it at 32 clients over `tokens`
    tokens (1: the hot voucher), a fresh idempotency key and invoice each time. The database's side of a
    redemption, to set beside TPC-B."""
    exe = Path(server.bin_path) / "pgbench"  # type: ignore[attr-defined]
    psql = Path(server.bin_path) / "psql"  # type: ignore[attr-defined]
    socket_dir = str(data_dir / "pgdata")
    setup = (
        "CREATE TABLE IF NOT EXISTS bench_token AS SELECT row_number() OVER (ORDER BY v.created_at, t.jti) AS n, "
        "t.jti, t.voucher_id FROM voucher_token t JOIN voucher v ON v.id = t.voucher_id; ANALYZE bench_token;"
    )
    subprocess.run([str(psql), "-h", socket_dir, "-U", "postgres", "-q", "-c", setup, database], check=True)
    script = data_dir / f"redeem-{tokens}.sql"
    script.write_text(REDEEM_SQL.format(count=tokens, provider=provider, line=LINE_FEN))
    ran = subprocess.run(
        [
            str(exe),
            "-h",
            socket_dir,
            "-U",
            "postgres",
            "-n",
            "-c",
            "32",
            "-j",
            "2",
            "-M",
            "simple",  # the script names values in quotes with colons (account codes), which pgbench would bind
            "-T",
            str(seconds),
            "-f",
            str(script),
            database,
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    if ran.returncode != 0:
        raise RuntimeError(f"pgbench failed: {ran.stderr[-1500:]}")
    out = ran.stdout
    return next((float(line.split()[2]) for line in out.splitlines() if line.startswith("tps =")), None)


def start_py_spy(py_spy: str, service_pid: int, seconds: float) -> subprocess.Popen[bytes]:
    """py-spy sampling one of the service's workers (a child of the uvicorn parent) for `seconds`, into
    profile.txt beside the py-spy given, as collapsed stacks (`--format raw`)."""
    children = [c for f in Path(f"/proc/{service_pid}/task").glob("*/children") for c in f.read_text().split()]
    pid = next(c for c in children if b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes())
    profile = Path(py_spy).resolve().with_name("profile.txt")
    print(f"profiling worker {pid} into {profile}")
    command = [py_spy, "record", "--format", "raw", "-o", str(profile), "-d", str(int(seconds)), "-r", "200"]
    return subprocess.Popen(
        [*command, "--pid", pid, "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


async def say_durability(db_url: str) -> None:
    engine = make_engine(db_url, Settings(database_url=db_url))
    try:
        async with engine.connect() as conn:
            found = {
                name: await conn.scalar(text(f"SHOW {name}"))
                for name in ("synchronous_commit", "fsync", "server_version")
            }
    finally:
        await engine.dispose()
    durable = found["synchronous_commit"] == "on" and found["fsync"] == "on"
    print(
        f"PostgreSQL {found['server_version']}: synchronous_commit={found['synchronous_commit']}, "
        f"fsync={found['fsync']}: commits are {'durable' if durable else 'NOT DURABLE: figures do not count'}"
    )
    if not durable:
        raise SystemExit(2)


_PAID = text("SELECT count(*), coalesce(sum(subsidy_fen), 0) FROM redemption WHERE provider_entity_id = :p")


def print_row(label: str, clients: int, r: dict[str, Any]) -> None:
    errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
    print(
        f"{label:<8} {clients:>7} {r['ok']:>8} {r['rps']:>14.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
        f"{r['service_ms']:>8.1f} {r['database_ms']:>6.1f} {r['other_ms']:>6.1f} {r['cores_busy']:>6.2f}  {errors}",
        flush=True,
    )
    for status, body in r["samples"].items():
        print(f"         first {status}: {body}")


async def soak(
    args: argparse.Namespace,
    service: Service,
    server: Any,
    db_url: str,
    data_dir: Path,
    provider: str,
    provider_key: str,
    tokens: list[str],
) -> bool:
    """The fresh deploy as it is: segments of `--segment` seconds, back to back, for `--soak` seconds per case;
    whether the books check."""
    postmaster = int((data_dir / "pgdata" / "postmaster.pid").read_text().split()[0])

    def probe() -> tuple[float, float, float]:
        assert service.process is not None
        return cpu_seconds(service.process.pid, postmaster)

    print(
        f"{'case':<14} {'from s':>6} {'201s':>8} {'redemptions/s':>14} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'service':>8} {'PG':>6} {'other':>6} {'cores':>6}  errors by status"
    )
    rates: dict[str, list[float]] = {}
    redeemed = 0
    errors = 0
    for label, pool in ((f"{min(40, len(tokens))} vouchers", tokens[:40]), (f"{len(tokens)} vouchers", tokens)):
        began = time.perf_counter()
        rates[label] = []
        while time.perf_counter() - began < args.soak - 1:
            at = time.perf_counter() - began
            r = await asyncio.to_thread(
                drive, service.base_url, provider_key, pool, args.clients, args.segment, "soak", data_dir, probe
            )
            rates[label].append(r["rps"])
            redeemed += r["ok"]
            errors += sum(r["errors"].values())
            errors_text = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
            print(
                f"{label:<14} {at:>6.0f} {r['ok']:>8} {r['rps']:>14.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
                f"{r['service_ms']:>8.1f} {r['database_ms']:>6.1f} {r['other_ms']:>6.1f} {r['cores_busy']:>6.2f}  "
                f"{errors_text}",
                flush=True,
            )
    service.stop()
    entries = await count_entries(db_url)
    ok = await check_books(db_url, provider, redeemed, args.clients * sum(len(r) for r in rates.values()))
    print(f"journal: {entries} entries at the end; errors: {errors}")
    for label, segments in rates.items():
        print(
            f"{label}: first {segments[0]:.0f}/s, slowest {min(segments):.0f}/s, last {segments[-1]:.0f}/s "
            f"(last/first {segments[-1] / segments[0]:.2f})"
        )
    if not args.no_pgbench:
        tps = await asyncio.to_thread(pgbench, server, data_dir, 30)
        if tps:
            print(f"pgbench TPC-B (prepared, 32 clients, scale 32, same server, after the soak): {tps:.0f} tps")
            for label, segments in rates.items():
                print(f"  {label}: slowest segment / TPC-B = {min(segments) / tps:.2f}")
    return ok and errors == 0


async def count_entries(db_url: str) -> int:
    engine = make_engine(db_url, Settings(database_url=db_url))
    try:
        async with engine.connect() as conn:
            return int(await conn.scalar(text("SELECT count(*) FROM ledger_entry")) or 0)
    finally:
        await engine.dispose()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--vouchers", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="`serve --workers`")
    parser.add_argument("--no-pgbench", action="store_true")
    parser.add_argument("--soak", type=float, default=0, metavar="SECONDS", help="each case's length, per segment")
    parser.add_argument("--segment", type=float, default=30.0, metavar="SECONDS")
    parser.add_argument(
        "--py-spy",
        metavar="PATH",
        help="profile one worker with this py-spy during the uniform case (collapsed stacks)",
    )
    args = parser.parse_args()
    if not (0 < args.seconds <= 600 and 1 <= args.vouchers <= 100_000 and 1 <= args.clients <= 1000):
        parser.error("--seconds in (0, 600], --vouchers in [1, 100000], --clients in [1, 1000]")

    ok = False
    async with fresh_deploy("vl-bench-redeem-", args.workers) as (data_dir, db_url, server, env, service):
        await service.start()
        admin = await asyncio.to_thread(admin_key, env)
        year = datetime.now(SHANGHAI).year  # an award is approved only inside its own program year
        began = time.perf_counter()
        provider, provider_key, vouchers, tokens = await seed(service.base_url, admin, args.vouchers, year)
        print(f"seeded {len(vouchers)} vouchers of {year} through the API in {time.perf_counter() - began:.1f}s")
        if args.soak:
            ok = await soak(args, service, server, db_url, data_dir, provider, provider_key, tokens)
            return 0 if ok else 1
        postmaster = int((data_dir / "pgdata" / "postmaster.pid").read_text().split()[0])

        def probe() -> tuple[float, float, float]:
            assert service.process is not None
            return cpu_seconds(service.process.pid, postmaster)

        cases = [("uniform", tokens), ("hot", tokens[:1])]
        warmup = [
            await asyncio.to_thread(
                drive,
                service.base_url,
                provider_key,
                pool,
                args.clients,
                max(WARMUP_S, WARMUP_PER_VOUCHER_S * len(pool)),
                "warmup",
                data_dir,
                probe,
            )
            for _label, pool in cases
        ]
        print(
            "CPU columns: ms of CPU per redemption in the service's processes, in PostgreSQL, and in everything "
            "else on the machine (wrk included); cores busy"
        )
        print(
            f"{'case':<8} {'clients':>7} {'201s':>8} {'redemptions/s':>14} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'service':>8} {'PG':>6} {'other':>6} {'cores':>6}  errors by status"
        )
        results = {}
        for label, pool in cases:
            spy = None
            if args.py_spy and label == "uniform":
                assert service.process is not None
                spy = start_py_spy(args.py_spy, service.process.pid, args.seconds)
            r = await asyncio.to_thread(
                drive, service.base_url, provider_key, pool, args.clients, args.seconds, label, data_dir, probe
            )
            results[label] = r
            print_row(label, args.clients, r)
            if spy is not None:
                spy.wait(timeout=60)
        service.stop()
        redeemed = sum(r["ok"] for r in warmup) + sum(r["ok"] for r in results.values())
        in_flight_max = args.clients * (len(warmup) + len(results))
        ok = await check_books(db_url, provider, redeemed, in_flight_max)
        if not args.no_pgbench:
            database = str(make_url(db_url).database)
            for label, count in (("uniform", len(tokens)), ("hot", 1)):
                sql_tps = await asyncio.to_thread(
                    pgbench_redeem, server, data_dir, database, int(args.seconds), provider, count
                )
                print(f"voucher_redeem alone through pgbench (32 clients, {label}): {sql_tps:.0f} calls/s")
            tps = await asyncio.to_thread(pgbench, server, data_dir, int(args.seconds))
            if tps:
                print(f"pgbench TPC-B (prepared, 32 clients, scale 32, same server): {tps:.0f} tps")
                for label, r in results.items():
                    print(f"  redemptions {label} / pgbench = {r['rps'] / tps:.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
