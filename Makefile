# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.torch_extensions
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1'), torch.__version__"
	@command -v java >/dev/null || echo "note: Java not found; METEOR and the PTB tokenizer need it (apt-get install -y default-jre-headless)"
	touch $@

demo: setup
	$(PY) -m launch.demo

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) .torch_extensions .pytest_cache
