# `make run` and `make test` do all the set-up: a Python 3.11 venv in .venv, the project installed with
# torch pinned to the CPU build and every other package at the version in constraints.txt, then the run or
# the tests. Re-running skips the install unless pyproject.toml or constraints.txt changed.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# No network beyond package registries: nothing may wait on a model hub or telemetry endpoint.
export KEDRO_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1
export HF_HUB_CACHE := $(CURDIR)/.cache/huggingface
export TOKENIZERS_PARALLELISM := false
export PYTHONHASHSEED := 0
# torch uses both cores by default, which is fastest on a quiet machine. When another process keeps a
# core busy, run with OMP_NUM_THREADS=1: thread contention slows a bootstrap down
# several-fold (benchmarks/bootstrap.py, docs/compute_plan.md).

.PHONY: install browser run test test-fast lint docs paper-dryrun smoke viz viz-build mlflow ui clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet -c constraints.txt "torch==2.13.0" -e ".[dev]"
	touch $@

install: $(STAMP)
	@mkdir -p $(HF_HUB_CACHE)

run: install  ## the embedded default: all six pipelines (extra arguments: make run ARGS="--pipeline align")
	$(BIN)/kedro run $(ARGS)

# The suite runs in TEST_WORKERS pytest-xdist processes, one module per worker at a time (module fixtures such
# as the pipeline slice are built once), each computing on one thread: many tests wait on servers and child
# processes, so two single-threaded workers keep both cores busy where one two-threaded process did not.
TEST_WORKERS ?= 2

test: install browser  ## every test, as CI runs them, with the 15 slowest listed at the end
	OMP_NUM_THREADS=1 $(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --durations=15 $(PYTEST_ARGS)

test-fast: install  ## the unit tests, small integration slices and every benchmark's --quick, without the tests marked slow (~1 min)
	OMP_NUM_THREADS=1 $(BIN)/pytest -m "not slow" -n $(TEST_WORKERS) --dist loadfile --durations=10 $(PYTEST_ARGS)

# Debian's chromium, for the test that opens the kedro-viz build in a headless browser; apt keeps it, so only
# the first run pays. Package lists are refreshed once when the install fails on stale ones.
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium
browser:  ## Debian's chromium for the browser tests, installed with apt-get when missing
	@command -v chromium >/dev/null || $(APT_INSTALL) >/dev/null || (apt-get update >/dev/null && $(APT_INSTALL) >/dev/null)

lint: install  ## ruff's linter and formatter check (pyproject.toml [tool.ruff]); `.venv/bin/ruff format .` fixes the format
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

docs: install  ## regenerate the tables of docs/configuration.md from the config classes' Field descriptions and conf/
	$(BIN)/python -m spavl_kedro.config_docs

paper-dryrun: install  ## conf/paper's own configuration through all six pipelines on this CPU, models swapped for fixtures (~15 min)
	$(BIN)/python -m spavl_kedro.paper_dryrun $(DRYRUN_ARGS)

smoke: install  ## a tiny model of every family (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, InternVL) through every stage on this device; one JSON line per stage and family (SMOKE_ARGS="--size gpu" on a GPU)
	$(BIN)/python -m spavl_kedro.smoke $(SMOKE_ARGS)

viz: install  ## kedro-viz on http://127.0.0.1:4141: lineage of the six pipelines, previews of tables and plots
	$(BIN)/kedro viz run --host 127.0.0.1 --port 4141

viz-build: install  ## the same as a static site in ./build (serve it over http: python -m http.server -d build)
	$(BIN)/kedro viz build --include-previews

mlflow: install  ## MLflow UI on the project's tracking store, http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri "sqlite:///$(CURDIR)/mlflow.db" --host 127.0.0.1 --port 5000 --workers 1

ui: mlflow

clean:  ## generated data, models and runs (keeps the committed seed files in data/01_raw)
	find data -mindepth 1 -maxdepth 1 -type d -not -name 01_raw -exec rm -rf {} +
	rm -rf mlflow.db mlartifacts build
