"""Journal exports: entries/s, MB/s and the service's peak memory while it streams the whole journal as
`jsonl`, `csv` and `ledger` (`GET /v1/exports/journal?format=...`), on a journal of 1,000,000 entries.
Targets (issue 5): at least 50,000 entries/s for `jsonl`; the service's peak RSS under 200 MB.

    uv run python bench/export.py [--entries 1000000] [--chunk 20000] [--accounts 300] [--workers 1]

What it does, all on loopback, in a temp folder it removes at the end:
1. starts the embedded PostgreSQL in the temp folder and migrates it (as bench/ledger.py does);
2. builds the journal through `ledger_post`, the function every ledger write goes through: a few hundred
   accounts (limited voucher accounts funded from a budget, unlimited provider payables), then one
   redemption-like transfer per entry (debit a voucher, credit a provider's payable; a unique idempotency
   key, its request fingerprint as `Ledger` computes it, a memo and metadata), `--chunk` entries per
   transaction with `SELECT ... FROM generate_series(...), LATERAL ledger_post(...)`. A sample of entries is
   then checked against `ledger.postings.request_hash`, so the same request through the service would be an
   idempotent replay. Then seals everything with the service's sealer (`Ledger.seal`, the largest batch it
   takes, each batch its own transaction through `run_in_transaction`); no ANALYZE, as on a fresh deploy;
3. starts `voucher-ledger serve --workers 1` as a separate process (`DATABASE_URL` set, `VL_DATA_DIR` the
   temp folder) and makes an auditor key with `voucher-ledger apikey create`;
4. for each format streams the whole export with httpx from this process, reading the body chunk by chunk
   (bytes and lines counted, nothing kept but the last line), while a thread samples the RSS of the service's
   process tree (the `serve` process and its children) every 50 ms with psutil; reports entries/s, MB/s, the
   time to the first byte, peak and idle RSS, and the CPU seconds of the service, of PostgreSQL and of this
   client during the export;
5. prints a table and whether the targets are met, stops the service and removes the temp folder.

Entries/s is the sealed entries in the journal divided by the wall time from sending the request to the last
byte. The client shares the machine's two cores with the service and PostgreSQL: its CPU use is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import psutil
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app import migrate
from app.db import make_engine
from app.embedded import start_embedded
from app.settings import Settings
from bench.redeem_load import VOUCHER_LEDGER, Service, cpu_seconds
from ledger.postings import credit, debit, request_hash
from ledger.service import Ledger, run_in_transaction

FORMATS = ("jsonl", "csv", "ledger")
TARGET_JSONL_EPS = 50_000
TARGET_RSS_MB = 200
SAMPLE_S = 0.05
SEAL_BATCH = 2_000
EXPORT_TIMEOUT_S = 900.0  # one export, at most
READ_TIMEOUT_S = 120.0  # between two chunks of a body (the first may wait on the database)
YEAR = 2026
BUDGET = f"budget:compute.purchase:{YEAR}"
CLEARING = f"treasury:{YEAR}:settlement-clearing"
BUILDERS = 2  # connections building at once: one per core
VOUCHER_FACE_FEN = 10**13  # each voucher account is funded far above what the transfers take
MB = 1_000_000

# One two-posting transfer per row of generate_series, alternating between a redemption (debit a voucher
# account, which carries a limit and so is locked and checked; credit a provider's payable) and a payout
# (debit a provider's payable, credit the settlement clearing account; neither is limited). Accounts and
# amounts vary with i, and every key is new. Builder :b of :nb only debits the vouchers whose index is b
# modulo nb, so concurrent builders never wait on one another's voucher locks.
# The fingerprint is ledger.postings.request_hash spelled in SQL: the canonical JSON of
# {"fields": {"memo", "metadata"}, "kind", "postings"} (sorted keys, no spaces, UTF-8), none of whose
# strings needs escaping. `main` checks a sample against the Python function.
_BUILD = """
WITH g AS (
    SELECT i, i % 2 = 0 AS redeem,
           1 + CAST(:b AS int)
             + CAST(:nb AS int) * ((i * 7919) % (cardinality(CAST(:v_ids AS bigint[])) / CAST(:nb AS int))) AS v,
           1 + (i * 104729) % cardinality(CAST(:p_ids AS bigint[])) AS p,
           100 + (i * 2654435761) % 4999900 AS amount,
           'INV-' || :run || '-' || lpad(i::text, 8, '0') AS invoice
      FROM generate_series(CAST(:lo AS bigint), CAST(:hi AS bigint)) AS i
), r AS (
    SELECT g.*,
           CASE WHEN redeem THEN 'redeem:' ELSE 'payout:' END || :run || ':' || i AS key,
           CASE WHEN redeem
                THEN format('算力券核销 redemption %s: voucher %s at %s, invoice %s, %s GPU hours', i,
                            (CAST(:v_codes AS text[]))[v], (CAST(:p_codes AS text[]))[p], invoice, 1 + i % 97)
                ELSE format('结算 payout %s to %s for invoice %s', i, (CAST(:p_codes AS text[]))[p], invoice)
           END AS memo,
           CASE WHEN redeem THEN (CAST(:v_codes AS text[]))[v] ELSE (CAST(:p_codes AS text[]))[p] END AS d_code,
           CASE WHEN redeem THEN (CAST(:v_ids AS bigint[]))[v] ELSE (CAST(:p_ids AS bigint[]))[p] END AS d_id,
           CASE WHEN redeem THEN (CAST(:p_codes AS text[]))[p] ELSE CAST(:clearing AS text) END AS c_code,
           CASE WHEN redeem THEN (CAST(:p_ids AS bigint[]))[p] ELSE CAST(:clearing_id AS bigint) END AS c_id
      FROM g
)
SELECT count(*) FILTER (WHERE x.outcome = 'created') AS created, count(*) AS called
  FROM r, LATERAL ledger_post(
        r.key,
        sha256(convert_to(format(
            '{"fields":{"memo":"%s","metadata":{"invoice_no":"%s","line_count":%s,"program":"compute.purchase",'
            '"ref":"%s"}},"kind":"transfer","postings":[["%s","debit","posted",%s],["%s","credit","posted",%s]]}',
            r.memo, r.invoice, 1 + r.i % 5, r.key, r.d_code, r.amount, r.c_code, r.amount), 'UTF8')),
        'transfer', NULL, NULL, NULL, r.memo,
        jsonb_build_object('invoice_no', r.invoice, 'line_count', 1 + r.i % 5, 'program', 'compute.purchase',
                           'ref', r.key),
        ARRAY[r.d_id, r.c_id], ARRAY['debit', 'credit'], ARRAY['posted', 'posted'], ARRAY[r.amount, r.amount]) AS x
