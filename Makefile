# Every target sets itself up on a fresh machine: it creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU wheel of torch lies on the CI/dev machines' disk; an unpinned torch pulls gigabytes of CUDA.
TORCH_SPEC ?= torch==2.13.0
CI_ENV := EGLIB_PROFILE=ci MPLBACKEND=Agg OMP_WAIT_POLICY=PASSIVE

.PHONY: setup data browser demo test test-fast lint lab figures redraw bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Real Fashion-MNIST from Debian's package, installed when we are root on Debian and it is missing.
data:
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] \
	    && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	fi

# Debian's Chromium for the end-to-end JupyterLab test (skipped with a reason where it cannot be had).
browser:
	@if ! command -v chromium >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium || true; \
	fi

demo: setup data
	$(BIN)/python -m eglib demo

lint: setup
	$(BIN)/ruff check eglib tests bench
	$(BIN)/ruff format --check eglib tests bench
	$(BIN)/mypy eglib

# The whole suite: lint, types, library tests, notebooks (CI profile) and the browser test.
test: setup data browser lint
	$(CI_ENV) $(BIN)/pytest -q tests --nbmake notebooks

test-fast: setup
	$(CI_ENV) $(BIN)/pytest -q tests -m "not slow and not e2e"

# JupyterLab on notebooks/; the ipywidgets extension comes with the pip dependencies (checked
# here). Notebooks read EGLIB_PROFILE: `EGLIB_PROFILE=ci make lab` for the small, fast runs.
lab: setup data
	@$(BIN)/jupyter labextension list 2>&1 | grep -q '@jupyter-widgets/jupyterlab-manager.*enabled' \
	  || { echo "JupyterLab lacks the ipywidgets extension: run make clean setup" >&2; exit 1; }
	$(BIN)/jupyter lab --ServerApp.root_dir=notebooks $$([ "$$(id -u)" = 0 ] && echo --allow-root)

figures: setup data
	EGLIB_PROFILE=full $(BIN)/python -m eglib figures --out figures/full

# every committed study's figures again from its tables (after a change to eglib.plots)
redraw: setup
	MPLBACKEND=Agg $(BIN)/python -m eglib redraw

bench: setup data
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/poison_throughput.py
	$(BIN)/python bench/guard_overhead.py
	$(BIN)/python bench/detection_scoring.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache test-artifacts
