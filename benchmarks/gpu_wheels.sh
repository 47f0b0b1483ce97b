#!/usr/bin/env bash
# Wheels that the lent GPU machine lacks (its image has torch, transformers, peft, safetensors,
# scipy, matplotlib, tqdm, pyyaml, absl-py, six, but no pydantic, rouge-score or nltk, and it cannot
# reach a package registry). Downloads them into .whl/ (git-ignored) for its Python 3.12, to travel
# with the working tree (`carry: [".whl"]`); the device command then starts with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# Versions: the ones pyproject.toml resolves to here, so both machines run the same code.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .whl && mkdir -p .whl
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
binary=(pydantic "pydantic-core" "annotated-types" "typing-inspection" nltk)
specs=()
for name in "${binary[@]}"; do specs+=("$name==$(version "$name")"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${specs[@]}"
# rouge-score is published as a source distribution only: build its (pure-Python) wheel here.
"$PY" -m pip wheel -q --no-deps -w .whl "rouge-score==$(version rouge-score)"
du -sh .whl && ls .whl
