"""Per-request dependencies: the database session and the caller.

One session per request. The route commits (once, when its command is done); services and repositories
only flush. Whatever is left uncommitted when the request ends (a read, a failed command) is rolled back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.requests import HTTPConnection

from app.apikeys import ApiKeyAuthenticator, Caller
from app.errors import Forbidden, Unauthorized
from app.roles import Role
from app.settings import Settings

__all__ = [
    "AdminCaller",
    "AdminOrAuditorCaller",
    "Caller",
    "CallerDep",
    "Role",
    "SessionDep",
    "SettingsDep",
    "UnrestrictedAdminCaller",
    "bearer_credentials",
    "current_caller",
    "get_session",
    "require_roles",
    "unrestricted_admin",
]


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    sessionmaker: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    async with sessionmaker() as session:
        try:
            yield session
        finally:
            if session.in_transaction():
                await session.rollback()


SessionDep = Annotated[AsyncSession, Depends(get_session)]


def app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(app_settings)]


def bearer_credentials(authorization: str | None) -> str | None:
    """The credentials of an `Authorization: Bearer <credentials>` header as FastAPI's HTTPBearer reads them
    (the scheme in any case, the credentials stripped), else None: the one reading, for every route and for
    the redemption fast path (app/fastpath.py)."""
    scheme, credentials = get_authorization_scheme_param(authorization)
    if not credentials or scheme.lower() != "bearer":
        return None
    return credentials


class _ApiKeyBearer(HTTPBearer):
    """HTTPBearer's security scheme in the OpenAPI document; the header read by `bearer_credentials`."""

    async def __call__(self, request: HTTPConnection) -> HTTPAuthorizationCredentials | None:
        credentials = bearer_credentials(request.headers.get("Authorization"))
        return None if credentials is None else HTTPAuthorizationCredentials(scheme="Bearer", credentials=credentials)


_bearer = _ApiKeyBearer(
    auto_error=False,
    scheme_name="ApiKey",
    bearerFormat="vl_<prefix>_<secret>",
    description="An API key: `Authorization: Bearer vl_<prefix>_<secret>`",
)


async def current_caller(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Caller:
    """The key's caller: from the authenticator's cache when it is warm (no session, no connection), else
    read in a session of its own, closed before the route runs (a route never holds two connections)."""
    if credentials is None:
        raise Unauthorized()
    authenticator: ApiKeyAuthenticator = request.app.state.api_keys
    caller = authenticator.cached(credentials.credentials)
    if caller is None:
        sessionmaker: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
        async with sessionmaker() as session:
            caller = await authenticator.authenticate(session, credentials.credentials)
    return caller


CallerDep = Annotated[Caller, Depends(current_caller)]


def require_roles(*roles: Role | str) -> Callable[[Caller], Awaitable[Caller]]:
    """A dependency answering the caller when its role is one of `roles`, else `403 forbidden`:

    `caller: Annotated[Caller, Depends(require_roles("admin", "auditor"))]`, or
    `APIRouter(dependencies=[Depends(require_roles("admin", "auditor"))])`.
    """
    allowed = frozenset(Role(role) for role in roles)  # an unknown role name fails at import time
    assert allowed, "require_roles needs at least one role"
    names = ", ".join(sorted(allowed))

    async def caller_in_roles(caller: CallerDep) -> Caller:
        if caller.role not in allowed:
            raise Forbidden(f"a {caller.role} key cannot do this (allowed: {names})")
        return caller

    return caller_in_roles


AdminCaller = Annotated[Caller, Depends(require_roles(Role.ADMIN))]
AdminOrAuditorCaller = Annotated[Caller, Depends(require_roles(Role.ADMIN, Role.AUDITOR))]


async def unrestricted_admin(caller: AdminCaller) -> Caller:
    """The caller when it is an admin limited to no voucher type, else `403 forbidden`: the one home of API.md's
    "Admin scope". The registry (API keys, entities, affiliations, external awards) and settlements move money
    in every program, so an admin limited to some voucher types acts only on its programs' objects."""
    if not caller.unrestricted:
        types = ", ".join(sorted(caller.voucher_types or ()))
        raise Forbidden(
            f"this admin key is limited to voucher types ({types}): API keys, the registry of entities and "
            "their affiliations, external awards and settlements take an admin key limited to no voucher type"
        )
    return caller


UnrestrictedAdminCaller = Annotated[Caller, Depends(unrestricted_admin)]
