"""Training configuration: one pydantic model, loaded from YAML (`alter-train run --config x.yaml`).

Defaults are the ALTER paper's: rank 8, lr_B 1e-3, lr_A 1e-5, β = γ = 1, λ = 0.01, batch 4,
3 epochs, Tsallis q = 1.5 with threshold 1.2 (see `train.alter.entropy` for why q = 1.5). Small
from-scratch models need other values; they set them in their own config file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from alter_serve.core.manifest import MAX_ALPHA, MAX_SCALE, SUPPORTED_RANKS
from alter_serve.core.names import is_valid_head_name

from train.data.prompting import PromptFormat, prompt_format
from train.runtime import check_device_name

Method = Literal["alter", "alter_no_entropy", "grad_ascent", "grad_diff", "npo"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(ValueError):
    """A training config that cannot be read or is invalid; the message names the file and every field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Section):
    """The base model: a Hugging Face folder, or "demo" for `train.demo.demo_model.build_demo_model()`."""

    path: str = "demo"
    # auto: bf16 weights on CUDA (adapters stay fp32), fp32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # The model before the forget data was learned (same tokenizer): the teacher of
    # optim.forget_loss "kl_pre". Loaded for that loss only.
    pretrained_path: str | None = None


class PromptFormatSection(_Section):
    """A custom prompt format (train.data.prompting): `template` holds {question} once."""

    template: str
    answer_prefix: str = " "
    stop: list[str] = Field(default_factory=list)


def _as_format(spec: str | PromptFormatSection) -> PromptFormat:
    return prompt_format(spec if isinstance(spec, str) else spec.model_dump())


class DataSection(_Section):
    """Forget/retain data and how forget records are grouped into sub-domains (one head each).

    kind "synthetic": a `SyntheticTofu` folder (`path`; default: the model folder's `data/`); the
    forget set is the records of `forget_subdomains`, the retain set all other records.
    kind "json": TOFU-format record files `forget_file` and `retain_file` (a JSON list or JSON lines).
    Sub-domains come from the records' `subdomain_field`, or, when that is null, from k-means over
    the base model's mean hidden states into `num_subdomains` clusters (heads "cluster-0", …).
    `prompt_format` is the text the model was fine-tuned on: "qa" (`Question: …\nAnswer: …`, the
    demo and TOFU-bench models), "tofu-llama2" (`[INST] … [/INST]…`, the public TOFU Llama-2
    checkpoints), or a custom {template, answer_prefix, stop}.
    """

    kind: Literal["synthetic", "json"] = "synthetic"
    path: str | None = None
    forget_subdomains: list[str] = Field(default_factory=list)
    forget_file: str | None = None
    retain_file: str | None = None
    subdomain_field: str | None = "subdomain"
    num_subdomains: int | None = Field(default=None, ge=1)
    max_length: int = Field(default=256, ge=8)
    max_retain: int | None = Field(default=None, ge=1)
    prompt_format: str | PromptFormatSection = "qa"
    # Question/answer records of entities the model never learned (TOFU's holdout authors): their
    # mean answer NLL under the base model is the "never learned" level τ of forget_loss bounded_nll.
    holdout_file: str | None = None

    @field_validator("prompt_format")
    @classmethod
    def _known_format(cls, value: str | PromptFormatSection) -> str | PromptFormatSection:
        _as_format(value)  # a known name, or a template with {question} exactly once
        return value

    @property
    def fmt(self) -> PromptFormat:
        """The prompt format as a `PromptFormat`."""
        return _as_format(self.prompt_format)

    @model_validator(mode="after")
    def _consistent(self) -> DataSection:
        if self.kind == "synthetic" and not self.forget_subdomains:
            raise ValueError("data.kind 'synthetic' needs data.forget_subdomains (one forget head each)")
        if self.kind == "json" and not (self.forget_file and self.retain_file):
            raise ValueError("data.kind 'json' needs data.forget_file and data.retain_file")
        if self.subdomain_field is None and self.num_subdomains is None:
            raise ValueError("set data.subdomain_field, or data.num_subdomains for k-means sub-domains")
        bad = [d for d in self.forget_subdomains if not is_valid_head_name(d)]
        if bad:
            raise ValueError(f"forget_subdomains {bad} are not valid head names ([a-z0-9][a-z0-9_-]*)")
        if self.kind == "json" and self.forget_subdomains and self.subdomain_field is None:
            # k-means names its own heads; the list would be ignored without a word.
            raise ValueError("data.forget_subdomains selects records by data.subdomain_field, which is null "
                             "(k-means sub-domains); set data.subdomain_field or drop data.forget_subdomains")
        return self


