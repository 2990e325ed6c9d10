# Two commands do everything on a fresh machine: `make test` and `make bench`.
# Both create .venv if it is missing, install the package and its tools, build the extensions
# (incrementally), then run their job. Re-running them is quick when nothing changed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch lies on this kind of machine; an unpinned torch would pull a CUDA build.
TORCH_SPEC ?= torch==2.13.0
INSTALLED := $(VENV)/.rollingq-installed
BUILT := build/.rollingq-ext
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.hpp' 2>/dev/null)
export MAX_JOBS ?= 2

.PHONY: all setup build test bench lint format clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, then the package against it without build isolation (an isolated build cannot see
# the installed torch; docs/build.md). The editable install is pure Python; `build` compiles.
$(INSTALLED): $(PY) pyproject.toml setup.py
	$(PY) -m pip install -q "$(TORCH_SPEC)" setuptools wheel
	ROLLINGQ_NO_EXT=1 $(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $@

setup: $(INSTALLED)

$(BUILT): $(INSTALLED) $(CSRC) csrc/build_flags.txt setup.py
	$(PY) setup.py -q build_ext --inplace
	mkdir -p build && touch $@

build: $(BUILT)

lint: $(INSTALLED)
	$(PY) -m ruff check .

format: $(INSTALLED)
	$(PY) -m ruff format .

test: build lint
	$(PY) -m pytest tests

# The CPU library built with AddressSanitizer + UndefinedBehaviorSanitizer into build/sanitize
# (the normal rollingq_kernels/_C is untouched), and the kernel, raw-op, hardening and fuzz tests
# run against it alone: tests/sanitize.sh. .ci/run calls it after `make test`.
.PHONY: sanitize
sanitize: $(INSTALLED)
	PY=$(abspath $(PY)) tests/sanitize.sh

bench: build
	$(PY) -m bench.report

clean:
	rm -rf build rollingq_kernels/*.so .pytest_cache
