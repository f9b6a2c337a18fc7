"""Journal exports an auditor takes away: JSON lines with a signed manifest, CSV, and an hledger journal.

Pure and offline (no database, no HTTP): the service feeds sealed entries in chain order, as
`ledger.service._ENTRY_COLUMNS` gives them, and `verify_export` checks a JSON-lines export with nothing but
the file and, for the signature, the JWKS the auditor trusts.

JSON lines (`jsonl`): one sealed entry per line, then one manifest line.

- An entry line holds every field of the entry's canonical form (`ledger.chain`), with postings as
  `{"account", "debit_fen", "credit_fen", "phase"}` (exactly one of the two amounts is positive), plus
  `prev_hash` and `hash` in hex. From the line alone `hash = SHA-256(prev_hash || canonical form)`
  recomputes.
- The manifest (`"type": "manifest"`) counts the entries, names the chain range and the first and last
  hash, the SHA-256 of every byte before it, the filters, whether the export is one contiguous stretch of
  the chain (`contiguous`), and the `kid` of the Ed25519 key whose signature (`signature`, base64url) covers
  the manifest's canonical JSON without `signature`.
- A contiguous export (no program, entity or account filter) links: consecutive `chain_seq`, and each
  `prev_hash` is the hash of the line before. A filtered export is a selection: each entry's hash still
  recomputes from its own `prev_hash`, `chain_seq` increases and consecutive seals link, and every entry
  matches the filters the manifest declares (offline, an entry that touches a voucher's account may match
  any program or entity: the voucher's program and holder are in the database). Entries left out cannot be
  told from entries deleted except through the manifest's count and digest, which its signature protects.
- CSV cells are text or integers. A text cell that begins with `=`, `+`, `-`, `@`, a tab or a carriage
  return (a spreadsheet formula, OWASP "CSV Injection") or with `'` is written with one `'` before it;
  integers (`chain_seq`, `debit_fen`, `credit_fen`: never negative) are written as bare numbers.
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import io
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ledger import chain
from ledger.money import format_yuan

FORMAT = "voucher-ledger-journal/1"
SHANGHAI = timezone(timedelta(hours=8), "Asia/Shanghai")  # no daylight saving since 1991
CSV_HEADER = (
    "entry_id",
    "chain_seq",
    "created_at",
    "kind",
    "account",
    "debit_fen",
    "credit_fen",
    "phase",
    "memo",
    "hash",
)
FILTER_NAMES = ("from", "to", "program", "entity_id", "account_prefix")
# filters that select entries out of the chain (a time range keeps a contiguous stretch of it)
SELECTING_FILTERS = ("program", "entity_id", "account_prefix")
_PHASES = ("posted", "pending", "release")
_ENTRY_KEYS = (
    "chain_seq",
    "id",
    "kind",
    "idempotency_key",
    "pending_entry_id",
    "reverses_entry_id",
    "expires_at",
    "created_at",
    "memo",
    "metadata",
    "postings",
    "prev_hash",
    "hash",
)


# -- one sealed entry -------------------------------------------------------------------------------------


def _hex(value: Any) -> str:
    return value.hex() if isinstance(value, bytes | bytearray | memoryview) else str(value)


def _optional_id(value: Any) -> str | None:
    return None if value is None else str(value)


def entry_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """The export's form of a sealed entry, from a row as `_ENTRY_COLUMNS` gives it (metadata and postings
    as JSON text, hashes as bytes) or from the same fields already parsed."""
    if row.get("chain_seq") is None or row.get("hash") is None:
        raise ValueError(f"entry {row.get('id')} is not sealed; only sealed entries are exported")
    metadata = row["metadata"]
    if isinstance(metadata, str):
        metadata = json.loads(metadata)
    postings = row["postings"]
    if isinstance(postings, str):
        postings = json.loads(postings)
    out = []
    for posting in postings or ():
        if isinstance(posting, Mapping):
            account, direction, phase, amount = (
                posting["account"],
                posting["direction"],
                posting["phase"],
                posting["amount_fen"],
            )
        else:
            account, direction, phase, amount = posting
        amount = int(amount)
        out.append(
            {
                "account": account,
                "debit_fen": amount if direction == "debit" else 0,
                "credit_fen": amount if direction == "credit" else 0,
                "phase": phase,
            }
        )
    return {
        "chain_seq": int(row["chain_seq"]),
        "id": str(row["id"]),
        "kind": row["kind"],
        "idempotency_key": row["idempotency_key"],
        "pending_entry_id": _optional_id(row["pending_entry_id"]),
        "reverses_entry_id": _optional_id(row["reverses_entry_id"]),
        "expires_at": None if row["expires_at"] is None else chain.rfc3339(row["expires_at"]),
        "created_at": chain.rfc3339(row["created_at"]),
        "memo": row["memo"],
        "metadata": dict(metadata),
        "postings": out,
        "prev_hash": _hex(row["prev_hash"]),
        "hash": _hex(row["hash"]),
    }


def jsonl_line(record: Mapping[str, Any]) -> bytes:
    """One entry (an `entry_record`) as a JSON line, newline included."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


