"""`voucher-ledger serve` removes the metrics folders a killed service left behind, and never one a live
service uses (issue 12, section 6: `kill -9` left `voucher-ledger-metrics-*` in the temp folder for good)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from conftest import create_database, drop_database

from app import metrics_folders, migrate
from app.metrics_folders import LOCK_NAME, PREFIX, UNLOCKED_GRACE_S, remove_stale
from tests.service_support import Service

REPO = Path(__file__).resolve().parents[1]
_HOLDER = """
import sys, time
from pathlib import Path
from app import metrics_folders
folder = metrics_folders.make(Path(sys.argv[2])) if sys.argv[1] == "make" else Path(sys.argv[2])
if sys.argv[1] == "hold":
    metrics_folders.hold(folder)
print(folder, flush=True)
time.sleep(600)
"""


@contextmanager
def process_using(how: str, path: Path, **env: str) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """A live process that makes a folder in `path` as `serve` does (`make`), holds `path` as a worker does
    (`hold`), or only names it in its environment (`env`); SIGKILLed at the end if still alive."""
    process = subprocess.Popen(  # noqa: S603 (our own interpreter)
        [sys.executable, "-c", _HOLDER, how, str(path)],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        folder = Path(process.stdout.readline().strip())
        assert folder.is_dir(), folder
        yield process, folder
    finally:
        process.kill()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def killed(process: subprocess.Popen[str]) -> None:
    process.kill()  # SIGKILL: no `finally`, no exit handler
    process.wait(timeout=10)
    if process.stdout is not None:
        process.stdout.close()


def unlocked_folder(parent: Path, name: str, *, age_s: float) -> Path:
    """A folder as `serve` made them before the lock: a worker's counter file and no lock file."""
    folder = parent / f"{PREFIX}{name}"
    folder.mkdir()
    (folder / "counter_999999.db").write_bytes(b"\0" * 16)
    then = time.time() - age_s
    os.utime(folder, (then, then))
    return folder


def test_only_folders_no_live_process_holds_are_removed(tmp_path: Path) -> None:
    with (
        process_using("make", tmp_path) as (serve_killed, left_behind),
        process_using("make", tmp_path) as (_serve_alive, in_use),
        process_using("make", tmp_path) as (orphaned_master, orphans_folder),
        process_using("hold", orphans_folder) as (_worker, _),
    ):
        killed(serve_killed)
        killed(orphaned_master)  # its worker lives on, and writes there
        assert left_behind.is_dir()
        assert remove_stale(tmp_path) == [left_behind]
        assert not left_behind.exists() and in_use.is_dir() and orphans_folder.is_dir()
        assert (in_use / LOCK_NAME).exists()
    # every holder has ended now
    assert sorted(remove_stale(tmp_path)) == sorted([in_use, orphans_folder])
    assert list(tmp_path.iterdir()) == []


def test_a_folder_from_before_the_lock_is_removed_once_old_and_named_by_no_process(tmp_path: Path) -> None:
    old = unlocked_folder(tmp_path, "old", age_s=UNLOCKED_GRACE_S + 60)
    young = unlocked_folder(tmp_path, "young", age_s=1)  # a `serve` may be making it right now
    named = unlocked_folder(tmp_path, "named", age_s=UNLOCKED_GRACE_S + 60)
    other = tmp_path / "voucher-ledger-data"
    other.mkdir()
    (tmp_path / f"{PREFIX}a-file").write_text("not a folder")
    with process_using("env", named, PROMETHEUS_MULTIPROC_DIR=str(named)):
        assert remove_stale(tmp_path) == [old]
    assert young.is_dir() and named.is_dir() and other.is_dir() and (tmp_path / f"{PREFIX}a-file").exists()
    assert remove_stale(tmp_path) == [named]


def test_a_worker_holds_the_folder_its_environment_names(tmp_path: Path) -> None:
    folder = metrics_folders.make(tmp_path)  # held by this test's process until it ends: a folder of its own
    with process_using("make", tmp_path) as (master, served):
        killed(master)
        env = {"PROMETHEUS_MULTIPROC_DIR": str(served)}
        script = "import app.metrics, time; print(flush=True); time.sleep(600)"
        worker = subprocess.Popen(  # noqa: S603
            [sys.executable, "-c", script], cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE, text=True
        )
        try:
            assert worker.stdout is not None and worker.stdout.readline() == "\n"
            assert remove_stale(tmp_path) == []
        finally:
            killed(worker)
        assert remove_stale(tmp_path) == [served]
    assert folder.is_dir()


async def test_serve_removes_what_a_killed_serve_left_and_keeps_what_a_live_one_uses(
    embedded_server_url: str, tmp_path: Path
) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()

    def folders() -> set[Path]:
        return set(temp.glob(f"{PREFIX}*"))

    url = await create_database(embedded_server_url)
    await asyncio.to_thread(migrate.upgrade, url)
    # one data folder (the key-encryption key the database's signing keys are sealed under), two logs
    live = Service(url, tmp_path, workers=2, env={"TMPDIR": str(temp)})
    crashing = Service(url, tmp_path, workers=2, env={"TMPDIR": str(temp)})
    crashing.log_path = tmp_path / "crashing.log"
    try:
        await live.start()
        (live_folder,) = folders()
        await crashing.start()
        (crashed_folder,) = folders() - {live_folder}
        crashing._metrics_dirs.clear()  # the harness would remove it after the kill: this test is about that
        crashing.kill()
        assert folders() == {live_folder, crashed_folder}  # kill -9: nothing removed it
        await crashing.start()
        (restarted_folder,) = folders() - {live_folder}
        assert restarted_folder != crashed_folder and not crashed_folder.exists()
        for service in (live, crashing):
            async with httpx.AsyncClient(base_url=service.base_url) as client:
                assert (await client.get("/metrics")).status_code == 200
        crashing.stop()
        assert folders() == {live_folder}  # a stop removes its own
    finally:
        crashing.stop()
        live.stop()
        await drop_database(embedded_server_url, url)
