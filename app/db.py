"""The database engine: one per process, owned by the app's lifespan or by a command."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.settings import Settings


def make_engine(url: str, settings: Settings) -> AsyncEngine:
    if not url.startswith("postgresql+asyncpg://"):
        raise ValueError("DATABASE_URL must be a postgresql+asyncpg:// URL")
    return create_async_engine(
        url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout_s,
        # Durable commits are the contract (a 2xx means committed): never turn synchronous_commit off.
        connect_args={"server_settings": {"application_name": "voucher-ledger", "timezone": "UTC"}},
    )