# A spreadsheet reads a cell that begins with one of these as a formula (OWASP "CSV Injection"); `'` is here
# too so that the escape can be undone: a text cell that begins with `'` had exactly one added.
CSV_ESCAPED_LEADS = ("=", "+", "-", "@", "\t", "\r", "'")


def csv_cell(value: Any) -> Any:
    """A cell as written: text that begins with a formula character (or `'`) gets a leading `'`, so no text
    cell can run as a formula; integers (chain_seq, the amounts, never negative) are written as numbers."""
    if isinstance(value, str):
        return "'" + value if value.startswith(CSV_ESCAPED_LEADS) else value
    assert type(value) is int, f"a csv cell is text or an integer, not {type(value).__name__}"
    return value


def csv_header() -> str:
    return _csv_rows([CSV_HEADER])


def csv_rows(record: Mapping[str, Any]) -> str:
    """One CSV row per posting (RFC 4180: CRLF, fields quoted when they need it), every cell through
    `csv_cell`."""
    return _csv_rows(
        [
            (
                record["id"],
                record["chain_seq"],
                record["created_at"],
                record["kind"],
                p["account"],
                p["debit_fen"],
                p["credit_fen"],
                p["phase"],
                record["memo"],
                record["hash"],
            )
            for p in record["postings"]
        ]
    )


