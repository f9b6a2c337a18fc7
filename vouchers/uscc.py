"""Unified social credit codes (统一社会信用代码, GB 32100-2015): normalise, validate, read the division code.

Pure: no I/O. A code is 18 characters of `ALPHABET`: registration authority (1), organisation type (2),
administrative division (3-8), organisation code body (9-17) and a check character (18). Following
POLICY.md (art. 25) only the 18th character is checked; the embedded organisation code's own check digit is
not, nor are the authority and type characters (their tables change; the check character does not).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from vouchers.errors import VoucherError

__all__ = [
    "ALPHABET",
    "GUANGZHOU_DIVISION_PREFIX",
    "USCC_LENGTH",
    "WEIGHTS",
    "InvalidUscc",
    "Uscc",
    "check_character",
    "make_uscc",
    "normalise",
    "parse_uscc",
]

# GB 32100-2015: digits and upper-case letters without I, O, S, V, Z; a character's value is its index.
ALPHABET = "0123456789ABCDEFGHJKLMNPQRTUWXY"
WEIGHTS = (1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28)
USCC_LENGTH = 18
# Art. 25's proxy for "registered in the Guangzhou area": a division code under 4401 (广州市).
GUANGZHOU_DIVISION_PREFIX = "4401"
_VALUES = {character: value for value, character in enumerate(ALPHABET)}
_MODULUS = len(ALPHABET)
# a refusal quotes at most this much of what it was given
_QUOTED_LENGTH_MAX = 40

assert _MODULUS == 31 and len(WEIGHTS) == USCC_LENGTH - 1


class InvalidUscc(VoucherError):
    """Not a unified social credit code: wrong length, a character outside the alphabet, or a check
    character that does not match the first 17."""

    code = "invalid_uscc"


@dataclass(frozen=True, slots=True)
class Uscc:
    """A valid, normalised code."""

    code: str

    @property
    def division_code(self) -> str:
        """Characters 3-8: the administrative division of the registering authority."""
        return self.code[2:8]

    @property
    def guangzhou_registered(self) -> bool:
        return self.division_code.startswith(GUANGZHOU_DIVISION_PREFIX)

    def __str__(self) -> str:
        return self.code


def normalise(raw: str) -> str:
    """Surrounding whitespace dropped, upper case: what a clerk means when typing ` 91440106ma59ab12cx`."""
    return raw.strip().upper()


def check_character(first_17: str) -> str:
    """The check character that completes `first_17` (17 characters of the alphabet)."""
    assert len(first_17) == USCC_LENGTH - 1 and all(c in _VALUES for c in first_17), first_17
    total = sum(_VALUES[character] * weight for character, weight in zip(first_17, WEIGHTS, strict=True))
    return ALPHABET[(_MODULUS - total % _MODULUS) % _MODULUS]  # 31 - (sum mod 31), where 31 reads 0


def _quoted(raw: str) -> str:
    return repr(raw if len(raw) <= _QUOTED_LENGTH_MAX else raw[:_QUOTED_LENGTH_MAX] + "...")


def parse_uscc(raw: str) -> Uscc:
    """`raw` normalised and validated; `InvalidUscc` saying what is wrong otherwise."""
    code = normalise(raw)
    if len(code) != USCC_LENGTH:
        raise InvalidUscc(
            f"uscc {_quoted(raw)} is not a unified social credit code: it has {len(code)} characters, not {USCC_LENGTH}"
        )
    for position, character in enumerate(code, start=1):
        if character not in _VALUES:
            raise InvalidUscc(
                f"uscc {_quoted(raw)} is not a unified social credit code: character {position} ({character!r}) "
                f"is not one of {ALPHABET}"
            )
    expected = check_character(code[:-1])
    if code[-1] != expected:
        raise InvalidUscc(
            f"uscc {_quoted(raw)} is not a unified social credit code: its check character is {code[-1]!r}, "
            "the first 17 characters call for another (a typing error?)"
        )
    return Uscc(code)


def make_uscc(division: str = "440106", *, body: str | None = None, prefix: str = "91") -> str:
    """A valid code for `division` (default 天河区, Guangzhou): `prefix` (authority and type, 91 = an
    enterprise registered with market regulation), the division, `body` (9 characters; random when
    absent) and the check character. For fixtures and tests: a real code is issued, never made up."""
    if body is None:
        body = "".join(secrets.choice(ALPHABET) for _ in range(9))
    first_17 = prefix + division + body
    if len(prefix) != 2 or len(division) != 6 or len(body) != 9 or any(c not in _VALUES for c in first_17):
        raise ValueError("make_uscc needs a 2-character prefix, a 6-character division and a 9-character body")
    return first_17 + check_character(first_17)
