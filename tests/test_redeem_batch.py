"""Redemptions sent to the database together (vouchers.redemption.RedeemBatcher): concurrent requests share
statements and commits, and each still gets the answer it would have got alone."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.apikeys import Role
from app.db import invalidate_if_lost, make_engine
from app.main import create_app
from app.settings import Settings
from ledger.service import Ledger
from tests.test_redemptions import YUAN, compute_lines, compute_voucher, token_for
from tests.test_support import bearer, create_entity, create_key, running_app
from vouchers.applications import new_id
from vouchers.redemption import RedeemBatcher, payable_account
from vouchers.vouchers import voucher_account


@pytest.fixture
async def app(settings: Settings) -> FastAPI:
    # one batch out at a time: whatever arrives meanwhile is certain to go together in the next
    return create_app(settings.model_copy(update={"redeem_batches_in_flight": 1}))


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(app.state.settings, app) as client:
        yield client


@pytest.fixture
async def admin(engine: AsyncEngine) -> dict[str, str]:
    return bearer(await create_key(engine, Role.ADMIN))


async def test_concurrent_redemptions_share_statements_and_each_is_answered_as_if_alone(
    app: FastAPI, client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    vouchers = [(await compute_voucher(client, admin, engine, 1_000_000))[0] for _ in range(4)]
    tokens = [await token_for(client, admin, v) for v in vouchers]
    provider = await create_entity(engine, kind="provider")
    key = bearer(await create_key(engine, Role.PROVIDER, entity_id=provider))

    async def redeem(idempotency_key: str, token: str, invoice: str) -> httpx.Response:
        return await client.post(
            "/v1/redemptions",
            headers={**key, "Idempotency-Key": idempotency_key},
            json={"token": token, "invoice_no": invoice, "lines": compute_lines(100_000)},
        )

    # 12 of 100,000 元 on each 1,000,000 元 voucher: 10 paid, 2 exhausted, whatever batch each lands in
    requests = [(f"k-{v}-{i}", tokens[v], f"INV-{v}-{i}") for v in range(3) for i in range(12)]
    # the same key and body twice (one answer, one redemption), and a twin invoice under another key
    # (on a fourth voucher, whose balance cannot be what refuses it)
    requests += [("k-0-0", tokens[0], "INV-0-0"), ("k-twin", tokens[3], "INV-1-0")]
    batcher: RedeemBatcher = app.state.redeem_batcher
    answers = await asyncio.gather(*(redeem(*r) for r in requests))

    assert all(a.status_code < 500 for a in answers), [a.text for a in answers if a.status_code >= 500][:2]
    assert batcher.batches < batcher.calls, "concurrent redemptions were sent one statement each"
    by_key: dict[str, list[httpx.Response]] = {}
    for (idempotency_key, _t, _i), answer in zip(requests, answers, strict=True):
        by_key.setdefault(idempotency_key, []).append(answer)
    assert len({a.text for a in by_key["k-0-0"]}) == 1  # the replay is the first answer, byte for byte
    twin, first = by_key["k-twin"][0], by_key["k-1-0"][0]
    assert sorted((twin.status_code, first.status_code)) == [201, 409], (twin.text, first.text)
    if twin.status_code == 409:  # its voucher has plenty left: only the invoice can refuse it
        assert "INV-1-0 was already redeemed" in twin.json()["detail"], twin.text
    else:  # the first of voucher 1's twelve may also have come after its balance ran out
        assert first.json()["code"] in ("conflict", "voucher_exhausted"), first.text
    for v in range(3):
        mine = [by_key[f"k-{v}-{i}"][0] for i in range(12)]
        paid = [a for a in mine if a.status_code == 201]
        assert len(paid) == 10, [a.text for a in mine if a.status_code != 201]
        assert {a.json()["code"] for a in mine if a.status_code != 201} <= {"voucher_exhausted", "conflict"}
        assert sum(a.json()["subsidy_fen"] for a in paid) == 1_000_000 * YUAN
    async with engine.connect() as conn:
        for voucher in vouchers[:3]:
            paid_fen = await conn.scalar(
                text("SELECT sum(subsidy_fen) FROM redemption WHERE voucher_id = :v"), {"v": voucher}
            )
            assert paid_fen == 1_000_000 * YUAN
        ledger = Ledger()
        assert await ledger.verify_cached_balances(conn) == []
        trial = await ledger.trial_balance(conn)
        assert trial.total_debits_fen == trial.total_credits_fen


def _args(voucher: str, jti: str, provider: str, invoice: str, *, request_hash: bytes) -> tuple[Any, ...]:
    """voucher_redeem's arguments for one 1 元 redemption, as vouchers.redemption builds them."""
    redemption_id = new_id("rdm_")
    return (
        "key-of-test",
        f"batch-{redemption_id}",
        "POST /v1/redemptions",
        request_hash,
        jti,
        False,
        voucher,
        voucher_account(voucher),
        payable_account(provider),
        provider,
        invoice,
        False,
        None,
        YUAN,
        YUAN,
        YUAN,
        redemption_id,
        "[]",
        "[]",
        f"test redemption {redemption_id}",
        json.dumps({"voucher": voucher}),
        json.dumps({"id": redemption_id}),
    )


