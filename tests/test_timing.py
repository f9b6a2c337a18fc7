"""Timing (POLICY.md, "An award is approved inside its own year" and "A voucher is valid long enough to use").

An award for program year Y is approved only from 1 January Y (Asia/Shanghai): art. 8 sizes it on the
previous year's (上一年度) purchases, a total not known before then. A voucher expires at the end of its year
or `min_validity_days` (90) after issue, whichever is later; its unspent value still returns to year Y's
budget. The service functions take `now`, so the boundaries run at the instants they name, on a database of
each test's own (the real app, migrated by Alembic); the HTTP cases run on the real clock."""

from __future__ import annotations

import calendar
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from app.apikeys import Role
from app.db import make_engine
from app.policy_tasks import affiliation_checker
from app.settings import Settings
from ledger.service import Ledger
from tests.service_support import CURRENT_YEAR, expected_expiry
from tests.test_support import assert_problem, bearer, create_entity, create_key, running_app
from vouchers import applications, redemption, tokens
from vouchers.applications import Issued, YearClosed, YearNotStarted
from vouchers.budgets import budget_account
from vouchers.redemption import Line, Presented
from vouchers.rules import SHANGHAI, approval_timing, voucher_expiry, year_end
from vouchers.vouchers import VoucherExpired, expire_due_vouchers, voucher_account

YUAN = 100
COMPUTE = "compute.purchase"
Y = CURRENT_YEAR


def shanghai(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0) -> datetime:
    """A wall-clock time in Asia/Shanghai, as an instant."""
    return datetime(year, month, day, hour, minute, second, us, tzinfo=SHANGHAI)


# -- the pure rules ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        (shanghai(2026, 12, 31, 23, 59, 59), "not_started"),  # the last second of the previous year
        (shanghai(2026, 12, 31, 23, 59, 59) + timedelta(microseconds=999_999), "not_started"),
        (datetime(2026, 12, 31, 16, 0, tzinfo=UTC), "open"),  # 2027-01-01 00:00 in Shanghai, still 2026 in UTC
        (shanghai(2027, 1, 1), "open"),
        (shanghai(2027, 12, 31, 23, 59, 59, 999_999), "open"),
        (shanghai(2028, 1, 1), "closed"),
        (datetime(2027, 12, 31, 16, 0, tzinfo=UTC), "closed"),  # 2028 has begun in Shanghai
        (shanghai(2025, 6, 1), "not_started"),
    ],
)
def test_an_award_for_2027_is_approved_only_inside_2027_in_shanghai(moment: datetime, expected: str) -> None:
    assert approval_timing(2027, moment) == expected


@pytest.mark.parametrize(
    ("year", "issued_at", "expires_at"),
    [
        # early in the year: the end of the year is later
        (2026, shanghai(2026, 6, 1, 9), shanghai(2027, 1, 1)),
        # exactly 90 days before the year's end, the two coincide
        (2026, shanghai(2026, 10, 3), shanghai(2027, 1, 1)),
        # a second later, the floor wins
        (2026, shanghai(2026, 10, 3, 0, 0, 1), shanghai(2027, 1, 1, 0, 0, 1)),
        # 20 December: 90 days of 24 hours, to the second (2027 is no leap year)
        (2026, shanghai(2026, 12, 20, 10), shanghai(2027, 3, 20, 10)),
        # in a leap year's February the same 90 days end a calendar day earlier
        (2027, shanghai(2027, 12, 20, 10), shanghai(2028, 3, 19, 10)),
        # the last instant of the year
        (2026, shanghai(2026, 12, 31, 23, 59, 59), shanghai(2027, 3, 31, 23, 59, 59)),
        # a fraction of a second rounds up: never less than 90 days, and a token's whole-second exp can match it
        (2026, shanghai(2026, 12, 20, 10, 0, 0, 1), shanghai(2027, 3, 20, 10, 0, 1)),
        # issued after its year (a public notice that ended in January): 90 days from the issue
        (2026, shanghai(2027, 1, 5, 8), shanghai(2027, 4, 5, 8)),
    ],
)
def test_a_voucher_lasts_to_its_years_end_or_90_days_whichever_is_later(
    year: int, issued_at: datetime, expires_at: datetime
) -> None:
    assert voucher_expiry(year, issued_at, 90) == expires_at
    assert voucher_expiry(year, issued_at, 90).tzinfo is not None


