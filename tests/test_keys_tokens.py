"""Signing keys and voucher tokens, through the real app: issue, offline verification with the JWKS alone,
narrowing, revocation, the attacks a verifier must refuse, rotation, the key-encryption key, the CLI."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import stat
import subprocess
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.apikeys import Role
from app.db import make_engine
from app.main import create_app
from app.settings import Settings
from tests.service_support import CURRENT_YEAR
from tests.test_support import VOUCHER_LEDGER, assert_problem, bearer, create_entity, create_key, running_app
from vouchers import keys
from vouchers.keys import Kek, KeyEncryptionKeyError, KeyRing, b64url, load_kek, thumbprint
from vouchers.rules import SHANGHAI
from vouchers.tokens import InvalidToken, VerifiedToken, WrongProvider, new_jti, verify_token
from vouchers.vouchers import VoucherExpired

YUAN = 100
YEAR = CURRENT_YEAR  # approved only inside its own year
PILOT = "data.pilot_dataset"
KID_LENGTH = 43


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    app = create_app(settings)
    async with running_app(settings, app):
        yield app


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        yield client


@pytest.fixture
def keyring(app: FastAPI) -> KeyRing:
    ring: KeyRing = app.state.keyring
    return ring


@pytest.fixture
async def admin(engine: AsyncEngine) -> dict[str, str]:
    return bearer(await create_key(engine, Role.ADMIN))


async def pilot_voucher(client: httpx.AsyncClient, admin: dict[str, str], holder: str) -> str:
    """A funded, approved data.pilot_dataset voucher of 100,000 元 for `holder`; its id."""
    path = f"/v1/programs/{PILOT}/budgets/{YEAR}"
    current = (await client.get(path, headers=admin)).json()["budget_fen"]
    funded = await client.put(path, json={"amount_fen": current + 100_000 * YUAN}, headers=admin)
    assert funded.status_code == 200, funded.text
    basis = {"project_ref": f"PD-{uuid.uuid4().hex[:12]}", "pilot_base": "国家人工智能行业应用中试基地"}
    applied = await client.post(
        "/v1/applications",
        json={"program": PILOT, "applicant_entity_id": holder, "year": YEAR, "basis": basis},
        headers=admin,
    )
    assert applied.status_code == 201, applied.text
    approved = await client.post(
        f"/v1/applications/{applied.json()['id']}/approve", json={"award_fen": 100_000 * YUAN}, headers=admin
    )
    assert approved.status_code == 201, approved.text
    voucher_id: str = approved.json()["id"]
    return voucher_id


async def issue(
    client: httpx.AsyncClient, voucher_id: str, headers: dict[str, str], body: dict[str, Any] | None = None
) -> dict[str, Any]:
    response = await client.post(f"/v1/vouchers/{voucher_id}/token", json=body, headers=headers)
    assert response.status_code == 201, response.text
    issued: dict[str, Any] = response.json()
    return issued


async def verify(
    engine: AsyncEngine, keyring: KeyRing, token: str, caller: str, now: datetime | None = None
) -> VerifiedToken:
    async with engine.connect() as conn:
        return await verify_token(conn, keyring, token, caller_entity_id=caller, now=now or datetime.now(UTC))


async def refused(engine: AsyncEngine, keyring: KeyRing, token: str, caller: str, now: datetime | None = None) -> str:
    """The token is refused as invalid; returns the reason, which never quotes the token."""
    with pytest.raises(InvalidToken) as caught:
        await verify(engine, keyring, token, caller, now)
    reason = caught.value.detail
    assert all(part not in reason for part in token.split(".") if len(part) > 3)
    return reason


def segments(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    header, payload, signature = token.split(".")
    return json.loads(_unb64(header)), json.loads(_unb64(payload)), signature


def _unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _b64json(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def sign(private_key: Ed25519PrivateKey, header: dict[str, Any], claims: dict[str, Any]) -> str:
    """A token signed with a real key, whatever its header and claims say (PyJWT adds nothing: built by hand)."""
    signing_input = f"{_b64json(header)}.{_b64json(claims)}"
    return f"{signing_input}.{b64url(private_key.sign(signing_input.encode()))}"


async def signer(engine: AsyncEngine, keyring: KeyRing) -> tuple[str, Ed25519PrivateKey]:
    async with engine.connect() as conn:
        return await keyring.signer(conn)


async def test_issue_and_verify_offline_with_the_jwks_alone(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine, keyring: KeyRing
) -> None:
    holder = await create_entity(engine)
    voucher_id = await pilot_voucher(client, admin, holder)
    enterprise = bearer(await create_key(engine, Role.ENTERPRISE, entity_id=holder))
    before = datetime.now(UTC).replace(microsecond=0)
    issued = await issue(client, voucher_id, enterprise)
    assert issued["jti"].startswith("tok_") and len(issued["jti"]) == 28
    expires_at = datetime.fromisoformat(issued["expires_at"])
    assert before + timedelta(hours=24) <= expires_at <= before + timedelta(hours=24, seconds=2)

    jwks_response = await client.get("/.well-known/jwks.json")  # public: no key
    assert jwks_response.status_code == 200
    assert '"d"' not in jwks_response.text
    jwks = jwks_response.json()
    for jwk in jwks["keys"]:
        assert set(jwk) == {"kty", "crv", "x", "kid", "use", "alg"}
        assert (jwk["kty"], jwk["crv"], jwk["use"], jwk["alg"]) == ("OKP", "Ed25519", "sig", "EdDSA")
        assert jwk["kid"] == thumbprint(jwk["x"])

    # offline: PyJWT and the JWK Set, nothing else of ours
    token = issued["token"]
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "EdDSA", "typ": "voucher+jwt", "kid": header["kid"]}
    key = jwt.PyJWKSet.from_dict(jwks)[header["kid"]]
    claims = jwt.decode(
        token,
        key,
        algorithms=["EdDSA"],
        issuer="voucher-ledger",
        options={"require": ["iss", "sub", "jti", "iat", "nbf", "exp", "voucher_id", "program"]},
    )
    assert claims["sub"] == holder and claims["voucher_id"] == voucher_id and claims["program"] == PILOT
    assert claims["jti"] == issued["jti"] and claims["exp"] == int(expires_at.timestamp())
    assert claims["nbf"] == claims["iat"] and "aud" not in claims and "max_amount_fen" not in claims

    # and by the service: any provider may redeem an unnarrowed token
    provider = await create_entity(engine, kind="provider")
    verified = await verify(engine, keyring, token, provider)
    assert verified == VerifiedToken(
        jti=issued["jti"],
        voucher_id=voucher_id,
        holder_entity_id=holder,
        program=PILOT,
        audience_entity_id=None,
        max_amount_fen=None,
        expires_at=expires_at,
    )
    async with engine.connect() as conn:
        row = (await conn.execute(text("SELECT * FROM voucher_token WHERE jti = :j"), {"j": issued["jti"]})).one()
    assert row.voucher_id == voucher_id and row.kid == header["kid"] and row.spent_fen == 0


async def test_who_may_issue_and_what_they_may_ask(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    holder = await create_entity(engine)
    voucher_id = await pilot_voucher(client, admin, holder)
    path = f"/v1/vouchers/{voucher_id}/token"
    other = bearer(await create_key(engine, Role.ENTERPRISE))
    assert_problem(await client.post(path, headers=other), 404, "not_found")
    assert_problem(await client.post(path, headers=bearer(await create_key(engine, Role.PROVIDER))), 403, "forbidden")
    assert_problem(await client.post(path, headers=bearer(await create_key(engine, Role.AUDITOR))), 403, "forbidden")
    compute_admin = bearer(await create_key(engine, Role.ADMIN, voucher_types=["compute"]))
    assert_problem(await client.post(path, headers=compute_admin), 403, "forbidden")
    data_admin = bearer(await create_key(engine, Role.ADMIN, voucher_types=["data"]))
    await issue(client, voucher_id, data_admin)
    assert_problem(await client.post(path), 401, "unauthorized")
    missing = "/v1/vouchers/vch_" + "0" * 24 + "/token"
    assert_problem(await client.post(missing, headers=admin), 404, "not_found")

    provider = await create_entity(engine, kind="provider")
    for body, field in [
        ({"max_amount_fen": 0}, "max_amount_fen"),
        ({"max_amount_fen": -1}, "max_amount_fen"),
        ({"max_amount_fen": 1.5}, "max_amount_fen"),
        ({"provider_entity_id": "not-an-entity"}, "provider_entity_id"),
        ({"provider_entity_id": "ent_" + "0" * 24}, "provider_entity_id"),  # well formed, not registered
        ({"expires_at": "2020-01-01T00:00:00+00:00"}, "expires_at"),
        ({"expires_at": "2030-01-01T00:00:00"}, "expires_at"),  # no offset
        ({"expires_at": 1_900_000_000}, "expires_at"),  # seconds since 1970 are not RFC 3339
        ({"audience": provider}, "audience"),
    ]:
        body_out = assert_problem(await client.post(path, json=body, headers=admin), 422, "validation_error")
        assert field in json.dumps(body_out["errors"]), (body, body_out)

    # never after the voucher's own expiry (the end of its program year or 90 days after issue, a whole second)
    voucher = (await client.get(f"/v1/vouchers/{voucher_id}", headers=admin)).json()
    late = await issue(client, voucher_id, admin, {"expires_at": "2031-01-01T00:00:00+08:00"})
    assert datetime.fromisoformat(late["expires_at"]) == datetime.fromisoformat(voucher["expires_at"])
    soon_at = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=900_000)
    soon = await issue(client, voucher_id, admin, {"expires_at": soon_at.astimezone(SHANGHAI).isoformat()})
    assert datetime.fromisoformat(soon["expires_at"]) == soon_at.replace(microsecond=0)  # whole seconds, down

    revoked = await client.post(
        f"/v1/vouchers/{voucher_id}/revoke", json={"reason": "test", "grounds": "administrative"}, headers=admin
    )
    assert revoked.status_code == 200, revoked.text
    assert_problem(await client.post(path, headers=admin), 409, "voucher_revoked")


async def test_a_narrowed_token_answers_its_provider_only(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine, keyring: KeyRing
) -> None:
    holder = await create_entity(engine)
    voucher_id = await pilot_voucher(client, admin, holder)
    provider, other = await create_entity(engine, kind="provider"), await create_entity(engine, kind="provider")
    enterprise = bearer(await create_key(engine, Role.ENTERPRISE, entity_id=holder))
    issued = await issue(
        client, voucher_id, enterprise, {"provider_entity_id": provider, "max_amount_fen": 5_000 * YUAN}
    )
    _header, claims, _signature = segments(issued["token"])
    assert claims["aud"] == provider and claims["max_amount_fen"] == 5_000 * YUAN
    verified = await verify(engine, keyring, issued["token"], provider)
    assert (verified.audience_entity_id, verified.max_amount_fen) == (provider, 5_000 * YUAN)
    with pytest.raises(WrongProvider):
        await verify(engine, keyring, issued["token"], other)
    with pytest.raises(WrongProvider):  # the same from the cache
        await verify(engine, keyring, issued["token"], holder)


async def test_revoked_tokens_stop_and_the_cache_does_not_hide_it(
    client: httpx.AsyncClient,
    admin: dict[str, str],
    engine: AsyncEngine,
    keyring: KeyRing,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    holder = await create_entity(engine)
    voucher_id = await pilot_voucher(client, admin, holder)
    enterprise = bearer(await create_key(engine, Role.ENTERPRISE, entity_id=holder))
    provider = await create_entity(engine, kind="provider")
    issued, kept = await issue(client, voucher_id, enterprise), await issue(client, voucher_id, enterprise)
    await verify(engine, keyring, issued["token"], provider)

    def no_signature_checks(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("a cached token is not verified again")

    with monkeypatch.context() as patch:
        patch.setattr(jwt, "decode", no_signature_checks)
        await verify(engine, keyring, issued["token"], provider)  # cached: no signature check

    path = f"/v1/tokens/{issued['jti']}/revoke"
    assert_problem(await client.post(path, headers=bearer(await create_key(engine, Role.ENTERPRISE))), 404, "not_found")
    assert_problem(await client.post(path, headers=bearer(await create_key(engine, Role.PROVIDER))), 403, "forbidden")
    compute_admin = bearer(await create_key(engine, Role.ADMIN, voucher_types=["compute"]))
    assert_problem(await client.post(path, headers=compute_admin), 403, "forbidden")
    assert_problem(await client.post("/v1/tokens/tok_" + "0" * 24 + "/revoke", headers=admin), 404, "not_found")
    assert_problem(await client.post("/v1/tokens/nope/revoke", headers=admin), 422, "validation_error")
    first = await client.post(path, headers=enterprise)
    assert first.status_code == 200, first.text
    assert first.json()["jti"] == issued["jti"] and first.json()["revoked_at"]
    again = await client.post(path, headers=admin)
    assert again.status_code == 200 and again.json() == first.json()

    assert await refused(engine, keyring, issued["token"], provider) == "the token has been revoked"
    assert (await verify(engine, keyring, kept["token"], provider)).jti == kept["jti"]  # the voucher works on
    async with engine.connect() as conn:
        by = await conn.scalar(text("SELECT revoked_by FROM voucher_token WHERE jti = :j"), {"j": issued["jti"]})
    assert by is not None and by.startswith("key_")


async def test_api_keys_and_tokens_never_stand_in_for_each_other(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine, keyring: KeyRing
) -> None:
    holder = await create_entity(engine)
    voucher_id = await pilot_voucher(client, admin, holder)
    issued = await issue(client, voucher_id, admin)
    # a token presented as an API key: not the key format
    response = await client.get("/v1/vouchers", headers=bearer(issued["token"]))
    body = assert_problem(response, 401, "unauthorized")
    assert issued["token"] not in response.text and "malformed" in body["detail"]
    # an API key presented as a token: not a JWS
    provider_key = await create_key(engine, Role.PROVIDER)
    assert await refused(engine, keyring, provider_key, holder) == "the token is not a compact JWS"
    assert await refused(engine, keyring, admin["Authorization"].removeprefix("Bearer "), holder)


async def test_attacks_are_invalid_tokens(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine, keyring: KeyRing
) -> None:
    holder = await create_entity(engine)
    voucher_id = await pilot_voucher(client, admin, holder)
    provider = await create_entity(engine, kind="provider")
    issued = await issue(client, voucher_id, admin, {"provider_entity_id": provider, "max_amount_fen": 100})
    token = issued["token"]
    header, claims, signature = segments(token)
    kid, private_key = await signer(engine, keyring)
    assert kid == header["kid"]
    assert sign(private_key, header, claims) == token  # the hand-built tokens below differ only as meant
    now = datetime.now(UTC)

    async def invalid(bad: str, reason: str) -> None:
        assert reason in await refused(engine, keyring, bad, provider)

    # alg none, with and without a signature segment
    none_header = {**header, "alg": "none"}
    await invalid(f"{_b64json(none_header)}.{_b64json(claims)}.", "not a compact JWS")
    await invalid(f"{_b64json(none_header)}.{_b64json(claims)}.{signature}", "not signed with EdDSA")
    # HS256 keyed with the public key (raw bytes, and its JWK's x): the classic confusion
    public_raw = private_key.public_key().public_bytes_raw()
    for secret in (public_raw, b64url(public_raw).encode()):
        hs_header = {**header, "alg": "HS256"}
        signing_input = f"{_b64json(hs_header)}.{_b64json(claims)}"
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        await invalid(f"{signing_input}.{b64url(mac)}", "not signed with EdDSA")
    # an unknown kid (a well-formed thumbprint of a key we never made), a malformed one
    stranger = Ed25519PrivateKey.generate()
    stranger_kid = keys.public_jwk(stranger.public_key())["kid"]
    await invalid(sign(stranger, {**header, "kid": stranger_kid}, claims), "unknown signing key")
    await invalid(sign(private_key, {**header, "kid": "../../etc/passwd"}, claims), "no valid signing key")
    # signed by a key of ours but naming another of ours: the signature does not verify
    async with engine.begin() as conn:
        new_kid = await keys.rotate(conn, keyring.kek)
    await asyncio.sleep(keys.REFRESH_INTERVAL_S)  # the ring re-reads the keys at most once a second
    await invalid(sign(private_key, {**header, "kid": new_kid}, claims), "signature does not verify")
    # a tampered signature, a tampered claim
    middle = len(signature) // 2
    flipped = signature[:middle] + ("A" if signature[middle] != "A" else "B") + signature[middle + 1 :]
    await invalid(f"{token.rsplit('.', 1)[0]}.{flipped}", "signature does not verify")
    raised = {**claims, "max_amount_fen": 10**12}
    await invalid(f"{_b64json(header)}.{_b64json(raised)}.{signature}", "signature does not verify")
    # outside its lifetime
    assert "expired" in await refused(engine, keyring, token, provider, now + timedelta(hours=25))
    assert "not valid yet" in await refused(engine, keyring, token, provider, now - timedelta(hours=1))
    # each required claim missing, signed with the real key
    for name in ("iss", "sub", "jti", "iat", "nbf", "exp", "voucher_id", "program"):
        await invalid(sign(private_key, header, {k: v for k, v in claims.items() if k != name}), f"the {name} claim")
    # a wrong typ, a missing typ, an extra header member
    await invalid(sign(private_key, {**header, "typ": "JWT"}, claims), "not a voucher+jwt")
    await invalid(sign(private_key, {"alg": "EdDSA", "kid": kid}, claims), "exactly alg, kid and typ")
    await invalid(sign(private_key, {**header, "jku": "https://evil.example/jwks"}, claims), "exactly alg")
    # a wrong issuer, claims of the wrong type, a claim we never sign
    await invalid(sign(private_key, header, {**claims, "iss": "someone-else"}), "not issued by this service")
    await invalid(sign(private_key, header, {**claims, "aud": [provider]}), "aud claim")
    await invalid(sign(private_key, header, {**claims, "exp": str(claims["exp"])}), "exp claim")
    await invalid(sign(private_key, header, {**claims, "max_amount_fen": True}), "max_amount_fen claim")
    await invalid(sign(private_key, header, {**claims, "scope": "all"}), "claims it should not")
    # sound signatures over claims the service never recorded
    await invalid(sign(private_key, header, {**claims, "jti": new_jti()}), "not known here")
    await invalid(sign(private_key, header, {**claims, "max_amount_fen": 10**12}), "does not match its record")
    await invalid(sign(private_key, header, {k: v for k, v in claims.items() if k != "aud"}), "does not match")
    # garbage
    for junk in ("", "a.b", "a.b.c.d", "é.b.c", "x" * 5000, "eyJ.eyJ.sig"):
        with pytest.raises(InvalidToken):
            await verify(engine, keyring, junk, provider)
    # the genuine token still verifies, by the old key, after the rotation
    assert (await verify(engine, keyring, token, provider)).jti == issued["jti"]


async def test_a_token_does_not_outlive_its_voucher(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine, keyring: KeyRing
) -> None:
    holder = await create_entity(engine)
    voucher_id = await pilot_voucher(client, admin, holder)
    provider = await create_entity(engine, kind="provider")
    whole_life = await issue(client, voucher_id, admin, {"expires_at": "2030-01-01T00:00:00+00:00"})
    short = await issue(client, voucher_id, admin)
    after = datetime(YEAR + 2, 1, 1, tzinfo=UTC)  # after the voucher's expiry, whichever rule set it
    with pytest.raises(VoucherExpired):  # sound token, voucher over: 409 voucher_expired, not a 401
        await verify(engine, keyring, whole_life["token"], provider, after)
    assert "expired" in await refused(engine, keyring, short["token"], provider, after)


async def test_rotation_keeps_old_tokens_and_signs_with_the_new_key(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine, keyring: KeyRing
) -> None:
    holder = await create_entity(engine)
    voucher_id = await pilot_voucher(client, admin, holder)
    provider = await create_entity(engine, kind="provider")
    old = await issue(client, voucher_id, admin)
    old_kid = segments(old["token"])[0]["kid"]
    async with engine.begin() as conn:  # as `keys rotate` in another process would
        new_kid = await keys.rotate(conn, keyring.kek)
    assert new_kid != old_kid and len(new_kid) == KID_LENGTH
    new = await issue(client, voucher_id, admin)
    assert segments(new["token"])[0]["kid"] == new_kid  # this process noticed at once
    assert (await verify(engine, keyring, old["token"], provider)).jti == old["jti"]
    assert (await verify(engine, keyring, new["token"], provider)).jti == new["jti"]

    await asyncio.sleep(keys.REFRESH_INTERVAL_S)
    response = await client.get("/.well-known/jwks.json")
    kids = [k["kid"] for k in response.json()["keys"]]
    assert kids[0] == new_kid and old_kid in kids and '"d"' not in response.text
    async with engine.connect() as conn:
        rows = {r.kid: r for r in await conn.execute(text("SELECT kid, status, retired_at FROM signing_key"))}
    assert rows[new_kid].status == "active" and rows[old_kid].status == "retired" and rows[old_kid].retired_at
    assert [r for r in rows.values() if r.status == "active"] == [rows[new_kid]]

    # a process that only verifies learns the new kid from the first token naming it
    fresh = KeyRing(keyring.kek, issuer=keyring.issuer, token_ttl_s=keyring.token_ttl_s)
    async with engine.begin() as conn:
        await fresh.load(conn)
        newest = await keys.rotate(conn, keyring.kek)
    newest_token = await issue(client, voucher_id, admin)
    assert segments(newest_token["token"])[0]["kid"] == newest
    await asyncio.sleep(keys.REFRESH_INTERVAL_S)
    assert (await verify(engine, fresh, newest_token["token"], provider)).jti == newest_token["jti"]


def test_the_kek_file_is_made_0600_and_a_wider_one_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    kek = load_kek(None, data_dir)
    path = data_dir / keys.KEK_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_kek(None, data_dir) == kek and load_kek("  ", data_dir) == kek  # read back, not remade
    assert [p.name for p in data_dir.iterdir()] == [keys.KEK_FILE]  # no temporary file left
    path.chmod(0o640)
    with pytest.raises(KeyEncryptionKeyError, match="chmod 600"):
        load_kek(None, data_dir)
    # from the environment, base64 or base64url, exactly 32 bytes
    raw = bytes(range(250, 256)) * 5 + b"\xfb\xff"
    assert load_kek(base64.b64encode(raw).decode(), tmp_path) == Kek(raw)
    assert load_kek(b64url(raw), tmp_path) == Kek(raw)
    for bad in ("not base64!", base64.b64encode(b"short").decode(), b64url(raw + b"x")):
        with pytest.raises(KeyEncryptionKeyError, match="VL_KEY_ENCRYPTION_KEY"):
            load_kek(bad, tmp_path)
    assert "key=" not in repr(Kek(raw)) and raw.hex() not in repr(Kek(raw))


async def test_a_wrong_kek_refuses_to_load_the_keys(fresh_db_url: str, tmp_path: Path) -> None:
    right, wrong = Kek(os.urandom(32)), Kek(os.urandom(32))

    def settings_with(kek: Kek) -> Settings:
        return Settings(
            database_url=fresh_db_url, background_tasks=False, data_dir=tmp_path, key_encryption_key=b64url(kek.key)
        )

    async with running_app(settings_with(right)) as client:
        assert len((await client.get("/.well-known/jwks.json")).json()["keys"]) == 1
    with pytest.raises(KeyEncryptionKeyError) as caught:
        async with running_app(settings_with(wrong)):
            pass
    message = str(caught.value)
    assert right.kek_id in message and wrong.kek_id in message and "VL_KEY_ENCRYPTION_KEY" in message
    settings = Settings(database_url=fresh_db_url, background_tasks=False)
    engine = make_engine(fresh_db_url, settings)
    try:
        async with engine.begin() as conn:
            with pytest.raises(KeyEncryptionKeyError, match="rotate with the KEK"):
                await keys.rotate(conn, wrong)
    finally:
        await engine.dispose()
    # a KEK file readable by others stops start-up before anything is read
    (tmp_path / "open").mkdir()
    (tmp_path / "open" / keys.KEK_FILE).write_text(b64url(right.key))
    (tmp_path / "open" / keys.KEK_FILE).chmod(0o644)
    with pytest.raises(KeyEncryptionKeyError, match="mode 0644"):
        async with running_app(Settings(database_url=fresh_db_url, background_tasks=False, data_dir=tmp_path / "open")):
            pass


async def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`voucher-ledger ARGS` as users run it, with only these settings (none inherited from this process)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VL_") and k != "DATABASE_URL"}
    return await asyncio.to_thread(
        subprocess.run,
        [VOUCHER_LEDGER, *args],
        env={**clean, "VL_BACKGROUND_TASKS": "false", **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_cli_keys_rotate_prints_the_new_kid_last(db_url: str, engine: AsyncEngine, keyring: KeyRing) -> None:
    # the command must open keys sealed under the service's KEK: give it the same one
    result = await _cli("keys", "rotate", DATABASE_URL=db_url, VL_KEY_ENCRYPTION_KEY=b64url(keyring.kek.key))
    assert result.returncode == 0, result.stderr
    kid = result.stdout.strip().splitlines()[-1]
    assert len(kid) == KID_LENGTH
    async with engine.connect() as conn:
        assert await conn.scalar(text("SELECT status FROM signing_key WHERE kid = :k"), {"k": kid}) == "active"
    wrong = await _cli("keys", "rotate", DATABASE_URL=db_url, VL_KEY_ENCRYPTION_KEY=b64url(os.urandom(32)))
    assert wrong.returncode == 1 and "key-encryption key" in wrong.stderr and wrong.stdout == ""
    assert (await _cli("keys", "--help")).returncode == 0