"""

_SAMPLE = """
SELECT e.idempotency_key, e.request_hash, e.memo, e.metadata::text AS metadata,
       (SELECT json_agg(json_build_array(a.code, p.direction, p.phase, p.amount) ORDER BY p.seq)
          FROM ledger_posting p JOIN ledger_account a ON a.id = p.account_id WHERE p.entry_id = e.id)::text
           AS postings
  FROM ledger_entry e WHERE e.idempotency_key ~ '^(redeem|payout):' ORDER BY random() LIMIT 200
"""


async def open_accounts(engine: AsyncEngine, ledger: Ledger, accounts: int, run: str) -> dict[str, Any]:
    """A budget, voucher accounts (debits limited to credits) funded from it, provider payables and a
    settlement clearing account, as parameters of `_BUILD`."""
    vouchers_n = max(BUILDERS, accounts * 5 // 6 // BUILDERS * BUILDERS)
    providers_n = max(1, accounts - vouchers_n - 1)
    v_codes = [f"voucher:{_hex(run, 'v', i)}" for i in range(vouchers_n)]
    p_codes = [f"entity:{_hex(run, 'p', i)}:payable" for i in range(providers_n)]

    async def work(conn: AsyncConnection) -> None:
        await ledger.open_account(conn, BUDGET, metadata={"program": "compute.purchase", "year": YEAR})
        await ledger.open_account(conn, CLEARING)
        for code in v_codes:
            await ledger.open_account(conn, code, limit="debits_must_not_exceed_credits")
        for code in p_codes:
            await ledger.open_account(conn, code)
        for code in v_codes:
            await ledger.transfer(
                conn,
                key=f"issue:{run}:{code}",
                postings=[debit(BUDGET, VOUCHER_FACE_FEN), credit(code, VOUCHER_FACE_FEN)],
                memo=f"voucher {code} issued",
                metadata={"program": "compute.purchase", "year": YEAR},
            )

    await run_in_transaction(engine, work)
    async with engine.connect() as conn:
        found = await ledger.accounts(conn, [*v_codes, *p_codes, CLEARING])
    return {
        "run": run,
        "v_codes": v_codes,
        "v_ids": [found[c].id for c in v_codes],
        "p_codes": p_codes,
        "p_ids": [found[c].id for c in p_codes],
        "clearing": CLEARING,
        "clearing_id": found[CLEARING].id,
        "nb": BUILDERS,
    }


def _hex(run: str, kind: str, i: int) -> str:
    return hashlib.sha256(f"{run}{kind}{i}".encode()).hexdigest()[:20]


async def build(engine: AsyncEngine, ledger: Ledger, entries: int, chunk: int, accounts: int) -> int:
    """`BUILDERS` connections, each calling `_BUILD` on its share of the chunks, one transaction a chunk."""
    run = f"{time.time_ns():x}"
    fixed = await open_accounts(engine, ledger, accounts, run)
    statement = text(_BUILD)
    done = 0
    began = time.perf_counter()
    next_report = 100_000

    async def one(b: int, lo: int, hi: int) -> None:
        nonlocal done, next_report

        async def work(conn: AsyncConnection) -> tuple[int, int]:
            row = (await conn.execute(statement, {**fixed, "b": b, "lo": lo, "hi": hi})).one()
            return int(row.created), int(row.called)

        made, called = await run_in_transaction(engine, work)
        if made != called:
            raise RuntimeError(f"entries {lo}..{hi}: ledger_post created {made} of {called}")
        done += made
        if done >= next_report or done == entries:
            elapsed = time.perf_counter() - began
            print(f"  built {done:,} entries in {elapsed:.0f}s ({done / elapsed:,.0f}/s)", flush=True)
            next_report += 100_000

    # no ANALYZE between chunks: ledger_post's statements read by key whatever the statistics (issue 14)
    chunks = iter(range(1, entries + 1, chunk))

    async def builder(b: int) -> None:
        for lo in chunks:
            await one(b, lo, min(entries, lo + chunk - 1))

    await asyncio.gather(*(builder(b) for b in range(BUILDERS)))
    return done + len(fixed["v_codes"])  # the funding transfers are entries too


async def check_fingerprints(engine: AsyncEngine) -> int:
    """Recompute a sample's request hashes as `Ledger.transfer` would: they must equal what was stored."""
    async with engine.connect() as conn:
        rows = (await conn.execute(text(_SAMPLE))).all()
    for row in rows:
        postings = [
            (debit if direction == "debit" else credit)(code, int(amount))
            for code, direction, _phase, amount in json.loads(row.postings)
        ]
        expected = request_hash("transfer", {"memo": row.memo, "metadata": json.loads(row.metadata)}, postings)
        if expected != bytes(row.request_hash):
            raise RuntimeError(f"entry {row.idempotency_key}: its fingerprint differs from Ledger's")
    return len(rows)