def test_with_no_floor_a_voucher_ends_with_its_year() -> None:
    assert voucher_expiry(2026, shanghai(2026, 12, 31, 23, 59), 0) == year_end(2026)
    assert voucher_expiry(2026, shanghai(2026, 12, 30), 1) == year_end(2026)  # one day: the 31st ends the year
    assert voucher_expiry(2026, shanghai(2026, 12, 31, 1), 1) == shanghai(2027, 1, 1, 1)


# -- the service, at the instants that matter -------------------------------------------------------------


@pytest.fixture
async def own(fresh_db_url: str) -> AsyncIterator[tuple[Settings, AsyncEngine]]:
    # a database of its own: the budgets and the expiry sweep here touch nobody else's vouchers
    settings = Settings(database_url=fresh_db_url, background_tasks=False, api_key_cache_ttl_s=0)
    engine = make_engine(fresh_db_url, settings)
    yield settings, engine
    await engine.dispose()


def state_of(client: httpx.AsyncClient) -> Any:
    transport = client._transport
    assert isinstance(transport, httpx.ASGITransport)
    return transport.app.state  # type: ignore[attr-defined]


async def fund(client: httpx.AsyncClient, admin: dict[str, str], year: int, yuan: int) -> None:
    response = await client.put(
        f"/v1/programs/{COMPUTE}/budgets/{year}", headers=admin, json={"amount_fen": yuan * YUAN}
    )
    assert response.status_code == 200, response.text


async def available(engine: AsyncEngine, year: int) -> int:
    async with engine.connect() as conn:
        return (await Ledger().balance(conn, budget_account(COMPUTE, year))).available_fen


async def submit(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine, year: int, purchased_yuan: int = 2_000_000
) -> str:
    """A compute application for `year` on `purchased_yuan` of compute bought in the year before: its id."""
    holder = await create_entity(engine)
    seller = await create_entity(engine, kind="provider")
    purchase = {
        "provider_entity_id": seller,
        "invoice_no": f"T-{holder[-8:]}",
        "category": "compute",
        "amount_fen": purchased_yuan * YUAN,
        "purchased_on": f"{year - 1}-06-01",
    }
    body = {"program": COMPUTE, "applicant_entity_id": holder, "year": year, "basis": {"purchases": [purchase]}}
    response = await client.post("/v1/applications", headers=admin, json=body)
    assert response.status_code == 201, response.text
    application_id: str = response.json()["id"]
    return application_id


async def approve_at(client: httpx.AsyncClient, application_id: str, now: datetime) -> Issued:
    """The approval service at `now`, committed as the route commits it (a refusal rolls everything back)."""
    state = state_of(client)
    async with state.sessionmaker() as session:
        conn = await session.connection()
        issued = await applications.approve(
            conn,
            state.ledger,
            state.catalog,
            affiliation_checker(state.settings, session),
            application_id=application_id,
            award_fen=None,
            actor="test",
            now=now,
        )
        await session.commit()
    assert isinstance(issued, Issued)
    return issued


async def status_of(client: httpx.AsyncClient, admin: dict[str, str], application_id: str) -> str:
    status: str = (await client.get(f"/v1/applications/{application_id}", headers=admin)).json()["status"]
    return status


