"""Award arithmetic, pure: what POLICY.md says an application is owed. No I/O, no clock, no database.

Every amount is integer fen. A rate is applied once, to the total it governs, and floored to the fen:
a fiscal payer never pays a fraction it does not owe (POLICY.md, Conventions).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

from vouchers.programs import ProgramDefinition

SHANGHAI = ZoneInfo("Asia/Shanghai")


def share_of(amount_fen: int, rate_bp: int) -> int:
    """rate_bp of amount_fen, floored to the fen: a payer never pays a fraction it does not owe."""
    assert amount_fen >= 0 and 0 <= rate_bp <= 10_000
    return amount_fen * rate_bp // 10_000


def exceeds(amount_fen: int, threshold_fen: int | None) -> bool:
    """ "超过" is strictly greater: exactly the threshold does not qualify."""
    return threshold_fen is None or amount_fen > threshold_fen


def program_year(moment: datetime) -> int:
    """The calendar year in Asia/Shanghai: 2027-12-31T16:30:00Z is 2028-01-01 00:30 in Guangzhou."""
    assert moment.tzinfo is not None, "an instant, not a wall-clock time"
    return moment.astimezone(SHANGHAI).year


def year_end(year: int) -> datetime:
    """The first instant after `year` in Asia/Shanghai: when that year's vouchers expire."""
    return datetime(year + 1, 1, 1, tzinfo=SHANGHAI).astimezone(UTC)


def approval_timing(year: int, moment: datetime) -> Literal["not_started", "open", "closed"]:
    """Whether an award for program year `year` may be approved at `moment`: only inside that year
    (Asia/Shanghai). Not before 1 January: art. 8 sizes it on 上一年度 purchases, a total not known until
    that year is over; not after 31 December: nothing is issued for a year that has ended."""
    current = program_year(moment)
    if current < year:
        return "not_started"
    return "open" if current == year else "closed"


def voucher_expiry(year: int, issued_at: datetime, min_validity_days: int) -> datetime:
    """When a voucher of program year `year` issued at `issued_at` expires: the end of its year or
    `min_validity_days` days (of 24 hours: Shanghai keeps no summer time) after the issue instant, whichever
    is later, so one issued in late December can still be spent (POLICY.md, "A voucher is valid long enough
    to use"). The floor is rounded up to a whole second: never less than the days, and a token's `exp`
    (whole seconds) can end exactly with its voucher. Unspent value still returns to the `year` budget."""
    assert issued_at.tzinfo is not None, "an instant, not a wall-clock time"
    assert min_validity_days >= 0
    whole_second = issued_at.replace(microsecond=0) + timedelta(seconds=1 if issued_at.microsecond else 0)
    return max(year_end(year), (whole_second + timedelta(days=min_validity_days)).astimezone(UTC))


def within_term(year: int, term_from: date, term_to: date) -> bool:
    """Art. 28: nothing is issued for a year outside the policy term."""
    return term_from.year <= year <= term_to.year


@dataclass(frozen=True, slots=True)
class Cap:
    cap_fen: int
    applies_to: str
    reason: str


def cap_for(program: ProgramDefinition, *, tags: Iterable[str] = (), uplift: bool = False) -> Cap:
    """The cap that governs an award, and why: the program's, raised by a tag (art. 8 "可适当放宽"), or the
    uplifted one (art. 11 ¶3)."""
    if uplift:
        assert program.uplift is not None
        return Cap(program.uplift.cap_fen, program.cap_applies_to, f"uplifted cap ({program.uplift.flag})")
    held = set(tags)
    raised = [r for r in program.raised_caps if held & set(r.tags)]
    if raised:
        best = max(raised, key=lambda r: r.cap_fen)
        return Cap(best.cap_fen, program.cap_applies_to, f"raised cap for {', '.join(sorted(held & set(best.tags)))}")
    return Cap(program.cap_fen, program.cap_applies_to, "program cap")


def award_rate_bp(program: ProgramDefinition, *, uplift: bool = False) -> int:
    if uplift:
        assert program.uplift is not None
        return program.uplift.rate_bp
    assert program.rate_bp is not None, f"{program.code} has no rate: its award is set by reviewers"
    return program.rate_bp


@dataclass(frozen=True, slots=True)
class Award:
    eligible_fen: int
    award_fen: int
    rule: str


def rate_award(
    program: ProgramDefinition,
    eligible_fen: int,
    *,
    tags: Iterable[str] = (),
    uplift: bool = False,
    already_fen: int = 0,
) -> Award:
    """A rate program's award: nothing unless the eligible total exceeds the threshold; else the rate of
    the total, floored once, at most the cap, less what the cap's holder already has (`already_fen`,
    for caps per entity-year and for top-ups)."""
    assert eligible_fen >= 0 and already_fen >= 0
    rate = award_rate_bp(program, uplift=uplift)
    cap = cap_for(program, tags=tags, uplift=uplift)
    if not exceeds(eligible_fen, program.threshold_fen):
        return Award(
            eligible_fen, 0, f"eligible {eligible_fen} fen does not exceed the threshold of {program.threshold_fen} fen"
        )
    entitlement = min(cap.cap_fen, share_of(eligible_fen, rate))
    award = max(0, entitlement - already_fen)
    rule = (
        f"{rate / 100:g}% of {eligible_fen} fen floored = {share_of(eligible_fen, rate)} fen; "
        f"{cap.reason} {cap.cap_fen} fen per {cap.applies_to}; entitlement {entitlement} fen"
    )
    if already_fen:
        rule += f"; {already_fen} fen already issued this year"
    return Award(eligible_fen, award, rule)


def reviewer_award(
    program: ProgramDefinition, requested_fen: int, *, tags: Iterable[str] = (), already_fen: int = 0
) -> Award:
    """A reviewer-set award: the reviewer's figure, never above the cap (less what the holder has)."""
    assert requested_fen >= 0 and already_fen >= 0
    cap = cap_for(program, tags=tags)
    room = max(0, cap.cap_fen - already_fen)
    return Award(
        requested_fen,
        min(requested_fen, room),
        f"set by reviewers; {cap.reason} {cap.cap_fen} fen per {cap.applies_to}",
    )
