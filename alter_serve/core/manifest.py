"""manifest.json of an ALTER bundle: its pydantic models and a strict parser (DESIGN.md §4).

Every model refuses unknown keys and non-finite floats; `parse_manifest` adds strict types (so
"8", 8.0 and true are not a rank), refuses duplicate keys and bounds the nesting of free-form
fields. Rules that span fields or need the served base model are `validation.manifest_problems`.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints, ValidationError, field_validator
from typing_extensions import TypedDict

from .names import MANIFEST_FILE, MODULE_NAME_PATTERN, RETAIN_HEAD

FORMAT_VERSION = 1
SUPPORTED_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's LoRA kernels accept
MAX_ALPHA = 4096.0
MAX_SCALE = 64.0  # s = alpha / r; PEFT's usual alpha = 2r gives s = 2
MAX_MANIFEST_BYTES = 1 << 20  # checked before anything is parsed
MAX_JSON_DEPTH = 32

# Every manifest model: unknown keys and non-finite floats are refused. Files are validated with
# strict=True on top (load_bundle), so "8", 8.0 and true are not a rank and "16" is not an alpha.
_MODEL_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)
_Text = Annotated[str, StringConstraints(max_length=4096, pattern=r"^[^\x00-\x1f\x7f]*$")]
_TargetName = Annotated[str, StringConstraints(max_length=200, pattern="^" + MODULE_NAME_PATTERN + "$")]
# Head counts are written as JSON object keys: canonical decimal strings only, so "1" and "01"
# (or "1.0") can never both name count 1. Negative and 0 parse so the range check can name them.
_COUNT_KEY_RE = re.compile(r"(?:0|-?[1-9][0-9]{0,8})\Z")


class BaseModelRef(BaseModel):
    model_config = _MODEL_CONFIG
    name_or_path: _Text
    fingerprint: Annotated[str, StringConstraints(max_length=200, pattern=r"^[A-Za-z0-9:._-]+$")]


class Heads(BaseModel):
    model_config = _MODEL_CONFIG
    retain: str = RETAIN_HEAD
    forget: list[str] = Field(default_factory=list)


# The Tsallis entropy parameters, bounded alike wherever a bundle stores them (entropy, router).
TsallisQ = Annotated[float, Field(gt=0.0)]
EntropyThreshold = Annotated[float, Field(ge=-1e6, le=1e6)]


class EntropySoftmaxParams(TypedDict, total=False):
    """`router.params` of kind "entropy_softmax" (train.router.EntropyRouter.spec). A plain dict
    after validation, so readers index it; q and threshold are required once router.weight exists."""

    __pydantic_config__ = _MODEL_CONFIG  # type: ignore[misc]
    features: Annotated[str, StringConstraints(max_length=200)]
    null_slot: Annotated[StrictInt, Field(ge=0, le=0)]
    q: TsallisQ
    threshold: EntropyThreshold
    tau_high: Annotated[float, Field(gt=0.0, le=100.0)]
    tau_low: Annotated[float, Field(gt=0.0, le=100.0)]


# The tensors each router kind stores, by name → number of dimensions.
ROUTER_TENSORS: dict[str, dict[str, int]] = {"entropy_softmax": {"weight": 2}}


class RouterSpec(BaseModel):
    model_config = _MODEL_CONFIG
    kind: Literal["entropy_softmax"] = "entropy_softmax"
    params: EntropySoftmaxParams = Field(default_factory=dict)  # type: ignore[arg-type]


class EntropySpec(BaseModel):
    model_config = _MODEL_CONFIG
    q: TsallisQ = 1.5
    threshold: EntropyThreshold = 1.2


class Calibration(BaseModel):
    """View calibration (train.calibration): `weights[n]` is the forget-head weight ω(n) ∈ [0, 1] for a
    view that switches n forget heads on, the largest that kept the retain calibration set's answer
    probability at or above `min_retain_ratio` × the base model's (`retain_ratio[n]` is what it kept).

    A bundle's calibration has one weight per count n = 1 … (number of forget heads), non-increasing
    in n (more heads never get a larger weight), and `retain_ratio` only for calibrated counts
    (checked in `validate_contents`, which knows the head count)."""

    model_config = _MODEL_CONFIG
    min_retain_ratio: float = Field(gt=0.0, le=1.0)
    weights: dict[int, float]
    retain_ratio: dict[int, float] = Field(default_factory=dict)
    retain_examples: int = Field(default=0, ge=0, le=1 << 53)

    @field_validator("weights", "retain_ratio", mode="before")
    @classmethod
    def _head_count_keys(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value  # pydantic reports the type
        bad = [k for k in value if isinstance(k, bool) or not isinstance(k, (int, str))
               or (isinstance(k, str) and not _COUNT_KEY_RE.match(k))]
        if bad:
            raise ValueError(f"keys {bad} are not head counts; write each count as a plain integer, e.g. \"1\"")
        return {int(k): v for k, v in value.items()}

    def weight_for(self, count: int) -> float:
        """ω(count); 1.0 for a view with no forget heads. Counts beyond the calibrated ones take
        the largest calibrated count's weight (more heads never get a larger weight)."""
        if count <= 0:
            return 1.0
        known = [n for n in self.weights if n <= count]
        return self.weights[max(known)] if known else 1.0