async def test_approval_opens_at_midnight_on_1_january_shanghai_and_closes_a_year_later(
    own: tuple[Settings, AsyncEngine],
) -> None:
    settings, engine = own
    admin = bearer(await create_key(engine, Role.ADMIN))
    async with running_app(settings) as client:
        await fund(client, admin, Y, 3_000_000)
        early = await submit(client, admin, engine, Y)
        before = await available(engine, Y)
        for moment in (shanghai(Y - 1, 12, 31, 23, 59, 59), shanghai(Y, 1, 1) - timedelta(microseconds=1)):
            with pytest.raises(YearNotStarted) as refused:
                await approve_at(client, early, moment)
            assert f"only from 1 January {Y}" in refused.value.detail and "art. 8" in refused.value.detail
            assert "上一年度" in refused.value.detail
        # a refusal changes nothing: still submitted, the budget untouched
        assert await status_of(client, admin, early) == "submitted"
        assert await available(engine, Y) == before

        issued = await approve_at(client, early, shanghai(Y, 1, 1))
        assert (issued.kind, issued.amount_fen) == ("voucher", 1_000_000 * YUAN)
        assert issued.expires_at == shanghai(Y + 1, 1, 1)  # issued in January: its year outlasts 90 days
        assert await available(engine, Y) == before - 1_000_000 * YUAN

        late = await submit(client, admin, engine, Y)
        with pytest.raises(YearClosed):
            await approve_at(client, late, shanghai(Y + 1, 1, 1))
        assert await status_of(client, admin, late) == "submitted"
        last_second = shanghai(Y, 12, 31, 23, 59, 59)
        issued = await approve_at(client, late, last_second)
        assert issued.expires_at == last_second + timedelta(days=90)  # issued on 31 December: the floor wins


async def test_a_next_year_application_is_taken_and_its_approval_refused_until_that_year(
    own: tuple[Settings, AsyncEngine],
) -> None:
    """Through HTTP, on the real clock: an application for next year, sized on this year's purchases (not yet
    complete), may be submitted; approving it is 409 year_not_started, and nothing moves."""
    settings, engine = own
    admin = bearer(await create_key(engine, Role.ADMIN))
    async with running_app(settings) as client:
        await fund(client, admin, Y + 1, 3_000_000)
        application_id = await submit(client, admin, engine, Y + 1)
        submitted = (await client.get(f"/v1/applications/{application_id}", headers=admin)).json()
        assert submitted["computed"]["award_fen"] == 1_000_000 * YUAN  # what it would be owed, as things stand
        before = await available(engine, Y + 1)
        path = f"/v1/applications/{application_id}/approve"
        problem = assert_problem(await client.post(path, headers=admin), 409, "year_not_started")
        assert f"1 January {Y + 1}" in problem["detail"] and "art. 8" in problem["detail"]
        # the same refusal with an idempotency key, and it stays refused on a retry
        keyed = {**admin, "Idempotency-Key": f"early-{application_id}"}
        assert_problem(await client.post(path, headers=keyed), 409, "year_not_started")
        assert_problem(await client.post(path, headers=keyed), 409, "year_not_started")
        assert await status_of(client, admin, application_id) == "submitted"
        assert await available(engine, Y + 1) == before
        listed = await client.get("/v1/vouchers", headers=admin, params={"year": Y + 1})
        assert listed.json()["data"] == []


async def redeem_at(
    client: httpx.AsyncClient, issued: Issued, provider: str, invoice_no: str, yuan: int, now: datetime
) -> int:
    """Sign a token at `now`, verify it and redeem `yuan` of compute with it at `now`: the subsidy in fen."""
    state = state_of(client)
    async with state.sessionmaker() as session:
        conn = await session.connection()
        signed = await tokens.issue_token(
            conn,
            state.keyring,
            voucher_id=issued.id,
            holder_entity_id=issued.application.applicant_entity_id,
            program=COMPUTE,
            provider_entity_id=None,
            max_amount_fen=None,
            expires_at=None,
            now=now,
            issued_by=None,
        )
        verified = await tokens.verify_token(conn, state.keyring, signed.token, caller_entity_id=provider, now=now)
        presented = Presented(verified.jti, verified.voucher_id, verified.holder_entity_id, verified.max_amount_fen)
        redeemed = await redemption.redeem(
            conn,
            state.ledger,
            state.catalog,
            affiliation_checker(state.settings, session),
            presented,
            provider_entity_id=provider,
            invoice_no=invoice_no,
            lines=[Line("compute", yuan * YUAN, "GPU hours")],
            now=now,
        )
        await session.commit()
    return redeemed.subsidy_fen


