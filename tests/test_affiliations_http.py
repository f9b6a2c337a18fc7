"""Affiliations over HTTP and in the database: recording, ending, reading, checking; roles; bad input
stores nothing; thresholds from configuration; the per-process graph follows every change at once, brought
forward by the rows changed, answering as a graph loaded whole."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from app.settings import Settings
from tests.affiliation_support import insert_entities, new_entity_id
from tests.test_support import assert_problem, bearer, create_key, running_app
from vouchers import affiliations
from vouchers.affiliation_graph import Affiliation, AffiliationGraph, RelationTable
from vouchers.affiliations import (
    NewAffiliation,
    Thresholds,
    UnknownEntity,
    check_affiliation,
    check_affiliation_at,
    check_affiliation_cached,
    end_affiliation,
    record_affiliation,
)

DEFAULT = Thresholds(Decimal("50"), Decimal("20"))


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(settings) as client:
        yield client


@pytest.fixture
async def admin(engine: AsyncEngine) -> dict[str, str]:
    return bearer(await create_key(engine, "admin", name="affiliations admin"))


async def _record(client: httpx.AsyncClient, admin: dict[str, str], **body: Any) -> dict[str, Any]:
    body.setdefault("valid_from", "2020-01-01")
    response = await client.post("/v1/affiliations", headers=admin, json=body)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def _check(client: httpx.AsyncClient, headers: dict[str, str], a: str, b: str, **params: str) -> Any:
    response = await client.get("/v1/affiliations/check", headers=headers, params={"a": a, "b": b, **params})
    assert response.status_code == 200, response.text
    return response.json()


async def _count(engine: AsyncEngine, *entity_ids: str) -> int:
    async with engine.connect() as conn:
        found = await conn.execute(
            text("SELECT count(*) FROM affiliation WHERE from_entity_id = ANY(:ids) OR to_entity_id = ANY(:ids)"),
            {"ids": list(entity_ids)},
        )
        return int(found.scalar_one())


async def test_record_read_list_end(client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine) -> None:
    r, a, b = await insert_entities(engine, 3)
    created = await _record(
        client, admin, from_entity_id=r, to_entity_id=a, kind="equity", equity_pct=60, source="工商登记 2026"
    )
    assert created["id"].startswith("aff_") and len(created["id"]) == 28
    assert created["equity_pct"] == "60.00" and created["kind"] == "equity"
    assert created["valid_from"] == "2020-01-01" and created["valid_to"] is None and created["ended_at"] is None
    assert created["source"] == "工商登记 2026"
    control = await _record(client, admin, from_entity_id=r, to_entity_id=b, kind="control", valid_from="2021-05-01")
    assert control["equity_pct"] is None

    got = await client.get(f"/v1/affiliations/{created['id']}", headers=admin)
    assert got.status_code == 200 and got.json() == created

    # listed for either end, page by page
    seen = []
    cursor = None
    for _ in range(5):
        params = {"entity_id": r, "limit": "1"} | ({"cursor": cursor} if cursor else {})
        page = await client.get("/v1/affiliations", headers=admin, params=params)
        assert page.status_code == 200, page.text
        seen += [item["id"] for item in page.json()["data"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert seen == [created["id"], control["id"]]
    listed_b = await client.get("/v1/affiliations", headers=admin, params={"entity_id": b})
    assert [item["id"] for item in listed_b.json()["data"]] == [control["id"]]

    # ended once; the end is final
    ended = await client.patch(f"/v1/affiliations/{control['id']}", headers=admin, json={"valid_to": "2025-12-31"})
    assert ended.status_code == 200, ended.text
    assert ended.json()["valid_to"] == "2025-12-31" and ended.json()["ended_at"] is not None
    again = await client.patch(f"/v1/affiliations/{control['id']}", headers=admin, json={"valid_to": "2026-12-31"})
    assert_problem(again, 409, "conflict")
    early = await client.patch(f"/v1/affiliations/{created['id']}", headers=admin, json={"valid_to": "2019-12-31"})
    assert_problem(early, 422, "validation_error")
    missing = "aff_" + "0" * 24
    assert_problem(
        await client.patch(f"/v1/affiliations/{missing}", headers=admin, json={"valid_to": "2026-01-01"}),
        404,
        "not_found",
    )
    assert_problem(await client.get(f"/v1/affiliations/{missing}", headers=admin), 404, "not_found")

    # the end shows in checks: related through the last day, not after
    on_last_day = await _check(client, admin, a, b, as_of="2025-12-31")
    assert on_last_day["affiliated"] is True and on_last_day["as_of"] == "2025-12-31"
    assert [(s["from_entity_id"], s["to_entity_id"]) for s in on_last_day["path"]] == [(r, a), (r, b)]
    assert on_last_day["path"][0] | {"id": None} == {
        "id": None,
        "from_entity_id": r,
        "to_entity_id": a,
        "kind": "equity",
        "equity_pct": "60.00",
        "effect": "control",
    }
    # the look-back (12 months by default): still related a day after the end, named on the last day,
    # through the same day a year later, and not the day after that
    after_end = await _check(client, admin, a, b, as_of="2026-01-01")
    assert after_end["affiliated"] is True and after_end["held_on"] == "2025-12-31"
    assert after_end["lookback_from"] == "2025-01-01"
    assert (await _check(client, admin, a, b, as_of="2026-12-31"))["held_on"] == "2025-12-31"
    assert (await _check(client, admin, a, b, as_of="2027-01-01"))["affiliated"] is False
    assert (await _check(client, admin, a, b, as_of="2021-04-30"))["affiliated"] is False


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"equity_pct": 20.005}, "equity_pct"),
        ({"equity_pct": "20.001"}, "equity_pct"),
        ({"equity_pct": 0}, "equity_pct"),
        ({"equity_pct": "0.00"}, "equity_pct"),
        ({"equity_pct": 100.01}, "equity_pct"),
        ({"equity_pct": -5}, "equity_pct"),
        ({"equity_pct": True}, "equity_pct"),
        ({"equity_pct": "1e1"}, "equity_pct"),
        ({"equity_pct": None}, "equity_pct"),
        ({"kind": "control"}, "equity_pct"),
        ({"kind": "personnel"}, "equity_pct"),
        ({"kind": "subsidiary"}, "kind"),
        ({"valid_from": "2026-02-30"}, "valid_from"),
        ({"valid_from": "2026-01-01T00:00:00"}, "valid_from"),
        ({"valid_from": 20260101}, "valid_from"),
        ({"valid_to": "2019-12-31"}, "valid_to"),
        ({"source": "x" * 501}, "source"),
        ({"from_entity_id": "self"}, "to_entity_id"),
        ({"from_entity_id": "unknown"}, "from_entity_id"),
        ({"to_entity_id": "unknown"}, "to_entity_id"),
        ({"to_entity_id": "ent_NOT-AN-ID"}, "to_entity_id"),
        ({"colour": "red"}, "colour"),
    ],
)
async def test_bad_input_is_422_and_stores_nothing(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine, change: dict[str, Any], field: str
) -> None:
    a, b = await insert_entities(engine, 2)
    body: dict[str, Any] = {"from_entity_id": a, "to_entity_id": b, "kind": "equity", "equity_pct": "25.5"}
    body["valid_from"] = "2020-01-01"
    body |= change
    if body.get("from_entity_id") == "self":
        body["from_entity_id"] = b
    for end in ("from_entity_id", "to_entity_id"):
        if body[end] == "unknown":
            body[end] = new_entity_id()
    response = await client.post("/v1/affiliations", headers=admin, json=body)
    problem = assert_problem(response, 422, "validation_error")
    assert field in problem["detail"] or any(field in map(str, e["loc"]) for e in problem["errors"]), problem
    assert await _count(engine, a, b) == 0


async def test_percentages_are_exact(client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine) -> None:
    a, b = await insert_entities(engine, 2)
    for sent, stored in ((33.33, "33.33"), ("0.01", "0.01"), (100, "100.00"), (20.000, "20.00"), ("50.1", "50.10")):
        created = await _record(client, admin, from_entity_id=a, to_entity_id=b, kind="equity", equity_pct=sent)
        assert created["equity_pct"] == stored
    raw = b'{"from_entity_id": "%s", "to_entity_id": "%s", "kind": "equity", "equity_pct": 33.3300000000000000001, '
    raw += b'"valid_from": "2020-01-01"}'
    response = await client.post(
        "/v1/affiliations", headers=admin | {"content-type": "application/json"}, content=raw % (a.encode(), b.encode())
    )
    assert_problem(response, 422, "validation_error")  # a float would have rounded this to 33.33
    broken = await client.post("/v1/affiliations", headers=admin | {"content-type": "application/json"}, content=b"{")
    assert_problem(broken, 422, "validation_error")
    nan = b'{"from_entity_id": "%s", "to_entity_id": "%s", "kind": "equity", "equity_pct": NaN, '
    nan += b'"valid_from": "2020-01-01"}'
    assert_problem(
        await client.post("/v1/affiliations", headers=admin, content=nan % (a.encode(), b.encode())),
        422,
        "validation_error",
    )


async def test_roles(client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine) -> None:
    mine, other, third, stranger = await insert_entities(engine, 4)
    await _record(client, admin, from_entity_id=other, to_entity_id=mine, kind="personnel")
    auditor = bearer(await create_key(engine, "auditor"))
    provider = bearer(await create_key(engine, "provider", entity_id=mine))
    enterprise = bearer(await create_key(engine, "enterprise"))  # an entity of its own: mine is a provider
    limited_admin = bearer(await create_key(engine, "admin", voucher_types=["compute"]))

    body = {"from_entity_id": mine, "to_entity_id": third, "kind": "control", "valid_from": "2020-01-01"}
    for who in (auditor, provider, enterprise, limited_admin):
        assert_problem(await client.post("/v1/affiliations", headers=who, json=body), 403, "forbidden")
    assert (await client.post("/v1/affiliations", headers=admin, json=body)).status_code == 201
    assert_problem(await client.post("/v1/affiliations", json=body), 401, "unauthorized")
    # who is asking comes before what is wrong with the body: nothing about it is told to a stranger
    bad_body = {**body, "kind": "equity", "equity_pct": "0"}
    assert_problem(await client.post("/v1/affiliations", json=bad_body), 401, "unauthorized")
    assert_problem(await client.post("/v1/affiliations", headers=auditor, json=bad_body), 403, "forbidden")

    assert (await client.get("/v1/affiliations", headers=auditor, params={"entity_id": mine})).status_code == 200
    for who in (provider, enterprise):
        assert_problem(await client.get("/v1/affiliations", headers=who), 403, "forbidden")

    # a provider checks for itself, as a or as b; nobody else's pairs
    for a, b in ((mine, other), (other, mine), (mine, mine)):
        assert (await _check(client, provider, a, b))["affiliated"] is True
    assert (await _check(client, provider, mine, stranger))["affiliated"] is False
    answer = await client.get("/v1/affiliations/check", headers=provider, params={"a": other, "b": third})
    assert_problem(answer, 403, "forbidden")
    answer = await client.get("/v1/affiliations/check", headers=provider, params={"a": new_entity_id(), "b": third})
    assert_problem(answer, 403, "forbidden")
    answer = await client.get("/v1/affiliations/check", headers=enterprise, params={"a": mine, "b": other})
    assert_problem(answer, 403, "forbidden")
    for who in (admin, auditor):
        assert (await _check(client, who, other, mine))["path"][0]["kind"] == "personnel"

    # unknown entities are 404, for whoever may ask
    unknown = new_entity_id()
    assert_problem(
        await client.get("/v1/affiliations/check", headers=provider, params={"a": mine, "b": unknown}), 404, "not_found"
    )
    assert_problem(
        await client.get("/v1/affiliations/check", headers=admin, params={"a": unknown, "b": mine}), 404, "not_found"
    )
    bad_date = await client.get(
        "/v1/affiliations/check", headers=admin, params={"a": mine, "b": other, "as_of": "2026-13-01"}
    )
    assert_problem(bad_date, 422, "validation_error")


async def test_an_admin_limited_to_voucher_types_records_and_ends_no_relation(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    """API.md, "Admin scope": affiliations decide awards and redemptions in every program (an affiliated
    provider cannot redeem), so an admin limited to `data` reads them but records and ends none."""
    a, b, c = await insert_entities(engine, 3)
    limited = bearer(await create_key(engine, "admin", voucher_types=["data"]))
    recorded = await _record(client, admin, from_entity_id=a, to_entity_id=b, kind="personnel")

    body = {"from_entity_id": a, "to_entity_id": c, "kind": "control", "valid_from": "2020-01-01"}
    assert_problem(await client.post("/v1/affiliations", headers=limited, json=body), 403, "forbidden")
    ended = await client.patch(f"/v1/affiliations/{recorded['id']}", headers=limited, json={"valid_to": "2025-12-31"})
    assert_problem(ended, 403, "forbidden")
    assert await _count(engine, c) == 0
    # a reviewer reads the relations and checks a pair
    one = await client.get(f"/v1/affiliations/{recorded['id']}", headers=limited)
    assert one.status_code == 200 and one.json()["valid_to"] is None and one.json()["ended_at"] is None
    assert (await client.get("/v1/affiliations", headers=limited, params={"entity_id": a})).status_code == 200
    assert (await _check(client, limited, a, b))["affiliated"] is True


async def test_as_of_defaults_to_today_in_shanghai(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    a, b = await insert_entities(engine, 2)
    before = datetime.now(ZoneInfo("Asia/Shanghai")).date()
    answer = await _check(client, admin, a, b)
    after = datetime.now(ZoneInfo("Asia/Shanghai")).date()
    assert answer == {
        "affiliated": False,
        "path": [],
        "as_of": answer["as_of"],
        "lookback_from": answer["lookback_from"],
        "held_on": None,
    }
    assert before <= date.fromisoformat(answer["as_of"]) <= after


async def test_thresholds_come_from_configuration(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine, settings: Settings
) -> None:
    r, a, b = await insert_entities(engine, 3)
    await _record(client, admin, from_entity_id=r, to_entity_id=a, kind="equity", equity_pct="40")
    await _record(client, admin, from_entity_id=r, to_entity_id=b, kind="equity", equity_pct="40")
    assert (await _check(client, admin, a, b))["affiliated"] is False  # 40% influences only: siblings are not
    stricter = settings.model_copy(
        update={"affiliation_control_pct": Decimal("30"), "affiliation_influence_pct": Decimal("10")}
    )
    async with running_app(stricter) as other:
        answer = await _check(other, admin, a, b)
    assert answer["affiliated"] is True
    assert [step["effect"] for step in answer["path"]] == ["control", "control"]


async def test_every_change_reaches_the_cached_graph(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    a, b, c = await insert_entities(engine, 3)
    assert (await _check(client, admin, a, b))["affiliated"] is False  # the graph is now cached
    # written by another process (straight to the database): the next check sees it
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO affiliation (id, from_entity_id, to_entity_id, kind, valid_from) "
                "VALUES (:id, :a, :b, 'personnel', DATE '2020-01-01')"
            ),
            {"id": "aff_" + new_entity_id()[4:], "a": a, "b": b},
        )
    assert (await _check(client, admin, a, b))["affiliated"] is True
    # recorded through this process: at once too
    assert (await _check(client, admin, b, c))["affiliated"] is False
    created = await _record(client, admin, from_entity_id=c, to_entity_id=b, kind="control")
    assert (await _check(client, admin, a, c))["affiliated"] is True
    await client.patch(f"/v1/affiliations/{created['id']}", headers=admin, json={"valid_to": "2020-06-30"})
    assert (await _check(client, admin, a, c))["affiliated"] is False
    assert (await _check(client, admin, a, c, as_of="2020-06-30"))["affiliated"] is True


async def test_service_check_inside_a_session_and_a_rollback(engine: AsyncEngine) -> None:
    a, b = await insert_entities(engine, 2)
    insert = text(
        "INSERT INTO affiliation (id, from_entity_id, to_entity_id, kind, equity_pct, valid_from) "
        "VALUES (:id, :a, :b, 'equity', 20, DATE '2020-01-01')"
    )
    async with AsyncSession(engine) as session:
        await session.execute(insert, {"id": "aff_" + new_entity_id()[4:], "a": a, "b": b})
        # the session sees its own uncommitted relation
        assert (await check_affiliation(session, a, b, date(2026, 1, 1), DEFAULT)).affiliated is True
        await session.rollback()
    async with AsyncSession(engine) as session:
        # the graph loaded inside the rolled-back transaction is not taken for the committed state
        assert (await check_affiliation(session, a, b, date(2026, 1, 1), DEFAULT)).affiliated is False
        with pytest.raises(UnknownEntity):
            await check_affiliation(session, a, new_entity_id(), date(2026, 1, 1), DEFAULT)


async def test_rows_are_never_deleted_and_end_once(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    a, b = await insert_entities(engine, 2)
    created = await _record(client, admin, from_entity_id=a, to_entity_id=b, kind="equity", equity_pct=30)
    refused = [
        "DELETE FROM affiliation WHERE id = :id",
        "UPDATE affiliation SET equity_pct = 31 WHERE id = :id",
        "UPDATE affiliation SET valid_from = DATE '2019-01-01' WHERE id = :id",
        "UPDATE affiliation SET valid_to = DATE '2030-01-01' WHERE id = :id",  # an end says when it was made
        "TRUNCATE affiliation",
    ]
    for statement in refused:
        with pytest.raises(DBAPIError):
            async with engine.begin() as conn:
                await conn.execute(text(statement), {"id": created["id"]})
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE affiliation SET valid_to = DATE '2030-01-01', ended_at = now() WHERE id = :id"),
            {"id": created["id"]},
        )
    with pytest.raises(DBAPIError):
        async with engine.begin() as conn:
            await conn.execute(
                text("UPDATE affiliation SET valid_to = DATE '2031-01-01', ended_at = now() WHERE id = :id"),
                {"id": created["id"]},
            )


# --------------------------------------------------------------------------------------------------------
# The cached graph brought forward by the rows changed since its version, compared with a graph loaded whole

YEAR = Thresholds(Decimal("50"), Decimal("20"), lookback_months=12)
ON = date(2026, 6, 1)
_TABLE_OF = affiliations._table_of


async def _loaded_whole(session: AsyncSession, thresholds: Thresholds) -> AffiliationGraph:
    """The graph as a process that never cached one loads it."""
    return AffiliationGraph(_TABLE_OF((await session.execute(affiliations._LOAD)).one()), thresholds)


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One item per whole load of the per-process graph from now on."""
    counted: list[int] = []

    def table_of(row: Any) -> RelationTable:
        counted.append(1)
        return _TABLE_OF(row)

    monkeypatch.setattr(affiliations, "_table_of", table_of)
    return counted


