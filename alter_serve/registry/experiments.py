"""A/B arm assignment: a stable hash of (salt, sticky key) mapped onto cumulative arm weights.

For an experiment with arms a_1..a_n (weights w_i ≥ 0, W = Σ w_i) and a sticky value k:

    u = int(sha256(salt + ":" + k)[:16], 16) / 2**64          u ∈ [0, 1)
    arm = the first a_i with u < (w_1 + … + w_i) / W

Why this shape:
- *Stable*: u depends only on (salt, k), so a user keeps the same arm across requests, restarts and
  replicas, with nothing stored per user.
- *Fair*: u is uniform, so P(a_i) = w_i / W; a fresh salt gives an experiment assignments
  independent of every other experiment's.
- *Monotone*: each arm owns one interval of [0, 1). Changing weights moves only the boundaries, so
  the users that switch arm are exactly those whose u falls between an old and a new boundary
  (for two arms going from 50/50 to 40/60, the 10% with u ∈ [0.4, 0.5), all from a_1 to a_2).
- A paused or stopped experiment sends everyone to the control arm's view. Paused traffic is served
  *outside* the arm samples: the response names the control arm that served it (`x-alter-arm`,
  with `x-alter-experiment-status: paused`), but it is logged with the experiment and no arm, so it
  never enters the arm statistics (it was not randomized; counting it as control would bias the
  control sample).

The sticky value k of kind 'user' is the request's `user` field, or, when a request has none, its
API key (`api-key:<id>`), so a client that never sends `user` still keeps one arm; 'header:<name>'
is that header's value; 'random' (or an absent header) draws a fresh arm per request.

Every arm's view must be granted to every tenant of an unstopped experiment (`Registry` refuses the
experiment otherwise, and the request path checks it again): an alias never serves a view its
tenant could not name directly.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from ..core.names import HEAD_NAME_PATTERN

RUNNING, PAUSED, STOPPED = "running", "paused", "stopped"
STATUSES = (RUNNING, PAUSED, STOPPED)
STICKY_USER, STICKY_RANDOM, STICKY_HEADER_PREFIX = "user", "random", "header:"
# Bounded so that the sum of weights stays finite (1e308 + 1e308 is inf, and u < w / inf never holds).
MAX_ARM_WEIGHT = 1e6
_HEADER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}\Z")
# pydantic checks `pattern` with Rust regex, which has no \Z; there `$` (no multi-line flag) is end of text.
_FIELD_PATTERN = "^" + HEAD_NAME_PATTERN + "$"


class Arm(BaseModel):
    """One arm: a name (shown in responses and metrics), the view it serves, its traffic weight."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=_FIELD_PATTERN)
    view: str = Field(pattern=_FIELD_PATTERN)
    weight: float = Field(ge=0.0, allow_inf_nan=False)


class _Experiment(Protocol):
    arms: Sequence[Arm]
    salt: str
    status: str
    control_arm: str


def normalize_sticky(kind: str) -> str:
    """Check a sticky key kind ('user', 'random', 'header:<name>'); header names are lowercased
    because HTTP header names are case-insensitive. Raises ValueError naming the accepted forms."""
    if kind in (STICKY_USER, STICKY_RANDOM):
        return kind
    if isinstance(kind, str) and kind.startswith(STICKY_HEADER_PREFIX):
        header = kind[len(STICKY_HEADER_PREFIX):]
        if _HEADER_NAME_RE.match(header):
            return STICKY_HEADER_PREFIX + header.lower()
    raise ValueError(f"sticky key {kind!r} must be 'user', 'random' or 'header:<header-name>'")


def arm_problems(arms: Sequence[Arm], control_arm: str | None) -> list[str]:
    """Every problem with a list of arms and its control arm (empty list = valid)."""
    problems: list[str] = []
    if not arms:
        return ["an experiment needs at least one arm"]
    names = [a.name for a in arms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"arm names must be unique; repeated: {duplicates}")
    too_heavy = [a.name for a in arms if a.weight > MAX_ARM_WEIGHT]
    if too_heavy:
        problems.append(f"arm weights must be at most {MAX_ARM_WEIGHT:g} (only their ratios matter); "
                        f"too large: {too_heavy}")
    elif sum(a.weight for a in arms) <= 0:
        problems.append("arm weights must not all be zero")
    if control_arm is not None and control_arm not in names:
        problems.append(f"control arm {control_arm!r} is not one of the arms {names}")
    return problems


def new_salt() -> str:
    return secrets.token_hex(8)


def unit_hash(salt: str, sticky_value: str) -> float:
    """u = int(sha256(salt + ':' + sticky)[:16], 16) / 2**64, uniform on [0, 1)."""
    digest = hashlib.sha256(f"{salt}:{sticky_value}".encode("utf-8")).hexdigest()
    return int(digest[:16], 16) / 2**64


def assign(arms: Sequence[Arm], u: float) -> Arm:
    """The arm whose cumulative-weight interval holds u. Zero-weight arms own an empty interval."""
    total = sum(a.weight for a in arms)
    if total <= 0:
        raise ValueError("arm weights must not all be zero")
    cumulative = 0.0
    for arm in arms:
        cumulative += arm.weight
        if arm.weight > 0 and u < cumulative / total:
            return arm
    # u within rounding of 1.0 (the float division above can round 1 - 2**-64 up): the last live arm.
    return [a for a in arms if a.weight > 0][-1]


def control(experiment: _Experiment) -> Arm:
    return next(a for a in experiment.arms if a.name == experiment.control_arm)


def sticky_value(kind: str, *, user: str | None, headers: Mapping[str, str], key_id: int) -> str | None:
    """The sticky value k one request hashes under sticky `kind` (see the module docstring): its
    `user` (else `api-key:<key_id>`), the named header's value (`headers` as the request's:
    case-insensitive), or None for a fresh random arm."""
    if kind == STICKY_USER:
        return user if user else f"api-key:{key_id}"
    if kind.startswith(STICKY_HEADER_PREFIX):
        return headers.get(kind[len(STICKY_HEADER_PREFIX):])
    return None


def choose_arm(experiment: _Experiment, sticky_value: str | None) -> Arm:
    """The arm for one request. `sticky_value` is the value the experiment's sticky kind names
    (`sticky_value`); None (sticky 'random', or the header is absent) draws a fresh random arm.
    Paused and stopped experiments always give the control arm."""
    if experiment.status != RUNNING:
        return control(experiment)
    key = sticky_value if sticky_value is not None else secrets.token_hex(16)
    return assign(experiment.arms, unit_hash(experiment.salt, key))