async def seal(engine: AsyncEngine, ledger: Ledger, expected: int) -> int:
    sealed = 0
    began = time.perf_counter()
    next_report = 100_000
    while n := await run_in_transaction(engine, lambda conn: ledger.seal(conn, SEAL_BATCH)):
        sealed += n
        if sealed >= next_report or sealed == expected:
            elapsed = time.perf_counter() - began
            print(f"  sealed {sealed:,} entries in {elapsed:.0f}s ({sealed / elapsed:,.0f}/s)", flush=True)
            next_report += 100_000
    return sealed


def auditor_key(env: dict[str, str]) -> str:
    out = subprocess.run(
        [VOUCHER_LEDGER, "apikey", "create", "--role", "auditor", "--name", "bench export"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return out.strip().splitlines()[-1]


class RssSampler(threading.Thread):
    """Peak RSS of a process and all its descendants, sampled every `SAMPLE_S`."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.peak = self.samples = 0
        self.stop = threading.Event()

    def tree_rss(self) -> int:
        total = 0
        with contextlib.suppress(psutil.Error):
            for proc in [self.root, *self.root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
        return total

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.tree_rss())
            self.samples += 1
            self.stop.wait(SAMPLE_S)


async def export(
    base_url: str, key: str, fmt: str, pid: int, probe: Any, deadline_s: float = EXPORT_TIMEOUT_S
) -> dict[str, Any]:
    sampler = RssSampler(pid)
    idle = sampler.tree_rss()
    headers = {"Authorization": f"Bearer {key}", "Accept-Encoding": "identity"}
    timeout = httpx.Timeout(30.0, read=READ_TIMEOUT_S)
    size = lines = chunks = 0
    tail = b""
    first_byte = float("nan")
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout) as client:
        sampler.start()
        cpu, before = time.process_time(), probe()
        began = time.perf_counter()
        try:
            async with asyncio.timeout(deadline_s):
                async with client.stream("GET", "/v1/exports/journal", params={"format": fmt}) as response:
                    if response.status_code != 200:
                        await response.aread()
                        raise RuntimeError(f"{fmt}: {response.status_code} {response.text[:300]}")
                    disposition = response.headers.get("content-disposition", "")
                    media = response.headers.get("content-type", "")
                    async for chunk in response.aiter_raw():
                        if not chunks:
                            first_byte = time.perf_counter() - began
                        chunks += 1
                        size += len(chunk)
                        lines += chunk.count(b"\n")
                        tail = (tail + chunk)[-65536:]
        finally:
            wall = time.perf_counter() - began
            cpu, after = time.process_time() - cpu, probe()
            sampler.stop.set()
            sampler.join()
    service, database, busy = (a - b for a, b in zip(after, before, strict=True))
    return {
        "format": fmt,
        "bytes": size,
        "lines": lines,
        "chunks": chunks,
        "wall": wall,
        "first_byte": first_byte,
        "peak_rss": sampler.peak,
        "idle_rss": idle,
        "samples": sampler.samples,
        "tail": tail,
        "media": media,
        "disposition": disposition,
        "service_cpu": service,
        "database_cpu": database,
        "client_cpu": cpu,
        "other_cpu": busy - service - database - cpu,
        "cores_busy": busy / wall,
    }


def check_body(fmt: str, r: dict[str, Any], sealed: int, postings: int) -> str:
    """What the body's shape says about its completeness (no parsing beyond counting lines)."""
    if fmt == "jsonl":
        last = r["tail"].rstrip(b"\n").rsplit(b"\n", 1)[-1]
        try:
            manifest = json.loads(last)
        except ValueError:
            return f"last line is not JSON: {last[:120]!r}"
        counted = next((manifest[k] for k in ("entry_count", "entries", "count") if k in manifest), None)
        verdict = "ok" if r["lines"] == sealed + 1 and counted == sealed else "MISMATCH"
        return f"{r['lines']:,} lines = {sealed:,} entries + manifest (manifest says {counted}): {verdict}"
    if fmt == "csv":
        verdict = "ok" if r["lines"] == postings + 1 else "MISMATCH"
        return f"{r['lines']:,} lines = {postings:,} postings + header: {verdict}"
    return f"{r['lines']:,} lines ({r['lines'] / max(sealed, 1):.2f} per entry)"


def print_table(results: list[dict[str, Any]], sealed: int) -> None:
    print(
        f"{'format':<7} {'entries':>9} {'MB':>8} {'s':>7} {'entries/s':>10} {'MB/s':>7} {'1st byte s':>10} "
        f"{'peak RSS MB':>11} {'idle RSS MB':>11} {'CPU s: service':>14} {'PG':>6} {'client':>6} {'other':>6} "
        f"{'cores':>5}"
    )
    for r in results:
        print(
            f"{r['format']:<7} {sealed:>9,} {r['bytes'] / MB:>8.1f} {r['wall']:>7.1f} {sealed / r['wall']:>10,.0f} "
            f"{r['bytes'] / MB / r['wall']:>7.1f} {r['first_byte']:>10.2f} {r['peak_rss'] / MB:>11.1f} "
            f"{r['idle_rss'] / MB:>11.1f} {r['service_cpu']:>14.1f} {r['database_cpu']:>6.1f} "
            f"{r['client_cpu']:>6.1f} {r['other_cpu']:>6.1f} {r['cores_busy']:>5.2f}",
            flush=True,
        )


async def wait_for_route(service: Service, key: str, wait_s: float) -> bool:
    """The route answers (any status but 404 on the path, or 405) within `wait_s`."""
    deadline = time.monotonic() + wait_s
    async with httpx.AsyncClient(base_url=service.base_url, timeout=10.0) as client:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                async with client.stream(
                    "GET", "/v1/exports/journal", params={"format": "jsonl"}, headers={"Authorization": f"Bearer {key}"}
                ) as response:
                    if response.status_code == 200:
                        return True
                    await response.aread()
                    print(f"  route: {response.status_code} {response.text[:200]}", flush=True)
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(min(30.0, max(0.0, deadline - time.monotonic())))


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--chunk", type=int, default=20_000, help="entries per transaction while building")
    parser.add_argument("--accounts", type=int, default=300)
    parser.add_argument("--workers", type=int, default=1, help="`serve --workers`")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument(
        "--wait-for-route", type=float, default=0.0, help="seconds to wait for the export route to answer"
    )
    args = parser.parse_args()
    formats = [f for f in args.formats.split(",") if f]
    if not (
        1 <= args.entries <= 5_000_000
        and 1 <= args.chunk <= 100_000
        and 2 <= args.accounts <= 10_000
        and 1 <= args.workers <= 4
        and set(formats) <= set(FORMATS)
        and 0 <= args.wait_for_route <= 3600
    ):
        parser.error("--entries in [1, 5e6], --chunk in [1, 1e5], --accounts in [2, 1e4], --workers in [1, 4]")

    data_dir = Path(tempfile.mkdtemp(prefix="vl-bench-export-"))
    server: Any = None
    service: Service | None = None
    ok = False
    try:
        began = time.perf_counter()
        db_url, server = start_embedded(data_dir)
        await asyncio.to_thread(migrate.upgrade, db_url)
        engine = make_engine(db_url, Settings(database_url=db_url))
        ledger = Ledger()
        try:
            t0 = time.perf_counter()
            made = await build(engine, ledger, args.entries, args.chunk, args.accounts)
            built_s = time.perf_counter() - t0
            print(f"built {made:,} entries through ledger_post in {built_s:.1f}s ({made / built_s:,.0f}/s)")
            checked = await check_fingerprints(engine)
            print(f"request fingerprints of {checked} sampled entries equal ledger.postings.request_hash")
            t0 = time.perf_counter()
            sealed = await seal(engine, ledger, made)
            sealed_s = time.perf_counter() - t0
            print(f"sealed {sealed:,} entries with Ledger.seal in {sealed_s:.1f}s ({sealed / sealed_s:,.0f}/s)")
            async with engine.connect() as conn:
                postings = int(await conn.scalar(text("SELECT count(*) FROM ledger_posting")))
                size = int(await conn.scalar(text("SELECT pg_database_size(current_database())")))
            print(
                f"{postings:,} postings; database {size / MB:,.0f} MB; "
                f"journal ready {time.perf_counter() - began:.0f}s after the start",
                flush=True,
            )
        finally:
            await engine.dispose()

        env = {
            **os.environ,
            "DATABASE_URL": db_url,
            "VL_DATA_DIR": str(data_dir),
            "XDG_RUNTIME_DIR": os.environ["XDG_RUNTIME_DIR"],  # set by start_embedded
        }
        service = Service(env, args.workers, data_dir / "service.log")
        await service.start()
        key = await asyncio.to_thread(auditor_key, env)
        if not await wait_for_route(service, key, args.wait_for_route):
            print("GET /v1/exports/journal does not answer 200: nothing to measure")
            return 1
        service.stop()
        await service.start()  # a fresh process: the RSS of one that has done nothing but start
        postmaster = int((data_dir / "pgdata" / "postmaster.pid").read_text().split()[0])

        def probe() -> tuple[float, float, float]:
            assert service is not None and service.process is not None
            return cpu_seconds(service.process.pid, postmaster)

        results = []
        for fmt in formats:
            assert service.process is not None
            r = await export(service.base_url, key, fmt, service.process.pid, probe)
            results.append(r)
            print(
                f"  {fmt}: {r['bytes'] / MB:,.1f} MB in {r['wall']:.1f}s, {r['chunks']:,} chunks, "
                f"{r['samples']} RSS samples; {r['media']}; {r['disposition']}; "
                f"{check_body(fmt, r, sealed, postings)}",
                flush=True,
            )
        print_table(results, sealed)
        jsonl = next((r for r in results if r["format"] == "jsonl"), None)
        peak = max(r["peak_rss"] for r in results) / MB
        speed_ok = jsonl is not None and sealed / jsonl["wall"] >= TARGET_JSONL_EPS
        rss_ok = peak < TARGET_RSS_MB
        if jsonl is not None:
            print(
                f"target jsonl >= {TARGET_JSONL_EPS:,} entries/s: {sealed / jsonl['wall']:,.0f} "
                f"{'met' if speed_ok else 'NOT MET'}"
            )
        print(f"target peak RSS < {TARGET_RSS_MB} MB (all formats): {peak:.1f} MB {'met' if rss_ok else 'NOT MET'}")
        print(f"total {time.perf_counter() - began:.0f}s")
        ok = speed_ok and rss_ok
    finally:
        if service is not None:
            service.stop()
        if server is not None:
            server.cleanup()
        shutil.rmtree(data_dir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