async def _compare(engine: AsyncEngine, questions: list[tuple[str, str, date]]) -> list[Affiliation]:
    """The cached graph's answers, each equal to a graph loaded whole's (affiliated, path, day held)."""
    answers = []
    async with AsyncSession(engine) as session:
        for thresholds in (YEAR, DEFAULT):
            whole = await _loaded_whole(session, thresholds)
            for a, b, on in questions:
                answer = await check_affiliation(session, a, b, on, thresholds)
                assert answer == whole.check(a, b, on), (a, b, on, thresholds)
                answers.append(answer)
    return answers


async def _recorded(engine: AsyncEngine, new: NewAffiliation) -> str:
    async with AsyncSession(engine) as session:
        recorded = await record_affiliation(session, new)
        await session.commit()
    return recorded.id


async def _answer(engine: AsyncEngine, a: str, b: str) -> Affiliation:
    async with AsyncSession(engine) as session:
        return await check_affiliation(session, a, b, ON, YEAR)


async def test_the_cached_graph_follows_each_change_as_a_whole_load_would(
    engine: AsyncEngine, loads: list[int]
) -> None:
    x, r, a, b, c, d = ids = await insert_entities(engine, 6)
    pairs = [(p, q, on) for p in ids for q in ids if p != q for on in (ON, date(2026, 7, 2), date(2027, 6, 1))]
    await _compare(engine, pairs)  # cached now (loaded whole, or brought forward from an earlier test's)
    loads.clear()

    await _recorded(engine, NewAffiliation(x, a, "control", date(2020, 1, 1)))
    assert (await _answer(engine, a, x)).affiliated
    # control above x: a's ultimate controller moves from x to r, which controls b too
    await _recorded(engine, NewAffiliation(r, x, "equity", date(2020, 1, 1), equity_pct=Decimal("60")))
    r_b = await _recorded(engine, NewAffiliation(r, b, "control", date(2021, 1, 1)))
    answer = (await _compare(engine, [(a, b, ON)]))[0]
    assert [(s.from_entity_id, s.to_entity_id) for s in answer.path] == [(x, a), (r, x), (r, b)]
    # not started yet on ON; related from its first day
    await _recorded(engine, NewAffiliation(c, d, "personnel", date(2026, 7, 1)))
    await _recorded(engine, NewAffiliation(d, a, "equity", date(2019, 1, 1), Decimal("25"), date(2025, 12, 31)))
    await _compare(engine, pairs)
    # ended: related through its last day, and in the year after it only with the look-back
    async with AsyncSession(engine) as session:
        await end_affiliation(session, r_b, date(2026, 3, 31))
        await session.commit()
    answers = await _compare(engine, pairs)
    assert not answers[pairs.index((a, b, ON)) + len(pairs)].affiliated  # the day only
    assert answers[pairs.index((a, b, ON))].held_on == date(2026, 3, 31)

    # written by another process, straight to the database: a graph cached before it is at an older
    # version, which a redemption confirming it refuses (voucher_redeem), and the next look sees it
    cached = check_affiliation_cached(engine, a, c, ON, YEAR)
    assert cached is not None and not cached[1].affiliated
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO affiliation (id, from_entity_id, to_entity_id, kind, valid_from) "
                "VALUES (:id, :a, :c, 'personnel', DATE '2020-01-01')"
            ),
            {"id": "aff_" + new_entity_id()[4:], "a": a, "c": c},
        )
    async with engine.connect() as conn:
        current = await conn.scalar(text("SELECT version FROM affiliation_registry"))
        assert cached[0] != current
        version, fresh = await check_affiliation_at(conn, a, c, ON, YEAR, reload=True)
        assert version == current and fresh.affiliated
    await _compare(engine, pairs)
    assert loads == [], "every change was applied to the cached graph"


