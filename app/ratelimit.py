"""Per-key rate limits: a token bucket per (API key, bucket), answered `429 rate_limited` with `Retry-After`.

Buckets: `redemption` (`POST /v1/redemptions`, `POST /v1/holds`, `POST /v1/holds/{id}/capture`) and
`export` (`GET /v1/exports/journal`). A route takes `dependencies=[RedemptionRate]` (or `ExportRate`): the
check runs after authentication, which a warm key cache answers from memory, and before the route's body
runs, so a refused request has done no database or ledger work. The dependency reuses the request's
authentication (FastAPI solves `current_caller` once per request) and opens no session of its own; it is
`async def` so that it runs on the event loop, never in the thread pool.

Defaults (`VL_RATE_LIMITS` overrides any role and bucket; settings.py holds them):

- `redemption`: 10,000 a second, burst 10,000, per key. API.md promises that the defaults never throttle a
  provider key below 5,000 redemptions/s; twice that leaves room for an uneven spread of one key's
  connections over the workers (below), and a burst of a second's worth lets a provider replay a
  backlog at once. The database gives out long before that (bench/ figures in the README), so this bucket
  stops a runaway client, never a real one.
- `export`: 0.1 a second (6 a minute), burst 5, per key. An export of a million entries holds a database
  connection, a REPEATABLE READ snapshot and a core for 17 s (jsonl) to 40 s (csv, hledger); 6 a minute
  keeps one key to a couple of them at a time, and a burst of 5 still lets an auditor take one range in
  all three formats, or a few filtered slices, without waiting.

The same figures apply to every role by default (an enterprise key is refused redemption and export with
`403` anyway); set a role's own to narrow it, e.g. `{"admin": {"export": {"rate_per_s": 0.05, "burst": 2}}}`.

Several worker processes. `voucher-ledger serve --workers N` runs N uvicorn worker processes on one
socket, each with its own buckets: left alone, a key would get N times its rate. Each worker therefore
enforces `rate_per_s / N` with a burst of `burst / N` (at least one request, so a small burst over many
workers can still be served), where N is `VL_WORKERS`, which `serve` sets for its workers. The kernel
hands a busy client's connections to the workers about evenly, so the sum is the configured rate; a
client on a single keep-alive connection meets one worker and gets 1/N of it (the redemption default's
factor two above the promise covers N = 2). This costs nothing per request, needs no shared memory and no
database round trip; its price is that the limit is approximate across workers, which a rate limit may
be. Whoever runs uvicorn directly with several workers, or several machines behind one balancer, sets
`VL_WORKERS` to the number of processes sharing the traffic.

The algorithm is the token bucket stored as one integer per key (GCRA, the "virtual scheduling" form):
the instant at which the key's bucket is full again, in nanoseconds of a monotonic clock. A request is
let through while that instant is at most `burst - 1` intervals ahead, and moves it one interval on;
`Retry-After` is the wait until it is back within reach, in whole seconds, at least 1. Integers keep the
arithmetic exact: a burst of 10,000 is exactly 10,000 requests.

Memory is bounded: each (role, bucket) keeps its keys in least-recently-used order, and every request
drops up to two of the oldest whose bucket is full again (they are idle: forgetting them changes
nothing), so the table holds the keys active in the last `burst / rate` seconds or so, and never more
than `KEYS_MAX` (past that the oldest is forgotten: a lenient failure, it starts again with a full
bucket). Each request is O(1). Within a worker everything runs on one event loop and no check awaits, so
no lock is needed.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import Depends, Request

from app.apikeys import Caller
from app.dependencies import CallerDep
from app.errors import ProblemError
from app.metrics import RATE_LIMITED
from app.settings import RATE_BUCKETS, RATE_ROLES, RateBucket, RateRole, RateRule, Settings

__all__ = [
    "KEYS_MAX",
    "ExportRate",
    "RateLimited",
    "RateLimiter",
    "RedemptionRate",
    "TokenBucket",
    "app_limiter",
    "rate_limit",
]

NS_PER_S = 1_000_000_000
# keys remembered per (role, bucket); API keys are created by administrators, so this is generous
KEYS_MAX = 100_000
# oldest entries looked at per request: more than one, so forgetting outpaces remembering
_EVICT_PER_TAKE = 2


class RateLimited(ProblemError):
    status = 429
    code = "rate_limited"

    def __init__(self, bucket: str, retry_after_s: int) -> None:
        super().__init__(
            f"this key is over its {bucket} rate limit; retry after {retry_after_s} s",
            code="rate_limited",
            headers={"Retry-After": str(retry_after_s)},
            extra={"bucket": bucket, "retry_after_s": retry_after_s},
        )


class TokenBucket:
    """The buckets of one rule, one per key: `rate_per_s` sustained and `burst` at once, of which this
    process enforces its share (1/workers)."""

    __slots__ = ("_full_at", "interval_ns", "keys_max", "tolerance_ns")

    def __init__(self, rule: RateRule, *, workers: int = 1, keys_max: int = KEYS_MAX) -> None:
        assert workers >= 1 and keys_max >= 1
        # one token every interval_ns in this process: the rate's share of this worker
        self.interval_ns = max(1, round(NS_PER_S * workers / rule.rate_per_s))
        # how far ahead the full-again instant may be and still let a request through: burst - 1 intervals
        self.tolerance_ns = round(max(0.0, rule.burst / workers - 1) * self.interval_ns)
        self.keys_max = keys_max
        self._full_at: OrderedDict[str, int] = OrderedDict()

    def take(self, key: str, now_ns: int) -> int:
        """Take a token from `key`'s bucket: 0 when taken, else the nanoseconds until one is there."""
        full_at = self._full_at.pop(key, now_ns)
        if full_at < now_ns:
            full_at = now_ns
        wait_ns = full_at - now_ns - self.tolerance_ns
        if wait_ns <= 0:
            full_at += self.interval_ns
        self._full_at[key] = full_at  # remembered last: the most recently used
        self._forget_idle(now_ns)
        return max(0, wait_ns)

    def _forget_idle(self, now_ns: int) -> None:
        entries = self._full_at
        for _ in range(_EVICT_PER_TAKE):
            oldest = next(iter(entries))
            if entries[oldest] > now_ns:
                break
            del entries[oldest]
            if not entries:
                return
        while len(entries) > self.keys_max:
            entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._full_at)


