"""Voucher tokens: `POST /v1/vouchers/{id}/token`, `POST /v1/tokens/{jti}/revoke`, and the public keys that
verify them, `GET /.well-known/jwks.json`.

A token is issued to the voucher's holder (its enterprise key) or an admin of the program's voucher type;
another entity's voucher is `404 not_found`. The token is in the response body only: it is never logged,
and nothing here writes it anywhere but the answer (its row keeps the jti and what it may do).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse
from pydantic import Field
from sqlalchemy.exc import SQLAlchemyError

from app.apikeys import Caller
from app.dependencies import SessionDep, require_roles
from app.errors import Forbidden, problem_responses
from app.roles import Role
from app.schemas import PositiveFen, RequestModel, ResponseModel, Rfc3339Time
from ledger.service import Ledger
from vouchers import tokens as service
from vouchers import vouchers as vouchers_service
from vouchers.catalog import Catalog
from vouchers.keys import KeyRing
from vouchers.vouchers import VoucherNotFound

log = logging.getLogger(__name__)

router = APIRouter(tags=["tokens"], responses=problem_responses(401, 403, 422))
well_known = APIRouter(tags=["tokens"])

VoucherId = Annotated[str, Path(pattern=r"^vch_[a-z0-9]{24}$")]
Jti = Annotated[str, Path(pattern=r"^tok_[a-z0-9]{24}$")]
HolderOrAdmin = Annotated[Caller, Depends(require_roles(Role.ADMIN, Role.ENTERPRISE))]
# JWKS answers may be cached briefly: a verifier meeting an unknown kid fetches the set again anyway
JWKS_MAX_AGE_S = 60


class TokenIn(RequestModel):
    provider_entity_id: str | None = Field(
        default=None, pattern=r"^ent_[a-z0-9]{24}$", description="narrow the token to this one provider (`aud`)"
    )
    max_amount_fen: PositiveFen | None = Field(
        default=None, description="a spending limit across every redemption made with this token"
    )
    expires_at: Rfc3339Time | None = Field(
        default=None, description="default: 24 hours from now; never after the voucher's own expiry"
    )


class TokenOut(ResponseModel):
    token: str
    jti: str
    expires_at: datetime


class RevocationOut(ResponseModel):
    jti: str
    revoked_at: datetime


def _keyring(request: Request) -> KeyRing:
    keyring: KeyRing = request.app.state.keyring
    return keyring


def _may_act_for(caller: Caller, catalog: Catalog, *, holder_entity_id: str, program: str, year: int) -> bool:
    """False: the object does not exist for this caller (404). Raises Forbidden for an admin of other types."""
    if caller.role is Role.ENTERPRISE:
        return caller.entity_id == holder_entity_id
    if not caller.administers(catalog.for_year(program, year).voucher_type):
        raise Forbidden(f"this key does not administer {program}")
    return True


@router.post(
    "/vouchers/{voucher_id}/token",
    status_code=201,
    summary="A signed token that lets a provider redeem the voucher (optionally narrowed and limited)",
    responses=problem_responses(404, 409),
)
async def issue_token(
    request: Request, voucher_id: VoucherId, session: SessionDep, caller: HolderOrAdmin, body: TokenIn | None = None
) -> TokenOut:
    body = body or TokenIn()
    conn = await session.connection()
    now = datetime.now(UTC)
    ledger: Ledger = request.app.state.ledger
    voucher = await vouchers_service.get_voucher(conn, ledger, voucher_id, now=now)
    catalog: Catalog = request.app.state.catalog
    if not _may_act_for(
        caller, catalog, holder_entity_id=voucher.holder_entity_id, program=voucher.program, year=voucher.year
    ):
        raise VoucherNotFound(f"no voucher {voucher_id}")
    issued = await service.issue_token(
        conn,
        _keyring(request),
        voucher_id=voucher.id,
        holder_entity_id=voucher.holder_entity_id,
        program=voucher.program,
        provider_entity_id=body.provider_entity_id,
        max_amount_fen=body.max_amount_fen,
        expires_at=body.expires_at,
        now=now,
        issued_by=caller.key_id,
    )
    await session.commit()
    return TokenOut(token=issued.token, jti=issued.jti, expires_at=issued.expires_at)


@router.post(
    "/tokens/{jti}/revoke",
    summary="Stop one token; the voucher and its other tokens keep working",
    responses=problem_responses(404),
)
async def revoke_token(request: Request, jti: Jti, session: SessionDep, caller: HolderOrAdmin) -> RevocationOut:
    conn = await session.connection()
    owner = await service.token_owner(conn, jti)
    catalog: Catalog = request.app.state.catalog
    if not _may_act_for(
        caller, catalog, holder_entity_id=owner.holder_entity_id, program=owner.program, year=owner.year
    ):
        raise service.TokenNotFound(f"no token {jti}")
    revocation = await service.revoke_token(conn, jti, by=caller.key_id)
    await session.commit()
    return RevocationOut(jti=revocation.jti, revoked_at=revocation.revoked_at)


@well_known.get(
    "/.well-known/jwks.json",
    summary="The public keys (JWK Set) that verify voucher tokens and exports: active and retired, never private",
)
async def jwks(request: Request, session: SessionDep) -> JSONResponse:
    keyring = _keyring(request)
    try:
        await keyring.refresh(await session.connection())  # at most once a second: a rotation elsewhere shows
    except (OSError, SQLAlchemyError):
        if not keyring.loaded:
            raise
        log.warning("serving the JWKS as last read: the database did not answer")
    return JSONResponse(keyring.jwks(), headers={"Cache-Control": f"public, max-age={JWKS_MAX_AGE_S}"})
