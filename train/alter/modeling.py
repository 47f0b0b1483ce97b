"""AsymLoRA (ALTER) layers injected into a Hugging Face causal LM.

Every targeted `nn.Linear` with frozen weight W0 [out, in] becomes

    y = W0 x + s · Σ_h ω_h · B_h · (A x)          s = alpha / r,  A: [r, in],  B_h: [out, r]

with heads h = 0 (retain, B_r) and h = 1 … H−1 (one forget head B_d per forget sub-domain).
`A x` is computed once per layer and all heads are mixed on it with one matmul:

* `view` mode (what tenants are served): ω is a fixed vector [H], so the heads collapse first,
  B_V = Σ_h ω_h B_h (a tiny [out, r] reduction), and the layer adds s · B_V (A x). This is
  *exactly* the standard LoRA (A, B_V) that `alter_serve.core.views.peft_tensors` writes.
* `routed` mode (the paper's per-token inference): ω is [..., H] per token, so the heads are
  concatenated, B_cat = [B_0 | … | B_{H−1}] ∈ [out, H·r], and the layer adds
  s · B_cat ((ω ⊗ A x) flattened to [..., H·r]).
* `samples` mode (the fused training step, `train.alter.fused_step`): every sample n of the batch has
  its own view, ω ∈ [N, H], split into the part that trains and the part that does not,
  `weights` = [2, N, H] with ω = weights[0] + weights[1]. Sample n adds s · B_n (A x_n) with

      B_n = Σ_h weights[0, n, h] · B_h + Σ_h weights[1, n, h] · sg(B_h)      (sg: stop-gradient)

  so B_h gets gradients from exactly the samples n with weights[0, n, h] ≠ 0, whatever other
  heads those samples switch on. `A x` is still computed once for all samples; the per-sample
  [out, r] matrices are one tiny einsum, and the mix is one batched matmul [N, T, r] × [N, r, out].
* `off`: the base model, adapters skipped.

Gradient isolation is per head: `AlterModel.set_grad_heads` names the heads that may receive
gradients in the next forward (kept in `HeadMix.keep`); the others enter the forward detached (their values are used, their
gradient is exactly zero). A head with ω_h = 0 also gets exactly zero gradient.

No host sync in the forward: everything a layer branches on is a Python value (mode, the
isolation flag), and the small tensors it uses (ω, the keep mask) are built when the mode is set
and copied to the device asynchronously (`host_to_device`).

Adapter parameters are kept in fp32 (optimizer master copy); the forward runs in the model's
compute dtype (bf16 under CUDA autocast), so the adapter adds few, small kernels.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from alter_serve.core.names import RETAIN_HEAD

from train.runtime import to_device

if TYPE_CHECKING:
    from alter_serve.core.bundle import AlterBundle
    from alter_serve.core.manifest import EntropySpec, RouterSpec

# The bundle module is imported only by to_bundle/from_bundle, so the layers need nothing but torch
# and the standard-library `names` (the GPU benchmark runs them where only torch, transformers and
# peft are installed).
MODES = ("off", "view", "routed", "samples")


class HeadMix(nn.Module):
    """What every AlterLinear of one model applies on its next forward (one instance, shared).

    `mode`: "off", "view", "routed" or "samples". `weights`: [H] in view mode, [..., H] broadcastable
    to the layer input's leading dims in routed mode, [2, N, H] (trained part, detached part) per
    sample of the batch in samples mode. `keep` ([1, H, 1] bool, None = all heads): the heads
    that may receive gradients, built once when they are set (`AlterModel.set_grad_heads`), so
    that no forward has to inspect a device tensor (on CUDA that is a host sync in every adapted
    layer).

    It is a module registered under every AlterLinear (and the AlterModel), with `weights` and
    `keep` as non-persistent buffers: whichever enclosing module is moved or cast (`alter.to`,
    `alter.model.cuda()`, `.double()`), they move with it, and they never enter a state dict.
    """

    def __init__(self, heads: Sequence[str]):
        super().__init__()
        self.heads = list(heads)
        self.mode = "view"
        self.register_buffer("weights", None, persistent=False)
        self.register_buffer("keep", None, persistent=False)

    @property
    def isolate(self) -> bool:
        """Whether some heads are detached in the next forward (a Python value: no device read)."""
        return self.keep is not None

    def extra_repr(self) -> str:
        return f"heads={self.heads}, mode={self.mode!r}"


class AlterLinear(nn.Module):
    """A frozen `nn.Linear` plus the shared A and the stacked heads B [out, H, r]."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, mix: HeadMix):
        super().__init__()
        self.base = base
        self.rank = rank
        self.scale = alpha / rank
        self.mix = mix
        num_heads = len(mix.heads)
        factory = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        # Heads stacked as [out, H, r]: head h is lora_B[:, h] (PEFT's [out, r] layout) and the
        # concatenation [B_0 | … | B_{H−1}] is lora_B.reshape(out, H·r), a view, not a copy.
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, num_heads, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default for A

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        mix = self.mix
        if mix.mode == "off":
            return result
        dtype = _compute_dtype(x)
        heads = _isolate(self.lora_B, mix)
        ax = F.linear(x.to(dtype), self.lora_A.to(dtype))
        if mix.mode == "view":
            b_view = torch.einsum("ohr,h->or", heads, mix.weights.to(heads.dtype))
            delta = F.linear(ax, b_view.to(dtype))
        elif mix.mode == "routed":
            weights = mix.weights.to(dtype)
            mixed = (weights.unsqueeze(-1) * ax.unsqueeze(-2)).flatten(-2)
            delta = F.linear(mixed, heads.flatten(1).to(dtype))
        elif mix.mode == "samples":
            return _add_per_sample_delta(result, ax, heads, mix.weights, self.scale)
        else:
            raise ValueError(f"unknown adapter mode {mix.mode!r}; use one of {MODES}")
        return result + (self.scale * delta).to(result.dtype)

    def head(self, index: int) -> torch.Tensor:
        """B_h as [out, r] (a view into the stacked parameter)."""
        return self.lora_B[:, index]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _isolate(stacked: torch.Tensor, mix: HeadMix) -> torch.Tensor:
    """Detach the heads not in `mix.keep`: same values, exactly zero gradient for them.

    Decided by the Python flag `mix.isolate`, never by reading a device tensor (no host sync)."""
    if not mix.isolate or not stacked.requires_grad:
        return stacked
    return torch.where(mix.keep.to(stacked.device), stacked, stacked.detach())


