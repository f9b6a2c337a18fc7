"""Signing keys: Ed25519, named by their RFC 7638 thumbprint, private halves encrypted at rest.

A key row (`signing_key`) holds the public JWK in clear and the 32 raw private bytes sealed with AES-256-GCM
under the key-encryption key (KEK): `nonce (12 bytes) || ciphertext+tag`, with the kid as associated data,
so a sealed key copied onto another row does not open. `kek_id` (the first 16 hex digits of SHA-256 of the
KEK) names the KEK a row was sealed under: a wrong KEK is reported as such, never as a garbled key.

The KEK comes from `VL_KEY_ENCRYPTION_KEY` (base64 or base64url of 32 bytes) or, when that is unset, from
the file `kek` in the data folder, created with mode 0600 on first start. A file readable by anyone else
is refused: a KEK stored with the database it protects protects nothing, and one readable by other users
even less.

Exactly one key is active (a partial unique index); `rotate` retires it and makes a new one in one
transaction. Retired keys sign nothing new and are never deleted (a trigger refuses it): the JWKS keeps
them while a token or an export they signed may still need checking. Verification needs public keys only,
so only the active key's private half is ever decrypted.

`KeyRing` is one process's view: every public key by kid, and the active private key. A kid it does not
know makes it re-read the table (at most once a second), so a rotation in another process is picked up by
the first token that names the new key; signing checks the active kid in the database every time (one
indexed read, `FOR SHARE`, so a concurrent rotation waits for the signature's transaction to commit).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import secrets
import stat
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

log = logging.getLogger(__name__)

KEK_BYTES = 32
KEK_FILE = "kek"
NONCE_BYTES = 12
# a kid we did not know makes the ring re-read the table at most this often
REFRESH_INTERVAL_S = 1.0
# verified tokens kept per process (a bound on memory, not on correctness: a miss only costs a verify)
TOKEN_CACHE_SIZE_MAX = 10_000
# rotations queue on this transaction-scoped advisory lock (an arbitrary constant, "vl keys")
_ROTATE_LOCK = 0x766C_6B65_7973


class KeyEncryptionKeyError(Exception):
    """The KEK is missing, malformed, stored unsafely, or not the one the keys were sealed under."""


class NoActiveKey(Exception):
    """No key signs: the database has no active key (ensure_active_key makes the first one)."""


@dataclass(frozen=True, slots=True)
class Kek:
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.key) != KEK_BYTES:
            raise KeyEncryptionKeyError(f"a key-encryption key is {KEK_BYTES} bytes, not {len(self.key)}")

    @property
    def kek_id(self) -> str:
        return hashlib.sha256(self.key).hexdigest()[:16]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _decode_kek(value: str, source: str) -> Kek:
    value = value.strip()
    padded = value + "=" * (-len(value) % 4)
    try:
        raw = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise KeyEncryptionKeyError(f"{source} is not base64 (or base64url) of {KEK_BYTES} bytes") from None
    if len(raw) != KEK_BYTES:
        raise KeyEncryptionKeyError(f"{source} decodes to {len(raw)} bytes; a key-encryption key is {KEK_BYTES}")
    return Kek(raw)


def _read_kek_file(path: Path) -> Kek:
    info = path.lstat()
    if not stat.S_ISREG(info.st_mode):
        raise KeyEncryptionKeyError(f"{path} is not a regular file; refusing to use it as the key-encryption key")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise KeyEncryptionKeyError(
            f"{path} has mode {mode:04o}: the key-encryption key must be readable by its owner only (chmod 600 {path})"
        )
    return _decode_kek(path.read_text(encoding="ascii"), str(path))


def _create_kek_file(path: Path) -> None:
    """Write a fresh KEK to `path`, mode 0600, atomically: written in full under a temporary name, then
    linked into place, so a concurrent first start (two workers) reads one complete key."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (b64url(secrets.token_bytes(KEK_BYTES)) + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temporary, path)
        log.warning(
            "created the key-encryption key %s: back it up apart from the database; without it the signing "
            "keys cannot be opened, and with the database it opens them",
            path,
        )
    except FileExistsError:
        pass  # another process made it first: use theirs
    finally:
        temporary.unlink()


def load_kek(value: str | None, data_dir: Path) -> Kek:
    """The KEK: `value` (from `VL_KEY_ENCRYPTION_KEY`) when set, else the file `kek` in `data_dir`, created
    on first use. Blocking file I/O: call it from a thread in async code."""
    if value is not None and value.strip():
        return _decode_kek(value, "VL_KEY_ENCRYPTION_KEY")
    path = data_dir / KEK_FILE
    if not path.exists():
        _create_kek_file(path)
    return _read_kek_file(path)


# -- keys -------------------------------------------------------------------------------------------


def thumbprint(x: str) -> str:
    """RFC 7638 thumbprint of an Ed25519 public key (RFC 8037 §2: the members of an OKP key are crv, kty,
    x), in lexicographic order, no whitespace, SHA-256, base64url without padding."""
    canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode("ascii")).digest())


