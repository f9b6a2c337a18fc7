"""Applications: submitted with a basis, evaluated by POLICY.md, approved (issuing a voucher or a payout
from the program budget through the ledger) or rejected.

Approval re-evaluates everything at the moment of issue, under locks that make concurrent approvals
queue where they compete: per program-year (the yearly award limit) and per holder-program-year (the
entity-year cap); the budget is the ledger's own limit and each basis document's single claim is a unique
index. So a race of approvals never issues beyond a cap, a budget, a yearly limit or a document.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger.errors import AccountNotFound, LimitExceeded
from ledger.postings import credit, debit
from ledger.service import Ledger
from vouchers.bases import (
    BASIS_MODELS,
    ComputePurchaseBasis,
    DatasetBenchmarkBasis,
    FirstPurchaseBasis,
    _Basis,
    documents,
    duplicates,
    exclusive_keys,
    unknown_counterparty,
)
from vouchers.budgets import budget_account
from vouchers.catalog import Catalog
from vouchers.errors import VoucherError
from vouchers.evaluation import Computed, Context, evaluate
from vouchers.locking import lock
from vouchers.programs import ProgramDefinition
from vouchers.rules import SHANGHAI, approval_timing, voucher_expiry
from vouchers.sanctions import cap_used_by_program, refuse_if_sanctioned

# (conn, applicant, counterparty, on date) -> the chain of relations when affiliated, else None
AffiliationChecker = Callable[[AsyncConnection, str, str, date], Awaitable[Sequence[Mapping[str, Any]] | None]]

_ALPHABET = string.ascii_lowercase + string.digits


_UNBIASED_BELOW = 256 - 256 % len(_ALPHABET)  # bytes at or above this would favour the first letters


def new_id(prefix: str) -> str:
    """`prefix` and 24 characters drawn uniformly from [a-z0-9] (about 124 bits), from one read of the
    system's randomness where a character at a time cost 24 (a redemption makes one on its hot path)."""
    chars: list[str] = []
    while len(chars) < 24:
        chars += [_ALPHABET[b % len(_ALPHABET)] for b in secrets.token_bytes(32) if b < _UNBIASED_BELOW]
    return prefix + "".join(chars[:24])


