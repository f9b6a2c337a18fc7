"""Affiliation looks back 12 months (POLICY.md "Affiliation looks back"; arts. 8, 9): parties affiliated on
any day from 12 calendar months before a date to that date are affiliated on it, by the relations that held
together on one such day. Pure graph cases (boundaries, chains that never held at once, a brute-force oracle
over every day), then the HTTP check and a compute application's line."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from app.apikeys import Role
from app.settings import Settings
from tests.test_affiliation_graph import assert_path_proves, oracle, rel
from tests.test_support import bearer, create_entity, create_key, running_app
from vouchers.affiliation_graph import AffiliationGraph, Relation, Thresholds, months_before

YEAR = Thresholds(Decimal("50"), Decimal("20"), lookback_months=12)
DAY_ONLY = Thresholds(Decimal("50"), Decimal("20"))


def check(relations: list[Relation], a: str, b: str, on: date, thresholds: Thresholds = YEAR) -> Any:
    return AffiliationGraph.of(relations, thresholds).check(a, b, on)


@pytest.mark.parametrize(
    ("on", "months", "expected"),
    [
        (date(2026, 3, 1), 12, date(2025, 3, 1)),
        (date(2026, 3, 1), 11, date(2025, 4, 1)),
        (date(2028, 2, 29), 12, date(2027, 2, 28)),  # no 29 February: the month's last day
        (date(2029, 2, 28), 12, date(2028, 2, 28)),  # not the 29th: the same day number
        (date(2027, 3, 31), 1, date(2027, 2, 28)),
        (date(2028, 3, 31), 1, date(2028, 2, 29)),
        (date(2027, 1, 15), 12, date(2026, 1, 15)),
        (date(2027, 1, 15), 13, date(2025, 12, 15)),  # across a year boundary
        (date(2026, 7, 31), 0, date(2026, 7, 31)),
    ],
)
def test_months_before(on: date, months: int, expected: date) -> None:
    assert months_before(on, months) == expected


def test_twelve_months_exactly_counts_and_one_day_more_does_not() -> None:
    purchase = date(2026, 3, 1)
    exactly = [rel("P", "A", "60", date(2020, 1, 1), date(2025, 3, 1))]
    answer = check(exactly, "A", "P", purchase)
    assert answer.affiliated and answer.held_on == date(2025, 3, 1) and answer.path == exactly
    day_more = [rel("P", "A", "60", date(2020, 1, 1), date(2025, 2, 28))]
    assert not check(day_more, "A", "P", purchase).affiliated
    # 11 months before: affiliated, named on the relation's last day
    eleven = [rel("P", "A", "personnel", date(2020, 1, 1), date(2025, 4, 1))]
    assert check(eleven, "A", "P", purchase).held_on == date(2025, 4, 1)
    # without the look-back, only the day counts
    assert not check(eleven, "A", "P", purchase, DAY_ONLY).affiliated
    # leap day: purchase on 29 February 2028 looks back to 28 February 2027 (the last day of that February)
    assert check([rel("P", "A", "60", date(2020, 1, 1), date(2027, 2, 28))], "A", "P", date(2028, 2, 29)).affiliated
    assert not check([rel("P", "A", "60", date(2020, 1, 1), date(2027, 2, 27))], "A", "P", date(2028, 2, 29)).affiliated
    # a relation that starts after the date does not count, however near
    assert not check([rel("P", "A", "60", date(2026, 3, 2))], "A", "P", purchase).affiliated


def test_a_chain_that_never_held_at_one_time_does_not_relate() -> None:
    # A controls B in January, B controls C in June: A never controlled C
    relations = [
        rel("A", "B", "control", date(2026, 1, 1), date(2026, 1, 31)),
        rel("B", "C", "control", date(2026, 6, 1)),
    ]
    on = date(2026, 9, 1)
    assert not check(relations, "A", "C", on).affiliated
    assert check(relations, "A", "B", on).held_on == date(2026, 1, 31)
    assert check(relations, "B", "C", on).held_on == on
    # overlapping on one day (31 January), they do
    overlapping = [relations[0], rel("B", "C", "control", date(2026, 1, 31))]
    answer = check(overlapping, "A", "C", on)
    assert answer.affiliated and answer.held_on == date(2026, 1, 31)
    assert [r.id for r in answer.path] == [r.id for r in overlapping]


def test_groups_change_over_the_window_and_the_latest_day_is_named() -> None:
    # X and Y were siblings under P until March; from April a new controller Q sits above P, and Y was
    # sold to R in May. Related: through May 31 (the last day Y was P's); named on that day.
    relations = [
        rel("P", "X", "60", date(2020, 1, 1)),
        rel("P", "Y", "60", date(2020, 1, 1), date(2026, 5, 31)),
        rel("Q", "P", "control", date(2026, 4, 1)),
        rel("R", "Y", "control", date(2026, 6, 1)),
    ]
    answer = check(relations, "X", "Y", date(2026, 11, 1))
    assert answer.affiliated and answer.held_on == date(2026, 5, 31)
    assert_path_proves(answer, "X", "Y", date(2026, 5, 31), relations, YEAR)
    assert not check(relations, "X", "Y", date(2027, 6, 1)).affiliated  # 12 months and a day after
    assert check(relations, "X", "Y", date(2027, 5, 31)).held_on == date(2026, 5, 31)
    # R and X: Y joined R in June, when Y had left P: never one group
    assert not check(relations, "X", "R", date(2026, 11, 1)).affiliated


def _random_relations(rng: random.Random, size: int) -> list[Relation]:
    names = [f"E{i}" for i in range(size)]
    relations = []
    for _ in range(rng.randrange(0, size * 2)):
        frm, to = rng.sample(names, 2)
        what = rng.choice(["control", "personnel", "60", "50", "50.01", "20", "19.99", "35", "5"])
        start = date(2025, 1, 1) + timedelta(days=rng.randrange(0, 80))
        end = None if rng.random() < 0.3 else start + timedelta(days=rng.randrange(0, 30))
        relations.append(rel(frm, to, what, start, end))
    return relations


@pytest.mark.parametrize("seed", range(150))
def test_agrees_with_every_day_of_the_window(seed: int) -> None:
    """The answer is what checking every single day of the window would say, and the day it names is the
    latest that held, with a path that holds on it."""
    rng = random.Random(seed)
    relations = _random_relations(rng, rng.randrange(2, 10))
    months = rng.choice([1, 2])
    thresholds = Thresholds(Decimal("50"), Decimal("20"), lookback_months=months)
    table = AffiliationGraph.of(relations, thresholds).table
    graphs = [
        AffiliationGraph(table, thresholds),
        AffiliationGraph(table, thresholds, probe_budget=0, summary_cache_size=0),
    ]
    names = sorted({r.from_entity_id for r in relations} | {r.to_entity_id for r in relations} | {"E0", "E1"})
    for _ in range(12):
        a, b = rng.choice(names), rng.choice(names)
        on = date(2025, 1, 1) + timedelta(days=rng.randrange(0, 140))
        first = months_before(on, months)
        days = [first + timedelta(days=n) for n in range((on - first).days + 1)]
        held = [d for d in days if oracle(relations, a, b, d, thresholds)]
        for graph in graphs:
            answer = graph.check(a, b, on)
            assert answer.affiliated is bool(held), (a, b, on, relations)
            if held:
                assert answer.held_on == held[-1]
                assert_path_proves(answer, a, b, held[-1], relations, thresholds)
            else:
                assert answer.held_on is None and answer.path == []


# --------------------------------------------------------------------------------------------------------
# Through the service (VL_AFFILIATION_LOOKBACK_MONTHS, default 12)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(settings) as client:
        yield client


@pytest.fixture
async def admin(engine: AsyncEngine) -> dict[str, str]:
    return bearer(await create_key(engine, Role.ADMIN))


async def _relate(client: httpx.AsyncClient, admin: dict[str, str], frm: str, to: str, valid_to: str) -> str:
    body = {"from_entity_id": frm, "to_entity_id": to, "kind": "control", "valid_from": "2020-01-01"}
    response = await client.post("/v1/affiliations", headers=admin, json=body | {"valid_to": valid_to})
    assert response.status_code == 201, response.text
    relation_id: str = response.json()["id"]
    return relation_id


async def test_http_check_looks_back_twelve_months(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine, settings: Settings
) -> None:
    parent, child = await create_entity(engine), await create_entity(engine, kind="provider")
    relation = await _relate(client, admin, parent, child, "2025-03-01")

    async def ask(on: str, app: httpx.AsyncClient = client) -> Any:
        response = await app.get("/v1/affiliations/check", headers=admin, params={"a": child, "b": parent, "as_of": on})
        assert response.status_code == 200, response.text
        return response.json()

    exactly = await ask("2026-03-01")
    assert exactly["affiliated"] is True and exactly["held_on"] == "2025-03-01"
    assert exactly["lookback_from"] == "2025-03-01" and [s["id"] for s in exactly["path"]] == [relation]
    day_more = await ask("2026-03-02")
    assert day_more == {
        "affiliated": False,
        "path": [],
        "as_of": "2026-03-02",
        "lookback_from": "2025-03-02",
        "held_on": None,
    }
    # configuration: a 24-month look-back still sees it; 0 sees the day alone
    async with running_app(settings.model_copy(update={"affiliation_lookback_months": 24})) as longer:
        assert (await ask("2026-03-02", longer))["held_on"] == "2025-03-01"
    async with running_app(settings.model_copy(update={"affiliation_lookback_months": 0})) as day_only:
        assert (await ask("2025-03-02", day_only))["affiliated"] is False
        assert (await ask("2025-03-01", day_only))["held_on"] == "2025-03-01"


async def test_compute_line_from_a_provider_affiliated_eleven_months_before_is_refused(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    """Art. 8: purchases from affiliated providers do not count. A provider the applicant controlled until
    11 months before the purchase is still affiliated; one let go 12 months and one day before is not."""
    applicant = await create_entity(engine)
    recent = await create_entity(engine, kind="provider")
    long_ago = await create_entity(engine, kind="provider")
    await _relate(client, admin, applicant, recent, "2025-04-01")  # 11 months before 2026-03-01
    await _relate(client, admin, applicant, long_ago, "2025-02-28")  # 12 months and one day before
    response = await client.post(
        "/v1/applications",
        headers=admin,
        json={
            "program": "compute.purchase",
            "applicant_entity_id": applicant,
            "year": 2027,
            "basis": {
                "purchases": [
                    {
                        "provider_entity_id": provider,
                        "invoice_no": f"LB-{n}",
                        "category": "compute",
                        "amount_fen": amount_fen,
                        "purchased_on": "2026-03-01",
                    }
                    for n, (provider, amount_fen) in enumerate(((recent, 600_000_00), (long_ago, 700_000_00)))
                ]
            },
        },
    )
    assert response.status_code == 201, response.text
    computed = response.json()["computed"]
    assert computed["eligible_fen"] == 700_000_00  # the line from the provider let go long ago counts
    excluded = [e for e in computed["excluded"] if e["reason"] == "affiliated_provider"]
    assert len(excluded) == 1 and excluded[0]["amount_fen"] == 600_000_00
    assert recent in excluded[0]["document"]
    [step] = excluded[0]["path"]
    assert (step["from_entity_id"], step["to_entity_id"], step["held_on"]) == (applicant, recent, "2025-04-01")
