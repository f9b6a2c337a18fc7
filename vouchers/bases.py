"""The basis of an application, per program (API.md, "Application bases"), and the basis documents it
claims: the keys by which no double support (就高不重复, art. 25) is enforced.

A document with a counterparty in the basis — an invoice (its provider), a dataset-benchmark contract (its
counterparty), a first-purchase contract (its vendor) — is its counterparty plus its number,
`doc:<entity>:<number>`, whatever kind the applicant calls it: an invoice from P numbered X and a contract
with P numbered X are one document, two vendors' contracts numbered alike are two (`document_id`, the
identity's only home). A document issued by an authority or the applicant's own keeps its kind:
`project:<ref>`, `dataset:<ref>`, `scenario:<ref>`, `filing:<no>`, `model:<ref>`, so that one project
claimed under 9 ¶1 and under 11 ¶4 is the same one. `number:<no>` is a document recorded before the identity
existed whose counterparty is unknown (an external award's `contract:<no>`): it blocks every counterparty's
document of that number (migration 0015).
"""

from __future__ import annotations

import re
from datetime import date
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StringConstraints

from vouchers.programs import Category

FEN_MAX = 10**15
Fen = Annotated[StrictInt, Field(gt=0, le=FEN_MAX)]
Ref = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100, pattern=r"^[^\s:][^:]*$")]
EntityId = Annotated[str, StringConstraints(pattern=r"^ent_[a-z0-9]{24}$")]
LINES_MAX = 500


class _Basis(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Purchase(_Basis):
    provider_entity_id: EntityId
    invoice_no: Ref
    category: Category
    amount_fen: Fen
    purchased_on: date

    @property
    def document(self) -> str:
        return document_id(self.provider_entity_id, self.invoice_no)


class ComputePurchaseBasis(_Basis):
    purchases: list[Purchase] = Field(min_length=1, max_length=LINES_MAX)


class TrustedSpaceBasis(_Basis):
    project_ref: Ref
    investment_fen: Fen


class Contract(_Basis):
    counterparty_entity_id: EntityId
    contract_no: Ref
    amount_fen: Fen
    signed_on: date

    @property
    def document(self) -> str:
        return document_id(self.counterparty_entity_id, self.contract_no)


class DatasetBenchmarkBasis(_Basis):
    dataset_ref: Ref
    contracts: list[Contract] = Field(min_length=1, max_length=LINES_MAX)


class PilotDatasetBasis(_Basis):
    project_ref: Ref
    pilot_base: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


class ScenarioBenchmarkBasis(_Basis):
    scenario_ref: Ref
    field: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,49}$")]


class FirstFilingBasis(_Basis):
    model_ref: Ref
    filing_no: Ref


class FirstPurchaseBasis(_Basis):
    model_ref: Ref
    vendor_entity_id: EntityId
    industry: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,49}$")]
    contract_no: Ref
    contract_fen: Fen
    rd_project: StrictBool
    # the contract date, on which the purchaser must not be affiliated with the vendor (art. 11 ¶2, art. 25);
    # absent, the date of the decision (submission, approval) stands in for it
    signed_on: date | None = None

    @property
    def document(self) -> str:
        return document_id(self.vendor_entity_id, self.contract_no)


class IndustryRolloutBasis(_Basis):
    project_ref: Ref
    deployment_cost_fen: Fen


Basis = (
    ComputePurchaseBasis
    | TrustedSpaceBasis
    | DatasetBenchmarkBasis
    | PilotDatasetBasis
    | ScenarioBenchmarkBasis
    | FirstFilingBasis
    | FirstPurchaseBasis
    | IndustryRolloutBasis
)

BASIS_MODELS: dict[str, type[_Basis]] = {
    "compute.purchase": ComputePurchaseBasis,
    "data.trusted_space": TrustedSpaceBasis,
    "data.dataset_benchmark": DatasetBenchmarkBasis,
    "data.pilot_dataset": PilotDatasetBasis,
    "scenario.benchmark": ScenarioBenchmarkBasis,
    "model.first_filing": FirstFilingBasis,
    "model.first_purchase": FirstPurchaseBasis,
    "model.industry_rollout": IndustryRolloutBasis,
}


