# kvgate: `make demo` runs the main job, `make test` runs every test. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Real vLLM (CPU build) for the tests marked `vllm`: installed once outside the checkout, reused after.
KVGATE_VLLM_VENV ?= /opt/vllm-venv
export KVGATE_VLLM_VENV
# The lowest versions pyproject allows (test-lowest): a throwaway venv, rebuilt on every run.
LOWEST_VENV ?= .venv-lowest

.PHONY: demo test test-fast test-vllm test-lowest lint schemas vllm clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $@

## main job: simulated vLLM fleet, gateway in front of it with each routing policy, same workload
demo: $(BIN)/.installed
	$(BIN)/kvgate bench --quick --out bench-out/quick

## every test: lint, the fast suite, and the suite against a real vLLM
test: lint vllm $(BIN)/.installed
	$(BIN)/pytest -q -p no:cacheprovider

## fast tests only (no real vLLM)
test-fast: $(BIN)/.installed
	$(BIN)/pytest -q -p no:cacheprovider -m "not vllm"

test-vllm: vllm $(BIN)/.installed
	$(BIN)/pytest -q -p no:cacheprovider -m vllm

## the fast tests against the lowest versions of the direct dependencies pyproject allows: the floors hold
test-lowest:
	rm -rf $(LOWEST_VENV)
	$(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/pip install -q uv
	$(LOWEST_VENV)/bin/uv pip install -q --python $(LOWEST_VENV)/bin/python --resolution lowest-direct \
		-e '.[test,bench]'
	$(LOWEST_VENV)/bin/pytest -q -p no:cacheprovider -m "not vllm"

lint: $(BIN)/.installed
	$(BIN)/ruff check .

## after a change to the config structs: the config's JSON Schema and the Helm chart's values schema (embeds it)
schemas: $(BIN)/.installed
	$(BIN)/python -m gateway.config_schema > config/kvgate.schema.json
	$(BIN)/python scripts/helm_values_schema.py > config/helm/kvgate/values.schema.json

vllm:
	@bash scripts/install-vllm.sh "$(KVGATE_VLLM_VENV)"

clean:
	rm -rf $(VENV) $(LOWEST_VENV) bench-out
