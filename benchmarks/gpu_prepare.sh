#!/usr/bin/env bash
# Run HERE (not on the GPU machine): fills the git-ignored .device/ with what the lent GPU machine
# lacks, to travel with the working tree as `carry: [".device"]`; `benchmarks/gpu_run.sh` uses it there.
#
#   .device/whl/   wheels for its Python 3.12. Its image has torch, transformers, peft, safetensors,
#                  scipy, matplotlib, tqdm, pyyaml, absl-py and six, but no pydantic, rouge-score or
#                  nltk, and it cannot reach a package registry. Versions: the ones pyproject.toml
#                  resolves to here, so both machines run the same code.
#   .device/tofu/  a copy of the TOFU data: only the checkout travels, not the ../shared beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TOFU=${TOFU:-../shared/data/tofu}
rm -rf .device && mkdir -p .device/whl
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
binary=(pydantic "pydantic-core" "annotated-types" "typing-inspection" nltk)
specs=()
for name in "${binary[@]}"; do specs+=("$name==$(version "$name")"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .device/whl "${specs[@]}"
# rouge-score is published as a source distribution only: build its (pure-Python) wheel here.
"$PY" -m pip wheel -q --no-deps -w .device/whl "rouge-score==$(version rouge-score)"
test -f "$TOFU/forget01.json" || { echo "no TOFU data at $TOFU (set TOFU=...)" >&2; exit 2; }
cp -r "$TOFU" .device/tofu
du -sh .device/whl .device/tofu
