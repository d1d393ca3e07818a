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

# `make demo`: a BPE tokenizer -> pre-training of the `tiny` preset on the Python standard library with the
# paper's recipe (runs/demo.toml) -> evaluation -> completions of a Python function. About 7.5 minutes on 2 free
# CPU cores; train.max_minutes keeps the whole demo under 10 on a busy machine. OMP_WAIT_POLICY=PASSIVE:
# on 2 cores shared with other work, OpenMP threads spinning at barriers stall each other (steps measured
# 4x slower); sleeping threads do not.
DEMO := runs/demo
# data.val_fraction of runs/demo.toml: the tokenizer never sees, and eval scores, the run's own split
DEMO_VAL := 0.05
DEMO_PROMPT := def read_lines(path):\n    """Return the lines of a text file."""\n    with open(path

demo: $(BIN)/dsv3
	@rm -rf $(DEMO) && mkdir -p $(DEMO) && date +%s > $(DEMO)/.started
	$(BIN)/dsv3 tokenizer train --out $(DEMO)/tokenizer --vocab-size 4096 --val-fraction $(DEMO_VAL)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/dsv3 train runs/demo.toml
	OMP_WAIT_POLICY=PASSIVE $(BIN)/dsv3 eval --model $(DEMO)/checkpoints/latest --data stdlib --split val \
		--val-fraction $(DEMO_VAL)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/dsv3 sample --model $(DEMO)/checkpoints/latest -n 2 --max-new-tokens 48 \
		--prompt "$$(printf '$(DEMO_PROMPT)')"
	@echo "demo done in $$(( $$(date +%s) - $$(cat $(DEMO)/.started) ))s; run directory $(DEMO)/ (metrics.jsonl, \
	TensorBoard events: tensorboard --logdir $(DEMO))"
	@echo "plots: $(DEMO)/plots/loss.png $(DEMO)/plots/expert_load.png"

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
