"""Voucher tokens: compact JWS (EdDSA over Ed25519) that let a provider redeem a voucher.

Header `{"alg": "EdDSA", "kid": <RFC 7638 thumbprint>, "typ": "voucher+jwt"}` and nothing else. Claims:
`iss`, `sub` (the holder entity), `jti`, `iat`, `nbf`, `exp`, `voucher_id`, `program`; a narrowed token
adds `aud` (the one provider entity that may redeem it) and/or `max_amount_fen` (a spending limit the
server enforces across every redemption made with the token, by `jti`: `voucher_token.spent_fen`).

The token authorizes; the balance lives in the ledger. Each token has a row (`voucher_token`) that says
what it may do and whether it was revoked; a token without its row is no token.

Verification (`verify_token`) is strict, and every failure is `InvalidToken` (401 `invalid_token`) with a
short reason that never quotes the token:
- the input must be three base64url segments (an API key, `vl_<prefix>_<secret>`, never is; a token is
  never an API key either: it does not match the key format);
- the header holds exactly `alg`, `kid`, `typ`; `alg` is EdDSA (PyJWT is also pinned to it, so `none` and
  HS256-with-the-public-key never reach a key), `typ` is `voucher+jwt`, `kid` names a key we published
  (an unknown kid re-reads the keys once, then is refused);
- the signature verifies with that key; every claim is present with its type; `iss` is ours; the token is
  inside `nbf`..`exp` at `now` (`nbf` and `iat` with a little leeway for clocks between hosts, `exp` none);
- the row exists, is not revoked, and agrees with the claims (voucher, key, audience, limit, expiry,
  holder, program).
Only then is the audience compared with the caller: a sound token narrowed to another provider is
`WrongProvider` (403 `wrong_provider`), not a 401.

A token of a voucher that has since been revoked still verifies here: the voucher's state is read (under
its row lock) by redemption, which answers 409 `voucher_revoked` (and `voucher_expired` for a voucher past
its expiry). A token never outlives its voucher (`exp` <= the voucher's `expires_at`); one that lived as
long as its voucher and is presented after it raises `VoucherExpired` (409), not a 401.

Tokens whose signature verified are cached in the key ring by SHA-256 of the token until their `exp`
(bounded), so a token used again costs no signature check; the row is read every time.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import string
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from vouchers.errors import VoucherError
from vouchers.keys import KeyRing
from vouchers.vouchers import VoucherExpired, VoucherNotFound, VoucherRevoked

ALGORITHM = "EdDSA"
TYP = "voucher+jwt"
JTI_PATTERN = re.compile(r"tok_[a-z0-9]{24}")
_JTI_ALPHABET = string.ascii_lowercase + string.digits
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_KID = re.compile(r"[A-Za-z0-9_-]{43}")
# A voucher token is a few hundred bytes; anything far larger is not one, and is not parsed.
TOKEN_LENGTH_MAX = 4096
REQUIRED_CLAIMS = ("iss", "sub", "jti", "iat", "nbf", "exp", "voucher_id", "program")
OPTIONAL_CLAIMS = ("aud", "max_amount_fen")
_HEADER_MEMBERS = frozenset({"alg", "kid", "typ"})
# Clocks of the hosts that issue and verify may differ a little: a token is accepted this long before its
# `nbf` (and `iat`). Never after its `exp`, which may be the voucher's own expiry.
CLOCK_LEEWAY_S = 30
FEN_MAX = 10**15


class InvalidToken(VoucherError):
    """The token does not verify: 401 `invalid_token`. The detail says why, never what the token was."""

    code = "invalid_token"


class WrongProvider(VoucherError):
    """A sound token narrowed to another provider than the caller: 403 `wrong_provider`."""

    code = "wrong_provider"


class TokenNotFound(VoucherError):
    code = "not_found"


class InvalidTokenRequest(VoucherError):
    """A token request that cannot be met as asked (a past expiry, an unregistered provider): 422."""

    code = "validation_error"

    def __init__(self, detail: str, *, field: str) -> None:
        super().__init__(detail)
        self.errors = [{"loc": ["body", field], "msg": detail, "type": "value_error"}]


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    jti: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    jti: str
    voucher_id: str
    holder_entity_id: str
    program: str
    audience_entity_id: str | None
    max_amount_fen: int | None
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class TokenRevocation:
    jti: str
    voucher_id: str
    revoked_at: datetime


@dataclass(frozen=True, slots=True)
class TokenOwner:
    """Whose token it is: what the revoke route authorizes against."""

    jti: str
    voucher_id: str
    holder_entity_id: str
    program: str
    year: int


def new_jti() -> str:
    jti = "tok_" + "".join(secrets.choice(_JTI_ALPHABET) for _ in range(24))
    assert JTI_PATTERN.fullmatch(jti)
    return jti


# -- issue --------------------------------------------------------------------------------------------


async def issue_token(
    conn: AsyncConnection,
    keyring: KeyRing,
    *,
    voucher_id: str,
    holder_entity_id: str,
    program: str,
    provider_entity_id: str | None,
    max_amount_fen: int | None,
    expires_at: datetime | None,
    now: datetime,
    issued_by: str | None,
) -> IssuedToken:
    """Sign a token for an active voucher and record it. `exp` is the requested expiry (default: `now` plus
    the ring's `token_ttl_s`) but never after the voucher's own; whole seconds, never later than asked.
    Does not commit."""
    voucher = (
        await conn.execute(
            text("SELECT holder_entity_id, program, status, expires_at FROM voucher WHERE id = :id"),
            {"id": voucher_id},
        )
    ).first()
    if voucher is None or voucher.holder_entity_id != holder_entity_id or voucher.program != program:
        raise VoucherNotFound(f"no voucher {voucher_id}")
    if voucher.status == "revoked":
        raise VoucherRevoked(f"voucher {voucher_id} is revoked: it issues no tokens")
    if voucher.status == "expired" or voucher.expires_at <= now:
        raise VoucherExpired(f"voucher {voucher_id} has expired: it issues no tokens")
    assert voucher.status == "active", f"voucher {voucher_id} has status {voucher.status}"

    if max_amount_fen is not None and not 0 < max_amount_fen <= FEN_MAX:
        raise InvalidTokenRequest("max_amount_fen must be above zero", field="max_amount_fen")
    if provider_entity_id is not None:
        known = await conn.scalar(text("SELECT 1 FROM entity WHERE id = :id"), {"id": provider_entity_id})
        if known is None:
            raise InvalidTokenRequest(f"no entity {provider_entity_id} is registered", field="provider_entity_id")
    if expires_at is not None and expires_at <= now:
        raise InvalidTokenRequest("expires_at must be in the future", field="expires_at")
    requested = expires_at if expires_at is not None else now + timedelta(seconds=keyring.token_ttl_s)
    iat = int(now.timestamp())
    exp = int(min(requested, voucher.expires_at).timestamp())
    if exp <= iat:
        raise InvalidTokenRequest("expires_at must be at least a second from now", field="expires_at")

    kid, private_key = await keyring.signer(conn)
    jti = new_jti()
    claims: dict[str, Any] = {
        "iss": keyring.issuer,
        "sub": holder_entity_id,
        "jti": jti,
        "iat": iat,
        "nbf": iat,
        "exp": exp,
        "voucher_id": voucher_id,
        "program": program,
    }
    if provider_entity_id is not None:
        claims["aud"] = provider_entity_id
    if max_amount_fen is not None:
        claims["max_amount_fen"] = max_amount_fen
    token = jwt.encode(claims, private_key, algorithm=ALGORITHM, headers={"kid": kid, "typ": TYP})
    expires = datetime.fromtimestamp(exp, UTC)
    await conn.execute(
        text(
            "INSERT INTO voucher_token (jti, voucher_id, kid, audience_entity_id, max_amount_fen, issued_by, "
            "issued_at, expires_at) VALUES (:jti, :voucher, :kid, :aud, :max, :by, :issued_at, :expires_at)"
        ),
        {
            "jti": jti,
            "voucher": voucher_id,
            "kid": kid,
            "aud": provider_entity_id,
            "max": max_amount_fen,
            "by": issued_by,
            "issued_at": now,
            "expires_at": expires,
        },
    )
    return IssuedToken(token=token, jti=jti, expires_at=expires)


# -- verify -------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_header(token: str) -> str:
    """The kid, once the header is exactly what we sign."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise InvalidToken("the token header is malformed") from None
    if set(header) != _HEADER_MEMBERS:
        raise InvalidToken("the token header must hold exactly alg, kid and typ")
    if header["alg"] != ALGORITHM:
        raise InvalidToken("the token is not signed with EdDSA")
    if header["typ"] != TYP:
        raise InvalidToken(f"the token is not a {TYP}")
    kid = header["kid"]
    if not isinstance(kid, str) or not _KID.fullmatch(kid):
        raise InvalidToken("the token names no valid signing key")
    return kid


def _check_claims(claims: dict[str, Any]) -> None:
    unknown = set(claims) - set(REQUIRED_CLAIMS) - set(OPTIONAL_CLAIMS)
    if unknown:
        raise InvalidToken("the token carries claims it should not")
    for name in ("sub", "voucher_id", "program"):
        if not isinstance(claims[name], str) or not claims[name]:
            raise InvalidToken(f"the token's {name} claim is not valid")
    if not isinstance(claims["jti"], str) or not JTI_PATTERN.fullmatch(claims["jti"]):
        raise InvalidToken("the token's jti claim is not valid")
    for name in ("iat", "nbf", "exp"):
        if not _is_int(claims[name]):
            raise InvalidToken(f"the token's {name} claim is not a whole number of seconds")
    if "aud" in claims and (not isinstance(claims["aud"], str) or not claims["aud"]):
        raise InvalidToken("the token's aud claim must name one provider")
    if "max_amount_fen" in claims:
        limit = claims["max_amount_fen"]
        if not _is_int(limit) or not 0 < limit <= FEN_MAX:
            raise InvalidToken("the token's max_amount_fen claim is not valid")


_PYJWT_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.InvalidSignatureError, "the token's signature does not verify"),
    (jwt.InvalidIssuerError, "the token was not issued by this service"),
    (jwt.InvalidAlgorithmError, "the token is not signed with EdDSA"),
    (jwt.DecodeError, "the token is malformed"),
)


