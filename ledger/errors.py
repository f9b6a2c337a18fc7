"""Ledger errors. They know nothing of HTTP: app/errors.py maps each `code` to a status.

Two families: a `Refusal` is a durable business outcome (the request was well formed and the ledger said
no; the refusal is recorded under the idempotency key, so the caller commits and a retry is refused again),
every other `LedgerError` means the request itself was wrong and nothing was written.
"""

from __future__ import annotations


class LedgerError(Exception):
    code = "ledger_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidEntry(LedgerError):
    """Malformed request: fewer than two postings, an amount that is not a positive integer, unbalanced."""

    code = "invalid_entry"


class AccountNotFound(LedgerError):
    code = "account_not_found"


class AccountExists(LedgerError):
    """An account with this code exists with a different currency or limit."""

    code = "account_exists"


class EntryNotFound(LedgerError):
    code = "entry_not_found"


class NotReversible(LedgerError):
    code = "not_reversible"


class IdempotencyConflict(LedgerError):
    """The key was used before for a different request."""

    code = "idempotency_conflict"


class AppendOnlyViolation(LedgerError):
    code = "append_only"


class Refusal(LedgerError):
    """A durable refusal: recorded with the idempotency key in the caller's transaction."""

    code = "refused"


class LimitExceeded(Refusal):
    code = "limit_exceeded"


class PendingExpired(Refusal):
    code = "pending_expired"


class PendingResolved(Refusal):
    code = "pending_resolved"


class AlreadyReversed(Refusal):
    code = "already_reversed"


REFUSALS: dict[str, type[Refusal]] = {
    cls.code: cls for cls in (LimitExceeded, PendingExpired, PendingResolved, AlreadyReversed)
}