def _add_per_sample_delta(result: torch.Tensor, ax: torch.Tensor, stacked: torch.Tensor, weights: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """result + s · B_n (A x_n) for every sample n (see the module docstring, samples mode).

    `result` [N, ..., out] (the base layer's W0 x), `ax` [N, ..., r], `stacked` [out, H, r],
    `weights` [2, N, H]. The trained part goes through B and the rest through B.detach(): the same
    values as one mix, the gradient only where weights[0] says. s is folded into the per-sample
    [N, out, r] matrices and the addition into the batched matmul (`baddbmm`), so no elementwise
    pass over the [N, T, out] activations is left: each was a full read and write, forward and
    backward, of the layer's largest tensor."""
    if ax.dim() < 2 or ax.shape[0] != weights.shape[1]:
        raise ValueError(f"samples mode has head weights for {weights.shape[1]} samples, but the layer input "
                         f"has leading shape {tuple(ax.shape[:-1])}; set the weights for this batch")
    scaled = weights.to(stacked.dtype) * scale
    per_sample = (torch.einsum("nh,ohr->nor", scaled[0], stacked)
                  + torch.einsum("nh,ohr->nor", scaled[1], stacked.detach()))
    flat = ax.reshape(ax.shape[0], -1, ax.shape[-1])                       # [N, T, r]
    base = result.reshape(flat.shape[0], flat.shape[1], -1)                # [N, T, out]
    mixed = torch.baddbmm(base, flat.to(base.dtype), per_sample.to(base.dtype).transpose(1, 2))
    return mixed.reshape(result.shape)


def host_to_device(values: Sequence[float] | Sequence[bool], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small tensor built on the host, on `device`, without a host sync (`runtime.to_device`);
    setting elements of a CUDA tensor one by one would copy each value the blocking way."""
    return to_device(torch.tensor(list(values), dtype=dtype), device)


class AlterModel(nn.Module):
    """A causal LM with AlterLinear layers; calls go straight to the wrapped model.

    Head 0 is "retain"; heads 1 … are the forget heads in `forget_heads` order.
    """

    def __init__(self, model: nn.Module, layers: dict[str, AlterLinear], mix: HeadMix,
                 target_modules: list[str], rank: int, alpha: float):
        super().__init__()
        self.model = model
        self.mix = mix
        self.target_modules = list(target_modules)
        self.rank = rank
        self.alpha = alpha
        self._layers = layers  # plain dict: the modules are already registered inside `model`

    # ---- plumbing --------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    @property
    def layers(self) -> dict[str, AlterLinear]:
        return dict(self._layers)

    @property
    def heads(self) -> list[str]:
        return list(self.mix.heads)

    @property
    def forget_heads(self) -> list[str]:
        return self.mix.heads[1:]

    @property
    def config(self) -> Any:
        return self.model.config

    def head_index(self, name: str) -> int:
        try:
            return self.mix.heads.index(name)
        except ValueError:
            raise KeyError(f"no head {name!r}; heads are {self.mix.heads}") from None

    def lora_A_parameters(self) -> list[nn.Parameter]:
        return [layer.lora_A for layer in self._layers.values()]

    def lora_B_parameters(self) -> list[nn.Parameter]:
        return [layer.lora_B for layer in self._layers.values()]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Every adapter tensor by "<module>.lora_A" / "<module>.lora_B" (for checkpoints)."""
        state = {}
        for name, layer in self._layers.items():
            state[f"{name}.lora_A"] = layer.lora_A.detach()
            state[f"{name}.lora_B"] = layer.lora_B.detach()
        return state

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, layer in self._layers.items():
                layer.lora_A.copy_(state[f"{name}.lora_A"])
                layer.lora_B.copy_(state[f"{name}.lora_B"])

    # ---- modes -----------------------------------------------------------------------------
    def set_off(self) -> None:
        self.mix.mode, self.mix.weights = "off", None

    def set_view(self, retain: float = 1.0, forget: dict[str, float] | None = None) -> None:
        """Fixed head weights ω = (retain, forget[d] for each named d, 0 for the others)."""
        values = [0.0] * len(self.mix.heads)
        values[0] = float(retain)
        for name, weight in (forget or {}).items():
            index = self.head_index(name)
            if index == 0:
                raise KeyError("'retain' is set through the `retain` argument, not `forget`")
            values[index] = float(weight)
        self.mix.mode, self.mix.weights = "view", host_to_device(values, torch.float32, self._device())

    def set_routed(self, weights: torch.Tensor) -> None:
        """Per-token head weights [..., H] (column 0 is the retain head)."""
        if weights.shape[-1] != len(self.mix.heads):
            raise ValueError(f"routed weights need {len(self.mix.heads)} columns (heads {self.mix.heads}), "
                             f"got shape {tuple(weights.shape)}")
        self.mix.mode, self.mix.weights = "routed", weights

    def set_grad_heads(self, names: Sequence[str] | None) -> None:
        """Only the named heads receive gradients (None: all heads).

        The keep mask and the "anything to detach" flag are computed here, once per call, so the
        forward of each adapted layer needs neither a mask rebuild nor a device read."""
        mix = self.mix
        if names is None:
            mix.keep = None
            return
        chosen = {self.head_index(name) for name in names}
        flags = [i in chosen for i in range(len(mix.heads))]
        mix.keep = host_to_device(flags, torch.bool, self._device()).view(1, -1, 1) if not all(flags) else None

    def set_samples(self, weights: torch.Tensor, trainable: torch.Tensor | None = None) -> None:
        """Per-sample head weights ω [N, H] for the next forwards (samples mode).

        `trainable` [N, H] bool: head h receives gradients from sample n only where it is True
        (None: everywhere). Both are best host tensors: the split is made here, once, and copied
        to the device without a host sync."""
        heads = len(self.mix.heads)
        if weights.dim() != 2 or weights.shape[1] != heads:
            raise ValueError(f"per-sample weights need shape [N, {heads}] (heads {self.mix.heads}), "
                             f"got {tuple(weights.shape)}")
        weights = weights.float()
        if trainable is None:
            split = torch.stack([weights, torch.zeros_like(weights)])
        else:
            split = torch.stack([weights * trainable, weights * ~trainable.bool()])
        self.mix.mode, self.mix.weights, self.mix.keep = "samples", to_device(split, self._device()), None

    @contextmanager
    def sample_mixing(self, weights: torch.Tensor, trainable: torch.Tensor | None = None) -> Iterator[None]:
        """Temporarily use per-sample head weights (`set_samples`); restore the mode on exit."""
        mix = self.mix
        saved = (mix.mode, mix.weights, mix.keep)
        try:
            self.set_samples(weights, trainable)
            yield
        finally:
            mix.mode, mix.weights, mix.keep = saved

    @contextmanager
    def mixing(self, mode: str = "view", retain: float = 1.0, forget: dict[str, float] | None = None,
               routed: torch.Tensor | None = None, grad_heads: Sequence[str] | None = None) -> Iterator[None]:
        """Temporarily set the mode, head weights and trainable heads; restore on exit."""
        mix = self.mix
        saved = (mix.mode, mix.weights, mix.keep)
        try:
            if mode == "off":
                self.set_off()
            elif mode == "view":
                self.set_view(retain, forget)
            elif mode == "routed":
                if routed is None:
                    raise ValueError("routed mode needs per-token weights")
                self.set_routed(routed)
            elif mode == "samples":
                raise ValueError("per-sample head weights are set with `sample_mixing`, not `mixing`")
            else:
                raise ValueError(f"unknown adapter mode {mode!r}; use one of {MODES}")
            self.set_grad_heads(grad_heads)
            yield
        finally:
            mix.mode, mix.weights, mix.keep = saved

    @property
    def device(self) -> torch.device:
        """Where the adapters live (and so where batches must go)."""
        return self._device()

    def _device(self) -> torch.device:
        return next(iter(self._layers.values())).lora_A.device


# ---- logits at chosen positions -----------------------------------------------------------------


def at_positions(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values[n, index[n, j]] for [N, T, D] values and [N, J] index: [N, J, D]."""
    return values.gather(1, index.unsqueeze(-1).expand(-1, -1, values.shape[-1]))


@contextmanager
def logits_at(model: torch.nn.Module, index: torch.Tensor) -> Iterator[bool]:
    """Within: the model's output projection sees only the hidden states at `index` [N, J], so its
    logits come out [N, J, V] (whatever the model applies after the projection, e.g. soft-capping,
    is per position and applies as before). Yields False for a model without
    `get_output_embeddings` (then the caller takes `at_positions` of the full logits)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield False
        return

    def gather(module: torch.nn.Module, args: tuple) -> tuple:
        return (at_positions(args[0], index), *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield True
    finally:
        handle.remove()


# ---- injection ------------------------------------------------------------------------------------


def matches_target(name: str, targets: Sequence[str]) -> bool:
    """PEFT's suffix rule: `name` is a target if it equals one or ends with "." + one."""
    return any(name == t or name.endswith("." + t) for t in targets)


def inject(model: nn.Module, target_modules: Sequence[str], rank: int, alpha: float,
           forget_heads: Sequence[str]) -> AlterModel:
    """Freeze `model` and wrap every targeted nn.Linear in an AlterLinear (in place).

    Heads start at B = 0 (the model is unchanged until they are initialised or trained).
    """
    targets = [name for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and matches_target(name, target_modules)]
    if not targets:
        raise ValueError(f"no nn.Linear in the model matches target_modules {list(target_modules)}")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    mix = HeadMix(heads=[RETAIN_HEAD, *forget_heads])
    layers: dict[str, AlterLinear] = {}
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = AlterLinear(getattr(parent, child), rank, alpha, mix)
        setattr(parent, child, layer)
        layers[name] = layer
    alter = AlterModel(model, layers, mix, list(target_modules), rank, alpha)
    alter.set_view(1.0, {})
    return alter


# ---- bundles ----------------------------------------------------------------------------------------


def to_bundle(
    alter: AlterModel,
    base_model: str,
    base_fingerprint: str,
    *,
    entropy: EntropySpec | None = None,
    router: dict[str, torch.Tensor] | None = None,
    router_spec: RouterSpec | None = None,
    training: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> AlterBundle:
    """The trained adapters as an `AlterBundle` (module names as in `model.named_modules()`)."""
    from alter_serve.core.bundle import AlterBundle
    from alter_serve.core.manifest import BaseModelRef, EntropySpec, Heads, Manifest, RouterSpec

    manifest = Manifest(
        base_model=BaseModelRef(name_or_path=base_model, fingerprint=base_fingerprint),
        rank=alter.rank,
        alpha=alter.alpha,
        target_modules=sorted(alter.target_modules),
        heads=Heads(retain=RETAIN_HEAD, forget=alter.forget_heads),
        router=router_spec or RouterSpec(),
        entropy=entropy or EntropySpec(),
        training=training or {},
    )
    lora_a, retain = {}, {}
    forget: dict[str, dict[str, torch.Tensor]] = {name: {} for name in alter.forget_heads}
    for module, layer in alter.layers.items():
        lora_a[module] = _export(layer.lora_A, dtype)
        retain[module] = _export(layer.head(0), dtype)
        for index, head in enumerate(alter.forget_heads, start=1):
            forget[head][module] = _export(layer.head(index), dtype)
    router_tensors = {k: _export(v, dtype) for k, v in (router or {}).items()}
    return AlterBundle(manifest, lora_a, retain, forget, router_tensors)


def from_bundle(model: nn.Module, bundle: AlterBundle) -> AlterModel:
    """Inject the bundle's adapters into `model` (its base model) and load A and every head."""
    m = bundle.manifest
    alter = inject(model, m.target_modules, m.rank, m.alpha, bundle.forget_heads)
    layers = alter.layers
    missing = sorted(set(layers) - set(bundle.lora_a))
    extra = sorted(set(bundle.lora_a) - set(layers))
    if missing or extra:
        raise ValueError(f"bundle does not fit this model: modules without adapters {missing}, "
                         f"adapters for absent modules {extra}")
    with torch.no_grad():
        for module, layer in layers.items():
            layer.lora_A.copy_(bundle.lora_a[module].float())
            layer.lora_B[:, 0].copy_(bundle.retain[module].float())
            for index, head in enumerate(bundle.forget_heads, start=1):
                layer.lora_B[:, index].copy_(bundle.forget[head][module].float())
    return alter


def _export(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.detach().to(device="cpu", dtype=dtype).contiguous()
