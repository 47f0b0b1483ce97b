"""Request admission: per-tenant limits and a server-wide cap, enforced in memory in each process.

Three limits come from the tenant's `Limits` (read from the registry with every authentication, so
an admin's change applies to the next request):

- `max_tokens_cap`: a request may not ask for more completion tokens than this. Asking for more is
  the caller's mistake, not load, so it is a 400 naming `max_tokens`; a request that names no
  `max_tokens` runs with its endpoint's default lowered to the cap (the permit's `max_tokens`; the
  generator lowers it further to the room the prompt leaves in the context and in the budget).
- `max_concurrent`: *sequences* of the tenant in flight at once. A request runs S = n × prompts
  sequences, and each one takes a batch slot in the engine, so it counts S, not 1. One that does not
  fit now answers 429; one with S > max_concurrent could never fit, so it is a 400 naming `n`.
- `tokens_per_minute`: prompt + completion tokens over a sliding 60-second window. Admission
  *reserves* the request's worst case until it finishes and then charges what it really used
  (prompt + generated tokens), so a burst of parallel requests cannot overshoot the budget: at any
  moment, tokens charged in the last minute + reservations of requests in flight ≤ the limit.
  The worst case is reserved in two steps: before the prompt is tokenised, S × max_tokens (cheap
  checks first: a request refused here costs no tokenisation); once it is, P + S × max_tokens,
  where P is the prompt tokens and max_tokens the limit the request really runs with
  (`Permit.reserve`). Echo scoring (echo with max_tokens 0) is charged its prompt tokens. A request
  whose worst case alone is more than the whole budget could never fit, so it is refused up front
  with a 400 that says so (waiting would not help, and a 429 would invite clients to retry it
  forever). A request that names no `max_tokens` runs with its default lowered to fit the budget.

Across tenants, `max_queued_sequences` caps the sequences the whole server holds (admitted and not
finished, admin requests included): one more answers 503 with Retry-After. It protects the engine's
queue and memory from the sum of tenants that each stay within their own limits.

Feedback (`/v1/feedback`) has its own per-tenant rate, `FeedbackLimiter`: ratings are cheap to send
and each one is a registry write.

Over a limit the answer is 429 with a `Retry-After` that says when the request would fit: for the
token window, when enough of the charged tokens age out of it; for concurrency (or a window held by
in-flight reservations), 1 s, since only a finishing request frees room. Refusals are
`serving.errors` exceptions (InvalidRequest, RateLimited, Unavailable); the API layer answers them
in the OpenAI error format (`api.errors`).

Isolation: each tenant has its own counters, keyed by tenant id, so one tenant's traffic never
counts against another's (only the server-wide cap is shared). Admin keys (no tenant) are not
limited per tenant.

Cost: `acquire` and `release` are O(1) amortised (the window keeps one bucket per second, at most
61 per tenant, and drops the expired ones from its front), never await and never block the event
loop; a `threading.Lock` makes them safe from worker threads as well. The counters are per process:
with several replicas each enforces the limits on its own share of the traffic.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import metrics
from ..registry import Limits, Principal
from .errors import InvalidRequest, RateLimited, Unavailable

WINDOW_S = 60.0
# Reservation of a request that names no max_tokens and has no cap: the server's largest default
# completion length (chat requests default to at most 1024 tokens, see serving/schemas.py).
DEFAULT_RESERVATION = 1024
_BUSY_RETRY_S = 1
# A full server frees room as fast as the engine finishes sequences; a little longer than a
# tenant's own wait, so clients back off from a busy server rather than add to it.
SERVER_BUSY_RETRY_S = 2


@dataclass
class _TenantState:
    """The counters of one tenant: sequences in flight, their reservations, the charged window."""

    active: int = 0  # sequences of admitted, unfinished requests
    reserved: int = 0
    charged: int = 0  # tokens in `buckets`
    buckets: deque[list[int]] = field(default_factory=deque)  # [second, tokens], oldest first

    def expire(self, now: float) -> None:
        """Drop the buckets that have left the window [now - 60 s, now]."""
        oldest_kept = math.floor(now - WINDOW_S)
        while self.buckets and self.buckets[0][0] < oldest_kept:
            self.charged -= self.buckets.popleft()[1]

    def charge(self, now: float, tokens: int) -> None:
        second = math.floor(now)
        if self.buckets and self.buckets[-1][0] == second:
            self.buckets[-1][1] += tokens
        else:
            self.buckets.append([second, tokens])
        self.charged += tokens

    def seconds_until_free(self, now: float, needed: int) -> int:
        """Whole seconds until at least `needed` charged tokens have aged out of the window."""
        freed = 0
        for second, tokens in self.buckets:
            freed += tokens
            if freed >= needed:
                # Tokens charged during [second, second + 1) are all out of the window at second + 61.
                return max(1, math.ceil(second + 1 + WINDOW_S - now))
        return _BUSY_RETRY_S


class Permit:
    """Admission of one request of `sequences` sequences. `reserve` once its prompt is tokenised;
    `release(tokens_used)` exactly once when it ends (later calls do nothing): it frees the
    sequences and turns the reservation into the tokens really used (prompt + generated)."""

    __slots__ = ("_limiter", "_principal", "sequences", "reservation", "max_tokens", "budget", "_released")

    def __init__(self, limiter: TenantLimiter, principal: Principal, sequences: int, reservation: int,
                 max_tokens: int | None):
        self._limiter, self._principal = limiter, principal
        self.sequences = sequences
        self.reservation = reservation
        self.max_tokens = max_tokens  # the completion-token limit the request runs with (None: server default)
        # Tokens (prompt + completions) the whole request may use: the generator lowers a default
        # max_tokens to fit it. None: no budget (an admin key, or a tenant without tokens_per_minute).
        self.budget = principal.limits.tokens_per_minute if principal.tenant_id is not None else None
        self._released = False

    def reserve(self, prompt_tokens: int, max_tokens: int) -> None:
        """Replace the reservation by the request's exact worst case, `prompt_tokens` + sequences ×
        `max_tokens` (the limit it runs with). A 400 when that alone exceeds the budget; a 429 when
        it does not fit the window now (the permit then still holds its first reservation: release it)."""
        if not self._released:
            self._limiter._reserve(self, max(0, int(prompt_tokens)), max(0, int(max_tokens)))

    def release(self, tokens_used: int = 0) -> None:
        if self._released:
            return
        self._released = True
        self._limiter._release(self, max(0, int(tokens_used)))

    @property
    def released(self) -> bool:
        return self._released


class TenantLimiter:
    """Admits or refuses requests: per tenant, and against the server-wide `max_queued_sequences`
    (None: no cap). See the module docstring. One per server process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, default_reservation: int = DEFAULT_RESERVATION,
                 max_queued_sequences: int | None = None):
        self._clock = clock
        self._default_reservation = default_reservation
        self.max_queued_sequences = max_queued_sequences
        self._tenants: dict[int, _TenantState] = {}
        self._held = 0  # sequences of every admitted, unfinished request (all tenants and admins)
        self._lock = threading.Lock()

    def acquire(self, principal: Principal, requested_max_tokens: int | None, *, sequences: int = 1) -> Permit:
        """Admit one request of `principal` asking for `requested_max_tokens` completion tokens per
        sequence (None: not stated) over `sequences` sequences (n × prompts). Raises InvalidRequest
        (400) for a request over the tenant's max_tokens cap or that could never fit a limit,
        RateLimited (429) over a tenant limit, Unavailable (503) over the server's sequence cap."""
        limits, sequences = principal.limits, max(1, sequences)
        max_tokens = _checked_max_tokens(limits, requested_max_tokens)
        tenant_id = principal.tenant_id
        reservation = 0
        if tenant_id is not None:
            _check_sequences(limits, sequences)
            per_sequence = max_tokens if max_tokens is not None else self._default_reservation
            reservation = self._checked_worst_case(limits, 0, per_sequence, sequences)
        with self._lock:
            state = None
            if tenant_id is not None:
                state = self._tenants.setdefault(tenant_id, _TenantState())
                self._admit(state, limits, sequences, reservation, principal.tenant_name)
            self._admit_to_server(sequences)
            self._held += sequences
            if state is not None:
                state.active += sequences
                state.reserved += reservation
        return Permit(self, principal, sequences, reservation, max_tokens)

    def admit(self, principal: Principal, body: Any) -> Permit:
        """`acquire` for a validated OpenAI request body: the token limit the client sent
        (`max_completion_tokens` or `max_tokens`) and the sequence count (`n` × prompts).

        A body that sends no limit is never refused for it: it runs with its endpoint's default
        (`default_max_tokens`: completions 16, chat 1024) lowered to the tenant's cap, which the
        permit's `max_tokens` carries (the engine never generates past the cap). The body is left
        as the client sent it, so nothing downstream mistakes that limit for one the client asked."""
        prompts = getattr(body, "prompt", None)
        sequences = int(getattr(body, "n", 1) or 1) * (len(prompts) if isinstance(prompts, list) else 1)
        requested = _sent_max_tokens(body)
        if requested is None:
            budget = principal.limits.tokens_per_minute
            per_sequence_budget = None if budget is None else max(1, budget // sequences)
            bounds = [x for x in (getattr(body, "default_max_tokens", None), principal.limits.max_tokens_cap,
                                  per_sequence_budget) if x is not None]
            requested = min(bounds) if bounds else None  # within the cap and the budget: never a 400
        return self.acquire(principal, requested, sequences=sequences)

    def usage(self, tenant_id: int) -> dict[str, int]:
        """The tenant's counters now: sequences in flight, tokens reserved, tokens charged in the window."""
        with self._lock:
            state = self._tenants.get(tenant_id)
            if state is None:
                return {"active": 0, "reserved": 0, "charged": 0}
            state.expire(self._clock())
            return {"active": state.active, "reserved": state.reserved, "charged": state.charged}

    @property
    def held_sequences(self) -> int:
        """Sequences of every admitted, unfinished request (what `max_queued_sequences` caps)."""
        return self._held

    # ---- internals --------------------------------------------------------------------------
    @staticmethod
    def _checked_worst_case(limits: Limits, prompt_tokens: int, per_sequence: int, sequences: int) -> int:
        """The request's worst case in tokens, prompt + sequences × per-sequence completion; a 400
        when it alone exceeds the budget (0 without a budget: nothing to reserve)."""
        budget = limits.tokens_per_minute
        if budget is None:
            return 0
        worst = prompt_tokens + per_sequence * sequences
        if worst > budget:
            metrics.REJECTED.labels("over_budget").inc()
            prompt = f"{prompt_tokens} prompt tokens + " if prompt_tokens else ""
            raise InvalidRequest(f"This request may use up to {worst} tokens ({prompt}{sequences} sequences × "
                                 f"max_tokens {per_sequence}), more than this API key's whole budget of {budget} "
                                 "tokens per minute, so it could never run. Shorten the prompt, or lower max_tokens "
                                 "or n.", param="max_tokens", code="request_exceeds_token_budget")
        return worst

    def _admit(self, state: _TenantState, limits: Limits, sequences: int, reservation: int, tenant: str | None) -> None:
        """Raise a 429 when `sequences` more sequences and `reservation` more tokens break a limit (lock held)."""
        if limits.max_concurrent is not None and state.active + sequences > limits.max_concurrent:
            _reject(f"Tenant '{tenant}' already has {state.active} sequences in flight; {sequences} more would "
                    f"pass its limit of {limits.max_concurrent}. Retry when one has finished.", _BUSY_RETRY_S)
        self._check_window(state, limits, state.reserved + reservation, reservation, tenant)

    def _check_window(self, state: _TenantState, limits: Limits, reserved: int, asked: int, tenant: str | None) -> None:
        """Raise a 429 when the window's charged tokens + `reserved` pass the budget (lock held)."""
        budget = limits.tokens_per_minute
        if budget is None:
            return
        now = self._clock()
        state.expire(now)
        over = state.charged + reserved - budget
        if over > 0:
            _reject(f"Tenant '{tenant}' is over its limit of {budget} tokens per minute "
                    f"({state.charged} used in the last minute, {reserved - asked} reserved by requests in flight, "
                    f"{asked} asked for). Lower max_tokens or retry later.",
                    state.seconds_until_free(now, over))

    def _admit_to_server(self, sequences: int) -> None:
        """Raise a 503 when `sequences` more would pass the server-wide cap (lock held)."""
        cap = self.max_queued_sequences
        if cap is not None and self._held + sequences > cap:
            metrics.REJECTED.labels("server_busy").inc()
            raise Unavailable(f"The server is busy: it holds {self._held} sequences, and {sequences} more would "
                              f"pass its limit of {cap}. Retry shortly.", code="server_busy",
                              retry_after_s=SERVER_BUSY_RETRY_S)

    def _reserve(self, permit: Permit, prompt_tokens: int, max_tokens: int) -> None:
        principal = permit._principal
        if principal.tenant_id is None:
            return
        limits = principal.limits
        worst = self._checked_worst_case(limits, prompt_tokens, max_tokens, permit.sequences)
        with self._lock:
            state = self._tenants[principal.tenant_id]  # held by the permit's sequences
            self._check_window(state, limits, state.reserved - permit.reservation + worst,
                               worst, principal.tenant_name)
            state.reserved += worst - permit.reservation
            permit.reservation = worst

    def _release(self, permit: Permit, tokens_used: int) -> None:
        tenant_id = permit._principal.tenant_id
        with self._lock:
            self._held -= permit.sequences
            state = self._tenants.get(tenant_id) if tenant_id is not None else None
            if state is None:
                return
            state.active -= permit.sequences
            state.reserved -= permit.reservation
            now = self._clock()
            state.expire(now)
            if tokens_used:
                state.charge(now, tokens_used)
            if state.active == 0 and not state.buckets:
                del self._tenants[tenant_id]  # idle tenants cost no memory


def _sent_max_tokens(body: Any) -> int | None:
    """The completion-token limit the client put in the body (a pydantic model tells set fields
    from defaults by `model_fields_set`; any other object counts every attribute as sent)."""
    sent = getattr(body, "model_fields_set", None)
    for name in ("max_completion_tokens", "max_tokens"):
        value = getattr(body, name, None)
        if value is not None and (sent is None or name in sent):
            return value
    return None


def _checked_max_tokens(limits: Limits, requested: int | None) -> int | None:
    """The request's completion-token limit: as asked, or the tenant's cap when none was asked.
    Over the cap is a 400 naming `max_tokens`."""
    cap = limits.max_tokens_cap
    if cap is None or requested is None:
        return requested if requested is not None else cap
    if requested > cap:
        metrics.REJECTED.labels("max_tokens").inc()
        raise InvalidRequest(f"max_tokens is {requested}, but this API key allows at most {cap} completion tokens "
                             "per request. Lower max_tokens.", param="max_tokens", code="max_tokens_exceeded")
    return requested


def _check_sequences(limits: Limits, sequences: int) -> None:
    """A request of more sequences than the tenant may run at once could never be admitted: a 400."""
    if limits.max_concurrent is not None and sequences > limits.max_concurrent:
        metrics.REJECTED.labels("too_many_sequences").inc()
        raise InvalidRequest(f"This request runs {sequences} sequences at once (n × prompts), more than this API "
                             f"key's limit of {limits.max_concurrent} concurrent sequences, so it could never run. "
                             "Lower n or send fewer prompts per request.", param="n", code="too_many_sequences")


def _reject(message: str, retry_after_s: int) -> None:
    metrics.REJECTED.labels("rate_limit").inc()
    raise RateLimited(message, retry_after_s=retry_after_s)


class FeedbackLimiter:
    """At most `per_minute` ratings per tenant per minute (a token bucket: a burst of `per_minute`,
    then one every 60/per_minute s); over it, 429 with the seconds until the next one fits. Per
    process, like `TenantLimiter`; admin keys (no tenant) send no feedback."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic):
        self.per_minute = per_minute
        self._clock = clock
        self._buckets: dict[int, tuple[float, float]] = {}  # tenant id → (tokens, at time)
        self._lock = threading.Lock()

    def take(self, principal: Principal) -> None:
        if principal.tenant_id is None:
            return
        rate = self.per_minute / WINDOW_S
        with self._lock:
            now = self._clock()
            tokens, then = self._buckets.get(principal.tenant_id, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - then) * rate)
            if tokens < 1.0:
                self._buckets[principal.tenant_id] = (tokens, now)
                _reject(f"Tenant '{principal.tenant_name}' sent more than {self.per_minute} feedback ratings in "
                        "a minute. Retry later.", math.ceil((1.0 - tokens) / rate))
            self._buckets[principal.tenant_id] = (tokens - 1.0, now)
            self._forget_full(now, rate)

    def _forget_full(self, now: float, rate: float) -> None:
        """Drop buckets that have refilled (lock held), so idle tenants cost no memory."""
        if len(self._buckets) > 1024:
            full = [t for t, (tokens, then) in self._buckets.items() if tokens + (now - then) * rate >= self.per_minute]
            for tenant_id in full:
                del self._buckets[tenant_id]
