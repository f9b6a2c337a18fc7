"""`/v1/ledger` through the real app: who may read it, pagination, the trial balance."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine

from app.apikeys import Role
from app.background import seal_all
from app.main import create_app
from app.settings import Settings
from ledger.postings import credit, debit
from ledger.service import Ledger, run_in_transaction
from tests.ledger_support import open_accounts, unique
from tests.test_support import assert_problem, bearer, create_key, running_app


async def test_ledger_routes_for_admins_and_auditors_only(settings: Settings, engine: AsyncEngine) -> None:
    keys = {role: await create_key(engine, role) for role in Role}
    async with running_app(settings) as client:
        for path in ("/v1/ledger/accounts", "/v1/ledger/entries", "/v1/ledger/trial-balance"):
            assert_problem(await client.get(path), 401, "unauthorized")
            assert_problem(await client.get(path, headers=bearer("vl_nope_nope")), 401, "unauthorized")
            for role in (Role.ENTERPRISE, Role.PROVIDER):
                assert_problem(await client.get(path, headers=bearer(keys[role])), 403, "forbidden")
            for role in (Role.ADMIN, Role.AUDITOR):
                assert (await client.get(path, headers=bearer(keys[role]))).status_code == 200


async def test_accounts_entries_and_trial_balance(settings: Settings, engine: AsyncEngine) -> None:
    ledger = Ledger()
    acc = await open_accounts(
        engine,
        ledger,
        {"world": None, "budget": "debits_must_not_exceed_credits", "voucher": "debits_must_not_exceed_credits"},
    )
    space = acc["world"].code.split(":")[0]
    await run_in_transaction(
        engine,
        lambda c: ledger.transfer(
            c,
            key=unique("k-"),
            postings=[debit(acc["world"].code, 900), credit(acc["budget"].code, 900)],
            metadata={"program": "compute.purchase"},
        ),
    )
    for amount in (100, 200, 300):
        await run_in_transaction(
            engine,
            lambda c, n=amount: ledger.transfer(  # type: ignore[misc]
                c, key=unique("k-"), postings=[debit(acc["budget"].code, n), credit(acc["voucher"].code, n)]
            ),
        )
    auditor = bearer(await create_key(engine, Role.AUDITOR))
    async with running_app(settings) as client:
        accounts = (await client.get("/v1/ledger/accounts", params={"prefix": space}, headers=auditor)).json()
        by_code = {a["code"]: a for a in accounts["data"]}
        assert by_code[acc["budget"].code]["available_fen"] == 300
        assert by_code[acc["voucher"].code]["credits_posted_fen"] == 600
        assert by_code[acc["world"].code]["limit"] is None
        assert accounts["next_cursor"] is None

        seen: list[dict[str, object]] = []
        cursor = None
        while True:
            params = {"account_prefix": space, "limit": 1, **({"cursor": cursor} if cursor else {})}
            page = (await client.get("/v1/ledger/entries", params=params, headers=auditor)).json()
            seen += page["data"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert len(seen) == 4
        assert seen[0]["metadata"] == {"program": "compute.purchase"}
        assert [p["amount_fen"] for p in seen[1]["postings"]] == [100, 100]  # type: ignore[index]
        one = (await client.get(f"/v1/ledger/entries/{seen[1]['id']}", headers=auditor)).json()
        assert one["id"] == seen[1]["id"]

        trial = (await client.get("/v1/ledger/trial-balance", headers=auditor)).json()
        assert trial["balanced"] and trial["total_debits_fen"] == trial["total_credits_fen"] > 0
        past = await client.get(
            "/v1/ledger/trial-balance", params={"as_of": "2020-01-01T00:00:00+08:00"}, headers=auditor
        )
        assert past.json()["rows"] == [] and past.json()["total_debits_fen"] == 0

        for not_rfc3339 in ("2020-01-01T00:00:00", "1577808000", "0.5"):  # no offset; seconds since 1970
            assert_problem(
                await client.get("/v1/ledger/trial-balance", params={"as_of": not_rfc3339}, headers=auditor),
                422,
                "validation_error",
            )
        assert_problem(
            await client.get("/v1/ledger/entries", params={"cursor": "!!"}, headers=auditor), 422, "validation_error"
        )
        assert_problem(
            await client.get("/v1/ledger/entries", params={"limit": 0}, headers=auditor), 422, "validation_error"
        )
        assert_problem(await client.get("/v1/ledger/entries/999999999999", headers=auditor), 404, "not_found")


def _entries_counted(metrics_text: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == "vl_ledger_entries_posted_total"
    )


async def test_metrics_count_each_committed_entry_once_when_sealed(settings: Settings, engine: AsyncEngine) -> None:
    ledger = Ledger()
    acc = await open_accounts(engine, ledger, {"a": None, "b": None})
    app = create_app(settings)
    async with running_app(settings, app) as client:
        before = _entries_counted((await client.get("/metrics")).text)
        await run_in_transaction(
            engine,
            lambda c: ledger.transfer(
                c, key=unique("k-"), postings=[debit(acc["a"].code, 1), credit(acc["b"].code, 1)]
            ),
        )
        sealed = await seal_all(engine, app.state.ledger)
        assert await seal_all(engine, app.state.ledger) == 0
        after = _entries_counted((await client.get("/metrics")).text)
    assert sealed >= 1
    assert after - before == sealed
