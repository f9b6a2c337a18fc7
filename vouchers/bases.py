"""The basis of an application, per program (API.md, "Application bases"), and the basis documents it
claims: the keys by which no double support (就高不重复, art. 25) is enforced.

A basis document is named `kind:reference` — `invoice:<provider entity>:<invoice no>`, `contract:<no>`,
`project:<ref>`, `dataset:<ref>`, `scenario:<ref>`, `filing:<no>`, `model:<ref>` — so that one document
claimed under two programs (a project under 9 ¶1 and under 11 ¶4, say) is recognised as the same one.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

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
        return f"invoice:{self.provider_entity_id}:{self.invoice_no}"


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


DocumentKind = Literal["invoice", "contract", "project", "dataset", "scenario", "filing", "model"]
DOCUMENT_KINDS: tuple[str, ...] = ("invoice", "contract", "project", "dataset", "scenario", "filing", "model")


def documents(basis: _Basis) -> list[str]:
    """The basis documents an application claims (each supports at most one award, art. 25)."""
    match basis:
        case ComputePurchaseBasis():
            return [p.document for p in basis.purchases]
        case TrustedSpaceBasis() | PilotDatasetBasis() | IndustryRolloutBasis():
            return [f"project:{basis.project_ref}"]
        case DatasetBenchmarkBasis():
            return [f"dataset:{basis.dataset_ref}"]
        case ScenarioBenchmarkBasis():
            return [f"scenario:{basis.scenario_ref}"]
        case FirstFilingBasis():
            # once per filing number and once per model (art. 11 ¶1)
            return [f"filing:{basis.filing_no}", f"model:{basis.model_ref}"]
        case FirstPurchaseBasis():
            return [f"contract:{basis.contract_no}"]
    raise AssertionError(f"no documents for {type(basis).__name__}")
