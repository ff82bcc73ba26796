# maas: `make run` and `make test` each build the environment first when it is missing or stale.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
BENCH_VENV := .bench-venv
BENCH_LIGHTGBM := .bench-lightgbm

.DEFAULT_GOAL := help
.PHONY: help install run test test-fast ui bench lock clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(INSTALLED): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

install: $(INSTALLED) ## create .venv and install the locked versions

run: $(INSTALLED) ## train on the built-in dataset with embedded defaults (ARGS="--dataset digits")
	$(BIN)/maas run $(ARGS)

test: $(INSTALLED) ## run every test (unit, model, integration with real Prefect/MLflow)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(INSTALLED) ## unit and model tests only
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

ui: $(INSTALLED) ## MLflow UI on the local store (http://127.0.0.1:5000)
	$(BIN)/maas ui

$(BENCH_VENV)/.installed: benchmarks/requirements-evidently.txt
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet -r benchmarks/requirements-evidently.txt
	touch $@

$(BENCH_LIGHTGBM)/.installed: benchmarks/requirements-lightgbm.txt $(INSTALLED)
	$(BIN)/python -m pip install --quiet --no-deps --target $(BENCH_LIGHTGBM) -r benchmarks/requirements-lightgbm.txt
	touch $@

bench: $(INSTALLED) $(BENCH_VENV)/.installed $(BENCH_LIGHTGBM)/.installed ## overhead, tuning, model selection, LightGBM vs hgb, text, int8 by CPU, compression, serving, the gate's CPU, monitoring, its false alarms (writes benchmarks/results/)
	cd benchmarks && ../$(BIN)/python pipeline_overhead.py && ../$(BIN)/python tuning_efficiency.py && ../$(BIN)/python model_selection.py && ../$(BIN)/python lightgbm_vs_hgb.py && ../$(BIN)/python text.py && ../$(BIN)/python int8_encoder.py && ../$(BIN)/python text_search.py && ../$(BIN)/python compression.py && ../$(BIN)/python serving.py && ../$(BIN)/python gate_cpu.py && ../$(BIN)/python monitoring.py && ../$(BIN)/python false_alarms.py

lock: ## re-resolve dependencies from pyproject.toml into requirements.lock
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip
	.lock-venv/bin/python -m pip install --quiet -e '.[test]'
	.lock-venv/bin/python -m pip freeze --all --exclude-editable | grep -v '^maas\|^pip==' > requirements.lock
	rm -rf .lock-venv

clean: ## remove the environment and local state (.maas)
	rm -rf $(VENV) $(BENCH_VENV) $(BENCH_LIGHTGBM) .maas