def exclusive_keys(basis: _Basis) -> list[str]:
    """Keys besides the documents that only one award may hold: one first purchaser per (model, industry)."""
    if isinstance(basis, FirstPurchaseBasis):
        return [f"first_purchase:{basis.model_ref}:{basis.industry}"]
    return []


DOCUMENT_KINDS: tuple[str, ...] = ("invoice", "contract", "doc", "project", "dataset", "scenario", "filing", "model")
_OWN_KINDS = ("project", "dataset", "scenario", "filing", "model")  # issued by an authority or the applicant's own
_COUNTERPARTY = re.compile(r"^(?:invoice|contract|doc):(ent_[a-z0-9]{24}):([^\s:][^:]*)$")


def document_id(counterparty_entity_id: str, number: str) -> str:
    """A document with a counterparty is that counterparty plus its number, whatever kind it is called
    (POLICY.md, "A document is its counterparty plus its number"; art. 25)."""
    return f"doc:{counterparty_entity_id}:{number}"


def unknown_counterparty(document: str) -> str | None:
    """The `number:<no>` key recorded before 0015 that blocks `document` (any counterparty's document of
    that number), for a document with a counterparty; None for the others."""
    if not document.startswith("doc:"):
        return None
    return "number:" + document.split(":", 2)[2]


def external_document(basis_ref: str) -> tuple[str, str | None]:
    """An external award's `basis_ref` as a document and its counterparty (None for the applicant's own
    kinds). `invoice:`, `contract:` or `doc:` take `<counterparty entity>:<number>`; ValueError says what fits."""
    kind, _, reference = basis_ref.partition(":")
    if kind in ("invoice", "contract", "doc"):
        found = _COUNTERPARTY.match(basis_ref)
        if found is None:
            raise ValueError(
                f"a{'n' if kind == 'invoice' else ''} {kind} is named by its counterparty and its number: "
                f"`{kind}:<counterparty entity id>:<number>` (art. 25: one document, one award)"
            )
        return document_id(found[1], found[2]), found[1]
    if kind not in _OWN_KINDS or not reference:
        raise ValueError(f"basis_ref is `kind:reference` with kind one of {', '.join(DOCUMENT_KINDS)}")
    return basis_ref, None


def documents(basis: _Basis) -> list[str]:
    """The basis documents an application claims (each supports at most one award, art. 25), each once."""
    match basis:
        case ComputePurchaseBasis():
            return list(dict.fromkeys(p.document for p in basis.purchases))
        case TrustedSpaceBasis() | PilotDatasetBasis() | IndustryRolloutBasis():
            return [f"project:{basis.project_ref}"]
        case DatasetBenchmarkBasis():
            return [f"dataset:{basis.dataset_ref}", *dict.fromkeys(c.document for c in basis.contracts)]
        case ScenarioBenchmarkBasis():
            return [f"scenario:{basis.scenario_ref}"]
        case FirstFilingBasis():
            # once per filing number and once per model (art. 11 ¶1)
            return [f"filing:{basis.filing_no}", f"model:{basis.model_ref}"]
        case FirstPurchaseBasis():
            return [basis.document]
    raise AssertionError(f"no documents for {type(basis).__name__}")


def duplicates(basis: _Basis) -> list[tuple[str, list[int]]]:
    """Lines that list one document twice: (document, line indexes). An invoice's lines of different
    categories are that document's lines, not duplicates; the same invoice twice in one category, or the same
    contract twice, is (POLICY.md, "A document is claimed whole")."""
    seen: dict[tuple[str, str], list[int]] = {}
    if isinstance(basis, ComputePurchaseBasis):
        for index, line in enumerate(basis.purchases):
            seen.setdefault((line.document, line.category), []).append(index)
    elif isinstance(basis, DatasetBenchmarkBasis):
        for index, contract in enumerate(basis.contracts):
            seen.setdefault((contract.document, ""), []).append(index)
    return [(document, indexes) for (document, _), indexes in seen.items() if len(indexes) > 1]
