# Two commands on a fresh machine: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-all demo bench crds clean

install: $(STAMP)

# torch goes in first and alone: `torch==2.13.0` takes the cached CPU build; letting pip
# resolve torch through the extras could pull a multi-GB CUDA build instead.
$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The FineTuneJob manifest runs locally (progress bar, status in runs/demo/status.yaml), then
# the fine-tuned model answers one of its training task's questions.
demo: install
	$(BIN)/kubetune apply -f examples/finetune-tiny.yaml
	@echo "--- sample generation from runs/demo/output/model:"
	$(BIN)/kubetune run generate --config examples/configs/demo_generate.yaml

# The chart ships the same CRDs (tests/platform/test_chart.py keeps them byte-equal).
crds: install
	$(BIN)/kubetune crds --out crds/
	cp crds/*.yaml charts/kubetune/crds/

clean:
	rm -rf $(VENV) runs .pytest_cache