async def _verified_claims(conn: AsyncConnection, keyring: KeyRing, token: str) -> tuple[str, dict[str, Any]]:
    """Header, signature and claim checks (no clock, no row): the kid and the claims, or InvalidToken."""
    kid = _check_header(token)
    public_key = await keyring.public_key(conn, kid)
    if public_key is None:
        raise InvalidToken("the token names an unknown signing key")
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            public_key,
            algorithms=[ALGORITHM],
            issuer=keyring.issuer,
            options={
                "require": list(REQUIRED_CLAIMS),
                # checked below against the caller's `now`, and the audience after the row (403, not 401)
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_aud": False,
            },
        )
    except jwt.MissingRequiredClaimError as exc:
        name = exc.claim if exc.claim in REQUIRED_CLAIMS else "a required"
        raise InvalidToken(f"the token lacks the {name} claim") from None
    except jwt.PyJWTError as exc:
        reason = next((r for cls, r in _PYJWT_REASONS if isinstance(exc, cls)), "the token is not valid")
        raise InvalidToken(reason) from None
    _check_claims(claims)
    return kid, claims


async def verify_token(
    conn: AsyncConnection, keyring: KeyRing, token: str, *, caller_entity_id: str, now: datetime
) -> VerifiedToken:
    """What the token lets `caller_entity_id` do, or InvalidToken (401) / WrongProvider (403).

    Reads the token's row with its voucher (one statement, no lock) and nothing else. A token of a revoked
    voucher verifies: the voucher's status is for the caller to check under the voucher's row lock (409
    `voucher_revoked`). A token's `exp` is never after its voucher's expiry, so a token that lived as long
    as its voucher and is past it raises `VoucherExpired` (409 `voucher_expired`) rather than a 401: the
    token was sound, the voucher is over. Any other token past its `exp` is InvalidToken."""
    if not isinstance(token, str) or len(token) > TOKEN_LENGTH_MAX or not _COMPACT_JWS.fullmatch(token):
        raise InvalidToken("the token is not a compact JWS")
    now_s = now.timestamp()
    digest = hashlib.sha256(token.encode("ascii")).digest()
    cached = keyring.token_cache.get(digest, now_s)
    kid, claims = cached if cached is not None else await _verified_claims(conn, keyring, token)
    if now_s + CLOCK_LEEWAY_S < claims["nbf"] or now_s + CLOCK_LEEWAY_S < claims["iat"]:
        raise InvalidToken("the token is not valid yet")

    row = (
        await conn.execute(
            text(
                "SELECT t.voucher_id, t.kid, t.audience_entity_id, t.max_amount_fen, t.expires_at, t.revoked_at, "
                "v.holder_entity_id, v.program, v.expires_at AS voucher_expires_at "
                "FROM voucher_token t JOIN voucher v ON v.id = t.voucher_id WHERE t.jti = :jti"
            ),
            {"jti": claims["jti"]},
        )
    ).first()
    if row is None:
        raise InvalidToken("the token is not known here")
    if row.revoked_at is not None:
        raise InvalidToken("the token has been revoked")
    audience: str | None = claims.get("aud")
    limit: int | None = claims.get("max_amount_fen")
    if (
        row.voucher_id != claims["voucher_id"]
        or row.holder_entity_id != claims["sub"]
        or row.program != claims["program"]
        or row.kid != kid
        or row.audience_entity_id != audience
        or row.max_amount_fen != limit
        or int(row.expires_at.timestamp()) != claims["exp"]
    ):
        raise InvalidToken("the token does not match its record")
    if now_s >= claims["exp"]:
        if claims["exp"] == int(row.voucher_expires_at.timestamp()) and row.voucher_expires_at <= now:
            raise VoucherExpired(f"voucher {row.voucher_id} has expired")
        raise InvalidToken("the token has expired")
    if cached is None:
        keyring.token_cache.put(digest, (kid, claims), float(claims["exp"]), now_s)
    if audience is not None and audience != caller_entity_id:
        raise WrongProvider("this token is narrowed to another provider")
    return VerifiedToken(
        jti=claims["jti"],
        voucher_id=claims["voucher_id"],
        holder_entity_id=claims["sub"],
        program=claims["program"],
        audience_entity_id=audience,
        max_amount_fen=limit,
        expires_at=row.expires_at,
    )


