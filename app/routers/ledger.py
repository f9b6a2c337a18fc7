"""`/v1/ledger`: accounts, journal entries and the trial balance, for administrators and auditors. Read-only:
the ledger is written by the commands that move money, never over this router."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from pydantic import Field

from app.dependencies import AdminOrAuditorCaller, SessionDep
from app.errors import problem_responses
from app.pagination import Cursor, Page, PageDep, split_page
from app.schemas import ResponseModel, Rfc3339Time
from ledger.service import Balance, Entry, Ledger

router = APIRouter(prefix="/ledger", tags=["ledger"], responses=problem_responses(401, 403, 422))

_ACCOUNT_CURSOR: Cursor[str] = Cursor(str)
_ENTRY_CURSOR: Cursor[int] = Cursor(int)
AccountPrefix = Annotated[
    str | None,
    Query(
        max_length=200,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$",
        description="only accounts whose code is this or starts with this followed by ':'",
    ),
]


class AccountOut(ResponseModel):
    id: str
    code: str
    currency: str
    limit: Literal["debits_must_not_exceed_credits", "credits_must_not_exceed_debits"] | None
    debits_posted_fen: int
    credits_posted_fen: int
    debits_pending_fen: int
    credits_pending_fen: int
    available_fen: int = Field(description="for a limited account, what it can still give; else credits - debits")


class PostingOut(ResponseModel):
    account: str
    direction: Literal["debit", "credit"]
    phase: Literal["posted", "pending", "release"]
    amount_fen: int


class EntryOut(ResponseModel):
    id: str
    kind: str
    idempotency_key: str
    created_at: datetime
    pending_entry_id: str | None
    reverses_entry_id: str | None
    expires_at: datetime | None
    memo: str
    metadata: dict[str, Any]
    postings: list[PostingOut]
    chain_seq: int | None = Field(description="position in the hash chain; null until sealed (within a second)")
    prev_hash: str | None
    hash: str | None


class TrialBalanceOut(ResponseModel):
    as_of: datetime | None
    total_debits_fen: int
    total_credits_fen: int
    total_debits_pending_fen: int
    total_credits_pending_fen: int
    balanced: bool
    rows: list[AccountOut]


def _ledger(request: Request) -> Ledger:
    ledger: Ledger = request.app.state.ledger
    return ledger


def account_out(balance: Balance) -> AccountOut:
    return AccountOut(
        id=str(balance.account.id),
        code=balance.account.code,
        currency=balance.account.currency,
        limit=balance.account.limit,
        debits_posted_fen=balance.debits_posted_fen,
        credits_posted_fen=balance.credits_posted_fen,
        debits_pending_fen=balance.debits_pending_fen,
        credits_pending_fen=balance.credits_pending_fen,
        available_fen=balance.available_fen,
    )


def entry_out(entry: Entry) -> EntryOut:
    return EntryOut(
        id=str(entry.id),
        kind=entry.kind,
        idempotency_key=entry.idempotency_key,
        created_at=entry.created_at,
        pending_entry_id=None if entry.pending_entry_id is None else str(entry.pending_entry_id),
        reverses_entry_id=None if entry.reverses_entry_id is None else str(entry.reverses_entry_id),
        expires_at=entry.expires_at,
        memo=entry.memo,
        metadata=entry.metadata,
        postings=[
            PostingOut(account=p.account, direction=p.direction, phase=p.phase, amount_fen=p.amount_fen)
            for p in entry.postings
        ],
        chain_seq=entry.chain_seq,
        prev_hash=None if entry.prev_hash is None else entry.prev_hash.hex(),
        hash=None if entry.hash is None else entry.hash.hex(),
    )


@router.get("/accounts", summary="Accounts with their balances, ordered by code")
async def list_accounts(
    request: Request,
    session: SessionDep,
    _caller: AdminOrAuditorCaller,
    page: PageDep,
    prefix: AccountPrefix = None,
) -> Page[AccountOut]:
    after = _ACCOUNT_CURSOR.decode(page.cursor) if page.cursor else None
    conn = await session.connection()
    rows = await _ledger(request).balances(conn, prefix=prefix, after_code=after, limit=page.limit + 1)
    rows, next_cursor = split_page(rows, page.limit, lambda b: _ACCOUNT_CURSOR.encode(b.account.code))
    return Page(data=[account_out(b) for b in rows], next_cursor=next_cursor)


@router.get("/entries", summary="Journal entries with their postings and seals, oldest first")
async def list_entries(
    request: Request,
    session: SessionDep,
    _caller: AdminOrAuditorCaller,
    page: PageDep,
    account_prefix: AccountPrefix = None,
) -> Page[EntryOut]:
    after = _ENTRY_CURSOR.decode(page.cursor) if page.cursor else None
    conn = await session.connection()
    rows = await _ledger(request).entries(conn, after_id=after, limit=page.limit + 1, account_prefix=account_prefix)
    rows, next_cursor = split_page(rows, page.limit, lambda e: _ENTRY_CURSOR.encode(e.id))
    return Page(data=[entry_out(e) for e in rows], next_cursor=next_cursor)


@router.get("/entries/{entry_id}", summary="One journal entry", responses=problem_responses(404))
async def get_entry(
    request: Request,
    session: SessionDep,
    _caller: AdminOrAuditorCaller,
    entry_id: Annotated[int, Path(ge=1, le=2**63 - 1)],
) -> EntryOut:
    conn = await session.connection()
    return entry_out(await _ledger(request).entry(conn, entry_id))


@router.get("/trial-balance", summary="Every account's totals and the sums of all debits and credits")
async def trial_balance(
    request: Request,
    session: SessionDep,
    _caller: AdminOrAuditorCaller,
    as_of: Annotated[Rfc3339Time | None, Query(description="RFC 3339 with an offset; default now")] = None,
) -> TrialBalanceOut:
    conn = await session.connection()
    trial = await _ledger(request).trial_balance(conn, as_of=as_of)
    return TrialBalanceOut(
        as_of=trial.as_of,
        total_debits_fen=trial.total_debits_fen,
        total_credits_fen=trial.total_credits_fen,
        total_debits_pending_fen=trial.total_debits_pending_fen,
        total_credits_pending_fen=trial.total_credits_pending_fen,
        balanced=(
            trial.total_debits_fen == trial.total_credits_fen
            and trial.total_debits_pending_fen == trial.total_credits_pending_fen
        ),
        rows=[account_out(b) for b in trial.rows],
    )
