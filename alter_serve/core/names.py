"""How an ALTER bundle names its parts: its files, heads, adapted modules and tensors (DESIGN.md §4).

This module is the one definition of the bundle's tensor-name grammar; whatever writes or reads
bundle tensors spells their names through it:

    weights.safetensors  "<module>.lora_A"            [r, in]   shared A
                         "<module>.B.retain"          [out, r]  retain head B_r
                         "<module>.B.forget.<head>"   [out, r]  forget head B_d
                         "router.<name>"              a tensor of the manifest's router kind

`<module>` is a dotted module path (MODULE_NAME_PATTERN), `<head>` a head name (HEAD_NAME_PATTERN,
which also names views, bundles, tenants and experiments: it is URL-, label- and file-name-safe),
`<name>` a router tensor name (ROUTER_NAME_PATTERN). Standard library only, so that training code
running where only torch is installed can import it.
"""

from __future__ import annotations

import re
from typing import Literal, NamedTuple

MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.safetensors"
RETAIN_HEAD = "retain"

HEAD_NAME_PATTERN = r"[a-z0-9][a-z0-9_-]{0,62}"
# Module paths and PEFT target names: dotted identifiers ("model.layers.0.self_attn.q_proj", "q_proj").
MODULE_NAME_PATTERN = r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*"
ROUTER_NAME_PATTERN = r"[a-z0-9_]{1,64}"
_HEAD_NAME_RE = re.compile(HEAD_NAME_PATTERN + r"\Z")
_MODULE_NAME_RE = re.compile(MODULE_NAME_PATTERN + r"\Z")
_ROUTER_NAME_RE = re.compile(ROUTER_NAME_PATTERN + r"\Z")

_LORA_A_SUFFIX = ".lora_A"
_RETAIN_LABEL = "B.retain"
_FORGET_LABEL = "B.forget."
ROUTER_PREFIX = "router."
TENSOR_NAME_FORMS = "<module>.lora_A, <module>.B.retain, <module>.B.forget.<head>, router.<name>"

TensorKind = Literal["lora_A", "retain", "forget", "router"]


class TensorName(NamedTuple):
    """A parsed bundle tensor name: `owner` is the module (the router tensor's name for "router");
    `head` is the forget head's name for "forget", else None."""

    kind: TensorKind
    owner: str
    head: str | None = None


def is_valid_head_name(name: object) -> bool:
    return isinstance(name, str) and _HEAD_NAME_RE.match(name) is not None


def is_valid_module_name(name: str) -> bool:
    return _MODULE_NAME_RE.match(name) is not None


def is_valid_router_name(name: str) -> bool:
    return _ROUTER_NAME_RE.match(name) is not None


def lora_a_name(module: str) -> str:
    return module + _LORA_A_SUFFIX


def retain_tensor_name(module: str) -> str:
    return f"{module}.{_RETAIN_LABEL}"


def forget_tensor_name(module: str, head: str) -> str:
    return f"{module}.{_FORGET_LABEL}{head}"


def head_label(head: str) -> str:
    """What follows "<module>." in the name of a B tensor of `head` (the retain head or a forget
    head): "B.retain" or "B.forget.<head>"."""
    return _RETAIN_LABEL if head == RETAIN_HEAD else _FORGET_LABEL + head


def router_tensor_name(name: str) -> str:
    return ROUTER_PREFIX + name


def parse_tensor_name(key: str) -> TensorName | None:
    """What a weights-file key names, or None when it follows none of TENSOR_NAME_FORMS. The parts
    are not checked against their patterns here: a reader reports those problems itself."""
    if key.startswith(ROUTER_PREFIX):
        return TensorName("router", key[len(ROUTER_PREFIX):])
    if key.endswith(_LORA_A_SUFFIX):
        return TensorName("lora_A", key[: -len(_LORA_A_SUFFIX)])
    if key.endswith("." + _RETAIN_LABEL):
        return TensorName("retain", key[: -len(_RETAIN_LABEL) - 1])
    if "." + _FORGET_LABEL in key:
        module, head = key.rsplit("." + _FORGET_LABEL, 1)
        return TensorName("forget", module, head)
    return None