class AdapterSection(_Section):
    rank: int = 8
    alpha: float = Field(default=16.0, gt=0, le=MAX_ALPHA, allow_inf_nan=False)
    target_modules: list[str] = Field(default_factory=lambda: list(LLAMA_TARGETS))
    init_scale: float = Field(default=1e-2, gt=0)  # ‖column‖ of the data-initialised heads
    init_tokens: int = Field(default=512, ge=1)     # tokens per head used for that initialisation

    @model_validator(mode="after")
    def _servable_rank(self) -> AdapterSection:
        if self.rank not in SUPPORTED_RANKS:
            raise ValueError(f"adapter.rank {self.rank} cannot be served by vLLM; use one of {list(SUPPORTED_RANKS)}")
        if self.alpha / self.rank > MAX_SCALE:  # the bundle format refuses it (alter_serve.core.validation)
            raise ValueError(f"adapter.alpha / adapter.rank = {self.alpha / self.rank:g} exceeds {MAX_SCALE:g}; lower alpha")
        return self


class EntropySection(_Section):
    q: float = Field(default=1.5, gt=0)
    threshold: float = 1.2
    split: Literal["threshold", "quantile"] = "threshold"
    quantile: float = Field(default=0.8, gt=0, lt=1)
    histogram: bool = True


class OptimSection(_Section):
    epochs: int = Field(default=3, ge=0)          # Phase II (ALTER) or the baseline's epochs
    phase1_epochs: int = Field(default=1, ge=0)   # ALTER Phase I (shared A)
    batch_size: int = Field(default=4, ge=1)
    lr_A: float = Field(default=1e-5, ge=0)
    lr_B: float = Field(default=1e-3, ge=0)
    lr: float = Field(default=1e-5, gt=0)         # baselines (LoRA or full parameters)
    weight_decay: float = Field(default=0.0, ge=0)
    # Learning-rate schedule of Phase II and the baselines: linear warm-up over `warmup_epochs`, then
    # constant or a linear decay to 0 at the last step (open-unlearning's recipe: 1 epoch, linear).
    lr_schedule: Literal["constant", "linear"] = "constant"
    warmup_epochs: float = Field(default=0.0, ge=0)
    adam_eps: float = Field(default=1e-8, gt=0)
    grad_clip: float | None = Field(default=1.0, gt=0)
    beta: float = Field(default=1.0, ge=0)        # ALTER forget (IHL) weight; GradDiff/NPO γ
    gamma: float = Field(default=1.0, ge=0)       # ALTER retain (NLL) weight; GradDiff/NPO α
    lam: float = Field(default=0.01, ge=0)        # ALTER structural (orthogonality) weight
    npo_beta: float = Field(default=0.1, gt=0)
    # Retain step: each forget head joins the (detached) forward with this probability.
    retain_view_head_prob: float = Field(default=0.5, ge=0, le=1)
    retain_view_nonempty: bool = True             # ...redrawn until at least one forget head is on
    # The forget term (train.alter.alter_steps): "ihl" (the paper), "bounded_nll" (raise each answer's NLL
    # to the never-learned level τ, then stop), "kl_pre" (distil model.pretrained_path on forget data).
    forget_loss: Literal["ihl", "bounded_nll", "kl_pre"] = "ihl"
    # Tokens the forget loss sees: "low_entropy" (the paper) or "answer" (every answer token but EOS).
    forget_tokens: Literal["low_entropy", "answer"] = "low_entropy"
    # τ of bounded_nll; None: the mean answer NLL of data.holdout_file under the base model.
    forget_nll_target: float | None = Field(default=None, gt=0)
    retain_kl: float = Field(default=0.0, ge=0)  # κ · KL(base ‖ view) on retain answers (adapters-off teacher)
    # κ_a: every forget head also answers for retain text under its own view, κ_a · KL(base ‖ view)
    # on `anchor_batch_size` retain rows per head and step, gradient to that head only (alter_loop).
    forget_anchor: float = Field(default=0.0, ge=0)
    anchor_batch_size: int = Field(default=4, ge=1)
    # Phase II: every head in one forward/backward (train.alter.fused_step); false: one pass per head
    # (train.alter.alter_steps, the reference). Same views, same gradients.
    fused_step: bool = True
    router_epochs: int = Field(default=3, ge=0)
    router_lr: float = Field(default=1e-2, gt=0)
    # Router training data: a seeded sample of up to this many tokens from the retain set and from
    # each forget sub-domain (one budget per label, so a large retain set cannot crowd them out).
    router_tokens_per_label: int = Field(default=50_000, ge=1)


