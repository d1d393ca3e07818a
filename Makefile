# The two commands of the quick start: `make demo` and `make test`. Both build .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU wheel of exactly this version is served locally; a looser pin pulls gigabytes of CUDA packages.
TORCH := torch==2.13.0

.PHONY: demo test test-slow test-gpu lint bench-cpu clean

$(BIN)/dsv3: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	@touch $@

demo: $(BIN)/dsv3
	@for p in tiny bench 671b; do $(BIN)/dsv3 info --preset $$p || exit 1; echo; done

test: $(BIN)/dsv3
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest -q

test-slow: $(BIN)/dsv3
	$(BIN)/pytest -q -m slow

test-gpu: $(BIN)/dsv3
	$(BIN)/pytest -q -m gpu

lint: $(BIN)/dsv3
	$(BIN)/ruff check src tests benchmarks

bench-cpu: $(BIN)/dsv3
	$(BIN)/python benchmarks/forward.py --preset tiny --device cpu

clean:
	rm -rf $(VENV) build src/*.egg-info
