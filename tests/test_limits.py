"""Admission: the max_tokens cap (400), concurrent sequences and tokens per minute (prompt +
completion; 429 + Retry-After, 400 for what could never fit), isolation between tenants, the
server-wide sequence cap (503 + Retry-After); then the same through the HTTP app (no engine:
requests that pass the limiter end at 503 'engine starting', which must release their permit)."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import httpx
import pytest

from alter_serve import metrics
from alter_serve.api.errors import OpenAIError, openai_error
from alter_serve.serving.schemas import CHAT_MAX_TOKENS, ChatCompletionRequest, CompletionRequest
from alter_serve.serving.errors import RateLimited, ServingError
from alter_serve.serving.limits import DEFAULT_RESERVATION, FeedbackLimiter, TenantLimiter
from alter_serve.registry import Limits, Principal

from .admin_app import AdminApp


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def tenant(tenant_id: int, **limits: int) -> Principal:
    return Principal(key_id=tenant_id, role="tenant", tenant_id=tenant_id, tenant_name=f"t{tenant_id}",
                     views=frozenset({"original"}), default_view="original", limits=Limits(**limits))


def refused(fn, *args, **kwargs) -> OpenAIError:
    """The refusal `fn` raises, as the API answers it."""
    with pytest.raises(ServingError) as info:
        fn(*args, **kwargs)
    return openai_error(info.value)


def rejected(reason: str) -> float:
    return metrics.REJECTED.labels(reason)._value.get()


def test_max_tokens_cap_is_a_400_naming_max_tokens():
    limiter, acme = TenantLimiter(), tenant(1, max_tokens_cap=64)
    before = rejected("max_tokens")
    err = refused(limiter.acquire, acme, 65)
    assert (err.status, err.param, err.code, err.type) == (400, "max_tokens", "max_tokens_exceeded", "invalid_request_error")
    assert "at most 64" in err.message and "65" in err.message
    assert rejected("max_tokens") == before + 1
    assert limiter.acquire(acme, 64).max_tokens == 64
    assert limiter.acquire(acme, None).max_tokens == 64  # no max_tokens asked: the cap applies


def test_admit_reads_the_body_and_gives_an_unbounded_one_the_cap():
    limiter, acme = TenantLimiter(), tenant(1, max_tokens_cap=50, tokens_per_minute=1000)
    chat = SimpleNamespace(max_tokens=None, max_completion_tokens=None, n=2)
    permit = limiter.admit(acme, chat)
    assert permit.max_tokens == 50 and permit.reservation == 100  # cap × n
    assert chat.max_tokens is None  # the body stays as sent: the limit is the permit's
    completion = SimpleNamespace(max_tokens=20, prompt=["a", "b", "c"], n=1)
    assert limiter.admit(acme, completion).reservation == 60  # max_tokens × prompts
    assert refused(limiter.admit, acme, SimpleNamespace(max_tokens=None, max_completion_tokens=51, n=1)).status == 400


def test_admit_applies_the_cap_to_schema_defaults_but_refuses_what_was_sent():
    limiter = TenantLimiter()
    capped, free = tenant(1, max_tokens_cap=8, tokens_per_minute=1000), tenant(2, tokens_per_minute=10_000)
    default = CompletionRequest(model="m", prompt="x")  # max_tokens not sent: 16
    assert limiter.admit(capped, default).max_tokens == 8 and default.token_limit is None
    sent = CompletionRequest(model="m", prompt="x", max_tokens=16)
    assert refused(limiter.admit, capped, sent).param == "max_tokens"
    assert limiter.admit(free, CompletionRequest(model="m", prompt=["a", "b"])).reservation == 32  # 16 × 2 prompts
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    assert limiter.admit(capped, chat).max_tokens == 8 and chat.token_limit is None  # not taken for a sent limit
    assert limiter.admit(free, chat).reservation == CHAT_MAX_TOKENS  # the chat default, not another admission's cap
    unbounded = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    roomy = tenant(3, tokens_per_minute=10 * DEFAULT_RESERVATION)
    assert limiter.admit(roomy, unbounded).reservation == CHAT_MAX_TOKENS and unbounded.max_tokens is None
    scoring = CompletionRequest(model="m", prompt="x", echo=True, max_tokens=0)  # echo only: generates nothing
    assert limiter.admit(capped, scoring).reservation == 0


def test_concurrency_limit_is_a_429_until_a_request_finishes():
    limiter, acme = TenantLimiter(), tenant(1, max_concurrent=2)
    first, second = limiter.acquire(acme, 10), limiter.acquire(acme, 10)
    before = rejected("rate_limit")
    err = refused(limiter.acquire, acme, 10)
    assert (err.status, err.type, err.code, err.headers) == (429, "rate_limit_error", "rate_limit_exceeded", {"Retry-After": "1"})
    assert "2 sequences in flight" in err.message
    assert rejected("rate_limit") == before + 1
    first.release(5)
    first.release(5)  # idempotent: frees one slot only once
    assert limiter.usage(1)["active"] == 1
    third = limiter.acquire(acme, 10)
    assert refused(limiter.acquire, acme, 10).status == 429
    second.release(0), third.release(0)
    assert limiter.usage(1) == {"active": 0, "reserved": 0, "charged": 5}  # the first's 5 tokens stay a minute


def test_tokens_per_minute_reserves_then_charges_and_retry_after_is_when_tokens_age_out():
    clock = Clock(1000.0)
    limiter, acme = TenantLimiter(clock), tenant(1, tokens_per_minute=100)
    first = limiter.acquire(acme, 60)
    # 60 reserved + 50 asked > 100: refused; nothing is charged yet, only a finishing request frees room.
    err = refused(limiter.acquire, acme, 50)
    assert err.status == 429 and err.headers["Retry-After"] == "1"
    assert "60 reserved" in err.message and "100 tokens per minute" in err.message
    clock.now = 1010.2
    first.release(30)  # used 30 of its 60: charged at second 1010
    assert limiter.usage(1) == {"active": 0, "reserved": 0, "charged": 30}
    second = limiter.acquire(acme, 50)  # 30 charged + 50 reserved = 80 ≤ 100
    err = refused(limiter.acquire, acme, 30)  # 30 + 50 + 30 = 110: 10 over, freed when second 1010 ages out
    assert err.headers["Retry-After"] == str(1071 - 1010)  # ceil(1010 + 1 + 60 - 1010.2) = 61
    clock.now = 1070.9
    assert refused(limiter.acquire, acme, 30).headers["Retry-After"] == "1"  # ceil(0.1)
    clock.now = 1071.0
    third = limiter.acquire(acme, 30)  # the 30 tokens of second 1010 have left the window
    assert limiter.usage(1) == {"active": 2, "reserved": 80, "charged": 0}
    second.release(50), third.release(0)


def test_a_request_larger_than_the_whole_budget_is_refused_up_front():
    """Issue 18 §4: the reservation used to be capped at the budget, so one n=4 request could
    generate 4 × 10 000 tokens against a budget of 100. Now it never starts: a 400 (not a 429, which
    clients retry) that says why; waiting could never make it fit."""
    limiter, acme = TenantLimiter(Clock()), tenant(1, tokens_per_minute=100)
    before = rejected("over_budget")
    err = refused(limiter.acquire, acme, 10_000, sequences=4)
    assert (err.status, err.param, err.code) == (400, "max_tokens", "request_exceeds_token_budget")
    assert "up to 40000 tokens (4 sequences × max_tokens 10000)" in err.message and "budget of 100" in err.message
    assert rejected("over_budget") == before + 1 and limiter.usage(1)["active"] == 0
    exact = limiter.acquire(acme, 25, sequences=4)  # exactly the budget: admitted
    assert exact.reservation == 100
    exact.release(0)
    other = tenant(2, tokens_per_minute=DEFAULT_RESERVATION * 10)
    assert limiter.acquire(other, None).reservation == DEFAULT_RESERVATION


def test_a_request_without_max_tokens_is_lowered_to_fit_the_budget():
    limiter, small = TenantLimiter(Clock()), tenant(1, tokens_per_minute=300)
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], n=2)  # default 1024 each
    permit = limiter.admit(small, chat)
    assert (permit.max_tokens, permit.reservation) == (150, 300)  # never a 400 for a limit it did not send


def test_the_budget_charges_prompt_tokens_up_front_and_settles_the_real_usage():
    """Issue 18 §4: tokens per minute used to count completion tokens only, so long prompts were free."""
    clock = Clock(1000.0)
    limiter, acme = TenantLimiter(clock), tenant(1, tokens_per_minute=1000)
    permit = limiter.acquire(acme, 100, sequences=2)
    assert permit.reservation == 200  # before tokenising: 2 sequences × max_tokens
    permit.reserve(300, 100)  # once tokenised: 300 prompt tokens + 2 × 100
    assert permit.reservation == 500 and limiter.usage(1) == {"active": 2, "reserved": 500, "charged": 0}
    err = refused(limiter.acquire, acme, 300, sequences=2)  # 500 reserved + 600 > 1000
    assert err.status == 429 and "500 reserved" in err.message
    permit.release(300 + 40)  # prompt + what it generated
    assert limiter.usage(1) == {"active": 0, "reserved": 0, "charged": 340}

    scoring = limiter.acquire(acme, 0)  # echo with max_tokens 0: nothing to generate
    scoring.reserve(250, 0)
    assert scoring.reservation == 250  # charged its prompt
    scoring.release(250)
    assert limiter.usage(1)["charged"] == 590


def test_a_prompt_that_does_not_fit_the_whole_budget_is_refused_up_front():
    limiter, acme = TenantLimiter(Clock()), tenant(1, tokens_per_minute=1000)
    permit = limiter.acquire(acme, 100, sequences=2)
    err = refused(permit.reserve, 900, 100)
    assert (err.status, err.code) == (400, "request_exceeds_token_budget")
    assert "up to 1100 tokens (900 prompt tokens + 2 sequences × max_tokens 100)" in err.message
    assert "budget of 1000" in err.message and "Shorten the prompt" in err.message
    assert permit.reservation == 200  # refused: the first reservation stands until the permit is released
    permit.release(0)
    assert limiter.usage(1) == {"active": 0, "reserved": 0, "charged": 0}


def test_a_prompt_that_does_not_fit_the_window_now_is_a_429():
    clock = Clock(1000.0)
    limiter, acme = TenantLimiter(clock), tenant(1, tokens_per_minute=1000)
    limiter.acquire(acme, 10).release(700)
    permit = limiter.acquire(acme, 100)  # 700 charged + 100 reserved
    with pytest.raises(RateLimited) as info:
        permit.reserve(250, 100)  # 700 + 350 > 1000
    assert info.value.retry_after_s == 61
    permit.release(0)


def test_sequences_count_toward_concurrency():
    """max_concurrent counts sequences (n × prompts): each one holds an engine slot."""
    limiter, acme = TenantLimiter(Clock()), tenant(1, max_concurrent=4)
    three = limiter.acquire(acme, 10, sequences=3)
    assert limiter.usage(1)["active"] == 3
    err = refused(limiter.acquire, acme, 10, sequences=2)  # 3 + 2 > 4: wait for one to finish
    assert (err.status, err.headers["Retry-After"]) == (429, "1")
    assert "3 sequences in flight" in err.message and "limit of 4" in err.message
    one = limiter.acquire(acme, 10, sequences=1)  # 3 + 1 fits
    before = rejected("too_many_sequences")
    err = refused(limiter.acquire, acme, 10, sequences=5)  # could never fit: a 400, not a 429
    assert (err.status, err.param, err.code) == (400, "n", "too_many_sequences")
    assert "5 sequences" in err.message and "limit of 4 concurrent sequences" in err.message
    assert rejected("too_many_sequences") == before + 1
    three.release(0), one.release(0)
    body = CompletionRequest(model="m", prompt=["a", "b"], n=2, max_tokens=1)  # 4 sequences
    limiter.admit(acme, body).release(0)
    assert refused(limiter.admit, acme, CompletionRequest(model="m", prompt=["a", "b", "c"], n=2, max_tokens=1)).status == 400


def test_the_server_wide_cap_answers_503_across_tenants():
    limiter = TenantLimiter(Clock(), max_queued_sequences=5)
    acme, globex = tenant(1, max_concurrent=4), tenant(2)
    admin = Principal(key_id=9, role="admin", tenant_id=None, tenant_name=None, views=frozenset(),
                      default_view=None, limits=Limits())
    held = [limiter.acquire(acme, 10, sequences=3), limiter.acquire(admin, 10)]  # admins count too
    assert limiter.held_sequences == 4
    before = rejected("server_busy")
    err = refused(limiter.acquire, globex, 10, sequences=2)  # each tenant is within its own limits
    assert (err.status, err.type, err.code, err.headers) == (503, "server_error", "server_busy", {"Retry-After": "2"})
    assert "holds 4 sequences" in err.message and "limit of 5" in err.message
    assert rejected("server_busy") == before + 1
    assert limiter.usage(2)["active"] == 0  # a refusal holds nothing
    limiter.acquire(globex, 10).release(0)  # one more fits
    held[0].release(0)
    limiter.acquire(globex, 10, sequences=2).release(0)
    held[1].release(0)
    assert limiter.held_sequences == 0


def test_feedback_is_rate_limited_per_tenant():
    clock = Clock()
    limiter, acme, globex = FeedbackLimiter(per_minute=3, clock=clock), tenant(1), tenant(2)
    for _ in range(3):
        limiter.take(acme)  # a burst of per_minute
    err = refused(limiter.take, acme)
    assert (err.status, err.code, err.headers["Retry-After"]) == (429, "rate_limit_exceeded", "20")  # 60 s / 3
    limiter.take(globex)  # another tenant is not slowed
    clock.now += 20
    limiter.take(acme)
    assert refused(limiter.take, acme).status == 429
    admin = Principal(key_id=9, role="admin", tenant_id=None, tenant_name=None, views=frozenset(),
                      default_view=None, limits=Limits())
    for _ in range(10):
        limiter.take(admin)  # no tenant: not limited (the route refuses admins anyway)


def test_one_tenant_at_its_limits_never_slows_another():
    clock = Clock()
    limiter = TenantLimiter(clock)
    noisy = tenant(1, max_concurrent=1, tokens_per_minute=50)
    quiet = tenant(2, max_concurrent=1, tokens_per_minute=50)
    held = limiter.acquire(noisy, 50)
    assert refused(limiter.acquire, noisy, 1).status == 429
    permit = limiter.acquire(quiet, 50)  # its own counters: free
    assert limiter.usage(2) == {"active": 1, "reserved": 50, "charged": 0}
    assert limiter.usage(1) == {"active": 1, "reserved": 50, "charged": 0}
    permit.release(50), held.release(50)


def test_admin_keys_are_not_limited():
    limiter = TenantLimiter()
    admin = Principal(key_id=9, role="admin", tenant_id=None, tenant_name=None, views=frozenset(),
                      default_view=None, limits=Limits())
    permits = [limiter.acquire(admin, 10_000) for _ in range(100)]
    assert all(p.reservation == 0 for p in permits)


def test_window_memory_is_bounded_and_operations_are_fast():
    clock = Clock(0.0)
    limiter, acme = TenantLimiter(clock), tenant(1, tokens_per_minute=10**9, max_concurrent=10**6)
    started = time.perf_counter()
    for i in range(20_000):
        clock.now = i * 0.05  # 1000 seconds of traffic, 20 requests a second
        limiter.acquire(acme, 10).release(7)
    elapsed = time.perf_counter() - started
    state = limiter._tenants[1]
    assert len(state.buckets) == 61  # one bucket per second of the window, no more
    in_window = sum(1 for i in range(20_000) if math.floor(i * 0.05) >= math.floor(clock.now - 60))
    assert in_window == 1220 and state.charged == 7 * in_window
    assert elapsed < 2.0, f"20 000 acquire/release took {elapsed:.2f} s"
    clock.now += 120
    assert limiter.usage(1)["charged"] == 0


# ---- through the HTTP app ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with AdminApp.start(tmp_path_factory.mktemp("limits")) as running:
        yield running


def _tenant_key(app: AdminApp, name: str, **limits: int) -> tuple[int, str]:
    with app.client() as admin:
        created = admin.post("/admin/tenants", json={"name": name, "views": ["original"], "limits": limits})
        assert created.status_code == 200, created.text
        key = admin.post(f"/admin/tenants/{name}/keys").json()["key"]
    return created.json()["id"], key


def _complete(app: AdminApp, key: str, **extra) -> httpx.Response:
    body = {"model": "original", "prompt": "Question: hi\nAnswer:", **extra}
    return httpx.post(app.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def test_http_cap_is_a_400_and_limits_answer_429_with_retry_after(app):
    noisy_id, noisy = _tenant_key(app, "noisy", max_concurrent=1, tokens_per_minute=1000, max_tokens_cap=32)
    quiet_id, quiet = _tenant_key(app, "quiet", max_concurrent=1)

    over_cap = _complete(app, noisy, max_tokens=33)
    assert over_cap.status_code == 400
    assert over_cap.json()["error"]["param"] == "max_tokens" and "at most 32" in over_cap.json()["error"]["message"]

    # Hold the noisy tenant's only slot, as a request in flight would.
    limiter = app.service.limiter
    noisy_principal = app.service.registry.authenticate(noisy)
    held = limiter.acquire(noisy_principal, 8)
    limited = _complete(app, noisy, max_tokens=8)
    assert limited.status_code == 429 and limited.headers["retry-after"] == "1"
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"

    # The quiet tenant is not slowed: it passes its limiter and reaches the (unstarted) engine: 503.
    passed = _complete(app, quiet, max_tokens=8)
    assert passed.status_code == 503 and passed.json()["error"]["code"] == "service_unavailable"
    assert limiter.usage(quiet_id)["active"] == 0  # the permit was released when the engine refused
    held.release(0)
    assert _complete(app, noisy, max_tokens=8).status_code == 503
    assert limiter.usage(noisy_id) == {"active": 0, "reserved": 0, "charged": 0}

    scraped = httpx.get(app.url + "/metrics", headers=app.admin_headers).text
    assert 'alter_rejected_requests_total{reason="rate_limit"}' in scraped
    assert 'alter_rejected_requests_total{reason="max_tokens"}' in scraped


def test_http_prompt_tokens_count_against_the_budget_and_n_against_concurrency(app, monkeypatch):
    # Prompts are checked against the context length of a running engine; this one never starts.
    monkeypatch.setattr(app.service.generator.planner, "engine", SimpleNamespace(max_model_len=2048))
    _, key = _tenant_key(app, "wordy", tokens_per_minute=50, max_concurrent=2)
    long_prompt = " ".join(["word"] * 200)
    over = _complete(app, key, prompt=long_prompt, max_tokens=1)
    assert over.status_code == 400, over.text  # 1 completion token, but ~200 prompt tokens
    error = over.json()["error"]
    assert error["code"] == "request_exceeds_token_budget" and "prompt tokens" in error["message"]
    assert _complete(app, key, max_tokens=4).status_code == 503  # a short prompt fits: it reaches the engine
    many = _complete(app, key, max_tokens=1, n=3)
    assert many.status_code == 400 and many.json()["error"]["param"] == "n"


def test_http_server_busy_is_a_503_with_retry_after(app):
    tenant_id, key = _tenant_key(app, "crowd")
    limiter = app.service.limiter
    other = limiter.acquire(app.service.registry.authenticate(app.admin_key), 8, sequences=3)  # someone else's load
    limiter.max_queued_sequences = 4
    try:
        busy = _complete(app, key, max_tokens=1, n=2)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "2"
        assert busy.json()["error"]["code"] == "server_busy"
        assert limiter.usage(tenant_id)["active"] == 0
    finally:
        limiter.max_queued_sequences = None
        other.release(0)
    assert limiter.held_sequences == 0