async def test_random_changes_keep_the_cached_graph_equal_to_a_whole_load(
    engine: AsyncEngine, loads: list[int]
) -> None:
    """A few hundred checks between random changes: relations recorded (some not started yet, some with an
    end), ended, written by another connection, and recorded in a transaction that rolls back after a check
    made inside it (the cached graph then has relations nobody else sees: the next check loads whole)."""
    rng = random.Random(14)
    ids = await insert_entities(engine, 8)
    open_: list[str] = []
    await _compare(engine, [(ids[0], ids[1], ON)])
    loads.clear()
    rollbacks = 0
    for step in range(24):
        frm, to = rng.sample(ids, 2)
        kind = rng.choice(["control", "personnel", "equity", "equity"])
        pct = Decimal(rng.choice(["60", "50", "20", "19.99", "35"])) if kind == "equity" else None
        start = ON + timedelta(days=rng.randrange(-500, 60))
        end = None if rng.random() < 0.7 else start + timedelta(days=rng.randrange(0, 400))
        new = NewAffiliation(frm, to, kind, start, pct, end)  # type: ignore[arg-type]
        if step % 6 == 5:
            async with AsyncSession(engine) as session:
                await record_affiliation(session, new)
                await check_affiliation(session, frm, to, ON, YEAR)
                await session.rollback()
            rollbacks += 1
        else:
            recorded = await _recorded(engine, new)
            if end is None:
                open_.append(recorded)
        if open_ and rng.random() < 0.4:
            async with engine.begin() as conn:  # another process's end
                await conn.execute(
                    text(
                        "UPDATE affiliation SET valid_to = valid_from + CAST(:days AS integer), ended_at = now() "
                        "WHERE id = :id"
                    ),
                    {"id": open_.pop(rng.randrange(len(open_))), "days": rng.randrange(0, 400)},
                )
        questions = [(*rng.sample(ids, 2), ON + timedelta(days=rng.randrange(-400, 60))) for _ in range(6)]
        await _compare(engine, questions)
    assert len(loads) == rollbacks, "loaded whole only after a rolled-back graph"


