"""Money is an integer number of fen (分). 1 元 = 100 fen. No floats anywhere on the money path."""

from __future__ import annotations

FEN_PER_YUAN = 100
# Amounts live in BIGINT columns; any single amount above this is a bug, not a subsidy.
AMOUNT_MAX_FEN = 10**15


def is_amount(value: object) -> bool:
    """A positive whole number of fen (a bool is not an amount, though Python says it is an int)."""
    return type(value) is int and 0 < value <= AMOUNT_MAX_FEN


def format_yuan(amount_fen: int) -> str:
    """`1234567` -> `"12345.67"`: exact, for statements and plain-text exports."""
    sign = "-" if amount_fen < 0 else ""
    whole, fen = divmod(abs(amount_fen), FEN_PER_YUAN)
    return f"{sign}{whole}.{fen:02d}"
