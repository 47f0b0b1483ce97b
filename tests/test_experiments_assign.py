"""A/B arm assignment: stable, proportional to the weights, monotone under weight changes.

Proportion checks use a binomial bound: with n users and arm probability p, the count of an arm has
standard deviation sqrt(n·p·(1−p)); we accept |count − n·p| ≤ 4σ (a false alarm about once in
15,000 runs for a correct implementation). The hash is deterministic, so each run sees the same
numbers anyway; the bound says the numbers are what a fair assignment would give.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import pytest

from alter_serve.registry import Registry
from alter_serve.registry.experiments import (
    PAUSED,
    RUNNING,
    STOPPED,
    Arm,
    arm_problems,
    assign,
    choose_arm,
    normalize_sticky,
    sticky_value,
    unit_hash,
)

N_USERS = 10_000
USERS = [f"user-{i}" for i in range(N_USERS)]


@dataclass(frozen=True)
class Exp:
    arms: tuple[Arm, ...]
    salt: str = "salt-1"
    status: str = RUNNING
    control_arm: str = "a"


def arms(*weights: float) -> tuple[Arm, ...]:
    return tuple(Arm(name=chr(ord("a") + i), view=f"view-{i}", weight=w) for i, w in enumerate(weights))


def within_4_sigma(count: int, n: int, p: float) -> bool:
    sigma = math.sqrt(n * p * (1 - p))
    return abs(count - n * p) <= 4 * sigma


def test_unit_hash_is_the_documented_formula():
    digest = hashlib.sha256(b"s3cret:alice").hexdigest()
    assert unit_hash("s3cret", "alice") == int(digest[:16], 16) / 2**64
    assert 0.0 <= unit_hash("s3cret", "alice") < 1.0
    assert unit_hash("s3cret", "alice") != unit_hash("s3cret", "bob")
    assert unit_hash("s3cret", "alice") != unit_hash("other", "alice")


def test_assign_maps_u_onto_cumulative_weights():
    three = arms(1, 2, 7)  # boundaries at 0.1 and 0.3
    assert assign(three, 0.0).name == "a"
    assert assign(three, 0.0999).name == "a"
    assert assign(three, 0.1).name == "b"
    assert assign(three, 0.2999).name == "b"
    assert assign(three, 0.3).name == "c"
    assert assign(three, math.nextafter(1.0, 0.0)).name == "c"
    assert assign(three, 1.0).name == "c"  # float rounding of (2**64 - 1) / 2**64
    with_zero = arms(1, 0, 1)
    assert {assign(with_zero, u / 100).name for u in range(100)} == {"a", "c"}
    assert assign(arms(1, 1, 0), 1.0).name == "b"  # the fallback skips a trailing zero-weight arm


def test_same_user_keeps_the_same_arm():
    experiment = Exp(arms(1, 1, 1))
    first = [choose_arm(experiment, u).name for u in USERS[:2000]]
    again = [choose_arm(experiment, u).name for u in USERS[:2000]]
    rebuilt = Exp(arms(1, 1, 1))  # a new object with the same salt, as after a restart
    assert first == again == [choose_arm(rebuilt, u).name for u in USERS[:2000]]
    assert set(first) == {"a", "b", "c"}


def test_stickiness_survives_a_registry_restart(registry_url, tmp_path):
    url = registry_url  # SQLite and PostgreSQL (conftest.py)
    registry = Registry(url, tmp_path / "data")
    registry.create_all()
    registry.create_tenant("acme", views=["original"])
    registry.create_experiment("exp1", alias="chat", tenants=["acme"],
                               arms=[{"name": "control", "view": "original", "weight": 1},
                                     {"name": "treatment", "view": "original", "weight": 1}])
    before = registry.get_experiment("exp1")
    assigned = [registry.choose_arm(before, u).name for u in USERS[:1000]]
    registry.close()

    reopened = Registry(url, tmp_path / "data")
    after = reopened.get_experiment("exp1")
    assert after.salt == before.salt and len(after.salt) == 16
    assert [after.choose_arm(u).name for u in USERS[:1000]] == assigned
    assert 400 < assigned.count("control") < 600
    reopened.close()


@pytest.mark.parametrize("weights", [(1, 1), (1, 2, 7), (0.05, 0.95), (3, 0, 1)])
def test_proportions_follow_the_weights(weights):
    experiment = Exp(arms(*weights))
    counts: dict[str, int] = {}
    for user in USERS:
        name = choose_arm(experiment, user).name
        counts[name] = counts.get(name, 0) + 1
    total = sum(weights)
    for arm in experiment.arms:
        p = arm.weight / total
        if p == 0:
            assert arm.name not in counts, "a zero-weight arm must never be chosen"
        else:
            assert within_4_sigma(counts[arm.name], N_USERS, p), (arm.name, counts, p)


def test_changing_weights_moves_only_the_users_it_must():
    old, new = Exp(arms(50, 50)), Exp(arms(40, 60))
    moved_a_to_b = moved_b_to_a = 0
    for user in USERS:
        before, after = choose_arm(old, user).name, choose_arm(new, user).name
        if before != after:
            if before == "a":
                moved_a_to_b += 1
            else:
                moved_b_to_a += 1
            # exactly the users whose u lies between the old and the new boundary move
            assert 0.4 <= unit_hash(old.salt, user) < 0.5
        else:
            assert not 0.4 <= unit_hash(old.salt, user) < 0.5
    assert moved_b_to_a == 0
    assert within_4_sigma(moved_a_to_b, N_USERS, 0.10), moved_a_to_b


def test_adding_weight_to_the_last_arm_keeps_the_others_in_order():
    old, new = Exp(arms(1, 1, 2)), Exp(arms(1, 1, 6))  # boundaries 0.25/0.5 → 0.125/0.25
    moves = {}
    for user in USERS:
        pair = (choose_arm(old, user).name, choose_arm(new, user).name)
        moves[pair] = moves.get(pair, 0) + 1
    # c only grows: nobody leaves c; a keeps [0, 0.125); b's users shift to a's old range or to c
    assert all(after == "c" for (before, after) in moves if before == "c")
    assert set(moves) <= {("a", "a"), ("a", "b"), ("b", "c"), ("c", "c")}
    assert within_4_sigma(moves[("a", "a")], N_USERS, 0.125)
    assert within_4_sigma(moves[("b", "c")], N_USERS, 0.25)


def test_paused_and_stopped_send_everyone_to_the_control_arm():
    for status in (PAUSED, STOPPED):
        experiment = Exp(arms(1, 1, 1), status=status, control_arm="b")
        assert {choose_arm(experiment, u).name for u in USERS[:500]} == {"b"}
        assert choose_arm(experiment, None).name == "b"


def test_random_sticky_draws_fresh_arms():
    experiment = Exp(arms(1, 3))
    draws = [choose_arm(experiment, None).name for _ in range(4000)]
    assert within_4_sigma(draws.count("b"), 4000, 0.75)


def test_a_new_salt_gives_an_independent_assignment():
    one, two = Exp(arms(1, 1), salt="first"), Exp(arms(1, 1), salt="second")
    same = sum(choose_arm(one, u).name == choose_arm(two, u).name for u in USERS)
    assert within_4_sigma(same, N_USERS, 0.5)


def test_sticky_kinds_and_arm_validation():
    assert normalize_sticky("user") == "user"
    assert normalize_sticky("random") == "random"
    assert normalize_sticky("header:X-Session-Id") == "header:x-session-id"
    for bad in ("users", "header:", "header:bad header", "cookie:x", ""):
        with pytest.raises(ValueError, match="sticky key"):
            normalize_sticky(bad)
    assert arm_problems(arms(1, 1), "a") == []
    assert arm_problems([], None) == ["an experiment needs at least one arm"]
    twice = (Arm(name="a", view="v", weight=1), Arm(name="a", view="w", weight=1))
    assert arm_problems(twice, "a") == ["arm names must be unique; repeated: ['a']"]
    assert arm_problems(arms(0, 0), "a") == ["arm weights must not all be zero"]
    assert arm_problems(arms(1e6, 1e6 + 1, 1e308), "a") == [
        "arm weights must be at most 1e+06 (only their ratios matter); too large: ['b', 'c']"]
    assert arm_problems(arms(1), "zzz") == ["control arm 'zzz' is not one of the arms ['a']"]
    for bad in ({"name": "A", "view": "v", "weight": 1}, {"name": "a", "view": "v", "weight": -1},
                {"name": "a", "view": "v", "weight": float("nan")}, {"name": "a\n", "view": "v", "weight": 1}):
        with pytest.raises(ValueError):
            Arm.model_validate(bad)


def test_sticky_user_falls_back_to_the_api_key():
    """Sticky 'user' hashes the request's `user`, or its API key when it sends none: one client keeps
    one arm instead of drawing a fresh one per request."""
    headers = {"x-session": "s1"}
    assert sticky_value("user", user="alice", headers=headers, key_id=7) == "alice"
    assert sticky_value("user", user=None, headers=headers, key_id=7) == "api-key:7"
    assert sticky_value("user", user="", headers=headers, key_id=7) == "api-key:7"
    assert sticky_value("header:x-session", user="alice", headers=headers, key_id=7) == "s1"
    assert sticky_value("header:x-other", user="alice", headers=headers, key_id=7) is None
    assert sticky_value("random", user="alice", headers=headers, key_id=7) is None
    experiment = Exp(arms(1, 1, 1))
    no_user = [choose_arm(experiment, sticky_value("user", user=None, headers={}, key_id=7)).name for _ in range(50)]
    assert len(set(no_user)) == 1
    per_key = {choose_arm(experiment, sticky_value("user", user=None, headers={}, key_id=k)).name for k in range(200)}
    assert per_key == {"a", "b", "c"}