class Manifest(BaseModel):
    """manifest.json. `target_modules` are PEFT-style suffixes (e.g. "q_proj")."""

    model_config = _MODEL_CONFIG
    format_version: int = FORMAT_VERSION
    base_model: BaseModelRef
    rank: int = Field(gt=0)
    alpha: float = Field(gt=0.0, le=MAX_ALPHA)
    target_modules: list[_TargetName] = Field(min_length=1, max_length=256)
    heads: Heads
    router: RouterSpec = Field(default_factory=RouterSpec)
    entropy: EntropySpec = Field(default_factory=EntropySpec)
    training: dict[str, Any] = Field(default_factory=dict)
    calibration: Calibration | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @field_validator("training")
    @classmethod
    def _plain_json(cls, value: dict[str, Any]) -> dict[str, Any]:
        problems: list[str] = []
        _json_value_problems(value, "training", 1, problems)
        if problems:
            more = f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise ValueError("; ".join(problems[:10]) + more)
        return value

    @field_validator("created_at", mode="before")
    @classmethod
    def _iso_datetime(cls, value: Any) -> Any:
        if isinstance(value, datetime):
            return value
        if isinstance(value, str) and len(value) <= 64:
            try:
                return datetime.fromisoformat(value)
            except ValueError:
                pass
        raise ValueError("must be an ISO 8601 date and time, e.g. \"2026-01-31T12:00:00+00:00\"")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _json_value_problems(value: Any, where: str, depth: int, problems: list[str]) -> None:
    """What in `value` is not plain, finite JSON (free-form fields must round-trip through a file)."""
    if depth > MAX_JSON_DEPTH:
        problems.append(f"{where}: nested deeper than {MAX_JSON_DEPTH} levels")
    elif isinstance(value, float):
        if not math.isfinite(value):
            problems.append(f"{where}: {value} is not a finite number")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _json_value_problems(item, f"{where}[{index}]", depth + 1, problems)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                problems.append(f"{where}: key {key!r} is not a string")
            _json_value_problems(item, f"{where}.{key}", depth + 1, problems)
    elif value is not None and not isinstance(value, (bool, int, str)):
        problems.append(f"{where}: a {type(value).__name__} is not a JSON value")


def parse_manifest(data: bytes, problems: list[str]) -> Manifest | None:
    """Strictly parse manifest.json bytes; add every problem to `problems` and return None on failure.

    Standard JSON only in effect: duplicate keys are refused (a parser that keeps the last one
    would validate a different manifest than another reader sees), NaN/Infinity/1e309 are refused
    by the finite-number rule, and types are exact (pydantic strict mode)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.append(f"{MANIFEST_FILE}: not UTF-8 text ({exc})")
        return None
    duplicates: list[str] = []

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                duplicates.append(key)
            seen[key] = value
        return seen

    try:
        raw = json.loads(text, object_pairs_hook=unique_keys)
    except RecursionError:
        problems.append(f"{MANIFEST_FILE}: JSON nested too deeply")
        return None
    except ValueError as exc:  # JSONDecodeError, or an integer literal too long to convert
        problems.append(f"{MANIFEST_FILE}: not valid JSON ({exc})")
        return None
    for key in sorted(set(duplicates)):
        problems.append(f"{MANIFEST_FILE}: key {key!r} appears more than once in one object; write each key once")
    if not isinstance(raw, dict):
        problems.append(f"{MANIFEST_FILE}: must be a JSON object, got {type(raw).__name__}")
        return None
    try:
        manifest = Manifest.model_validate(raw, strict=True)
    except ValidationError as exc:
        problems.extend(pydantic_problems(exc, MANIFEST_FILE))
        return None
    return None if duplicates else manifest


def pydantic_problems(exc: ValidationError, where: str) -> list[str]:
    return [f"{where}: {'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()]
