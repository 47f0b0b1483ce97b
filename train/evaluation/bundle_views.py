"""Local scorers for the views of an ALTER bundle: a view name becomes a scorable model.

A view NAME is ``original`` (adapters off), ``retain`` (the retain head alone), forget-head names
joined by ``+`` (retain head plus those forget heads, weight 1 each; a head written ``NAME*W``
gets weight W in [0, 1] instead, e.g. ``bio*0.5+cyber*0.5``), ``calibrated:`` followed by plain
names (the same heads at the bundle's calibrated weight ω(n) for n heads, see
``train.alter.calibration``), or ``routed`` (the paper's per-token entropy routing; needs router
weights in the bundle). The bundle is loaded into the model by ``train.alter.modeling``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from train.data.prompting import QA_FORMAT, PromptFormat, prompt_format
from train.evaluation.scorers import LocalScorer, ModeContext

CALIBRATED_PREFIX = "calibrated:"


def resolve_prompt_format(name: str | None, bundle_dir: str | None) -> PromptFormat:
    """`name` when given; else the format recorded in the bundle's manifest (training config
    `data.prompt_format`); else `qa`, the format of bundles made before formats were recorded."""
    if name:
        return prompt_format(name)
    if not bundle_dir:
        return QA_FORMAT
    from alter_serve.core.bundle import BundleError
    from alter_serve.core.manifest import MAX_MANIFEST_BYTES, parse_manifest
    from alter_serve.core.names import MANIFEST_FILE

    path = Path(bundle_dir) / MANIFEST_FILE
    problems: list[str] = []
    try:
        with path.open("rb") as f:
            manifest = parse_manifest(f.read(MAX_MANIFEST_BYTES + 1), problems)
    except OSError as exc:
        raise BundleError(bundle_dir, [f"{MANIFEST_FILE}: {exc}"]) from None
    if manifest is None:
        raise BundleError(bundle_dir, problems)
    spec = manifest.training.get("config", {}).get("data", {}).get("prompt_format", "qa")
    try:
        return prompt_format(spec)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        problem = f"{MANIFEST_FILE}: training.config.data.prompt_format {spec!r}: {exc}"
        raise BundleError(bundle_dir, [problem]) from None



def local_view_scorers(
    model_dir: str,
    bundle_dir: str | None,
    views: Sequence[str],
    *,
    device: str | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, LocalScorer]:
    """LocalScorers for the HF model in ``model_dir``, one per view of the ALTER bundle in
    ``bundle_dir``, all sharing one copy of the model (see the module docstring for view names;
    without a bundle only ``original``, the plain model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    if bundle_dir is None:
        if set(views) != {"original"}:
            raise SystemExit(f"views {sorted(set(views) - {'original'})} need a bundle")
        return {"original": LocalScorer(model.to(dev), tokenizer, batch_size=batch_size, progress=progress)}
    alter, bundle = attach_bundle(model, model_dir, bundle_dir)
    scorers = {}
    for view in dict.fromkeys(views):
        module, mode = bundle_view(alter, bundle, view)
        scorers[view] = LocalScorer(module.to(dev), tokenizer, mode=mode, batch_size=batch_size, progress=progress)
    return scorers


def attach_bundle(model: torch.nn.Module, model_dir: str, bundle_dir: str) -> tuple[Any, Any]:
    """(AlterModel, AlterBundle): the bundle validated against the base model's module shapes
    and fingerprint (a bundle trained on another base model is refused), then injected into
    ``model`` in place by ``train.alter.modeling.from_bundle``."""
    from alter_serve.core.bundle import load_bundle
    from alter_serve.core.fingerprint import fingerprint, module_shapes
    from train.alter.modeling import from_bundle

    bundle = load_bundle(bundle_dir, module_shapes(model_dir), fingerprint(model_dir))
    return from_bundle(model, bundle), bundle


def bundle_view(alter: Any, bundle: Any, view: str) -> tuple[torch.nn.Module, ModeContext | None]:
    """(module to score, mode context) that makes ``alter`` behave as ``view``."""
    if view == "routed":
        return _RoutedModel(alter, bundle), None
    if view == "original":
        return alter.model, lambda: alter.mixing("off")
    heads_part = view.removeprefix(CALIBRATED_PREFIX)
    forget = {} if heads_part == "retain" else weighted_heads(view, heads_part)
    unknown = sorted(set(forget) - set(alter.forget_heads))
    if unknown:
        raise SystemExit(f"view {view!r}: no forget heads {unknown} in the bundle (heads: {alter.forget_heads})")
    if view.startswith(CALIBRATED_PREFIX):
        if any(weight != 1.0 for weight in forget.values()):
            raise SystemExit(f"view {view!r}: a calibrated view takes its weights from the bundle; "
                             "drop the *W weights or the calibrated: prefix")
        from alter_serve.core.views import View, calibrated_view

        try:
            forget = calibrated_view(View(name="calibrated", forget=forget), bundle.manifest.calibration).forget
        except ValueError as exc:
            raise SystemExit(f"view {view!r}: {exc}") from None
    return alter.model, lambda: alter.mixing("view", retain=1.0, forget=forget)


def weighted_heads(view: str, heads_part: str) -> dict[str, float]:
    """``a+b*0.5`` → {"a": 1.0, "b": 0.5}: forget heads joined by ``+``, each with an optional
    ``*W`` weight in [0, 1] (SystemExit naming the view on a bad term)."""
    forget: dict[str, float] = {}
    for term in heads_part.split("+"):
        name, star, weight_text = term.partition("*")
        try:
            weight = float(weight_text) if star else 1.0
        except ValueError:
            weight = math.nan
        if not name or not 0.0 <= weight <= 1.0 or name in forget:
            raise SystemExit(f"view {view!r}: {term!r} is not a forget head NAME or NAME*W with W in [0, 1] "
                             "(each head at most once)")
        forget[name] = weight
    return forget


class _RoutedModel(torch.nn.Module):
    """Forward-only module running the paper's routed inference (a base pass for entropy and
    hidden state, then the adapted pass with per-token head weights). It has no ``generate``:
    per-token routing needs the base pass at every step, so LocalScorer's greedy loop is used."""

    def __init__(self, alter: Any, bundle: Any) -> None:
        from train.alter.router import EntropyRouter

        super().__init__()
        self.alter = alter
        self.router = EntropyRouter.from_bundle(bundle)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        from train.alter.router import routed_forward

        return routed_forward(self.alter, self.router, input_ids, attention_mask)