class RateLimiter:
    """This process's buckets for every role and bucket name."""

    def __init__(
        self,
        rules: Mapping[RateRole, Mapping[RateBucket, RateRule]],
        *,
        workers: int = 1,
        clock: Callable[[], int] = time.monotonic_ns,
        keys_max: int = KEYS_MAX,
    ) -> None:
        self.rules = rules
        self.workers = workers
        self.clock = clock
        self.buckets: dict[tuple[str, str], TokenBucket] = {
            (role, name): TokenBucket(rules[role][name], workers=workers, keys_max=keys_max)
            for role in RATE_ROLES
            for name in RATE_BUCKETS
        }

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> RateLimiter:
        return cls(settings.rate_limits, workers=settings.workers, **kwargs)

    def check(self, caller: Caller, bucket: RateBucket) -> None:
        """Take one of `caller`'s tokens in `bucket`, or raise `RateLimited` with the wait in whole seconds."""
        wait_ns = self.buckets[(caller.role.value, bucket)].take(caller.key_id, self.clock())
        if wait_ns > 0:
            RATE_LIMITED.labels(bucket=bucket, role=caller.role.value).inc()
            raise RateLimited(bucket, max(1, math.ceil(wait_ns / NS_PER_S)))


def limiter_of(request: Request) -> RateLimiter:
    return app_limiter(request.app.state)


def app_limiter(state: Any) -> RateLimiter:
    """The app's limiter (`app.state.rate_limiter`), made from its settings on first use; a test may set
    its own beforehand (with a fake clock). The app's fast path (`app.fastpath`) takes from it too."""
    limiter: RateLimiter | None = getattr(state, "rate_limiter", None)
    if limiter is None:
        limiter = RateLimiter.from_settings(state.settings)
        state.rate_limiter = limiter
    return limiter


def rate_limit(bucket: RateBucket) -> Callable[[Request, Caller], Awaitable[None]]:
    """A dependency taking one of the caller's tokens in `bucket`: `429 rate_limited` when there is none."""
    assert bucket in RATE_BUCKETS, bucket

    async def within_rate(request: Request, caller: CallerDep) -> None:
        limiter_of(request).check(caller, bucket)

    within_rate.__name__ = f"within_{bucket}_rate"
    return within_rate


# `@router.post(..., dependencies=[RedemptionRate])`
RedemptionRate = Depends(rate_limit("redemption"))
ExportRate = Depends(rate_limit("export"))
