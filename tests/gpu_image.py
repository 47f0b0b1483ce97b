"""Run code as the lent GPU machine would: its image has torch, transformers, peft and the
scientific stack, but none of the serving packages (/work/shared/NOTES-gpu.md). `env_without` gives a
subprocess environment in which importing any of those packages fails, so a test catches a training
or benchmark path that pulls in the server by accident, on a machine that has it all installed."""

from __future__ import annotations

import os
from pathlib import Path

# Installed here, absent from the GPU image (the wheels benchmarks/gpu_prepare.sh carries are not listed).
GPU_IMAGE_LACKS = ("vllm", "fastapi", "starlette", "uvicorn", "sqlalchemy", "openai", "psycopg", "psycopg2")

_SITECUSTOMIZE = '''\
import sys

class _AbsentOnTheGpuImage:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {lacks!r}:
            raise ImportError(f"{{name!r}} is not installed on the GPU image (tests/gpu_image.py)")
        return None

sys.meta_path.insert(0, _AbsentOnTheGpuImage())
'''


def env_without(folder: Path) -> dict[str, str]:
    """A copy of this process's environment whose Pythons (and their spawned children) cannot import
    `GPU_IMAGE_LACKS`; `folder` receives the sitecustomize module that does it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(lacks=set(GPU_IMAGE_LACKS)))
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return os.environ | {"PYTHONPATH": path}