def public_jwk(public_key: Ed25519PublicKey) -> dict[str, str]:
    x = b64url(public_key.public_bytes_raw())
    return {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": thumbprint(x), "use": "sig", "alg": "EdDSA"}


def _aad(kid: str) -> bytes:
    return f"voucher-ledger signing key {kid}".encode("ascii")


def seal(kek: Kek, kid: str, private_key: Ed25519PrivateKey) -> bytes:
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(kek.key).encrypt(nonce, private_key.private_bytes_raw(), _aad(kid))


def unseal(kek: Kek, kid: str, kek_id: str, sealed: bytes) -> Ed25519PrivateKey:
    if kek_id != kek.kek_id:
        raise KeyEncryptionKeyError(
            f"signing key {kid} is sealed under key-encryption key {kek_id}, but the configured one is "
            f"{kek.kek_id}: set VL_KEY_ENCRYPTION_KEY (or the data folder's kek file) to the key the signing "
            "keys were made with"
        )
    try:
        raw = AESGCM(kek.key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], _aad(kid))
    except InvalidTag:
        raise KeyEncryptionKeyError(
            f"signing key {kid} does not open under key-encryption key {kek.kek_id}: the stored key is damaged"
        ) from None
    private_key = Ed25519PrivateKey.from_private_bytes(raw)
    if public_jwk(private_key.public_key())["kid"] != kid:
        raise KeyEncryptionKeyError(f"signing key {kid}: the private key does not match its public key")
    return private_key


_INSERT_KEY = (
    "INSERT INTO signing_key (kid, public_jwk, private_key_encrypted, kek_id, status) "
    "VALUES (:kid, CAST(:jwk AS jsonb), :sealed, :kek_id, 'active')"
)
# the first key, when several processes start at once: the loser's insert does nothing
_INSERT_FIRST_KEY = _INSERT_KEY + " ON CONFLICT (status) WHERE status = 'active' DO NOTHING"
_ACTIVE_KID = "SELECT kid FROM signing_key WHERE status = 'active'"


async def _insert_key(conn: AsyncConnection, kek: Kek, *, first: bool = False) -> str:
    private_key = Ed25519PrivateKey.generate()
    jwk = public_jwk(private_key.public_key())
    kid = jwk["kid"]
    await conn.execute(
        text(_INSERT_FIRST_KEY if first else _INSERT_KEY),
        {"kid": kid, "jwk": json.dumps(jwk), "sealed": seal(kek, kid, private_key), "kek_id": kek.kek_id},
    )
    return kid


async def active_kid(conn: AsyncConnection, *, for_share: bool = False) -> str | None:
    kid: str | None = await conn.scalar(text(_ACTIVE_KID + " FOR SHARE" if for_share else _ACTIVE_KID))
    return kid


async def ensure_active_key(conn: AsyncConnection, kek: Kek) -> str:
    """The active kid, making the first key if there is none (safe when several processes start at once).
    Does not commit."""
    kid = await active_kid(conn)
    if kid is None:
        await _insert_key(conn, kek, first=True)
        kid = await active_kid(conn)
    assert kid is not None, "an active signing key exists after ensure_active_key"
    return kid


async def rotate(conn: AsyncConnection, kek: Kek) -> str:
    """Retire the active key and make a new active one; return the new kid. Does not commit: the caller's
    one transaction makes both changes or neither. Refused when the active key was sealed under another
    KEK (the servers could not open the new key either, or could not open the old one now)."""
    await conn.execute(text("SELECT pg_advisory_xact_lock(:lock)"), {"lock": _ROTATE_LOCK})
    current = (
        await conn.execute(text("SELECT kid, kek_id FROM signing_key WHERE status = 'active' FOR UPDATE"))
    ).first()
    if current is not None:
        if current.kek_id != kek.kek_id:
            raise KeyEncryptionKeyError(
                f"the active signing key {current.kid} is sealed under key-encryption key {current.kek_id}, "
                f"not the configured {kek.kek_id}: rotate with the KEK the service runs with"
            )
        await conn.execute(
            text("UPDATE signing_key SET status = 'retired', retired_at = now() WHERE kid = :kid"),
            {"kid": current.kid},
        )
    return await _insert_key(conn, kek)


# -- the ring -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PublicKey:
    kid: str
    jwk: dict[str, str]
    key: Ed25519PublicKey
    status: str
    created_at: datetime