async def test_writers_queue_on_the_registry_and_stamp_the_version_they_commit(engine: AsyncEngine) -> None:
    """The version is taken before a statement writes, under the registry's row lock held to the commit: a
    second writer waits, then takes a later version, which its rows carry and the log keeps."""
    a, b, c = await insert_entities(engine, 3)
    insert = text(
        "INSERT INTO affiliation (id, from_entity_id, to_entity_id, kind, valid_from) "
        "VALUES (:id, :a, :b, 'personnel', DATE '2020-01-01') RETURNING changed_version"
    )
    async with engine.connect() as first, engine.connect() as second:
        version_first = await first.scalar(insert, {"id": "aff_" + new_entity_id()[4:], "a": a, "b": b})
        waiting = asyncio.ensure_future(second.scalar(insert, {"id": "aff_" + new_entity_id()[4:], "a": a, "b": c}))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        await first.commit()
        version_second = await waiting
        await second.commit()
    async with engine.connect() as conn:
        registry = await conn.scalar(text("SELECT version FROM affiliation_registry"))
        logged = await conn.scalars(
            text("SELECT version FROM affiliation_version_log WHERE version = ANY(:v)"),
            {"v": [version_first, version_second]},
        )
        assert version_first < version_second == registry
        assert sorted(logged) == [version_first, version_second]
