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

# The whole pipeline of examples/demo/ on this machine (README: "A five-minute tour"): continued
# pretraining -> LoRA instruction tuning -> DPO -> an EvalJob per stage -> a ModelDeployment;
# then report.py prints held-out accuracy per stage, writes the plots into runs/demo/ and asks
# the served model one question through the openai client; the server is stopped even if the
# report fails. One thread per process: the tiny model's matrices are too small for a second one to
# help, and on a busy machine OpenMP threads waiting for each other made a step 7x slower.
# The manifests read and write the claim `demo` (pvc://demo/...), which `kubetune apply` maps to
# runs/demo/: the data goes there first, as `kubectl cp` puts it into the claim on a cluster.
demo: install
	export OMP_NUM_THREADS=1; \
	mkdir -p runs/demo && cp -r examples/demo/data runs/demo/ && \
	$(BIN)/kubetune apply -f examples/demo/ --detach && $(BIN)/python examples/demo/report.py; status=$$?; \
	$(BIN)/kubetune delete mdep demo-bot 2>/dev/null; exit $$status

# The chart ships the same CRDs (tests/platform/test_chart.py keeps them byte-equal).
crds: install
	$(BIN)/kubetune crds --out crds/
	cp crds/*.yaml charts/kubetune/crds/

clean:
	rm -rf $(VENV) runs .pytest_cache