class TokenCache:
    """Claims of tokens whose signature and claims verified, by SHA-256 of the token, until their `exp`:
    a token seen again skips the signature check (about 124 µs), never the row (revocation lives there)."""

    def __init__(self, size_max: int = TOKEN_CACHE_SIZE_MAX) -> None:
        self._size_max = size_max
        self._entries: OrderedDict[bytes, tuple[tuple[str, dict[str, Any]], float]] = OrderedDict()

    def get(self, digest: bytes, now_s: float) -> tuple[str, dict[str, Any]] | None:
        """The (kid, claims) of a token verified before and not past its `exp`."""
        entry = self._entries.get(digest)
        if entry is None:
            return None
        verified, exp_s = entry
        if exp_s <= now_s:
            del self._entries[digest]
            return None
        return verified

    def put(self, digest: bytes, verified: tuple[str, dict[str, Any]], exp_s: float, now_s: float) -> None:
        if len(self._entries) >= self._size_max:
            for stale in [d for d, (_c, exp) in self._entries.items() if exp <= now_s]:
                del self._entries[stale]
            while len(self._entries) >= self._size_max:
                self._entries.popitem(last=False)
        self._entries[digest] = (verified, exp_s)

    def __len__(self) -> int:
        return len(self._entries)


class KeyRing:
    """One process's keys: public keys by kid (active and retired), and the active private key.

    Lives at `app.state.keyring`. `issuer` and `token_ttl_s` are the token settings (`VL_TOKEN_ISSUER`,
    `VL_TOKEN_TTL_S`); `token_cache` holds verified tokens (vouchers/tokens.py)."""

    def __init__(
        self,
        kek: Kek,
        *,
        issuer: str,
        token_ttl_s: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kek = kek
        self.issuer = issuer
        self.token_ttl_s = token_ttl_s
        self.token_cache = TokenCache()
        self._clock = clock
        self._public: dict[str, PublicKey] = {}
        self._active: tuple[str, str, bytes] | None = None  # kid, kek_id, sealed private key
        self._signer: tuple[str, Ed25519PrivateKey] | None = None
        self._loaded_at: float | None = None

    @property
    def loaded(self) -> bool:
        return self._loaded_at is not None

    @property
    def active_kid(self) -> str | None:
        return self._active[0] if self._active else None

    async def load(self, conn: AsyncConnection) -> None:
        """Read every key. Public keys only: the private key is opened when something is signed (`unlock`)."""
        self._loaded_at = self._clock()
        rows = (
            await conn.execute(
                text(
                    "SELECT kid, public_jwk, private_key_encrypted, kek_id, status, created_at "
                    "FROM signing_key ORDER BY created_at DESC, kid"
                )
            )
        ).all()
        public: dict[str, PublicKey] = {}
        active: tuple[str, str, bytes] | None = None
        for row in rows:
            jwk = {k: str(v) for k, v in dict(row.public_jwk).items()}
            assert "d" not in jwk and thumbprint(jwk["x"]) == row.kid, f"signing key {row.kid} is inconsistent"
            key = Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(jwk["x"] + "=" * (-len(jwk["x"]) % 4)))
            public[row.kid] = PublicKey(row.kid, jwk, key, row.status, row.created_at)
            if row.status == "active":
                active = (row.kid, row.kek_id, bytes(row.private_key_encrypted))
        self._public = public
        self._active = active
        if self._signer is not None and (active is None or self._signer[0] != active[0]):
            self._signer = None

    def unlock(self) -> None:
        """Open the active private key now (at start-up: a wrong KEK stops the service, with its reason)."""
        if self._active is None:
            raise NoActiveKey("no active signing key")
        kid, kek_id, sealed = self._active
        if self._signer is None or self._signer[0] != kid:
            self._signer = (kid, unseal(self.kek, kid, kek_id, sealed))

    async def refresh(self, conn: AsyncConnection, *, force: bool = False) -> bool:
        """Re-read the keys unless that was done less than a second ago (or `force`); True if it read."""
        now = self._clock()
        if not force and self._loaded_at is not None and now - self._loaded_at < REFRESH_INTERVAL_S:
            return False
        await self.load(conn)
        return True

    async def public_key(self, conn: AsyncConnection, kid: str) -> Ed25519PublicKey | None:
        """The public key `kid` names; an unknown kid re-reads the table first (at most once a second)."""
        found = self._public.get(kid)
        if found is None and await self.refresh(conn):
            found = self._public.get(kid)
        return found.key if found else None

    async def signer(self, conn: AsyncConnection) -> tuple[str, Ed25519PrivateKey]:
        """The active kid and private key, as the database has them now: the row is read `FOR SHARE`, so a
        rotation waits until the caller's transaction ends and no retired key signs after its retirement.
        With no key at all (a database migrated after start-up) the first one is made."""
        kid = await active_kid(conn, for_share=True)
        if kid is None:
            await ensure_active_key(conn, self.kek)
            kid = await active_kid(conn, for_share=True)
        if self._active is None or self._active[0] != kid:
            await self.load(conn)
        self.unlock()
        assert self._signer is not None and self._signer[0] == kid
        return self._signer

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """Every public key, active first then newest first; never private material."""
        keys = sorted(self._public.values(), key=lambda k: (k.status != "active", -k.created_at.timestamp(), k.kid))
        published = [dict(k.jwk) for k in keys]
        assert all("d" not in jwk for jwk in published)
        return {"keys": published}
