"""Program definitions: the eight sub-measures of arts. 8-11 as versioned data (definitions/programs.toml).

A definition is immutable once published: the next year's notice adds a version with a later `from_year`.
The version that governs a program-year is the highest one whose `from_year` is not after that year.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
import typing
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFINITIONS_FILE = Path(__file__).with_name("definitions") / "programs.toml"

ProgramCode = Literal[
    "compute.purchase",
    "data.trusted_space",
    "data.dataset_benchmark",
    "data.pilot_dataset",
    "scenario.benchmark",
    "model.first_filing",
    "model.first_purchase",
    "model.industry_rollout",
]
PROGRAM_CODES: tuple[str, ...] = typing.get_args(ProgramCode)
VoucherType = Literal["compute", "data", "scenario", "model"]
Category = Literal[
    "compute",
    "storage",
    "network",
    "security",
    "dataset",
    "model_purchase",
    "private_deployment",
    "cloud_deployment",
    "api_calls",
    "other",
]
Fen = int
BasisPoints = int


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class RaisedCap(_Strict):
    tags: list[str] = Field(min_length=1)
    cap_fen: Fen = Field(gt=0)


class Uplift(_Strict):
    flag: str
    rate_bp: BasisPoints = Field(gt=0, le=10_000)
    cap_fen: Fen = Field(gt=0)


class Redemption(_Strict):
    rate_bp: BasisPoints = Field(gt=0, le=10_000)
    uplift_rate_bp: BasisPoints | None = Field(default=None, gt=0, le=10_000)
    categories: list[Category] = Field(min_length=1)
    non_affiliated: bool
    named_vendor_only: bool


class ProgramDefinition(_Strict):
    code: ProgramCode
    version: int = Field(ge=1)
    from_year: int = Field(ge=2000, le=2100)
    article: str
    name: str
    voucher_type: VoucherType
    mode: Literal["voucher", "payout"]
    award: Literal["rate", "reviewer"]
    rate_bp: BasisPoints | None = Field(default=None, gt=0, le=10_000)
    cap_fen: Fen = Field(gt=0)
    cap_applies_to: Literal["entity_year", "project", "dataset", "contract", "scenario", "filing"]
    raised_caps: list[RaisedCap] = []
    uplift: Uplift | None = None
    threshold_fen: Fen | None = Field(default=None, ge=0)
    basis_period: Literal["previous_year"] | None = None
    eligible_categories: list[Category] = []
    non_affiliated: bool = False
    top_up: bool = False
    automatic_for_tags: list[str] = []
    awards_per_year_max: int | None = Field(default=None, ge=1)
    scenario_fields: list[str] = []
    # the budget is held on the ledger through the notice, and a hold lasts at most 31 days
    notice_days: int = Field(default=0, ge=0, le=21)
    expiry: Literal["year_end"] | None = None
    redemption: Redemption | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ProgramDefinition:
        if (self.award == "rate") != (self.rate_bp is not None):
            raise ValueError(f"{self.code}: a rate program has rate_bp, a reviewer-set one has none")
        if (self.mode == "voucher") != (self.redemption is not None and self.expiry is not None):
            raise ValueError(f"{self.code}: a voucher program says how it is redeemed and when it expires")
        if self.uplift is not None and self.redemption is not None and self.redemption.uplift_rate_bp is None:
            raise ValueError(f"{self.code}: an uplifted award is redeemed at the uplifted rate too")
        return self

    def content_hash(self) -> bytes:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).digest()


class PolicySettings(_Strict):
    term_from: date
    term_to: date
    appropriation_max_fen: Fen = Field(gt=0)
    timezone: Literal["Asia/Shanghai"]
    # POLICY.md, "Basis documents, sanctions and timing": no new award for this many years after a
    # misconduct decision (art. 25), and a voucher stays spendable at least this many days after issue
    sanction_years: int = Field(default=3, ge=1, le=20)
    min_validity_days: int = Field(default=90, ge=0, le=366)


class DefinitionFile(_Strict):
    policy: PolicySettings
    program: list[ProgramDefinition]

    @model_validator(mode="after")
    def _unique_versions(self) -> DefinitionFile:
        seen: set[tuple[str, int]] = set()
        for program in self.program:
            key = (program.code, program.version)
            if key in seen:
                raise ValueError(f"{program.code} version {program.version} is defined twice")
            seen.add(key)
        missing = set(PROGRAM_CODES) - {p.code for p in self.program}
        if missing:
            raise ValueError(f"no definition for {', '.join(sorted(missing))}")
        return self


def load_file(path: Path = DEFINITIONS_FILE) -> DefinitionFile:
    with path.open("rb") as handle:
        raw = tomllib.load(handle)
    # TOML dates arrive as datetime.date; strict mode accepts them as they are
    return DefinitionFile.model_validate(raw)


def governing(definitions: Sequence[ProgramDefinition], code: str, year: int) -> ProgramDefinition | None:
    """The version of `code` in force for `year`: the highest whose from_year is not after it."""
    candidates = [d for d in definitions if d.code == code and d.from_year <= year]
    return max(candidates, key=lambda d: d.version, default=None)
