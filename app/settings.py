"""Settings from the environment: `DATABASE_URL` and everything else under the `VL_` prefix.

The README's settings table lists every field here; keep the two in step.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The roles of app/apikeys.py (tests/test_rate_limits.py checks the two agree; this module imports nothing
# of the app) and the rate-limited kinds of request (app/ratelimit.py).
RateRole = Literal["admin", "enterprise", "provider", "auditor"]
RateBucket = Literal["redemption", "export"]
RATE_ROLES: tuple[RateRole, ...] = ("admin", "enterprise", "provider", "auditor")
RATE_BUCKETS: tuple[RateBucket, ...] = ("redemption", "export")


class RateRule(BaseModel):
    """One key's allowance in one bucket: `rate_per_s` requests a second sustained, `burst` at once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate_per_s: float = Field(gt=0, le=1_000_000, allow_inf_nan=False)
    burst: int = Field(ge=1, le=1_000_000)


# app/ratelimit.py explains these figures: a provider key is never throttled below 10,000 redemptions/s
# (API.md promises 5,000), while a journal export, seconds to minutes of a connection and a core, is
# held to 6 a minute per key with a burst of 5.
RATE_LIMITS_DEFAULT: dict[RateRole, dict[RateBucket, RateRule]] = {
    role: {
        "redemption": RateRule(rate_per_s=10_000, burst=10_000),
        "export": RateRule(rate_per_s=0.1, burst=5),
    }
    for role in RATE_ROLES
}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VL_", extra="ignore")

    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_URL", "VL_DATABASE_URL"),
        description="postgresql+asyncpg://... of a PostgreSQL server; unset: start the embedded one",
    )
    data_dir: Path = Field(default=Path(".voucher-ledger"), description="folder of the embedded PostgreSQL")
    log_level: str = "INFO"
    # uvicorn's line per request: off by default, it cost a tenth of a worker's CPU under load (the journal
    # and /metrics are the record of what was done)
    access_log: bool = Field(default=False, description="log a line per HTTP request (uvicorn's access log)")
    db_pool_size: int = Field(default=20, ge=1, le=200)
    db_max_overflow: int = Field(default=10, ge=0, le=200)
    db_pool_timeout_s: float = Field(default=10.0, gt=0)
    # redemptions arriving while others are with the database go together, as one statement and one commit
    # (vouchers.redemption.RedeemBatcher); 1 and 1 send each alone
    redeem_batch_max: int = Field(default=32, ge=1, le=500, description="redemptions per database statement, at most")
    redeem_batches_in_flight: int = Field(
        default=4, ge=1, le=100, description="redemption statements out at once, per worker, before calls queue"
    )
    sealer_interval_s: float = Field(default=0.2, gt=0, le=60)
    sweeper_interval_s: float = Field(default=1.0, gt=0, le=3600)
    background_tasks: bool = Field(default=True, description="run the chain sealer and hold sweeper")
    automatic_interval_s: float = Field(default=60.0, gt=0, le=86_400, description="免申即享 pass interval")
    api_key_cache_ttl_s: float = Field(default=5.0, ge=0, le=300)
    page_limit_max: int = Field(default=500, ge=1, le=10_000)
    # POLICY.md, affiliated parties: X controls Y with equity strictly above this percent (or a control
    # relation); X influences Y with equity at or above the influence percent (and not above control).
    affiliation_control_pct: Decimal = Field(default=Decimal("50"), ge=0, le=100)
    affiliation_influence_pct: Decimal = Field(default=Decimal("20"), ge=0, le=100)
    # POLICY.md, "Affiliation looks back": parties affiliated on any day of the months before a date (that
    # date included) are affiliated on it; 0 checks the day alone
    affiliation_lookback_months: int = Field(default=12, ge=0, le=120)
    # art. 27: each year's appropriation funds the program budgets; at most 500,000,000 元 a year
    appropriation_fen: int = Field(default=50_000_000_000, gt=0, le=50_000_000_000)
    # the program definitions to publish at start-up (a later year's notice adds versions to this file)
    programs_file: Path | None = None
    # art. 28: the policy term; unset, the definitions file's (2026-01-01 to 2030-12-31)
    policy_term_from: date | None = None
    policy_term_to: date | None = None
    # voucher tokens (vouchers/keys.py, vouchers/tokens.py): the key-encryption key sealing the signing keys
    # (base64 or base64url of 32 bytes; unset: the file `kek` in data_dir, made 0600 on first start)
    key_encryption_key: SecretStr | None = Field(default=None, repr=False)
    token_issuer: str = Field(default="voucher-ledger", min_length=1, max_length=200)
    token_ttl_s: int = Field(default=86_400, ge=60, le=366 * 86_400, description="default token lifetime")
    # per-key rate limits (app/ratelimit.py), JSON in the environment, e.g.
    # VL_RATE_LIMITS='{"provider": {"redemption": {"rate_per_s": 20000, "burst": 20000}}}': what it names
    # replaces the default of that role and bucket, the rest keep theirs
    rate_limits: dict[RateRole, dict[RateBucket, RateRule]] = Field(
        default_factory=lambda: {role: dict(rules) for role, rules in RATE_LIMITS_DEFAULT.items()},
        description="per role, per bucket: {rate_per_s, burst}; merged over the defaults",
    )
    # the worker processes serving one listening socket: each enforces 1/workers of every rate, so a key's
    # limit holds for the whole service (`voucher-ledger serve --workers N` sets it for its workers)
    workers: int = Field(default=1, ge=1, le=256)
    # the largest stretch of the hash chain one journal export may cover (app/routers/exports.py)
    export_entries_max: int = Field(default=5_000_000, ge=1, le=1_000_000_000)
    # connections a client keeps waiting on itself (app/http_guard.py): uvicorn alone keeps a silent socket,
    # half-sent headers or a half-sent body open for ever, and a flood of them ran the workers out of fds
    http_header_timeout_s: float = Field(
        default=5.0, gt=0, le=300, description="from accept (or a kept-alive request's first byte) to its headers"
    )
    http_body_timeout_s: float = Field(
        default=10.0, gt=0, le=3600, description="from a request's headers to the end of its body (1 MiB at most)"
    )
    http_keep_alive_timeout_s: int = Field(default=5, ge=1, le=3600, description="idle between two requests")
    http_connections_max: int = Field(
        default=4096, ge=16, le=1_000_000, description="connections per worker process (lowered to fit the fd limit)"
    )
    # journal exports running at once in the whole service, held in PostgreSQL (app/export_slots.py): each
    # holds a connection, a snapshot and most of a core for seconds to minutes
    exports_concurrent_max: int = Field(
        default=2, ge=1, le=64, description="journal exports streaming at once, across every process and host"
    )
    # exports read on connections of their own, never the request pool's: this many per process, at most
    export_db_pool_size: int = Field(
        default=2, ge=1, le=64, description="database connections for exports, per process"
    )
    export_statement_timeout_s: float = Field(
        default=60.0, gt=0, le=86_400, description="PostgreSQL statement_timeout on export connections"
    )
    # redemptions waiting in a worker for a place in a batch (vouchers.redemption.RedeemBatcher): past this
    # many the worker answers 503 service_unavailable with Retry-After, so a flood queues for a bounded time
    redeem_queue_max: int = Field(
        default=256, ge=1, le=100_000, description="redemptions waiting for a batch per worker before 503"
    )
    # POST /v1/redemptions answered by a lean ASGI layer (app/fastpath.py) rather than FastAPI's routing and
    # dependencies; off, every request takes the route (bench/fastpath.py measures one against the other)
    redemption_fast_path: bool = Field(
        default=True, description="answer redemptions from cached provider keys without FastAPI's machinery"
    )

    @field_validator("rate_limits", mode="after")
    @classmethod
    def _over_defaults(
        cls, value: dict[RateRole, dict[RateBucket, RateRule]]
    ) -> dict[RateRole, dict[RateBucket, RateRule]]:
        return {role: {**RATE_LIMITS_DEFAULT[role], **value.get(role, {})} for role in RATE_ROLES}


@lru_cache
def get_settings() -> Settings:
    return Settings()
