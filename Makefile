# make demo: the whole pipeline on the built-in toy model (about 4 minutes on CPU), ending with demo-out/demo.png.
# make test: the test suite (CPU, 20 to 30 minutes on two cores).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install clean

$(BIN)/dreamlora: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU torch, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q "torch==2.13.0"
	# The versions CI last passed with (constraints.txt), so a new release cannot break a fresh install.
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $(BIN)/dreamlora

install: $(BIN)/dreamlora

demo: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/dreamlora demo

test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo-out .pytest_cache
