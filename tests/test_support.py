"""Helpers for the HTTP tests: the real app, entered through its lifespan, and keys to call it with.

Not fixtures (imported fixtures trip the linter's redefinition check): each test module wraps what it needs.
"""

from __future__ import annotations

import socket
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from app.apikeys import ApiKeyCreate, Role, VoucherType, create_api_key
from app.main import create_app
from app.settings import Settings
from vouchers import entities
from vouchers.entities import EntityKind, NewEntity
from vouchers.uscc import make_uscc

VOUCHER_LEDGER = str(Path(sys.executable).with_name("voucher-ledger"))


@asynccontextmanager
async def running_app(settings: Settings, app: FastAPI | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app (built from `settings` unless given), its lifespan entered for the duration."""
    app = app if app is not None else create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
    ):
        yield client


def unique_entity() -> str:
    """An entity id that no entity has (registered entities come from `create_entity`)."""
    return f"ent_{uuid.uuid4().hex[:16]}"


async def create_entity(
    engine: AsyncEngine,
    *,
    kind: EntityKind | str = EntityKind.ENTERPRISE,
    name: str | None = None,
    tags: Sequence[str] = (),
    division: str = "440106",
    uscc: str | None = None,
) -> str:
    """A committed entity with a fresh valid code in `division` (default 天河区, Guangzhou: presumed
    eligible; "440300", Shenzhen, is presumed not); returns its id."""
    uscc = uscc if uscc is not None else make_uscc(division)
    new = NewEntity(uscc=uscc, name=name or f"test entity {uscc}", kind=EntityKind(kind), tags=tags)
    async with AsyncSession(engine, expire_on_commit=False) as session:
        entity = await entities.create_entity(session, new, actor_key_id=None)
        await session.commit()
    return entity.id


async def create_key(
    engine: AsyncEngine,
    role: Role | str = Role.ADMIN,
    *,
    entity_id: str | None = None,
    voucher_types: Sequence[VoucherType | str] | None = None,
    name: str = "test",
) -> str:
    """A committed key; enterprise and provider keys get a fresh registered entity unless one is given."""
    if entity_id is None and Role(role) in (Role.ENTERPRISE, Role.PROVIDER):
        entity_id = await create_entity(engine, kind=Role(role).value)
    request = ApiKeyCreate.model_validate(
        {"role": role, "name": name, "entity_id": entity_id, "voucher_types": voucher_types}
    )
    async with AsyncSession(engine, expire_on_commit=False) as session:
        _row, key = await create_api_key(session, request)
        await session.commit()
    return key


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is an RFC 9457 problem with this status and code; returns its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["code"] == code, body
    assert isinstance(body["type"], str) and body["type"]
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    return body


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