class CalibrationSection(_Section):
    """View calibration after ALTER training (train.alter.calibration): the forget-head weight ω(n) for
    views of n heads, the largest that keeps the retain calibration set's answer probability at
    `min_retain_ratio` × the base model's. The calibration set is up to `max_examples` records
    (a seeded sample) of `retain_file` (TOFU-format records, never an evaluation set) or, by
    default, of the retain training records."""

    enabled: bool = True
    min_retain_ratio: float = Field(default=0.95, gt=0, le=1)
    retain_file: str | None = None
    max_examples: int = Field(default=128, ge=1)
    steps: int = Field(default=6, ge=1, le=20)
    subsets_per_count: int = Field(default=2, ge=1)


class RuntimeSection(_Section):
    device: str = "auto"                  # auto: cuda if available, else cpu; or cpu, cuda, cuda:N
    bf16: bool = True                     # autocast to bf16 on CUDA
    cpu_bf16: bool = False                # ...and on CPU too (faster there; fp32 stays the CPU default)
    gradient_checkpointing: bool = False
    seed: int = 0
    threads: int | None = Field(default=None, ge=1)
    progress: bool = True
    output_dir: str | None = None         # default: runs/<name>
    cache_dir: str = "var/cache"
    eval_batch_size: int = Field(default=16, ge=1)
    # Score the base model and every view before/after training into report.json (answer probabilities).
    report_eval: bool = True

    @field_validator("device")
    @classmethod
    def _supported_device(cls, value: str) -> str:
        return check_device_name(value)


class TrainConfig(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    method: Method = "alter"
    peft: Literal["lora", "full"] = "lora"   # baselines only; ALTER is always AsymLoRA
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection
    adapter: AdapterSection = Field(default_factory=AdapterSection)
    entropy: EntropySection = Field(default_factory=EntropySection)
    optim: OptimSection = Field(default_factory=OptimSection)
    calibration: CalibrationSection = Field(default_factory=CalibrationSection)
    runtime: RuntimeSection = Field(default_factory=RuntimeSection)

    @model_validator(mode="after")
    def _reachable_threshold(self) -> TrainConfig:
        """For q > 1, S_q < 1/(q − 1) over any vocabulary (train.alter.entropy), so a threshold at or above
        that bound makes Phase I a no-op; the vocabulary-exact check runs once the model is loaded."""
        cfg = self.entropy
        if self.method == "alter" and cfg.split == "threshold" and cfg.q > 1.0:
            bound = 1.0 / (cfg.q - 1.0)
            if cfg.threshold >= bound:
                raise ValueError(
                    f"entropy.threshold {cfg.threshold} can never be exceeded with q = {cfg.q}: S_q < 1/(q − 1) "
                    f"= {bound:.4g} for every vocabulary, so Phase I would train on nothing. Lower the "
                    f"threshold, use q < {1.0 + 1.0 / cfg.threshold:.4g}, or split: quantile")
        return self

    @model_validator(mode="after")
    def _forget_loss_inputs(self) -> TrainConfig:
        optim = self.optim
        if optim.forget_loss == "bounded_nll" and optim.forget_nll_target is None and not self.data.holdout_file:
            raise ValueError("optim.forget_loss 'bounded_nll' needs its never-learned level: set "
                             "optim.forget_nll_target, or data.holdout_file (answers of entities never trained)")
        if optim.forget_loss == "kl_pre" and not self.model.pretrained_path:
            raise ValueError("optim.forget_loss 'kl_pre' needs model.pretrained_path, the model from before the "
                             "forget data was learned")
        return self

    @property
    def is_alter(self) -> bool:
        return self.method in ("alter", "alter_no_entropy")

    def output_path(self) -> Path:
        return Path(self.runtime.output_dir or f"runs/{self.name}")


def load_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read a YAML config (optionally deep-merging `overrides`); errors name the file and every field."""
    source = Path(path)
    try:
        raw = yaml.safe_load(source.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read training config {source}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"training config {source} must be a YAML mapping, got {type(raw).__name__}")
    if overrides:
        raw = deep_merge(raw, overrides)
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"invalid training config {source}:\n  - " + "\n  - ".join(lines)) from None


def deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
