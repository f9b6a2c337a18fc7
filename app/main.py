"""The ASGI application: `create_app()` builds it, its lifespan owns the database engine.

`uvicorn --factory app.main:create_app` serves it as is (settings from the environment); `voucher-ledger
serve` migrates the database first and then does exactly that.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from app.apikeys import ApiKeyAuthenticator
from app.background import run_background
from app.db import invalidate_if_lost, make_engine
from app.embedded import start_embedded
from app.errors import install_error_handlers
from app.export_slots import ExportSlots
from app.fastpath import RedemptionFastPath
from app.log import configure_logging
from app.metrics import LEDGER_ENTRIES_POSTED, MetricsMiddleware
from app.migrate import head_revision
from app.policy_tasks import policy_pass
from app.routers import affiliations as affiliations_router
from app.routers import api_keys, applications, health, metrics, programs, redemptions
from app.routers import entities as entities_router
from app.routers import exports as exports_router
from app.routers import ledger as ledger_router
from app.routers import reports as reports_router
from app.routers import sanctions as sanctions_router
from app.routers import settlements as settlements_router
from app.routers import tokens as tokens_router
from app.routers import vouchers as vouchers_router
from app.settings import Settings, get_settings
from ledger.service import Ledger
from vouchers import catalog, keys
from vouchers.catalog import Catalog
from vouchers.programs import DEFINITIONS_FILE, load_file
from vouchers.redemption import RedeemableCache, RedeemBatcher

log = logging.getLogger(__name__)

# No request body this API takes comes near this; a larger one is answered 413 without being read whole.
BODY_SIZE_MAX = 1024 * 1024
# start-up does not wait longer than this on a database that does not answer
PUBLISH_TIMEOUT_S = 5


def _package_version() -> str:
    try:
        return version("voucher-ledger")
    except PackageNotFoundError:  # pragma: no cover (running from a bare checkout)
        return "0"


def _report_exit(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("background tasks stopped: the chain sealer and hold sweeper no longer run", exc_info=exc)
    else:
        log.error("background tasks returned: the chain sealer and hold sweeper no longer run")


async def _publish_programs(app: FastAPI, engine: AsyncEngine, settings: Settings) -> Catalog:
    """Publish the shipped program definitions and read the catalog back from the database, the record of
    what governed each year. A published version that changed stops start-up; a database that is not
    reachable or not migrated yet does not (/readyz says so): the file's catalog serves, and the first
    application publishes the definitions (`ensure_programs_published`)."""
    definitions = load_file(settings.programs_file or DEFINITIONS_FILE)
    app.state.definitions = definitions
    app.state.programs_published = False
    try:
        async with asyncio.timeout(PUBLISH_TIMEOUT_S), engine.begin() as conn:
            await catalog.publish(conn, definitions)
            loaded = await catalog.load(
                conn, definitions.policy, term_from=settings.policy_term_from, term_to=settings.policy_term_to
            )
    except (OSError, TimeoutError, SQLAlchemyError) as exc:
        log.warning("program definitions not published yet (%s); the database is not ready", type(exc).__name__)
        return catalog.from_file(definitions, term_from=settings.policy_term_from, term_to=settings.policy_term_to)
    app.state.programs_published = True
    return loaded


async def _load_keyring(engine: AsyncEngine, settings: Settings) -> keys.KeyRing:
    """The signing keys, the first one made if there is none. A KEK that is malformed, stored unsafely or
    not the one the keys were sealed under stops start-up (KeyEncryptionKeyError says which); a database not
    reachable or not migrated yet does not: the ring loads on first use."""
    secret = settings.key_encryption_key
    kek = await asyncio.to_thread(
        keys.load_kek, secret.get_secret_value() if secret is not None else None, settings.data_dir
    )
    keyring = keys.KeyRing(kek, issuer=settings.token_issuer, token_ttl_s=settings.token_ttl_s)
    try:
        async with asyncio.timeout(PUBLISH_TIMEOUT_S), engine.begin() as conn:
            await keys.ensure_active_key(conn, kek)
            await keyring.load(conn)
    except (OSError, TimeoutError, SQLAlchemyError) as exc:
        log.warning("signing keys not loaded yet (%s); the database is not ready", type(exc).__name__)
        return keyring
    keyring.unlock()
    return keyring


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    server: Any = None
    if settings.database_url is None:
        url, server = await asyncio.to_thread(start_embedded, settings.data_dir)
    else:
        url = settings.database_url
    engine = make_engine(url, settings)
    export_engine = make_engine(url, settings, exports=True)  # exports never take the request pool's connections
    authenticator = ApiKeyAuthenticator(engine, cache_ttl_s=settings.api_key_cache_ttl_s)
    background: asyncio.Task[None] | None = None
    app.state.engine = engine
    app.state.sessionmaker = async_sessionmaker(engine, expire_on_commit=False)
    app.state.api_keys = authenticator
    app.state.export_slots = ExportSlots(
        export_engine,
        slots_max=settings.exports_concurrent_max,
        connections_max=settings.export_db_pool_size,
        request_engine=engine,
    )
    app.state.background = None
    try:
        app.state.ledger = Ledger(on_sealed=lambda kind: LEDGER_ENTRIES_POSTED.labels(kind=kind).inc())
        app.state.catalog = await _publish_programs(app, engine, settings)
        app.state.keyring = await _load_keyring(engine, settings)
        app.state.redeemables = RedeemableCache()  # verified tokens with their vouchers' fixed terms
        app.state.redeem_batcher = RedeemBatcher(
            engine,
            batch_max=settings.redeem_batch_max,
            in_flight_max=settings.redeem_batches_in_flight,
            on_error=invalidate_if_lost,
            queue_max=settings.redeem_queue_max,
        )
        if settings.background_tasks:
            background = asyncio.create_task(
                run_background(engine, app.state.ledger, settings, policy_work=lambda: policy_pass(app.state)),
                name="voucher-ledger background",
            )
            background.add_done_callback(_report_exit)
            app.state.background = background
        yield
    finally:
        if background is not None:
            background.cancel()
            await asyncio.wait([background])
        await authenticator.aclose()
        batcher = getattr(app.state, "redeem_batcher", None)
        if batcher is not None:
            await batcher.aclose()
        await engine.dispose()
        await export_engine.dispose()
        if server is not None:
            await asyncio.to_thread(server.cleanup)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level)
    app = FastAPI(
        title="voucher-ledger",
        version=_package_version(),
        summary="Subsidy vouchers run as money on a double-entry ledger",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.head_revision = head_revision()
    install_error_handlers(app, max_body_size=BODY_SIZE_MAX)
    # added after the error middleware, so outside it: it also counts the 500s that middleware answers
    app.add_middleware(MetricsMiddleware)
    # added last, so outermost: POST /v1/redemptions answered without FastAPI's machinery (it counts its own)
    if settings.redemption_fast_path:
        app.add_middleware(RedemptionFastPath, max_body_size=BODY_SIZE_MAX)
    app.include_router(health.router)
    app.include_router(metrics.router)
    # the busiest routes first: each request is matched against the routers in this order
    app.include_router(redemptions.router, prefix="/v1")
    app.include_router(api_keys.router, prefix="/v1")
    app.include_router(affiliations_router.router, prefix="/v1")
    app.include_router(entities_router.router, prefix="/v1")
    app.include_router(ledger_router.router, prefix="/v1")
    app.include_router(programs.router, prefix="/v1")
    app.include_router(applications.router, prefix="/v1")
    app.include_router(vouchers_router.router, prefix="/v1")
    app.include_router(tokens_router.router, prefix="/v1")
    app.include_router(tokens_router.well_known)
    app.include_router(settlements_router.router, prefix="/v1")
    app.include_router(reports_router.router, prefix="/v1")
    app.include_router(sanctions_router.router, prefix="/v1")
    app.include_router(exports_router.router, prefix="/v1")
    return app