class InvalidApplication(VoucherError):
    code = "validation_error"

    def __init__(self, detail: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.errors = errors or []


class ApplicationNotFound(VoucherError):
    code = "not_found"


class ApplicationNotPending(VoucherError):
    code = "conflict"


class YearClosed(VoucherError):
    code = "year_closed"


class YearNotStarted(VoucherError):
    code = "year_not_started"


class CapExceeded(VoucherError):
    code = "cap_exceeded"


class NothingOwed(VoucherError):
    code = "nothing_owed"


class AwardLimitReached(VoucherError):
    code = "award_limit_reached"


class BudgetExhausted(VoucherError):
    code = "budget_exhausted"


class BasisAlreadyUsed(VoucherError):
    code = "basis_already_used"


class PurchaseAlreadyReported(VoucherError):
    code = "conflict"


class DuplicateBasis(VoucherError):
    """One document listed twice in one application: it is one document's lines, never summed (art. 25)."""

    code = "duplicate_basis"

    def __init__(self, found: Sequence[tuple[str, Sequence[int]]]) -> None:
        named = "; ".join(f"{d} at lines {', '.join(map(str, lines))}" for d, lines in found)
        super().__init__(
            f"the same document is listed more than once: {named}. List each document once (an invoice's lines of "
            "different categories are one document's lines); one document supports one award (art. 25)"
        )
        self.errors = [{"document": d, "indexes": list(lines)} for d, lines in found]


class AffiliatedPurchaser(VoucherError):
    """art. 11 ¶2, art. 25: an industry first purchaser buys at arm's length from the model's vendor."""

    code = "affiliated_party"

    def __init__(self, detail: str, path: Sequence[Mapping[str, Any]]) -> None:
        super().__init__(detail)
        self.errors = [{"path": list(path)}]


@dataclass(frozen=True, slots=True)
class Application:
    id: str
    program: str
    definition_version: int
    applicant_entity_id: str
    year: int
    basis: dict[str, Any]
    status: str
    computed: dict[str, Any]
    award_fen: int | None
    automatic: bool
    decision_reason: str | None
    created_at: datetime
    decided_at: datetime | None
    issued_at: datetime | None
    voucher_id: str | None = None
    payout_id: str | None = None
    notice_ends_at: datetime | None = None
    notice_hold_entry_id: int | None = None
    issue_id: str | None = None
    reversed_at: datetime | None = None
    reversal_reason: str | None = None


@dataclass(frozen=True, slots=True)
class Issued:
    application: Application
    kind: str  # voucher | payout | notice (approved, waiting out the public notice)
    id: str
    amount_fen: int
    expires_at: datetime | None


def computed_json(computed: Computed) -> dict[str, Any]:
    body = asdict(computed)
    body["excluded"] = [{**e, "path": list(e["path"])} for e in body["excluded"]]
    return body


def parse_basis(program: str, raw: Mapping[str, Any]) -> _Basis:
    model = BASIS_MODELS[program]
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        errors = [{"loc": ["body", "basis", *[str(p) for p in e["loc"]]], "msg": e["msg"]} for e in exc.errors()]
        raise InvalidApplication(f"the basis does not fit {program}", errors) from None


async def _entity(conn: AsyncConnection, entity_id: str) -> Any:
    return (await conn.execute(text("SELECT id, eligible, tags FROM entity WHERE id = :id"), {"id": entity_id})).first()


def _counterparties(basis: _Basis) -> list[tuple[str, str, date]]:
    """(document, counterparty entity, date) for each line whose counterparty must not be affiliated."""
    if isinstance(basis, ComputePurchaseBasis):
        return [(p.document, p.provider_entity_id, p.purchased_on) for p in basis.purchases]
    if isinstance(basis, DatasetBenchmarkBasis):
        return [(c.document, c.counterparty_entity_id, c.signed_on) for c in basis.contracts]
    return []


def _numbered(basis: _Basis) -> list[tuple[str, str, str]]:
    """(document, counterparty, number) of each document with a counterparty."""
    if isinstance(basis, ComputePurchaseBasis):
        return [(p.document, p.provider_entity_id, p.invoice_no) for p in basis.purchases]
    if isinstance(basis, DatasetBenchmarkBasis):
        return [(c.document, c.counterparty_entity_id, c.contract_no) for c in basis.contracts]
    if isinstance(basis, FirstPurchaseBasis):
        return [(basis.document, basis.vendor_entity_id, basis.contract_no)]
    return []


async def active_holders(conn: AsyncConnection, wanted: Sequence[str]) -> dict[str, str]:
    """document -> the award (application or external award id) an active claim on it supports: the claim
    on the document itself (a duplicate kept by migration 0015 included), or for a document with a
    counterparty, a `number:` claim of the same number recorded before its counterparty was known."""
    legacy = {d: k for d in wanted if (k := unknown_counterparty(d)) is not None}
    rows = await conn.execute(
        text(
            "SELECT DISTINCT ON (document) document, coalesce(application_id, external_award_id) AS holder "
            "FROM basis_claim WHERE released_at IS NULL AND document = ANY(:docs) ORDER BY document, id"
        ),
        {"docs": sorted({*wanted, *legacy.values()})},
    )
    found = {row.document: row.holder for row in rows}
    holders = {d: found[d] for d in wanted if d in found}
    for document, key in legacy.items():
        if document not in holders and key in found:
            holders[document] = found[key]
    return holders


async def _voucher_paid(conn: AsyncConnection, numbered: Sequence[tuple[str, str, str]]) -> dict[str, int]:
    """document -> what vouchers paid on it: redemptions at its counterparty under its number, each net of
    what was refunded; a reversed (clawed back) redemption paid nothing (its value went back to the voucher,
    or is owed back by the provider)."""
    if not numbered:
        return {}
    distinct = sorted({(c, n) for _d, c, n in numbered})  # an invoice's lines of several categories: once
    rows = await conn.execute(
        text(
            "SELECT r.provider_entity_id, r.invoice_no, "
            "       sum(CASE WHEN r.reversed_at IS NULL THEN r.subsidy_fen - r.refunded_fen ELSE 0 END) AS paid "
            "FROM unnest(CAST(:providers AS text[]), CAST(:nos AS text[])) AS d(provider, no) "
            "JOIN redemption_invoice ri ON ri.provider_entity_id = d.provider AND ri.invoice_no = d.no "
            "JOIN redemption r ON r.id = ri.redemption_id "
            "GROUP BY r.provider_entity_id, r.invoice_no"
        ),
        {"providers": [c for c, _n in distinct], "nos": [n for _c, n in distinct]},
    )
    paid = {(row.provider_entity_id, row.invoice_no): int(row.paid) for row in rows}
    return {d: paid[(c, n)] for d, c, n in numbered if paid.get((c, n), 0) > 0}


async def _no_self_dealing(
    conn: AsyncConnection, checker: AffiliationChecker, basis: FirstPurchaseBasis, applicant: str, today: date
) -> None:
    """art. 11 ¶2, art. 25: the industry first purchaser is neither the model's vendor nor affiliated with it
    on the contract date (the decision date when the contract date is not given)."""
    on = basis.signed_on or today
    path = await checker(conn, applicant, basis.vendor_entity_id, on)
    if path is None:
        return
    if applicant == basis.vendor_entity_id:
        detail = (
            f"the applicant {applicant} is the model's vendor: a vendor cannot be its own industry first "
            "purchaser (art. 11 ¶2, no self-dealing, art. 25)"
        )
    else:
        detail = (
            f"the applicant {applicant} is affiliated with the vendor {basis.vendor_entity_id} on {on} "
            "(the chain of relations is in errors[0].path): an industry first purchase is bought at arm's "
            "length (art. 11 ¶2, no self-dealing, art. 25)"
        )
    raise AffiliatedPurchaser(detail, path)


def check_no_duplicates(basis: _Basis) -> None:
    """`duplicate_basis` when one document is listed twice (POLICY.md, "A document is claimed whole")."""
    found = duplicates(basis)
    if found:
        raise DuplicateBasis(found)


async def build_context(
    conn: AsyncConnection,
    checker: AffiliationChecker,
    program: ProgramDefinition,
    basis: _Basis,
    applicant: str,
    year: int,
    *,
    today: date | None = None,
) -> Context:
    """Everything `evaluate` needs from the database. `today` (Asia/Shanghai) is the decision's date: the
    affiliation date of a first purchase whose contract date is not given. Refuses a self-dealt first
    purchase (`AffiliatedPurchaser`)."""
    entity = await _entity(conn, applicant)
    if entity is None:
        raise InvalidApplication(f"applicant_entity_id: no entity {applicant}")
    affiliated: dict[str, Sequence[Mapping[str, Any]]] = {}
    if program.non_affiliated:
        for document, counterparty, on in _counterparties(basis):
            if await _entity(conn, counterparty) is None:
                raise InvalidApplication(f"basis: no entity {counterparty}")
            if document in affiliated:
                continue
            path = await checker(conn, applicant, counterparty, on)
            if path is not None:
                affiliated[document] = path
    if isinstance(basis, FirstPurchaseBasis):
        if await _entity(conn, basis.vendor_entity_id) is None:
            raise InvalidApplication(f"basis.vendor_entity_id: no entity {basis.vendor_entity_id}")
        await _no_self_dealing(conn, checker, basis, applicant, today or datetime.now(SHANGHAI).date())
    wanted = documents(basis) + exclusive_keys(basis)
    if isinstance(basis, FirstPurchaseBasis):
        wanted.append(f"model:{basis.model_ref}")
    claims = await active_holders(conn, wanted)
    on_record = 0
    if program.top_up:
        on_record = int(
            await conn.scalar(
                text(
                    "SELECT coalesce(sum(eligible_fen), 0) FROM application WHERE applicant_entity_id = :e "
                    "AND program = :p AND year = :y AND status IN ('in_notice', 'held', 'issued')"
                ),
                {"e": applicant, "p": program.code, "y": year},
            )
            or 0
        )
    already = 0
    if program.cap_applies_to == "entity_year":
        # issued awards by the one rule of cap use (misconduct keeps it used, art. 25), plus awards in notice
        issued = await cap_used_by_program(conn, applicant, year, program=program.code)
        already = issued.get(program.code, 0) + int(
            await conn.scalar(
                text(
                    "SELECT coalesce(sum(award_fen), 0) FROM application "
                    "WHERE applicant_entity_id = :e AND program = :p AND year = :y AND status IN ('in_notice', 'held')"
                ),
                {"e": applicant, "p": program.code, "y": year},
            )
            or 0
        )
    numbered = _numbered(basis)
    reported: dict[str, tuple[str, int]] = {}
    if numbered:
        sales = {
            (row.provider_entity_id, row.invoice_no): (row.category, int(row.amount_fen))
            for row in await conn.execute(
                text(
                    "SELECT provider_entity_id, invoice_no, category, amount_fen FROM purchase "
                    "WHERE buyer_entity_id = :e AND invoice_no = ANY(:nos)"
                ),
                {"e": applicant, "nos": sorted({n for _d, _c, n in numbered})},
            )
        }
        reported = {d: sales[(c, n)] for d, c, n in numbered if (c, n) in sales}
    model_filed, first_purchaser = True, None
    if isinstance(basis, FirstPurchaseBasis):
        # on record as filed: its first national filing supports an award here or under another policy
        model_filed = f"model:{basis.model_ref}" in claims
        first_purchaser = claims.get(f"first_purchase:{basis.model_ref}:{basis.industry}")
    return Context(
        year=year,
        tags=frozenset(entity.tags),
        eligible_entity=bool(entity.eligible),
        affiliated=affiliated,
        claimed={d: h for d, h in claims.items() if d in documents(basis)},
        on_record_fen=on_record,
        already_fen=already,
        reported=reported,
        voucher_paid=await _voucher_paid(conn, numbered),
        model_filed=model_filed,
        first_purchaser=first_purchaser,
    )


_COLUMNS = """
    a.id, a.program, a.definition_version, a.applicant_entity_id, a.year, a.basis::text AS basis, a.status,
    a.computed::text AS computed, a.award_fen, a.automatic, a.decision_reason, a.created_at, a.decided_at,
    a.issued_at, a.notice_ends_at, a.notice_hold_entry_id, a.issue_id, a.reversed_at, a.reversal_reason,
    v.id AS voucher_id, p.id AS payout_id
"""
_FROM = """
    FROM application a LEFT JOIN voucher v ON v.application_id = a.id LEFT JOIN payout p ON p.application_id = a.id
"""


def _application(row: Any) -> Application:
    return Application(
        id=row.id,
        program=row.program,
        definition_version=row.definition_version,
        applicant_entity_id=row.applicant_entity_id,
        year=row.year,
        basis=json.loads(row.basis),
        status=row.status,
        computed=json.loads(row.computed),
        award_fen=row.award_fen,
        automatic=row.automatic,
        decision_reason=row.decision_reason,
        created_at=row.created_at,
        decided_at=row.decided_at,
        issued_at=row.issued_at,
        voucher_id=row.voucher_id,
        payout_id=row.payout_id,
        notice_ends_at=row.notice_ends_at,
        notice_hold_entry_id=row.notice_hold_entry_id,
        issue_id=row.issue_id,
        reversed_at=row.reversed_at,
        reversal_reason=row.reversal_reason,
    )


async def get(conn: AsyncConnection, application_id: str, *, for_update: bool = False) -> Application:
    lock = " FOR UPDATE OF a" if for_update else ""
    row = (
        await conn.execute(text(f"SELECT {_COLUMNS} {_FROM} WHERE a.id = :id{lock}"), {"id": application_id})
    ).first()
    if row is None:
        raise ApplicationNotFound(f"no application {application_id}")
    return _application(row)


async def list_applications(
    conn: AsyncConnection,
    *,
    after: tuple[datetime, str] | None,
    limit: int,
    entity_id: str | None = None,
    program: str | None = None,
    status: str | None = None,
    year: int | None = None,
) -> list[Application]:
    rows = await conn.execute(
        text(
            f"SELECT {_COLUMNS} {_FROM} WHERE (CAST(:after_at AS timestamptz) IS NULL "
            "OR (a.created_at, a.id) > (CAST(:after_at AS timestamptz), CAST(:after_id AS text))) "
            "AND (CAST(:entity AS text) IS NULL OR a.applicant_entity_id = :entity) "
            "AND (CAST(:program AS text) IS NULL OR a.program = :program) "
            "AND (CAST(:status AS text) IS NULL OR a.status = :status) "
            "AND (CAST(:year AS integer) IS NULL OR a.year = :year) "
            "ORDER BY a.created_at, a.id LIMIT :n"
        ),
        {
            "after_at": after[0] if after else None,
            "after_id": after[1] if after else None,
            "entity": entity_id,
            "program": program,
            "status": status,
            "year": year,
            "n": limit,
        },
    )
    return [_application(row) for row in rows]


async def submit(
    conn: AsyncConnection,
    catalog: Catalog,
    checker: AffiliationChecker,
    *,
    program: str,
    applicant_entity_id: str,
    year: int,
    basis: Mapping[str, Any],
    actor: str | None,
    automatic: bool = False,
) -> Application:
    definition = catalog.for_year(program, year)
    parsed = parse_basis(program, basis)
    check_no_duplicates(parsed)
    await refuse_if_sanctioned(conn, applicant_entity_id, now=datetime.now(UTC))  # art. 25, any program
    context = await build_context(conn, checker, definition, parsed, applicant_entity_id, year)
    computed = evaluate(definition, parsed, context)
    application_id = new_id("app_")
    await conn.execute(
        text(
            "INSERT INTO application (id, program, definition_version, applicant_entity_id, year, basis, computed, "
            "eligible_fen, computed_award_fen, automatic, submitted_by) VALUES (:id, :program, :version, :entity, "
            ":year, CAST(:basis AS jsonb), CAST(:computed AS jsonb), :eligible, :award, :automatic, :actor)"
        ),
        {
            "id": application_id,
            "program": program,
            "version": definition.version,
            "entity": applicant_entity_id,
            "year": year,
            "basis": parsed.model_dump_json(),
            "computed": json.dumps(computed_json(computed)),
            "eligible": computed.eligible_fen,
            "award": computed.award_fen,
            "automatic": automatic,
            "actor": actor,
        },
    )
    return await get(conn, application_id)


async def approve(
    conn: AsyncConnection,
    ledger: Ledger,
    catalog: Catalog,
    checker: AffiliationChecker,
    *,
    application_id: str,
    award_fen: int | None,
    actor: str,
    now: datetime,
) -> Issued:
    application = await get(conn, application_id, for_update=True)
    if application.status != "submitted":
        raise ApplicationNotPending(f"application {application_id} is {application.status}, not submitted")
    program = catalog.version(application.program, application.definition_version)
    timing = approval_timing(application.year, now)
    if timing == "not_started":
        raise YearNotStarted(
            f"an award for {application.year} can be approved only from 1 January {application.year} "
            f"(Asia/Shanghai): it is sized on the previous year's (上一年度) total, which is not known before "
            f"then (art. 8); submit it now and it is approved once {application.year} has begun"
        )
    if timing == "closed":
        raise YearClosed(f"{application.year} has ended (Asia/Shanghai): nothing is issued for it any more")
    holder, year = application.applicant_entity_id, application.year
    await refuse_if_sanctioned(conn, holder, now=now)  # a sanction imposed since it was submitted (art. 25)
    # lock order: program-year, then holder-program-year (every approval takes them in this order)
    await lock(conn, f"award:{program.code}:{year}")
    await lock(conn, f"award:{program.code}:{year}:{holder}")
    basis = parse_basis(program.code, application.basis)
    check_no_duplicates(basis)
    today = now.astimezone(SHANGHAI).date()
    computed = evaluate(program, basis, await build_context(conn, checker, program, basis, holder, year, today=today))
    if program.award == "reviewer" and award_fen is None:
        raise InvalidApplication("award_fen: a reviewer-set program needs the reviewer's figure")
    award = computed.award_fen if award_fen is None else award_fen
    if award > computed.award_fen:
        raise CapExceeded(
            f"{award} fen is more than the {computed.award_fen} fen this application can receive now: {computed.rule}"
        )
    if award <= 0:
        used = [e for e in computed.excluded if e.reason == "basis_already_used"]
        if used and computed.eligible_fen == 0:
            raise BasisAlreadyUsed("no double support (art. 25): " + "; ".join(e.detail for e in used))
        raise NothingOwed("nothing is owed: " + "; ".join(computed.reasons or (computed.rule,)))
    if program.awards_per_year_max is not None:
        issued = await conn.scalar(
            text(
                "SELECT count(*) FROM application WHERE program = :p AND year = :y "
                "AND status IN ('in_notice', 'held', 'issued')"
            ),
            {"p": program.code, "y": year},
        )
        if int(issued or 0) >= program.awards_per_year_max:
            raise AwardLimitReached(
                f"{program.code} has made its {program.awards_per_year_max} awards for {year} (art. 9 ¶2, art. 10)"
            )
    await _claim(conn, application_id, _claimed_documents(basis, computed))
    issue_id = new_id("vch_" if program.mode == "voucher" else "pay_")
    target = await open_target(conn, ledger, program, holder, issue_id)
    decision = {
        "a": award,
        "c": json.dumps(computed_json(computed)),
        "e": computed.eligible_fen,
        "ca": computed.award_fen,
        "by": actor,
        "issue": issue_id,
        "id": application_id,
    }
    postings = [debit(budget_account(program.code, year), award), credit(target, award)]
    if program.notice_days > 0:
        # 公示: the award waits out the notice period; the budget is held for it on the ledger meanwhile
        try:
            hold = await ledger.hold(
                conn,
                key=f"notice:{application_id}",
                postings=postings,
                timeout_s=(program.notice_days + NOTICE_GRACE_DAYS) * 86_400,
                memo=f"{program.code} {year}: held through the public notice of application {application_id}",
                metadata={"program": program.code, "year": year, "application": application_id, **_deducted(computed)},
            )
        except (LimitExceeded, AccountNotFound) as refused:
            raise BudgetExhausted(f"the {program.code} {year} budget cannot hold {award} fen") from refused
        await conn.execute(
            text(
                "UPDATE application SET status = 'in_notice', award_fen = :a, computed = CAST(:c AS jsonb), "
                "eligible_fen = :e, computed_award_fen = :ca, decided_by = :by, decided_at = now(), issue_id = :issue, "
                "notice_hold_entry_id = :hold, notice_ends_at = now() + make_interval(days => :days), "
                "updated_at = now() WHERE id = :id"
            ),
            {**decision, "hold": hold.id, "days": program.notice_days},
        )
        return Issued(await get(conn, application_id), "notice", issue_id, award, None)
    try:
        entry = await ledger.transfer(
            conn,
            key=f"issue:{application_id}",
            postings=postings,
            memo=f"{program.code} {year}: {program.mode} {issue_id} for application {application_id}",
            metadata={
                "program": program.code,
                "year": year,
                "application": application_id,
                "holder": holder,
                **_deducted(computed),
            },
        )
    except (LimitExceeded, AccountNotFound) as refused:
        raise BudgetExhausted(f"the {program.code} {year} budget cannot fund {award} fen") from refused
    await conn.execute(
        text(
            "UPDATE application SET status = 'issued', award_fen = :a, computed = CAST(:c AS jsonb), "
            "eligible_fen = :e, computed_award_fen = :ca, decided_by = :by, decided_at = now(), issue_id = :issue, "
            "issued_at = now(), updated_at = now() WHERE id = :id"
        ),
        decision,
    )
    return await record_issue(
        conn,
        program,
        basis,
        application_id,
        issue_id,
        award,
        entry.id,
        issued_at=now,
        min_validity_days=catalog.policy.min_validity_days,
    )


# A hold outlives the notice period by this much, so that an objection resolved a little late still finds it.
NOTICE_GRACE_DAYS = 9


async def open_target(
    conn: AsyncConnection, ledger: Ledger, program: ProgramDefinition, holder: str, issue_id: str
) -> str:
    """The account an award is credited to: the voucher's own (limited: it can never give more than it
    was given) or the beneficiary's payable account."""
    if program.mode == "voucher":
        target = f"voucher:{issue_id}"
        await ledger.open_account(conn, target, limit="debits_must_not_exceed_credits")
    else:
        target = f"entity:{holder}:payable"
        await ledger.open_account(conn, target)
    return target


async def record_issue(
    conn: AsyncConnection,
    program: ProgramDefinition,
    basis: _Basis,
    application_id: str,
    issue_id: str,
    award: int,
    entry_id: int,
    *,
    issued_at: datetime,
    min_validity_days: int,
) -> Issued:
    """Record an issued award. A voucher expires at the end of its year or `min_validity_days` after
    `issued_at`, whichever is later (rules.voucher_expiry)."""
    application = await get(conn, application_id)
    holder, year = application.applicant_entity_id, application.year
    expires_at: datetime | None = None
    if program.mode == "voucher":
        assert program.redemption is not None
        expires_at = voucher_expiry(year, issued_at, min_validity_days)
        uplifted = isinstance(basis, FirstPurchaseBasis) and basis.rd_project
        rate = program.redemption.uplift_rate_bp if uplifted else program.redemption.rate_bp
        vendor = basis.vendor_entity_id if isinstance(basis, FirstPurchaseBasis) else None
        await conn.execute(
            text(
                "INSERT INTO voucher (id, application_id, program, holder_entity_id, year, face_value_fen, "
                "vendor_entity_id, redemption_rate_bp, expires_at) VALUES (:id, :app, :p, :h, :y, :f, :v, :r, :x)"
            ),
            {
                "id": issue_id,
                "app": application_id,
                "p": program.code,
                "h": holder,
                "y": year,
                "f": award,
                "v": vendor,
                "r": rate,
                "x": expires_at,
            },
        )
    else:
        await conn.execute(
            text(
                "INSERT INTO payout (id, application_id, program, beneficiary_entity_id, year, amount_fen, entry_id) "
                "VALUES (:id, :app, :p, :h, :y, :a, :e)"
            ),
            {
                "id": issue_id,
                "app": application_id,
                "p": program.code,
                "h": holder,
                "y": year,
                "a": award,
                "e": entry_id,
            },
        )
    await conn.execute(
        text(
            "UPDATE application SET status = 'issued', issued_at = coalesce(issued_at, now()), updated_at = now() "
            "WHERE id = :id"
        ),
        {"id": application_id},
    )
    return Issued(await get(conn, application_id), program.mode, issue_id, award, expires_at)


def _deducted(computed: Computed) -> dict[str, int]:
    """The issuing entry names what was deducted from the basis (voucher-paid, above a reported sale), so
    an export shows it beside the award (art. 8 实际采购, art. 25)."""
    total = sum(d.amount_fen for d in computed.deductions)
    return {"deducted_fen": total} if total else {}


def _claimed_documents(basis: _Basis, computed: Computed) -> list[str]:
    """What an issued award holds: every document of its basis, those with excluded lines included (a
    storage line does not leave its invoice free for another award), except the ones another award already
    holds; and its exclusive keys."""
    held = {e.document for e in computed.excluded if e.reason == "basis_already_used"}
    return [d for d in documents(basis) if d not in held] + exclusive_keys(basis)


async def _claim(conn: AsyncConnection, application_id: str, wanted: list[str]) -> None:
    if not wanted:
        return
    # claims the unique index does not see (a duplicate kept by 0015, a `number:` of unknown counterparty)
    # are never written any more, so reading them before the insert is enough
    taken = await active_holders(conn, wanted)
    if not taken:
        inserted = (
            (
                await conn.execute(
                    text(
                        "INSERT INTO basis_claim (document, application_id) "
                        "SELECT d, :app FROM unnest(CAST(:docs AS text[])) d "
                        "ON CONFLICT (document) WHERE released_at IS NULL AND duplicate_of IS NULL DO NOTHING "
                        "RETURNING document"
                    ),
                    {"app": application_id, "docs": wanted},
                )
            )
            .scalars()
            .all()
        )
        if len(inserted) == len(wanted):
            return
        taken = await active_holders(conn, sorted(set(wanted) - set(inserted)))
    named = ", ".join(f"{d} supports {h}" for d, h in sorted(taken.items())) or "another award holds it"
    raise BasisAlreadyUsed(f"no double support (art. 25): {named}")


async def reject(conn: AsyncConnection, *, application_id: str, reason: str, actor: str) -> Application:
    application = await get(conn, application_id, for_update=True)
    if application.status != "submitted":
        raise ApplicationNotPending(f"application {application_id} is {application.status}, not submitted")
    await conn.execute(
        text(
            "UPDATE application SET status = 'rejected', decision_reason = :r, decided_by = :by, decided_at = now(), "
            "updated_at = now() WHERE id = :id"
        ),
        {"r": reason, "by": actor, "id": application_id},
    )
    return await get(conn, application_id)
