"""What an application is owed, and why: pure evaluation of a basis against POLICY.md.

Everything that needs the database (affiliations on each line's date, documents already claimed, purchases
on record, what the holder already has this year, reported sales) arrives in a `Context`; the result says
the eligible amount, the award (for reviewer-set programs, the most a reviewer may grant), every excluded
line with its reason, every deduction from a counted line (what a voucher paid, what exceeds the sale a
provider reported), the rule applied, and flags for a reviewer (an invoice a provider reported differently).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from vouchers.bases import (
    ComputePurchaseBasis,
    DatasetBenchmarkBasis,
    FirstFilingBasis,
    FirstPurchaseBasis,
    IndustryRolloutBasis,
    PilotDatasetBasis,
    ScenarioBenchmarkBasis,
    TrustedSpaceBasis,
    _Basis,
    documents,
)
from vouchers.programs import ProgramDefinition
from vouchers.rules import cap_for, rate_award, reviewer_award


@dataclass(frozen=True, slots=True)
class Excluded:
    document: str
    amount_fen: int
    reason: str  # category | outside_prior_year | affiliated_provider | basis_already_used | not_eligible
    detail: str
    index: int | None = None
    path: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class Deduction:
    """A part of a counted line that is not the applicant's own spending (art. 8 实际采购, art. 25)."""

    document: str
    index: int
    amount_fen: int
    reason: str  # voucher_paid | above_reported
    detail: str


@dataclass(frozen=True, slots=True)
class Context:
    year: int
    tags: frozenset[str] = frozenset()
    eligible_entity: bool = True
    # line document -> the affiliation path between applicant and that line's counterparty on its date
    affiliated: Mapping[str, Sequence[Mapping[str, Any]]] = field(default_factory=dict)
    # document -> the award (application id or external award id) it already supports
    claimed: Mapping[str, str] = field(default_factory=dict)
    # compute.purchase: eligible purchases of the entity-year already on record from approved applications
    on_record_fen: int = 0
    # what the cap's holder already holds this program-year (issued less released)
    already_fen: int = 0
    # document -> (category, amount_fen) of the sale its counterparty reported (POST /v1/purchases)
    reported: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    # document -> what redemptions of vouchers paid on it, net of refunds and reversals
    voucher_paid: Mapping[str, int] = field(default_factory=dict)
    # model.first_purchase
    model_filed: bool = True
    first_purchaser: str | None = None


@dataclass(frozen=True, slots=True)
class Computed:
    eligible_fen: int
    award_fen: int
    excluded: tuple[Excluded, ...]
    reasons: tuple[str, ...]
    rule: str
    flags: tuple[str, ...] = ()
    reviewer_set: bool = False
    deductions: tuple[Deduction, ...] = ()


class _Counter:
    """The amount counted of each document's lines: at most the sale its counterparty reported, less what
    a voucher paid on it (POLICY.md, "A document is claimed whole", "实际采购 excludes what a voucher paid")."""

    def __init__(self, context: Context) -> None:
        self.context = context
        self.reported_left = {d: amount for d, (_category, amount) in context.reported.items()}
        self.paid_left = dict(context.voucher_paid)
        self.deductions: list[Deduction] = []
        self.flags: list[str] = []

    def count(self, document: str, index: int, amount_fen: int, counterparty: str) -> int:
        counted = amount_fen
        left = self.reported_left.get(document)
        if left is not None:
            if counted > left:
                above = counted - left
                reported = self.context.reported[document][1]
                self.deductions.append(
                    Deduction(
                        document,
                        index,
                        above,
                        "above_reported",
                        f"{counterparty} reported this sale at {reported} fen: the {above} fen claimed above that "
                        "is not counted (art. 8 实际采购: what was actually bought, as the seller reported it)",
                    )
                )
                self.flags.append(f"{document}: {above} fen above the {reported} fen the seller reported, not counted")
                counted = left
            self.reported_left[document] = left - counted
        paid = min(self.paid_left.get(document, 0), counted)
        if paid > 0:
            self.deductions.append(
                Deduction(
                    document,
                    index,
                    paid,
                    "voucher_paid",
                    f"{paid} fen of this document was paid with a voucher redeemed at {counterparty} (net of "
                    "refunds and reversals): voucher money is not the applicant's own spending (art. 8 实际采购), "
                    "and one payment supports one award (art. 25)",
                )
            )
            self.paid_left[document] -= paid
            counted -= paid
        return counted

    @property
    def deducted(self) -> tuple[Deduction, ...]:
        return tuple(self.deductions)


