"""The race tests again, against `voucher-ledger serve --workers 2` over real HTTP: the two workers are
separate processes, so whatever holds here rests on the database (row locks, advisory locks, unique
indexes), never on state inside one process.

Each race sends its requests over connections that are known to be spread over both workers (which worker
holds a connection is read from /proc: tests/service_support.py `clients_on_every_worker`), so both worker
processes take part in every race. The in-process originals are in tests/test_redemptions.py,
tests/test_applications.py and tests/test_ledger_races.py.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import drop_database

from tests.service_support import (
    YUAN,
    ProviderKey,
    Service,
    Voucher,
    assert_journal_whole,
    check_books,
    clients_on_every_worker,
    compute_vouchers,
    expect,
    fund,
    program_year,
    provider_key,
    query,
    redemption_body,
    register,
    served_database,
)

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Served:
    service: Service
    url: str
    admin_key: str
    year: int

    @asynccontextmanager
    async def admin(self) -> AsyncIterator[httpx.AsyncClient]:
        async with self.service.client(self.admin_key) as client:
            yield client


@pytest.fixture(scope="module")
async def served(embedded_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    """One service with two workers on a fresh database, for the whole module."""
    url, admin_key = await served_database(embedded_server_url)
    # the races hold connections idle while they open the others, as a provider's pool does: on a busy machine
    # that outlasts the default 5 s, and a request sent as the server closes its idle connection fails
    patient = {"VL_HTTP_KEEP_ALIVE_TIMEOUT_S": "120", "VL_HTTP_HEADER_TIMEOUT_S": "120"}
    service = Service(url, Path(tmp_path_factory.mktemp("workers")), workers=2, env=patient)
    try:
        await service.start()
        yield Served(service, url, admin_key, program_year())
        assert "unhandled error" not in service.log_text()
    finally:
        service.stop()
        await drop_database(embedded_server_url, url)


Job = Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]


async def race(served: Served, key: str, jobs: list[Job]) -> list[httpx.Response]:
    """All `jobs` at once, each on its own connection, the connections spread over both workers."""
    clients, owners = await clients_on_every_worker(served.service, key, len(jobs))
    try:
        assert len(owners) == served.service.workers == 2, owners
        print(f"{len(jobs)} requests over {len(clients)} connections, per worker: {sorted(owners.values())}")
        # every connection used a moment before the race (the service keeps idle ones for 120 s here, see
        # `served`): a connection already closed is reopened here, not in the race.
        await asyncio.gather(*(client.get("/healthz") for client in clients))
        return list(await asyncio.gather(*(job(clients[i]) for i, job in enumerate(jobs))))
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))


def codes(responses: list[httpx.Response]) -> Counter[tuple[int, str]]:
    return Counter((r.status_code, r.json().get("code", "") if r.status_code >= 400 else "") for r in responses)


async def voucher_and_provider(served: Served, face_fen: int, label: str) -> tuple[Voucher, ProviderKey]:
    async with served.admin() as admin:
        (voucher,) = await compute_vouchers(admin, served.year, [face_fen], label)
        return voucher, await provider_key(admin)


async def test_sixty_four_concurrent_redemptions_on_two_workers_pay_exactly_the_balance(served: Served) -> None:
    voucher, provider = await voucher_and_provider(served, 1_000_000 * YUAN, "overspend")

    def redeem(i: int) -> Job:
        body = redemption_body(voucher.token, f"R-{i}", 20_000 * YUAN)
        return lambda client: client.post("/v1/redemptions", json=body, headers={"Idempotency-Key": f"race-{i}"})

    results = await race(served, provider.key, [redeem(i) for i in range(64)])
    assert codes(results) == {(201, ""): 50, (409, "voucher_exhausted"): 14}, codes(results)
    assert sum(r.json()["subsidy_fen"] for r in results if r.status_code == 201) == voucher.face_fen
    async with served.admin() as admin:
        state = expect(await admin.get(f"/v1/vouchers/{voucher.id}"), 200)
    assert (state["available_fen"], state["redeemed_fen"]) == (0, voucher.face_fen)
    journal = await assert_journal_whole(served.url, provider)
    assert sum(int(row.subsidy_fen) for row in journal.rows.values()) == voucher.face_fen
    await check_books(served.url)


async def test_fifty_identical_requests_on_two_workers_make_one_redemption(served: Served) -> None:
    voucher, provider = await voucher_and_provider(served, 2_000_000 * YUAN, "identical")
    body = redemption_body(voucher.token, "SAME-1", 100 * YUAN)

    def same(client: httpx.AsyncClient) -> Awaitable[httpx.Response]:
        return client.post("/v1/redemptions", json=body, headers={"Idempotency-Key": "same"})

    results = await race(served, provider.key, [same] * 50)
    assert {r.status_code for r in results} == {201}, [r.text for r in results if r.status_code != 201][:2]
    assert len({r.text for r in results}) == 1  # the very same answer, byte for byte
    journal = await assert_journal_whole(served.url, provider)
    assert len(journal.rows) == 1 and list(journal.records) == ["same"]
    await check_books(served.url)


async def _approvals(
    served: Served, program: str, funded_fen: int, applications: list[tuple[str, dict[str, Any]]]
) -> list[str]:
    """Fund the program-year, submit the applications: their ids."""
    async with served.admin() as admin:
        await fund(admin, served.year, funded_fen, program)
        ids = []
        for applicant, basis in applications:
            body = {"program": program, "applicant_entity_id": applicant, "year": served.year, "basis": basis}
            ids.append(expect(await admin.post("/v1/applications", json=body), 201)["id"])
    return ids


def approve(application_id: str, award_fen: int | None = None) -> Job:
    body = None if award_fen is None else {"award_fen": award_fen}
    return lambda client: client.post(f"/v1/applications/{application_id}/approve", json=body)


async def test_concurrent_approvals_on_two_workers_never_exceed_the_budget(served: Served) -> None:
    async with served.admin() as admin:
        leads = [await register(admin, "department", "lead") for _ in range(5)]
    ids = await _approvals(
        served,
        "model.industry_rollout",
        1_000_000 * YUAN,
        [(lead, {"project_ref": f"R-{lead[-8:]}", "deployment_cost_fen": 1_000_000 * YUAN}) for lead in leads],
    )
    results = await race(served, served.admin_key, [approve(i) for i in ids])
    assert codes(results) == {(201, ""): 3, (409, "budget_exhausted"): 2}, codes(results)
    async with served.admin() as admin:
        budget = expect(await admin.get(f"/v1/programs/model.industry_rollout/budgets/{served.year}"), 200)
        for application_id, result in zip(ids, results, strict=True):
            if result.status_code == 409:  # a refused approval changes nothing
                assert expect(await admin.get(f"/v1/applications/{application_id}"), 200)["status"] == "submitted"
    assert budget["available_fen"] == 100_000 * YUAN, budget
    refused = [i for i, r in zip(ids, results, strict=True) if r.status_code == 409]
    claims = await query(
        served.url, "SELECT count(*) AS n FROM basis_claim WHERE application_id = ANY(:ids)", {"ids": refused}
    )
    assert claims[0].n == 0
    await check_books(served.url)


async def test_concurrent_approvals_on_two_workers_never_exceed_the_entity_year_cap(served: Served) -> None:
    async with served.admin() as admin:
        holder = await register(admin, "enterprise", "pilot")
    basis = [{"project_ref": f"PD-{holder[-6:]}-{i}", "pilot_base": "国家人工智能行业应用中试基地"} for i in range(6)]
    ids = await _approvals(served, "data.pilot_dataset", 10_000_000 * YUAN, [(holder, b) for b in basis])
    results = await race(served, served.admin_key, [approve(i, 600_000 * YUAN) for i in ids])
    assert codes(results) == {(201, ""): 3, (409, "cap_exceeded"): 3}, codes(results)
    held = await query(
        served.url, "SELECT sum(face_value_fen) AS s FROM voucher WHERE holder_entity_id = :h", {"h": holder}
    )
    assert held[0].s == 1_800_000 * YUAN  # within 2,000,000 元 per entity-year


async def test_concurrent_approvals_on_two_workers_never_exceed_the_yearly_award_limit(served: Served) -> None:
    async with served.admin() as admin:
        institutions = [await register(admin, "institution", "scenario") for _ in range(12)]
    ids = await _approvals(
        served,
        "scenario.benchmark",
        10_000_000 * YUAN,
        [(i, {"scenario_ref": f"SC-{i[-8:]}", "field": "smart_manufacturing"}) for i in institutions],
    )
    results = await race(served, served.admin_key, [approve(i, 100_000 * YUAN) for i in ids])
    assert codes(results) == {(201, ""): 10, (409, "award_limit_reached"): 2}, codes(results)


async def test_a_contested_hold_is_resolved_once_on_two_workers(served: Served) -> None:
    voucher, provider = await voucher_and_provider(served, 1_000_000 * YUAN, "hold")
    async with served.service.client(provider.key) as client:
        held = await client.post(
            "/v1/holds",
            json={"token": voucher.token, "amount_fen": 200_000 * YUAN, "expires_in_s": 3600},
            headers={"Idempotency-Key": "hold"},
        )
    hold_id = expect(held, 201)["id"]
    lines = [{"category": "compute", "amount_fen": 150_000 * YUAN, "description": "GPU hours"}]

    def capture(i: int) -> Job:
        body = {"invoice_no": f"CAP-{i}", "lines": lines}
        headers = {"Idempotency-Key": f"capture-{i}"}
        return lambda client: client.post(f"/v1/holds/{hold_id}/capture", json=body, headers=headers)

    def void(i: int) -> Job:
        return lambda client: client.post(f"/v1/holds/{hold_id}/void", headers={"Idempotency-Key": f"void-{i}"})

    jobs = [job for i in range(15) for job in (capture(i), void(i))]
    results = await race(served, provider.key, jobs)
    winners = [r for r in results if r.status_code in (200, 201)]
    assert len(winners) == 1, codes(results)
    print(f"hold race: {dict(codes(results))}")
    assert {r.status_code for r in results if r not in winners} == {409}, codes(results)
    captured = winners[0].status_code == 201
    async with served.admin() as admin:
        state = expect(await admin.get(f"/v1/vouchers/{voucher.id}"), 200)
    redeemed = 150_000 * YUAN if captured else 0
    assert (state["held_fen"], state["redeemed_fen"], state["available_fen"]) == (
        0,
        redeemed,
        voucher.face_fen - redeemed,
    ), state
    journal = await assert_journal_whole(served.url, provider)
    assert len(journal.rows) == (1 if captured else 0)
    await check_books(served.url)
