"""`voucher-ledger`: serve, migrate, apikey create, keys rotate, verify-export.

Without `DATABASE_URL` every command uses the embedded PostgreSQL in `VL_DATA_DIR`; commands run at the
same time in the same folder reach the same server, which stops when the last of them exits.

Exit status: 0 done, 1 the command failed (database unreachable, schema not migrated; for verify-export: the
export is not sound), 2 bad usage (for verify-export also: the file or the JWKS cannot be read), 3 for
verify-export only: sound but for the signature, which was not checked (neither --jwks nor --skip-signature).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any

from app.roles import Role

# Each command imports what it uses when it runs: `--help` and `verify-export` (an auditor's offline check)
# never load the web app, the ORM or the settings, which took 1 to 3 s before a word was printed.
if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from app.apikeys import ApiKey, ApiKeyCreate
    from app.settings import Settings

log = logging.getLogger(__name__)

PROG = "voucher-ledger"
# A request still running this long after SIGTERM is cut off: a stop must not hang on one client.
GRACEFUL_SHUTDOWN_S = 10
# uvicorn kills a worker that does not answer its supervisor's ping within this, and a new worker only answers
# once it has imported the app: at uvicorn's 5 s, on a busy 2-core machine, workers were killed while importing,
# again and again, and `serve --workers 2` never answered
WORKER_HEALTHCHECK_S = 60


class CommandFailed(Exception):
    """A failure worth one clear line on stderr, not a traceback."""


def _error(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


@contextmanager
def _database(settings: Settings) -> Iterator[str]:
    """The database URL: `DATABASE_URL`, or the embedded server, joined (or started) for the duration."""
    if settings.database_url is not None:
        yield settings.database_url
        return
    from app.embedded import start_embedded

    url, server = start_embedded(settings.data_dir)
    try:
        yield url
    finally:
        server.cleanup()


def _stop_on_sigterm() -> None:
    """SIGTERM ends the process through SystemExit, so `finally` blocks run (the embedded server's handle
    is released and the server stops with its last holder); Python's default would exit on the spot."""

    def handler(_signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, handler)


# --------------------------------------------------------------------------------------------------------
# serve


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from app import metrics_folders, migrate
    from app.embedded import start_embedded
    from app.http_guard import ConnectionLimits
    from app.settings import get_settings

    server: Any = None
    metrics_dir: str | None = None
    try:
        url = settings.database_url
        if url is None:
            url, server = start_embedded(settings.data_dir)
            # the app (in this process or in uvicorn's workers) reads it and joins the same server
            os.environ["DATABASE_URL"] = url
        # every worker enforces 1/N of each key's rate (app/ratelimit.py): N is this, not a guess
        os.environ["VL_WORKERS"] = str(args.workers)
        get_settings.cache_clear()
        migrate.upgrade(url)
        metrics_folders.remove_stale()  # those of services killed before they could remove their own
        if args.workers > 1:
            metrics_dir = str(metrics_folders.make())
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        # the workers inherit the raised fd limit; each keeps its connections under it (app/http_guard.py)
        limits = ConnectionLimits.from_settings(settings)
        (log.warning if limits.lowered else log.info)("connections: %s", limits.describe())
        uvicorn.run(
            "app.main:create_app",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            loop="auto",  # uvloop when installed
            # httptools, with deadlines on half-sent requests and a connection cap (uvicorn has neither)
            http="app.http_guard:GuardedHttpToolsProtocol",
            timeout_keep_alive=settings.http_keep_alive_timeout_s,
            log_level=settings.log_level.lower(),
            access_log=settings.access_log,
            server_header=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            timeout_worker_healthcheck=WORKER_HEALTHCHECK_S,
        )
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        if server is not None:
            server.cleanup()
    return 0


# --------------------------------------------------------------------------------------------------------
# migrate


def _migrate(_args: argparse.Namespace, settings: Settings) -> int:
    from app import migrate

    with _database(settings) as url:
        migrate.upgrade(url)
    print(f"database at revision {migrate.head_revision()}")
    return 0


# --------------------------------------------------------------------------------------------------------
# apikey create


async def _require_head(engine: AsyncEngine) -> None:
    """A command that writes needs the schema at the migrations' head; else it says what to run."""
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    from app import migrate

    async with engine.connect() as connection:
        try:
            versions = set((await connection.execute(text("SELECT version_num FROM alembic_version"))).scalars())
        except SQLAlchemyError:
            versions = set()
    head = migrate.head_revision()
    if versions != {head}:
        raise CommandFailed(f"the database is not migrated to {head}: run `{PROG} migrate` first")


