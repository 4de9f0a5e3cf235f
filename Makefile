# Two entry points for a newcomer: `make demo` (set up, then run the embedded MNIST T-shirt demo)
# and `make test` (set up, then lint and run the test suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on disk here; a bare `torch` requirement would pull a multi-GB CUDA
# build, so without CUDA we pin the CPU build, in the same pip run as the project (one resolution).
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")

.PHONY: setup test demo lint bench clean

$(BIN)/retrack: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)" -e ".[dev,sd]"
	@-if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || \
		echo "note: no Debian dataset-fashion-mnist; the demo uses the T-shirt shipped in the package (the Debian files only cross-check it in the tests)."; \
	fi
	@-if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 || \
		echo "note: could not install Debian's chromium; the report's browser test will be skipped."; \
	fi
	touch $(BIN)/retrack

setup: $(BIN)/retrack

lint: setup
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/lint-imports

test: setup lint docs
	$(BIN)/python -m pytest

.PHONY: docs
docs: setup
	$(BIN)/mkdocs build --strict --site-dir site

demo: setup
	$(BIN)/retrack demo

bench: setup
	$(BIN)/python bench/bench_step.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