def _prior_year(day: date, year: int) -> bool:
    return day.year == year - 1


def evaluate(program: ProgramDefinition, basis: _Basis, context: Context) -> Computed:
    reasons: list[str] = []
    if not context.eligible_entity:
        # art. 25: registered and substantively engaged in AI work in Guangzhou
        reasons.append("the applicant is not eligible (art. 25): not presumed or declared a Guangzhou entity")
    # a claimed invoice or dataset contract excludes its line; any other claimed document, the whole basis
    lines = {c.document for c in basis.contracts} if isinstance(basis, DatasetBenchmarkBasis) else set()
    claimed_docs = [d for d in documents(basis) if d in context.claimed and d not in lines]
    if claimed_docs and not isinstance(basis, ComputePurchaseBasis):
        excluded = tuple(
            Excluded(d, 0, "basis_already_used", f"{d} already supports award {context.claimed[d]} (art. 25)")
            for d in claimed_docs
        )
        return Computed(
            0,
            0,
            excluded,
            (*reasons, "the basis already supports another award (就高不重复)"),
            "no double support (art. 25)",
            reviewer_set=program.award == "reviewer",
        )
    computed = _evaluate(program, basis, context, reasons)
    if not context.eligible_entity:
        return Computed(
            computed.eligible_fen,
            0,
            computed.excluded,
            tuple(reasons),
            computed.rule,
            computed.flags,
            computed.reviewer_set,
            computed.deductions,
        )
    return computed


def _evaluate(program: ProgramDefinition, basis: _Basis, context: Context, reasons: list[str]) -> Computed:
    match basis:
        case ComputePurchaseBasis():
            return _compute(program, basis, context, reasons)
        case DatasetBenchmarkBasis():
            return _dataset_benchmark(program, basis, context, reasons)
        case TrustedSpaceBasis():
            award = rate_award(program, basis.investment_fen)
            return Computed(basis.investment_fen, award.award_fen, (), tuple(reasons), award.rule)
        case IndustryRolloutBasis():
            award = rate_award(program, basis.deployment_cost_fen)
            return Computed(basis.deployment_cost_fen, award.award_fen, (), tuple(reasons), award.rule)
        case PilotDatasetBasis():
            ceiling = reviewer_award(program, cap_for(program).cap_fen, already_fen=context.already_fen)
            if context.already_fen:
                reasons.append(f"the entity already holds {context.already_fen} fen of this program this year")
            return Computed(0, ceiling.award_fen, (), tuple(reasons), ceiling.rule, reviewer_set=True)
        case ScenarioBenchmarkBasis():
            if basis.field not in program.scenario_fields:
                reasons.append(f"{basis.field!r} is not a field of the scenario library (art. 10)")
                return Computed(
                    0, 0, (), tuple(reasons), "scenario fields of the program definition", reviewer_set=True
                )
            ceiling = reviewer_award(program, cap_for(program).cap_fen)
            return Computed(0, ceiling.award_fen, (), tuple(reasons), ceiling.rule, reviewer_set=True)
        case FirstFilingBasis():
            ceiling = reviewer_award(program, cap_for(program).cap_fen)
            return Computed(0, ceiling.award_fen, (), tuple(reasons), ceiling.rule, reviewer_set=True)
        case FirstPurchaseBasis():
            if not context.model_filed:
                reasons.append(f"model {basis.model_ref} is not on record as filed (art. 11 ¶2)")
            if context.first_purchaser is not None:
                reasons.append(
                    f"model {basis.model_ref} already has its first purchaser in {basis.industry}: "
                    f"{context.first_purchaser}"
                )
            counter = _Counter(context)
            counted = counter.count(basis.document, 0, basis.contract_fen, basis.vendor_entity_id)
            award = rate_award(program, counted, uplift=basis.rd_project)
            owed = award.award_fen if context.model_filed and context.first_purchaser is None else 0
            return Computed(
                counted, owed, (), tuple(reasons), award.rule, tuple(counter.flags), deductions=counter.deducted
            )
    raise AssertionError(f"no evaluation for {type(basis).__name__}")


