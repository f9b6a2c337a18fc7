"""Pure posting arithmetic: building, checking and fingerprinting entries. No I/O."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from ledger.errors import InvalidEntry
from ledger.money import is_amount

Direction = Literal["debit", "credit"]
Phase = Literal["posted", "pending", "release"]
Kind = Literal["transfer", "pending", "post_pending", "void_pending", "expire_pending", "reversal"]
MetadataValue = str | int | bool | None
Metadata = Mapping[str, MetadataValue]

POSTINGS_MAX = 64
METADATA_KEYS_MAX = 32
METADATA_VALUE_LENGTH_MAX = 500
MEMO_LENGTH_MAX = 500
KEY_LENGTH_MAX = 255
# Keys the ledger writes for itself (hold expiry) start with "~"; callers cannot collide with them.
INTERNAL_KEY_PREFIX = "~"


@dataclass(frozen=True, slots=True)
class Posting:
    account: str
    direction: Direction
    amount_fen: int
    phase: Phase = "posted"


def debit(account: str, amount_fen: int, phase: Phase = "posted") -> Posting:
    return Posting(account, "debit", amount_fen, phase)


def credit(account: str, amount_fen: int, phase: Phase = "posted") -> Posting:
    return Posting(account, "credit", amount_fen, phase)


def check_postings(postings: Sequence[Posting]) -> None:
    """At least two postings, positive whole amounts, and debits equal credits within each phase."""
    if len(postings) < 2:
        raise InvalidEntry("an entry needs at least two postings")
    if len(postings) > POSTINGS_MAX:
        raise InvalidEntry(f"an entry has at most {POSTINGS_MAX} postings")
    balance: dict[str, int] = {}
    for posting in postings:
        if not is_amount(posting.amount_fen):
            raise InvalidEntry(f"amount_fen must be a positive whole number of fen, got {posting.amount_fen!r}")
        if posting.direction not in ("debit", "credit"):
            raise InvalidEntry(f"direction must be debit or credit, got {posting.direction!r}")
        if posting.phase not in ("posted", "pending", "release"):
            raise InvalidEntry(f"phase must be posted, pending or release, got {posting.phase!r}")
        if not isinstance(posting.account, str) or not posting.account:
            raise InvalidEntry("every posting names an account")
        signed = posting.amount_fen if posting.direction == "debit" else -posting.amount_fen
        balance[posting.phase] = balance.get(posting.phase, 0) + signed
    unbalanced = sorted(phase for phase, total in balance.items() if total != 0)
    if unbalanced:
        raise InvalidEntry(f"debits and credits differ in phase {', '.join(unbalanced)}")


def check_key(key: str) -> None:
    if not isinstance(key, str) or not 1 <= len(key) <= KEY_LENGTH_MAX:
        raise InvalidEntry(f"an idempotency key is 1 to {KEY_LENGTH_MAX} characters")
    if key.startswith(INTERNAL_KEY_PREFIX):
        raise InvalidEntry(f"idempotency keys starting with {INTERNAL_KEY_PREFIX!r} are the ledger's own")


def check_memo_and_metadata(memo: str, metadata: Metadata) -> None:
    if len(memo) > MEMO_LENGTH_MAX:
        raise InvalidEntry(f"memo is at most {MEMO_LENGTH_MAX} characters")
    if len(metadata) > METADATA_KEYS_MAX:
        raise InvalidEntry(f"metadata has at most {METADATA_KEYS_MAX} keys")
    for name, value in metadata.items():
        if not isinstance(name, str):
            raise InvalidEntry("metadata keys are strings")
        # floats are refused: they have no single canonical text, and the hash chain needs one
        if value is not None and not isinstance(value, str | int | bool):
            raise InvalidEntry(f"metadata {name!r}: values are strings, integers, booleans or null")
        if isinstance(value, str) and len(value) > METADATA_VALUE_LENGTH_MAX:
            raise InvalidEntry(f"metadata {name!r} is longer than {METADATA_VALUE_LENGTH_MAX} characters")


def request_hash(kind: Kind, fields: Mapping[str, object], postings: Iterable[Posting] = ()) -> bytes:
    """SHA-256 over a canonical form of what the caller asked for: the idempotency fingerprint."""
    document = {
        "kind": kind,
        "fields": dict(fields),
        "postings": [[p.account, p.direction, p.phase, p.amount_fen] for p in postings],
    }
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode()).digest()


def release_of(pending: Sequence[Posting]) -> list[Posting]:
    """The postings that give back everything a hold reserved."""
    return [Posting(p.account, p.direction, p.amount_fen, "release") for p in pending if p.phase == "pending"]


def posted_from_hold(pending: Sequence[Posting], amount_fen: int | None) -> list[Posting]:
    """What posting a hold moves for good: all of it, or `amount_fen` of a two-legged hold."""
    legs = [p for p in pending if p.phase == "pending"]
    total = sum(p.amount_fen for p in legs if p.direction == "debit")
    if amount_fen is None or amount_fen == total:
        return [Posting(p.account, p.direction, p.amount_fen, "posted") for p in legs]
    if not is_amount(amount_fen) or amount_fen > total:
        raise InvalidEntry(f"a hold of {total} fen can be posted for 1 to {total} fen, not {amount_fen!r}")
    if len(legs) != 2:
        raise InvalidEntry("only a hold with one debit and one credit can be posted in part")
    return [Posting(p.account, p.direction, amount_fen, "posted") for p in legs]


def reversal_of(original: Sequence[Posting]) -> list[Posting]:
    """The compensating postings: every posted movement of the original, the other way round."""
    return [
        Posting(p.account, "credit" if p.direction == "debit" else "debit", p.amount_fen, "posted")
        for p in original
        if p.phase == "posted"
    ]
