"""Unified social credit codes (GB 32100-2015, POLICY.md art. 25): valid and invalid cases, exhaustively."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vouchers.uscc import ALPHABET, InvalidUscc, check_character, make_uscc, normalise, parse_uscc

TIANHE = "91440106MA59AB12CX"  # 天河区, Guangzhou
SHENZHEN = "91440300MA5DABCDEU"


@pytest.mark.parametrize(
    ("raw", "code", "division", "guangzhou"),
    [
        (TIANHE, TIANHE, "440106", True),
        (SHENZHEN, SHENZHEN, "440300", False),
        ("91440106ma59ab12cx", TIANHE, "440106", True),
        ("  91440106MA59AB12CX\t\n", TIANHE, "440106", True),
        (" 91440300ma5dabcdeu ", SHENZHEN, "440300", False),
        (make_uscc("440100", body="000000000"), make_uscc("440100", body="000000000"), "440100", True),
        (make_uscc("440183", body="ABCDEFGHJ"), make_uscc("440183", body="ABCDEFGHJ"), "440183", True),
        (make_uscc("110105", body="MA01XY312"), make_uscc("110105", body="MA01XY312"), "110105", False),
        (make_uscc("044010", body="123456789"), make_uscc("044010", body="123456789"), "044010", False),
    ],
)
def test_valid_codes(raw: str, code: str, division: str, guangzhou: bool) -> None:
    uscc = parse_uscc(raw)
    assert uscc.code == code == str(uscc)
    assert uscc.division_code == division
    assert uscc.guangzhou_registered is guangzhou


def test_the_check_character_of_the_policy_examples() -> None:
    assert check_character(TIANHE[:17]) == "X"
    assert check_character(SHENZHEN[:17]) == "U"


@pytest.mark.parametrize(
    "raw",
    [
        "",
        " ",
        TIANHE[:17],
        TIANHE + "0",
        TIANHE[:-1],
        TIANHE[:10] + " " + TIANHE[10:17],  # a space inside is not whitespace to trim
        "91440106MA59AB12C X",
        "9144010６MA59AB12CX",  # a full-width digit
        "91440106MA59AB12CＸ",
        "91440106MA59AB12C-",
        "x" * 10_000,
    ],
)
def test_malformed_codes(raw: str) -> None:
    with pytest.raises(InvalidUscc) as caught:
        parse_uscc(raw)
    assert caught.value.code == "invalid_uscc"
    assert len(caught.value.detail) < 300  # a long input is not echoed whole


@pytest.mark.parametrize("letter", ["I", "O", "S", "V", "Z", "i", "o", "s", "v", "z"])
@pytest.mark.parametrize("position", [0, 8, 16, 17])
def test_letters_outside_the_alphabet(letter: str, position: int) -> None:
    raw = TIANHE[:position] + letter + TIANHE[position + 1 :]
    with pytest.raises(InvalidUscc, match=f"character {position + 1}"):
        parse_uscc(raw)


@pytest.mark.parametrize("example", [TIANHE, SHENZHEN])
def test_every_single_character_corruption_is_refused(example: str) -> None:
    """The weights are chosen so that any one substituted character changes the check: try them all."""
    refused = 0
    for position in range(18):
        for character in ALPHABET:
            if character == example[position]:
                continue
            with pytest.raises(InvalidUscc):
                parse_uscc(example[:position] + character + example[position + 1 :])
            refused += 1
    assert refused == 18 * (len(ALPHABET) - 1)


def test_normalise() -> None:
    assert normalise("  91440106ma59ab12cx  ") == TIANHE
    assert normalise(TIANHE) == TIANHE


_first_17 = st.text(alphabet=ALPHABET, min_size=17, max_size=17)


@given(first_17=_first_17, other=st.sampled_from(ALPHABET))
def test_a_code_with_its_check_character_is_valid_and_any_other_is_not(first_17: str, other: str) -> None:
    code = first_17 + check_character(first_17)
    assert parse_uscc(code).code == code
    assert parse_uscc(code.lower()).code == code
    if other != code[-1]:
        with pytest.raises(InvalidUscc, match="check character"):
            parse_uscc(first_17 + other)


@given(first_17=_first_17, position=st.integers(0, 16), other=st.sampled_from(ALPHABET))
def test_a_substituted_character_is_caught(first_17: str, position: int, other: str) -> None:
    code = first_17 + check_character(first_17)
    corrupted = code[:position] + other + code[position + 1 :]
    if corrupted != code:
        with pytest.raises(InvalidUscc):
            parse_uscc(corrupted)


def test_make_uscc() -> None:
    assert make_uscc(body="MA59AB12C") == TIANHE
    assert make_uscc("440300", body="MA5DABCDE") == SHENZHEN
    random_codes = {make_uscc() for _ in range(50)}
    assert len(random_codes) == 50
    assert all(parse_uscc(code).division_code == "440106" for code in random_codes)
    for bad in [{"division": "4401"}, {"body": "short"}, {"body": "MA59AB12I"}, {"prefix": "9"}]:
        with pytest.raises(ValueError):
            make_uscc(**bad)  # type: ignore[arg-type]