async def _create_key(url: str, settings: Settings, request: ApiKeyCreate) -> tuple[ApiKey, str]:
    from sqlalchemy.ext.asyncio import AsyncSession

    from app.apikeys import create_api_key
    from app.db import make_engine

    engine = make_engine(url, settings)
    try:
        await _require_head(engine)
        async with AsyncSession(engine, expire_on_commit=False) as session:
            row, key = await create_api_key(session, request)
            await session.commit()
            return row, key
    finally:
        await engine.dispose()


def _split_types(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


_OPTIONS = {"role": "--role", "name": "--name", "entity_id": "--entity", "voucher_types": "--types"}


def _apikey_create(args: argparse.Namespace, settings: Settings) -> int:
    from pydantic import ValidationError

    from app.apikeys import ApiKeyCreate
    from app.errors import ValidationFailed

    try:
        request = ApiKeyCreate(
            role=args.role, name=args.name, entity_id=args.entity, voucher_types=_split_types(args.types)
        )
    except ValidationError as exc:
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            _error(f"{_OPTIONS.get(field, field)}: {error['msg']}")
        return 2
    try:
        with _database(settings) as url:
            row, key = asyncio.run(_create_key(url, settings, request))
    except ValidationFailed as exc:  # an entity not registered, or of a kind the role does not fit
        field = str(exc.extra["errors"][0]["loc"][-1]) if exc.extra.get("errors") else ""
        _error(f"{_OPTIONS.get(field, field)}: {exc.detail}")
        return 2
    print(f"id: {row.id}")
    print(f"role: {row.role}")
    if row.entity_id is not None:
        print(f"entity: {row.entity_id}")
    if row.voucher_types is not None:
        print(f"voucher types: {','.join(row.voucher_types)}")
    print(f"name: {row.name}")
    print(f"prefix: {row.prefix}")
    print("the key is shown once, on the next line; store it now:", flush=True)
    print(key)
    return 0


# --------------------------------------------------------------------------------------------------------
# keys rotate


async def _rotate_key(url: str, settings: Settings) -> str:
    from app.db import make_engine
    from vouchers import keys

    secret = settings.key_encryption_key
    kek = keys.load_kek(secret.get_secret_value() if secret is not None else None, settings.data_dir)
    engine = make_engine(url, settings)
    try:
        await _require_head(engine)
        async with engine.begin() as connection:
            return await keys.rotate(connection, kek)
    finally:
        await engine.dispose()


def _keys_rotate(_args: argparse.Namespace, settings: Settings) -> int:
    from vouchers import keys

    try:
        with _database(settings) as url:
            kid = asyncio.run(_rotate_key(url, settings))
    except keys.KeyEncryptionKeyError as exc:
        raise CommandFailed(str(exc)) from None
    print("a new signing key is active; the previous one is retired and stays in the JWKS")
    print("new kid on the next line:", flush=True)
    print(kid)
    return 0


# --------------------------------------------------------------------------------------------------------
# verify-export

JWKS_FETCH_TIMEOUT_S = 10
JWKS_SIZE_MAX = 1024 * 1024


def _read_jwks(source: str) -> dict[str, Any]:
    """A JWKS from a file or an http(s) URL; CommandFailed (exit 2) when it cannot be read or parsed."""
    import json
    import urllib.request

    try:
        if source.startswith(("http://", "https://")):
            request = urllib.request.Request(source, headers={"Accept": "application/json"})  # noqa: S310 (http(s) only)
            with urllib.request.urlopen(request, timeout=JWKS_FETCH_TIMEOUT_S) as response:  # noqa: S310
                raw = response.read(JWKS_SIZE_MAX + 1)
        else:
            with open(source, "rb") as file:
                raw = file.read(JWKS_SIZE_MAX + 1)
        if len(raw) > JWKS_SIZE_MAX:
            raise ValueError(f"larger than {JWKS_SIZE_MAX} bytes")
        jwks = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise CommandFailed(f"--jwks {source}: cannot read a JWKS: {exc}") from None
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        raise CommandFailed(f'--jwks {source}: not a JWKS (a JSON object with a "keys" list)')
    return jwks


def _verify_export(args: argparse.Namespace) -> int:
    """Offline, on the auditor's machine: no settings, no database."""
    from ledger.export import verify_export

    try:
        jwks = None if args.jwks is None else _read_jwks(args.jwks)
    except CommandFailed as exc:
        _error(str(exc))
        return 2
    try:
        with open(args.file, "rb") as file:
            report = verify_export(file, jwks)
    except OSError as exc:
        _error(f"{args.file}: {exc.strerror or exc}")
        return 2
    if not report.ok:
        _error(f"{args.file}: NOT SOUND: {report.summary}")
        return 1
    if report.signature_verified:
        print(f"{args.file}: {report.summary}")
        return 0
    if args.skip_signature:
        print(f"{args.file}: {report.summary}, skipped (--skip-signature): nothing shows the service wrote this file")
        return 0
    # anyone can recompute SHA-256 and a manifest: an unchecked signature is not a pass
    _error(
        f"{args.file}: signature not checked: give --jwks FILE_OR_URL (the keys you trust), or --skip-signature"
        f" to accept a file anyone could have written; the rest is {report.summary}"
    )
    return 3


# --------------------------------------------------------------------------------------------------------


def _port(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError("a port is between 0 and 65535")
    return number


def _workers(value: str) -> int:
    number = int(value)
    if not 1 <= number <= 256:
        raise argparse.ArgumentTypeError("workers is between 1 and 256")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Subsidy vouchers on a double-entry ledger.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="migrate the database, then serve the HTTP API")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8000, help="port to bind (default 8000)")
    serve.add_argument("--workers", type=_workers, default=1, help="worker processes (default 1)")
    serve.set_defaults(handler=_serve)

    migrate_ = commands.add_parser("migrate", help="upgrade the database schema to the latest revision")
    migrate_.set_defaults(handler=_migrate)

    apikey = commands.add_parser("apikey", help="manage API keys")
    apikey_commands = apikey.add_subparsers(dest="apikey_command", required=True, metavar="COMMAND")
    create = apikey_commands.add_parser("create", help="create a key; it is printed once, as the last line")
    create.add_argument("--role", required=True, choices=[role.value for role in Role])
    create.add_argument("--entity", metavar="ID", help="entity id (enterprise and provider keys)")
    create.add_argument("--types", metavar="TYPES", help="admin keys: voucher types, e.g. compute,data")
    create.add_argument("--name", required=True, help="what the key is for, e.g. the system that holds it")
    create.set_defaults(handler=_apikey_create)

    keys_ = commands.add_parser("keys", help="manage the keys that sign voucher tokens")
    keys_commands = keys_.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    rotate = keys_commands.add_parser("rotate", help="a new active signing key; its kid is the last line")
    rotate.set_defaults(handler=_keys_rotate)

    verify = commands.add_parser(
        "verify-export", help="check a jsonl journal export offline: balances, hash chain, manifest, signature"
    )
    verify.add_argument("file", metavar="FILE", help="the export (GET /v1/exports/journal?format=jsonl)")
    signature = verify.add_mutually_exclusive_group()
    signature.add_argument(
        "--jwks", metavar="FILE_OR_URL", help="the keys you trust (a file, or e.g. https://host/.well-known/jwks.json)"
    )
    signature.add_argument(
        "--skip-signature",
        action="store_true",
        help="check all but the signature and exit 0 when that is sound (without it, and without --jwks: exit 3)",
    )
    verify.set_defaults(handler=_verify_export, offline=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "offline", False):
        code: int = args.handler(args)
        return code
    from pydantic import ValidationError
    from pydantic_settings import SettingsError
    from sqlalchemy.exc import SQLAlchemyError

    from app.log import configure_logging
    from app.settings import get_settings

    try:
        settings = get_settings()
    except ValidationError as exc:
        for error in exc.errors():
            _error(f"setting {'.'.join(str(p) for p in error['loc'])}: {error['msg']}")
        return 2
    except SettingsError as exc:  # a JSON setting (VL_RATE_LIMITS) that is not JSON
        _error(f"{exc}: {exc.__cause__ or 'not valid'}")
        return 2
    if settings.database_url is not None and not settings.database_url.startswith("postgresql+asyncpg://"):
        _error("DATABASE_URL must be a postgresql+asyncpg://user:password@host:port/database URL")
        return 2
    configure_logging(settings.log_level)
    _stop_on_sigterm()
    try:
        code = args.handler(args, settings)
    except CommandFailed as exc:
        _error(str(exc))
        return 1
    except (OSError, SQLAlchemyError) as exc:
        first_line = (str(exc).splitlines() or [""])[0][:300]
        _error(f"the database could not be reached or refused the command: {type(exc).__name__}: {first_line}")
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