def _csv_rows(rows: Iterable[Iterable[Any]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerows([csv_cell(value) for value in row] for row in rows)
    return buffer.getvalue()


def hledger_account(code: str) -> str:
    """An account code as an hledger account name. Codes are `[A-Za-z0-9._-]` parts joined by ':' (the
    ledger refuses anything else), which hledger reads as they are; anything hledger would misread (two
    spaces or a tab end the name, ';' starts a comment, brackets and parentheses mark virtual postings) is
    replaced by '_' defensively."""
    name = "".join(c if c.isalnum() or c in "._-:" else "_" for c in code)
    return name or "_"


def _one_line(text: str) -> str:
    """Free text for a description or comment: one line, no ';' (hledger's comment) and no '|' (its
    payee/note separator)."""
    return " ".join(text.replace(";", ",").replace("|", "/").split())


def hledger_header() -> str:
    return (
        f"; voucher-ledger journal export ({FORMAT}): amounts in CNY (yuan), dates in Asia/Shanghai.\n"
        "; Only posted postings move balances; pending and release postings (holds) are comments.\n"
        "commodity 1000.00 CNY\n\n"
    )


def hledger_transaction(record: Mapping[str, Any]) -> str:
    """One entry as an hledger transaction: date (Asia/Shanghai), `kind #id memo` as the description, the
    entry id, chain position and hash as tags, one posting line per posted posting (debits positive,
    credits negative, two decimals, CNY). Pending and release postings do not move balances: they are
    listed as comment lines (`; pending: debit account 12.34 CNY`)."""
    created = datetime.fromisoformat(record["created_at"]).astimezone(SHANGHAI)
    description = _one_line(f"{record['kind']} #{record['id']} {record['memo']}")
    lines = [
        f"{created:%Y-%m-%d} * {description}",
        f"    ; entry:{record['id']}, seq:{record['chain_seq']}, kind:{record['kind']}, "
        f"time:{record['created_at']}, hash:{record['hash']}",
    ]
    if record["idempotency_key"]:
        lines.append(f"    ; idempotency_key: {_one_line(record['idempotency_key'])}")
    for posting in record["postings"]:
        amount = posting["debit_fen"] - posting["credit_fen"]
        account = hledger_account(posting["account"])
        if posting["phase"] == "posted":
            lines.append(f"    {account}    {format_yuan(amount)} CNY")
        else:
            side = "debit" if posting["debit_fen"] else "credit"
            lines.append(f"    ; {posting['phase']}: {side} {account} {format_yuan(abs(amount))} CNY")
    return "\n".join(lines) + "\n\n"


# -- the manifest -------------------------------------------------------------------------------------------


class ManifestBuilder:
    """Folds the bytes of each exported line into the manifest: count, range, first and last hash, SHA-256."""

    def __init__(self, filters: Mapping[str, str | None]) -> None:
        self.filters = {name: filters.get(name) for name in FILTER_NAMES}
        self.contiguous = all(self.filters[name] is None for name in SELECTING_FILTERS)
        self._digest = hashlib.sha256()
        self.entries = 0
        self.first: dict[str, Any] | None = None
        self.last: dict[str, Any] | None = None

    def add(self, record: Mapping[str, Any], line: bytes) -> None:
        self._digest.update(line)
        self.entries += 1
        if self.first is None:
            self.first = {"chain_seq": record["chain_seq"], "hash": record["hash"], "prev_hash": record["prev_hash"]}
        self.last = {"chain_seq": record["chain_seq"], "hash": record["hash"]}

    def manifest(self, kid: str, created_at: datetime) -> dict[str, Any]:
        return {
            "type": "manifest",
            "format": FORMAT,
            "entries": self.entries,
            "first_chain_seq": None if self.first is None else self.first["chain_seq"],
            "last_chain_seq": None if self.last is None else self.last["chain_seq"],
            "first_prev_hash": None if self.first is None else self.first["prev_hash"],
            "first_hash": None if self.first is None else self.first["hash"],
            "last_hash": None if self.last is None else self.last["hash"],
            "sha256": self._digest.hexdigest(),
            "contiguous": self.contiguous,
            "filters": self.filters,
            "created_at": chain.rfc3339(created_at),
            "alg": "EdDSA",
            "kid": kid,
        }

    def signed_line(self, kid: str, key: Ed25519PrivateKey, created_at: datetime) -> bytes:
        return manifest_line(self.manifest(kid, created_at), key)


def canonical_manifest(manifest: Mapping[str, Any]) -> bytes:
    """What the signature covers: the manifest without `signature`, compact JSON, sorted keys, UTF-8."""
    body = {k: v for k, v in manifest.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def manifest_line(manifest: Mapping[str, Any], key: Ed25519PrivateKey) -> bytes:
    signed = {**manifest, "signature": _b64url(key.sign(canonical_manifest(manifest)))}
    return json.dumps(signed, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


# -- verification -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Report:
    """`ok`: every check that was run passed. `signature_verified`: the manifest's signature was one of them
    (a JWKS was given); without it anyone could have written the file, since SHA-256 and a manifest are
    easy to recompute."""

    ok: bool
    summary: str
    first_bad_line: int | None = None
    signature_verified: bool = False


class _Bad(Exception):
    def __init__(self, line: int, problem: str) -> None:
        super().__init__(f"line {line}: {problem}")
        self.line = line


def _canonical_from_record(record: Mapping[str, Any]) -> dict[str, Any]:
    postings = []
    for p in record["postings"]:
        debit, credit = p["debit_fen"], p["credit_fen"]
        if type(debit) is not int or type(credit) is not int or debit < 0 or credit < 0 or (debit > 0) == (credit > 0):
            raise ValueError("a posting has exactly one positive whole amount, debit_fen or credit_fen")
        if p["phase"] not in _PHASES:
            raise ValueError(f"unknown phase {p['phase']!r}")
        if not isinstance(p["account"], str):
            raise ValueError("an account is a code (text)")
        postings.append(
            {
                "account": p["account"],
                "direction": "debit" if debit else "credit",
                "phase": p["phase"],
                "amount_fen": debit or credit,
            }
        )
    if not isinstance(record["metadata"], dict):
        raise ValueError("metadata is a JSON object")
    return {
        "chain_seq": record["chain_seq"],
        "id": record["id"],
        "kind": record["kind"],
        "idempotency_key": record["idempotency_key"],
        "pending_entry_id": record["pending_entry_id"],
        "reverses_entry_id": record["reverses_entry_id"],
        "expires_at": None if record["expires_at"] is None else datetime.fromisoformat(record["expires_at"]),
        "memo": record["memo"],
        "metadata": record["metadata"],
        "created_at": datetime.fromisoformat(record["created_at"]),
        "postings": postings,
    }


def _check_entry(number: int, record: Any) -> tuple[int, bytes, bytes]:
    """(chain_seq, prev_hash, hash) of a sound entry line; `_Bad` naming what is wrong otherwise."""
    if not isinstance(record, dict) or set(record) != set(_ENTRY_KEYS):
        raise _Bad(number, "not an entry line (its fields are not those of an exported entry)")
    try:
        seq = record["chain_seq"]
        if type(seq) is not int or seq < 1:
            raise ValueError("chain_seq is a positive integer")
        prev, digest = bytes.fromhex(record["prev_hash"]), bytes.fromhex(record["hash"])
        if len(prev) != 32 or len(digest) != 32:
            raise ValueError("hashes are 32 bytes of hex")
        document = _canonical_from_record(record)
    except (TypeError, ValueError, KeyError) as exc:
        raise _Bad(number, f"malformed entry: {exc}") from None
    if len(document["postings"]) < 2:
        raise _Bad(number, f"entry {record['id']} has fewer than two postings")
    for phase in _PHASES:
        debits = sum(p["amount_fen"] for p in document["postings"] if p["phase"] == phase and p["direction"] == "debit")
        credits = sum(
            p["amount_fen"] for p in document["postings"] if p["phase"] == phase and p["direction"] == "credit"
        )
        if debits != credits:
            raise _Bad(number, f"entry {record['id']} does not balance: {phase} debits {debits} != credits {credits}")
    try:
        recomputed = chain.link_hash(prev, document)
    except (TypeError, ValueError) as exc:
        raise _Bad(number, f"malformed entry: {exc}") from None
    if recomputed != digest:
        raise _Bad(number, f"entry {record['id']} (seal {seq}) does not match its hash: it was altered")
    return seq, prev, digest


# -- the declared selection: what the manifest's filters say, against the entries themselves ---------------


def _account_prefixes(record: Mapping[str, Any]) -> set[str]:
    """The `account_prefix` values an entry matches, as the export reads them: each account it touches and
    every ancestor of it (`a` and `a:b` for `a:b:c`)."""
    found: set[str] = set()
    for posting in record["postings"]:
        parts = posting["account"].split(":")
        found.update(":".join(parts[:end]) for end in range(1, len(parts) + 1))
    return found


def _touches_a_voucher(record: Mapping[str, Any]) -> bool:
    return any(posting["account"].startswith("voucher:") for posting in record["postings"])


def _programs(record: Mapping[str, Any]) -> set[str] | None:
    """The `program` values an entry matches, as the export reads them: the program its metadata names and
    each whose `program:<code>:...` accounts it touches. None when it touches a voucher's account: the
    voucher's program is in the database, not in the export, so offline it may match any program."""
    if _touches_a_voucher(record):
        return None
    named = record["metadata"].get("program")
    # the export compares `metadata ->> 'program'`: a string as it is, any other scalar as its JSON text
    found = set() if named is None else {named if isinstance(named, str) else json.dumps(named)}
    for posting in record["postings"]:
        parts = posting["account"].split(":")
        if len(parts) >= 3 and parts[0] == "program":
            found.add(parts[1])
    return found


def _entities(record: Mapping[str, Any]) -> set[str] | None:
    """The `entity_id` values an entry matches, as the export reads them: each entity whose `entity:<id>`
    accounts it touches. None when it touches a voucher's account, whose holder is not in the export."""
    if _touches_a_voucher(record):
        return None
    found: set[str] = set()
    for posting in record["postings"]:
        parts = posting["account"].split(":")
        if len(parts) >= 2 and parts[0] == "entity":
            found.add(parts[1])
    return found


class _Selection:
    """Whether every entry matches one filter, folded in one pass before the filter is known (the manifest
    comes last): the values the first deciding entry matches, each with the first later entry that does not.
    Memory is bounded by that one entry however long the export."""

    def __init__(self, values: Callable[[Mapping[str, Any]], set[str] | None]) -> None:
        self._values = values
        self._first: tuple[int, str] | None = None  # (line, what) of the first entry that decides
        self._open: set[str] = set()  # values every deciding entry so far matches
        self._ruled_out: dict[str, tuple[int, str]] = {}
        self.undecided = 0  # entries whose match cannot be decided offline

    def add(self, number: int, record: Mapping[str, Any]) -> None:
        values = self._values(record)
        if values is None:
            self.undecided += 1
            return
        where = (number, f"entry {record['id']} (seal {record['chain_seq']})")
        if self._first is None:
            self._first, self._open = where, values
            return
        for value in self._open - values:
            self._ruled_out[value] = where
        self._open &= values

    def mismatch(self, value: str) -> tuple[int, str] | None:
        """(line, what) of the first entry that does not match `value`; None when every deciding one does."""
        if self._first is None or value in self._open:
            return None
        return self._ruled_out.get(value, self._first)


@dataclass(frozen=True, slots=True)
class _Declared:
    """A manifest's filters, read: `from`/`to` as instants, the selecting filters as given."""

    from_at: datetime | None
    to_at: datetime | None
    selecting: dict[str, str]  # the selecting filters that are set

    @property
    def contiguous(self) -> bool:
        return not self.selecting


def _declared(manifest: Mapping[str, Any]) -> _Declared | None:
    """The manifest's filters; None when they are missing or malformed."""
    filters = manifest.get("filters")
    if not isinstance(filters, dict) or set(filters) != set(FILTER_NAMES):
        return None
    if any(value is not None and not isinstance(value, str) for value in filters.values()):
        return None
    try:
        times = [None if filters[name] is None else datetime.fromisoformat(filters[name]) for name in ("from", "to")]
    except ValueError:
        return None
    if any(moment is not None and moment.tzinfo is None for moment in times):
        return None
    selecting = {name: filters[name] for name in SELECTING_FILTERS if filters[name] is not None}
    return _Declared(times[0], times[1], selecting)


@dataclass(slots=True)
class _Edge:
    """An end of the export: its line, chain position, hashes and creation time."""

    line: int
    seq: int
    prev: bytes
    digest: bytes
    created_at: str

    @property
    def what(self) -> str:
        return f"seal {self.seq}"


def _selection_problems(
    declared: _Declared, selections: Mapping[str, _Selection], first: _Edge | None, last: _Edge | None
) -> list[_Bad]:
    """Where the entries are not the selection the manifest declares. A time range keeps a contiguous
    stretch of the chain: from the first entry created at or after `from` (without `from`, the chain's
    first: seal 1) to the last created before `to`; entries inside it may be stamped a little outside the
    range (app/routers/exports.py), so a contiguous export's ends are what `from`/`to` bound, and a filtered
    export's entries, not being the stretch's ends, are bound by the filters alone."""
    problems: list[_Bad] = []
    if declared.contiguous and first is not None and last is not None:
        if declared.from_at is None and (first.seq != 1 or first.prev != chain.GENESIS_HASH):
            problems.append(
                _Bad(
                    first.line,
                    f"the manifest declares no `from`, so the export starts the chain at seal 1, but it starts at "
                    f"{first.what}: the entries before it are missing",
                )
            )
        if declared.from_at is not None and datetime.fromisoformat(first.created_at) < declared.from_at:
            problems.append(
                _Bad(
                    first.line,
                    f"{first.what}, the first entry, was created at {first.created_at}, before the declared "
                    f"`from` {chain.rfc3339(declared.from_at)}: the export is not the range its manifest declares",
                )
            )
        if declared.to_at is not None and datetime.fromisoformat(last.created_at) >= declared.to_at:
            problems.append(
                _Bad(
                    last.line,
                    f"{last.what}, the last entry, was created at {last.created_at}, not before the declared "
                    f"`to` {chain.rfc3339(declared.to_at)}: the export is not the range its manifest declares",
                )
            )
    for name, value in declared.selecting.items():
        found = selections[name].mismatch(value)
        if found is not None:
            line, what = found
            problems.append(
                _Bad(
                    line,
                    f"{what} does not match the declared {name} {value!r}: the export's entries are not the "
                    "selection its manifest declares",
                )
            )
    return problems


def _public_keys(jwks: Mapping[str, Any]) -> dict[str, Ed25519PublicKey]:
    found: dict[str, Ed25519PublicKey] = {}
    for jwk in jwks.get("keys", []) if isinstance(jwks, Mapping) else []:
        if not isinstance(jwk, Mapping) or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            continue
        try:
            found[str(jwk["kid"])] = Ed25519PublicKey.from_public_bytes(_b64url_decode(str(jwk["x"])))
        except (KeyError, ValueError, binascii.Error):
            continue
    return found


def _check_manifest(
    number: int,
    manifest: dict[str, Any],
    digest: str,
    count: int,
    first: _Edge | None,
    last: _Edge | None,
    jwks: Mapping[str, Any] | None,
) -> tuple[str, bool]:
    """A description of the signature check and whether it was made; `_Bad` when the manifest does not
    describe the lines before it."""

    def expect(name: str, value: Any) -> None:
        if manifest.get(name) != value:
            raise _Bad(number, f"manifest {name} is {manifest.get(name)!r} but the export has {value!r}")

    if manifest.get("format") != FORMAT:
        raise _Bad(number, f"unknown export format {manifest.get('format')!r} (expected {FORMAT})")
    expect("entries", count)
    expect("sha256", digest)
    expect("first_chain_seq", None if first is None else first.seq)
    expect("first_prev_hash", None if first is None else first.prev.hex())
    expect("first_hash", None if first is None else first.digest.hex())
    expect("last_chain_seq", None if last is None else last.seq)
    expect("last_hash", None if last is None else last.digest.hex())
    declared = _declared(manifest)
    if declared is None:
        raise _Bad(number, "manifest filters are missing or malformed")
    if manifest.get("contiguous") is not declared.contiguous:
        raise _Bad(number, "manifest says the export is contiguous, but it names a filter that selects entries")
    kid, signature = manifest.get("kid"), manifest.get("signature")
    if not isinstance(kid, str) or not isinstance(signature, str) or manifest.get("alg") != "EdDSA":
        raise _Bad(number, "manifest has no EdDSA signature and kid")
    if jwks is None:
        return f"signature not checked (signed by kid {kid})", False
    key = _public_keys(jwks).get(kid)
    if key is None:
        raise _Bad(number, f"manifest is signed by kid {kid}, which is not in the given JWKS")
    try:
        key.verify(_b64url_decode(signature), canonical_manifest(manifest))
    except (InvalidSignature, ValueError, binascii.Error):
        raise _Bad(number, f"manifest signature does not verify with kid {kid}: it was altered or re-signed") from None
    return f"signature verified (kid {kid})", True


def verify_export(lines: Iterable[bytes | str], jwks: Mapping[str, Any] | None) -> Report:
    """Check a JSON-lines export offline: each entry balances per phase and matches its hash; entries are in
    chain order, and consecutive seals link (each `prev_hash` the hash before it); a contiguous export has
    no gap; the entries are the selection the manifest declares (each matches its filters, and a contiguous
    export's ends are within `from`/`to`, or start the chain); the last line is a manifest whose counts,
    range and SHA-256 describe exactly the lines before it; and, given a JWKS, its signature verifies with
    the key its `kid` names (`Report.signature_verified`). Reads the lines once, in memory bounded by one
    entry; the report names the first bad line (1-based)."""
    hasher = hashlib.sha256()
    count = number = manifest_number = 0
    first: _Edge | None = None
    last: _Edge | None = None
    manifest: dict[str, Any] | None = None
    selections = {
        "account_prefix": _Selection(_account_prefixes),
        "program": _Selection(_programs),
        "entity_id": _Selection(_entities),
    }
    # The whole file is read (the manifest, last, says whether gaps are allowed and what was selected); the
    # first problem of each sort is kept and the earliest that counts is reported.
    broken: _Bad | None = None  # an unreadable, altered or misplaced line, or consecutive seals that do not link
    gap: _Bad | None = None  # seals missing between two entries: fatal unless the export is a filtered selection
    for raw in lines:
        number += 1
        data = raw.encode() if isinstance(raw, str) else raw
        try:
            if manifest is not None:
                raise _Bad(number, "a line after the manifest: something was appended")
            try:
                record = json.loads(data)
            except (ValueError, UnicodeDecodeError):
                raise _Bad(number, "not a JSON line") from None
            if isinstance(record, dict) and record.get("type") == "manifest":
                manifest, manifest_number = record, number
                continue
            if not data.endswith(b"\n"):
                raise _Bad(number, "an entry without its newline: the export is cut short")
            seq, prev, digest = _check_entry(number, record)
            if last is not None and seq <= last.seq:
                raise _Bad(number, f"seal {seq} after seal {last.seq}: entries are out of chain order")
        except _Bad as bad:
            broken = broken or bad
            continue
        if last is not None and seq == last.seq + 1 and prev != last.digest:
            # consecutive seals link in a selection too: one of the two was replaced by an entry hashed anew
            unlinked = f"seal {seq} does not link to seal {last.seq} before it: one of them was replaced"
            broken = broken or _Bad(number, unlinked)
        if last is not None and gap is None and seq != last.seq + 1:
            gap = _Bad(number, f"seal {seq} does not link to seal {last.seq} before it: an entry is missing")
        hasher.update(data)
        for selection in selections.values():
            selection.add(number, record)
        last = _Edge(number, seq, prev, digest, record["created_at"])
        first = first or last
        count += 1
    problems = [bad for bad in (broken, gap) if bad is not None]
    declared = None if manifest is None else _declared(manifest)
    if manifest is None:
        problems.append(_Bad(number + 1, "no manifest after the last entry: the export is cut short"))
    elif declared is not None:
        if not declared.contiguous and gap in problems:
            problems.remove(gap)
        problems += _selection_problems(declared, selections, first, last)
    try:
        if problems:
            raise min(problems, key=lambda bad: bad.line)
        assert manifest is not None
        signature_note, verified = _check_manifest(
            manifest_number, manifest, hasher.hexdigest(), count, first, last, jwks
        )
    except _Bad as bad:
        return Report(False, str(bad), bad.line)
    assert declared is not None
    span = "no entries" if first is None or last is None else f"seals {first.seq}..{last.seq}"
    if declared.contiguous:
        shape = "a contiguous chain"
    else:
        selected = ", ".join(f"{name} {value!r}" for name, value in declared.selecting.items())
        shape = f"a selection ({selected}), each entry matching it and its hash checked"
        undecided = max((selections[name].undecided for name in declared.selecting), default=0)
        if undecided:
            shape += (
                f" ({undecided} touch a voucher's account, whose program and holder are not in the export:"
                " only the signature vouches that they belong)"
            )
    return Report(True, f"sound: {count} entries ({span}), {shape}; {signature_note}", signature_verified=verified)
