"""The hash chain: each sealed entry's hash is SHA-256 over the previous hash and the entry's canonical form.

Pure and self-contained, so an auditor's verifier can reproduce it from an export without the service.
The canonical form is compact JSON with sorted keys, UTF-8, integers for money, RFC 3339 UTC timestamps
with microseconds, ids as strings.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

GENESIS_HASH = bytes(32)


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical_entry(entry: Mapping[str, Any]) -> bytes:
    """`entry` holds: chain_seq, id, kind, idempotency_key, pending_entry_id, reverses_entry_id,
    expires_at, memo, metadata, created_at, postings (each with account, direction, phase, amount_fen)."""
    document = {
        "chain_seq": int(entry["chain_seq"]),
        "id": str(entry["id"]),
        "kind": entry["kind"],
        "idempotency_key": entry["idempotency_key"],
        "pending_entry_id": _id_or_none(entry["pending_entry_id"]),
        "reverses_entry_id": _id_or_none(entry["reverses_entry_id"]),
        "expires_at": _time_or_none(entry["expires_at"]),
        "memo": entry["memo"],
        "metadata": dict(entry["metadata"]),
        "created_at": _time_or_none(entry["created_at"]),
        "postings": [
            {
                "account": p["account"],
                "direction": p["direction"],
                "phase": p["phase"],
                "amount_fen": int(p["amount_fen"]),
            }
            for p in entry["postings"]
        ],
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def link_hash(prev_hash: bytes, entry: Mapping[str, Any]) -> bytes:
    return hashlib.sha256(prev_hash + canonical_entry(entry)).digest()


@dataclass(frozen=True, slots=True)
class ChainReport:
    ok: bool
    entries: int
    last_hash: bytes
    problem: str | None = None


def verify(sealed: Iterable[Mapping[str, Any]], start_hash: bytes = GENESIS_HASH, start_seq: int = 1) -> ChainReport:
    """Walk sealed entries in chain order; each carries `prev_hash` and `hash` besides its content."""
    prev = start_hash
    count = 0
    for entry in sealed:
        expected_seq = start_seq + count
        if int(entry["chain_seq"]) != expected_seq:
            return ChainReport(False, count, prev, f"expected seal {expected_seq}, found {entry['chain_seq']}")
        if bytes(entry["prev_hash"]) != prev:
            return ChainReport(False, count, prev, f"seal {expected_seq} does not link to the one before it")
        if link_hash(prev, entry) != bytes(entry["hash"]):
            return ChainReport(False, count, prev, f"seal {expected_seq}: entry {entry['id']} was altered")
        prev = bytes(entry["hash"])
        count += 1
    return ChainReport(True, count, prev)


def _id_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def _time_or_none(value: datetime | None) -> str | None:
    return None if value is None else rfc3339(value)