async def test_a_batch_whose_statement_fails_answers_each_redemption_on_its_own(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    voucher, _holder = await compute_voucher(client, admin, engine, 1_000_000)
    jti = jwt.decode(await token_for(client, admin, voucher), options={"verify_signature": False})["jti"]
    provider = await create_entity(engine, kind="provider")
    good = hashlib.sha256(b"request").digest()
    calls = [_args(voucher, jti, provider, f"OK-{i}", request_hash=good) for i in range(4)]
    # a request hash the stored answer's CHECK refuses: this one fails, and with it the batch's statement
    calls.insert(2, _args(voucher, jti, provider, "BAD", request_hash=b"short"))
    batcher = RedeemBatcher(engine, batch_max=10, in_flight_max=1, on_error=invalidate_if_lost)

    answers = await asyncio.gather(*(batcher.call(args) for args in calls), return_exceptions=True)

    assert (batcher.batches, batcher.calls) == (1, 5)  # they went as one statement
    assert isinstance(answers[2], asyncpg.CheckViolationError), answers[2]
    good_answers = [a for i, a in enumerate(answers) if i != 2]
    assert [a["outcome"] for a in good_answers] == ["created"] * 4, good_answers
    async with engine.connect() as conn:
        invoices = (
            await conn.scalars(
                text("SELECT invoice_no FROM redemption WHERE voucher_id = :v ORDER BY invoice_no"), {"v": voucher}
            )
        ).all()
        assert invoices == ["OK-0", "OK-1", "OK-2", "OK-3"]
        assert await Ledger().verify_cached_balances(conn) == []


async def test_a_lone_redemption_goes_alone(engine: AsyncEngine, client: httpx.AsyncClient) -> None:
    """An idle service sends a redemption at once, as its own statement: nothing waits to fill a batch."""
    batcher = RedeemBatcher(engine, batch_max=10, in_flight_max=1, on_error=invalidate_if_lost)
    answer = await batcher.call(
        _args("vch_" + "0" * 24, "no-such-jti", "ent_none", "X", request_hash=hashlib.sha256(b"x").digest())
    )
    assert (batcher.batches, batcher.calls) == (1, 1)
    assert answer["outcome"] == "token_revoked"  # no such token: refused, nothing written


async def test_closing_waits_for_the_batches_still_out(db_url: str, settings: Settings) -> None:
    """A batch answers its callers before it gives its connection back: `aclose` waits for that, so the
    engine is disposed of with nothing checked out (else an unclosed connection outlives the app)."""
    engine = make_engine(db_url, settings)
    try:
        batcher = RedeemBatcher(engine, batch_max=10, in_flight_max=2, on_error=invalidate_if_lost)
        calls = [
            _args(
                "vch_" + "0" * 24, f"no-such-jti-{i}", "ent_none", f"X{i}", request_hash=hashlib.sha256(b"x").digest()
            )
            for i in range(6)
        ]
        callers = [asyncio.create_task(batcher.call(args)) for args in calls]
        await asyncio.sleep(0)  # the calls are queued, their batches on their way
        await batcher.aclose()
        # every batch was sent, answered and gave its connection back before aclose returned
        assert batcher.calls == 6
        assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert {(await caller)["outcome"] for caller in callers} == {"token_revoked"}
    finally:
        await engine.dispose()