def _compute(program: ProgramDefinition, basis: ComputePurchaseBasis, context: Context, reasons: list[str]) -> Computed:
    excluded: list[Excluded] = []
    counter = _Counter(context)
    flags = counter.flags
    eligible = 0
    for index, line in enumerate(basis.purchases):
        document = line.document
        reported = context.reported.get(document)
        if reported is not None and reported != (line.category, line.amount_fen):
            flags.append(
                f"{document}: the provider reported {reported[0]} {reported[1]} fen, "
                f"the application says {line.category} {line.amount_fen} fen"
            )
        if line.category not in program.eligible_categories:
            excluded.append(
                Excluded(
                    document,
                    line.amount_fen,
                    "category",
                    f"{line.category} is not intelligent compute (art. 8 excludes storage, "
                    "network, security and other services)",
                    index,
                )
            )
        elif program.basis_period == "previous_year" and not _prior_year(line.purchased_on, context.year):
            excluded.append(
                Excluded(
                    document,
                    line.amount_fen,
                    "outside_prior_year",
                    f"bought on {line.purchased_on}, not in {context.year - 1}",
                    index,
                )
            )
        elif document in context.affiliated:
            excluded.append(
                Excluded(
                    document,
                    line.amount_fen,
                    "affiliated_provider",
                    f"{line.provider_entity_id} is affiliated with the applicant on {line.purchased_on} (art. 8)",
                    index,
                    tuple(context.affiliated[document]),
                )
            )
        elif document in context.claimed:
            excluded.append(
                Excluded(
                    document,
                    line.amount_fen,
                    "basis_already_used",
                    f"{document} already supports award {context.claimed[document]} (art. 25)",
                    index,
                )
            )
        else:
            eligible += counter.count(document, index, line.amount_fen, line.provider_entity_id)
    total = context.on_record_fen + eligible
    award = rate_award(program, total, tags=context.tags, already_fen=context.already_fen)
    if context.on_record_fen:
        reasons.append(f"{context.on_record_fen} fen of eligible purchases already on record for {context.year - 1}")
    return Computed(
        eligible,
        award.award_fen,
        tuple(excluded),
        tuple(reasons),
        award.rule,
        tuple(flags),
        deductions=counter.deducted,
    )


def _dataset_benchmark(
    program: ProgramDefinition, basis: DatasetBenchmarkBasis, context: Context, reasons: list[str]
) -> Computed:
    excluded: list[Excluded] = []
    counter = _Counter(context)
    eligible = 0
    for index, contract in enumerate(basis.contracts):
        document = contract.document
        if not _prior_year(contract.signed_on, context.year):
            excluded.append(
                Excluded(
                    document,
                    contract.amount_fen,
                    "outside_prior_year",
                    f"signed on {contract.signed_on}, not in {context.year - 1} (art. 9 ¶2)",
                    index,
                )
            )
        elif document in context.affiliated:
            excluded.append(
                Excluded(
                    document,
                    contract.amount_fen,
                    "affiliated_provider",
                    f"{contract.counterparty_entity_id} is affiliated with the applicant on "
                    f"{contract.signed_on} (art. 9 ¶2)",
                    index,
                    tuple(context.affiliated[document]),
                )
            )
        elif document in context.claimed:
            excluded.append(
                Excluded(
                    document,
                    contract.amount_fen,
                    "basis_already_used",
                    f"{document} already supports award {context.claimed[document]} (art. 25)",
                    index,
                )
            )
        else:
            eligible += counter.count(document, index, contract.amount_fen, contract.counterparty_entity_id)
    # the award is "依据…合同交易金额": a reviewer grants at most the cap and never more than the eligible amount
    ceiling = reviewer_award(program, eligible)
    return Computed(
        eligible,
        ceiling.award_fen,
        tuple(excluded),
        tuple(reasons),
        f"{ceiling.rule}; at most the eligible non-affiliated contract amount",
        tuple(counter.flags),
        reviewer_set=True,
        deductions=counter.deducted,
    )