# -- revoke -------------------------------------------------------------------------------------------


async def token_owner(conn: AsyncConnection, jti: str) -> TokenOwner:
    row = (
        await conn.execute(
            text(
                "SELECT t.jti, t.voucher_id, v.holder_entity_id, v.program, v.year "
                "FROM voucher_token t JOIN voucher v ON v.id = t.voucher_id WHERE t.jti = :jti"
            ),
            {"jti": jti},
        )
    ).first()
    if row is None:
        raise TokenNotFound(f"no token {jti}")
    return TokenOwner(row.jti, row.voucher_id, row.holder_entity_id, row.program, row.year)


async def revoke_token(conn: AsyncConnection, jti: str, *, by: str | None) -> TokenRevocation:
    """Stop one token (the voucher and its other tokens are untouched). Revoking a revoked token changes
    nothing and answers the first revocation. Does not commit."""
    row = (
        await conn.execute(
            text(
                "UPDATE voucher_token SET revoked_at = coalesce(revoked_at, now()), "
                "revoked_by = CASE WHEN revoked_at IS NULL THEN CAST(:by AS text) ELSE revoked_by END "
                "WHERE jti = :jti RETURNING jti, voucher_id, revoked_at"
            ),
            {"jti": jti, "by": by},
        )
    ).first()
    if row is None:
        raise TokenNotFound(f"no token {jti}")
    return TokenRevocation(row.jti, row.voucher_id, row.revoked_at)