async def test_a_voucher_issued_on_20_december_is_spent_into_the_next_year_then_returns_to_its_budget(
    own: tuple[Settings, AsyncEngine],
) -> None:
    settings, engine = own
    admin = bearer(await create_key(engine, Role.ADMIN))
    async with running_app(settings) as client:
        await fund(client, admin, Y, 3_000_000)
        application_id = await submit(client, admin, engine, Y)
        funded = await available(engine, Y)

        issued_at = shanghai(Y, 12, 20, 10)
        issued = await approve_at(client, application_id, issued_at)
        leap = calendar.isleap(Y + 1)
        assert issued.expires_at == issued_at + timedelta(days=90)
        assert issued.expires_at is not None
        assert issued.expires_at.astimezone(SHANGHAI).date() == date(Y + 1, 3, 19 if leap else 20)
        voucher = (await client.get(f"/v1/vouchers/{issued.id}", headers=admin)).json()
        assert datetime.fromisoformat(voucher["expires_at"]) == issued.expires_at
        assert voucher["year"] == Y  # still a year-Y voucher, drawn from the year-Y budget

        provider = await create_entity(engine, kind="provider")
        spent = await redeem_at(client, issued, provider, "NYE-1", 200_000, shanghai(Y, 12, 31, 23, 59, 59))
        spent += await redeem_at(client, issued, provider, "JAN-1", 300_000, shanghai(Y + 1, 1, 15, 12))
        expires_at = issued.expires_at
        spent += await redeem_at(client, issued, provider, "LAST-1", 100_000, expires_at - timedelta(seconds=1))
        assert spent == 600_000 * YUAN  # the voucher pays compute lines in full (rate 10000 bp)
        with pytest.raises(VoucherExpired):
            await redeem_at(client, issued, provider, "LATE-1", 100_000, expires_at)

        ledger = Ledger()
        assert await expire_due_vouchers(engine, ledger, expires_at - timedelta(microseconds=1)) == []
        assert await expire_due_vouchers(engine, ledger, expires_at) == [issued.id]
        # the unspent 400,000 元 went back to the year-Y budget, though year Y+1 had begun
        assert await available(engine, Y) == funded - spent
        async with engine.connect() as conn:
            assert (await ledger.balance(conn, voucher_account(issued.id))).available_fen == 0
        ended = (await client.get(f"/v1/vouchers/{issued.id}", headers=admin)).json()
        assert (ended["status"], ended["released_fen"], ended["redeemed_fen"]) == (
            "expired",
            1_000_000 * YUAN - spent,
            spent,
        )


async def test_an_approval_today_follows_the_validity_rule(own: tuple[Settings, AsyncEngine]) -> None:
    """Through HTTP on the real clock, and through 免申即享 (which approves as of now): the end of this year or
    90 days from now, whichever is later."""
    settings, engine = own
    admin = bearer(await create_key(engine, Role.ADMIN))
    async with running_app(settings) as client:
        await fund(client, admin, Y, 5_000_000)
        application_id = await submit(client, admin, engine, Y)
        approving = datetime.now(UTC)
        issued = await client.post(f"/v1/applications/{application_id}/approve", headers=admin)
        approved = datetime.now(UTC)
        assert issued.status_code == 201, issued.text
        expires_at = datetime.fromisoformat(issued.json()["expires_at"])
        assert expected_expiry(Y, approving) <= expires_at <= expected_expiry(Y, approved)

        team = await create_entity(engine)
        provider = await create_entity(engine, kind="provider")
        provider_key = bearer(await create_key(engine, Role.PROVIDER, entity_id=provider))
        sale = {
            "buyer_entity_id": team,
            "invoice_no": f"AUTO-{team[-8:]}",
            "category": "compute",
            "amount_fen": 1_500_000 * YUAN,
            "purchased_on": f"{Y - 1}-06-01",
        }
        assert (await client.post("/v1/purchases", headers=provider_key, json=sale)).status_code == 201
        approving = datetime.now(UTC)
        tagged = await client.patch(f"/v1/entities/{team}", headers=admin, json={"tags": ["innovation_team"]})
        approved = datetime.now(UTC)
        assert tagged.status_code == 200, tagged.text
        (granted,) = (await client.get("/v1/vouchers", headers=admin, params={"holder_entity_id": team})).json()["data"]
        expires_at = datetime.fromisoformat(granted["expires_at"])
        assert expected_expiry(Y, approving) <= expires_at <= expected_expiry(Y, approved)
