# earlyfusion: `make demo` and `make test` each create .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build of torch (an unpinned torch pulls a multi-GB CUDA build).
TORCH_PIN ?= torch==2.13.0
DEMO_DIR ?= runs/demo

.PHONY: demo demo-chat test bench bench-gpu install clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

test: install
	$(BIN)/python -m pytest tests

demo: install
	$(BIN)/python -m earlyfusion.demo --out $(DEMO_DIR)

# The demo with built-in conversations as well: one model that captions, draws, answers questions and edits.
demo-chat: install
	$(BIN)/python -m earlyfusion.demo --out runs/demo-chat --conversations 40000

bench: install
	$(BIN)/python bench/run.py

# One prepared GPU check (under 8 minutes on an H100): figures to runs/bench-gpu/ and a section of bench/RESULTS.md.
bench-gpu: install
	$(BIN)/python bench/gpu.py --results bench/RESULTS.md

clean:
	rm -rf $(VENV) runs
