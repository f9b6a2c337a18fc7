"""The award arithmetic, table by table, straight from POLICY.md."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vouchers.programs import DefinitionFile, ProgramDefinition, governing, load_file
from vouchers.rules import (
    cap_for,
    exceeds,
    program_year,
    rate_award,
    reviewer_award,
    share_of,
    within_term,
    year_end,
)

YUAN = 100
DEFINITIONS = load_file()


def program(code: str, year: int = 2026) -> ProgramDefinition:
    found = governing(DEFINITIONS.program, code, year)
    assert found is not None
    return found


@pytest.mark.parametrize(
    ("amount_fen", "rate_bp", "expected_fen"),
    [
        (33_333, 3000, 9_999),  # 30% of 333.33 元 = 99.99 元 (POLICY.md)
        (333, 4500, 149),  # 45% of 3.33 元 = 1.49 元: the uplift is one rate, applied once
        (1, 5000, 0),  # half a fen is not paid
        (3, 3333, 0),
        (100_000_001, 5000, 50_000_000),  # 50% of 1,000,000.01 元 floors to 500,000.00 元
        (0, 5000, 0),
        (10**15, 10_000, 10**15),
    ],
)
def test_share_of_floors_once(amount_fen: int, rate_bp: int, expected_fen: int) -> None:
    assert share_of(amount_fen, rate_bp) == expected_fen


@given(st.lists(st.integers(min_value=0, max_value=10**9), max_size=20), st.integers(min_value=0, max_value=10_000))
def test_rounding_on_the_total_never_pays_less_than_line_by_line(lines: list[int], rate_bp: int) -> None:
    # floored once on the total: at least the sum of the floored lines, less than one fen more per line
    total = share_of(sum(lines), rate_bp)
    by_line = sum(share_of(line, rate_bp) for line in lines)
    assert by_line <= total <= by_line + len(lines)
    assert total * 10_000 <= sum(lines) * rate_bp


@pytest.mark.parametrize(
    ("eligible_fen", "tags", "already_fen", "award_fen"),
    [
        (1_000_000 * YUAN, (), 0, 0),  # exactly 1,000,000.00 元 does not exceed the threshold
        (1_000_000 * YUAN + 1, (), 0, 50_000_000),  # one fen above: 50%, floored
        (2_000_000 * YUAN, (), 0, 100_000_000),
        (6_000_000 * YUAN, (), 0, 300_000_000),  # 50% = 3,000,000 元 = the cap
        (9_000_000 * YUAN, (), 0, 300_000_000),  # capped at 3,000,000 元
        (9_000_000 * YUAN, ("multimodal_foundation_model",), 0, 450_000_000),  # raised cap not reached
        (30_000_000 * YUAN, ("key_vertical_model",), 0, 1_000_000_000),  # raised cap 10,000,000 元
        (30_000_000 * YUAN, ("innovation_team",), 0, 300_000_000),  # other tags do not raise it
        (4_000_000 * YUAN, (), 150_000_000, 50_000_000),  # top-up: entitlement less what was issued
        (9_000_000 * YUAN, (), 300_000_000, 0),  # the year's entitlement is used up
        (9_000_000 * YUAN, (), 400_000_000, 0),  # never negative
    ],
)
def test_compute_entitlement(eligible_fen: int, tags: tuple[str, ...], already_fen: int, award_fen: int) -> None:
    award = rate_award(program("compute.purchase"), eligible_fen, tags=tags, already_fen=already_fen)
    assert award.award_fen == award_fen, award.rule
    assert award.eligible_fen == eligible_fen


@pytest.mark.parametrize(
    ("contract_fen", "uplift", "award_fen"),
    [
        (333, False, 99),  # 30% of 3.33 元
        (333, True, 149),  # 45% of 3.33 元 = 1.49 元
        (2_000_000 * YUAN, False, 60_000_000),
        (4_000_000 * YUAN, False, 100_000_000),  # capped at 1,000,000 元 per contract
        (3_000_000 * YUAN, True, 135_000_000),
        (4_000_000 * YUAN, True, 150_000_000),  # uplifted cap 1,500,000 元
    ],
)
def test_first_purchase_with_and_without_uplift(contract_fen: int, uplift: bool, award_fen: int) -> None:
    assert rate_award(program("model.first_purchase"), contract_fen, uplift=uplift).award_fen == award_fen


@pytest.mark.parametrize(
    ("code", "basis_fen", "award_fen"),
    [
        ("data.trusted_space", 5_000_000 * YUAN, 150_000_000),  # 30% of the investment
        ("data.trusted_space", 20_000_000 * YUAN, 300_000_000),  # at most 3,000,000 元 per project
        ("model.industry_rollout", 10_000_000 * YUAN, 300_000_000),
        ("model.industry_rollout", 20_000_000 * YUAN, 500_000_000),  # at most 5,000,000 元
    ],
)
def test_payout_rate_programs(code: str, basis_fen: int, award_fen: int) -> None:
    assert rate_award(program(code), basis_fen).award_fen == award_fen


@pytest.mark.parametrize(
    ("code", "requested_fen", "already_fen", "award_fen"),
    [
        ("data.dataset_benchmark", 80_000_000, 0, 80_000_000),
        ("data.dataset_benchmark", 120_000_000, 0, 100_000_000),  # 1,000,000 元 per dataset
        ("scenario.benchmark", 60_000_000, 0, 50_000_000),  # 500,000 元 per scenario
        ("model.first_filing", 100_000_000, 0, 100_000_000),
        ("data.pilot_dataset", 250_000_000, 0, 200_000_000),  # 2,000,000 元 per entity-year
        ("data.pilot_dataset", 150_000_000, 100_000_000, 100_000_000),  # what the entity holds counts
    ],
)
def test_reviewer_awards_never_exceed_the_cap(code: str, requested_fen: int, already_fen: int, award_fen: int) -> None:
    assert reviewer_award(program(code), requested_fen, already_fen=already_fen).award_fen == award_fen


def test_caps_say_what_they_apply_to() -> None:
    assert [
        cap_for(program(c)).applies_to
        for c in (
            "compute.purchase",
            "data.trusted_space",
            "data.dataset_benchmark",
            "model.first_purchase",
            "scenario.benchmark",
            "model.first_filing",
        )
    ] == ["entity_year", "project", "dataset", "contract", "scenario", "filing"]
    assert cap_for(program("model.first_purchase"), uplift=True).cap_fen == 150_000_000


def test_threshold_is_strict() -> None:
    assert not exceeds(100_000_000, 100_000_000)
    assert exceeds(100_000_001, 100_000_000)
    assert exceeds(0, None)


@pytest.mark.parametrize(
    ("moment", "year"),
    [
        (datetime(2027, 12, 31, 16, 30, tzinfo=UTC), 2028),  # 00:30 on 1 January in Guangzhou
        (datetime(2027, 12, 31, 15, 59, 59, tzinfo=UTC), 2027),
        (datetime(2027, 12, 31, 16, 0, tzinfo=UTC), 2028),
    ],
)
def test_years_are_asia_shanghai(moment: datetime, year: int) -> None:
    assert program_year(moment) == year


def test_year_end_and_term() -> None:
    assert year_end(2026) == datetime(2026, 12, 31, 16, 0, tzinfo=UTC)
    term = (DEFINITIONS.policy.term_from, DEFINITIONS.policy.term_to)
    assert term == (date(2026, 1, 1), date(2030, 12, 31))
    assert [y for y in range(2024, 2033) if within_term(y, *term)] == [2026, 2027, 2028, 2029, 2030]


def test_definitions_are_versioned_data() -> None:
    newer = program("compute.purchase").model_copy(update={"version": 2, "from_year": 2028, "rate_bp": 4000})
    definitions = [*DEFINITIONS.program, newer]
    assert governing(definitions, "compute.purchase", 2027).rate_bp == 5000  # type: ignore[union-attr]
    assert governing(definitions, "compute.purchase", 2028).rate_bp == 4000  # type: ignore[union-attr]
    assert governing(definitions, "compute.purchase", 2025) is None
    with pytest.raises(ValueError, match="defined twice"):
        DefinitionFile.model_validate(
            {"policy": DEFINITIONS.policy.model_dump(), "program": [p.model_dump() for p in DEFINITIONS.program] * 2}
        )
    with pytest.raises(ValueError, match="rate"):
        ProgramDefinition.model_validate({**program("data.trusted_space").model_dump(), "rate_bp": None})
