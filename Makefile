# The README's two commands: `make run` (the whole pipeline) and `make test` (the suite).
# Both depend on `make install`, which is idempotent and fast when nothing changed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.helox-installed
TORCH  := torch==2.13.0
EXTRAS := test

.PHONY: install run test test-all bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade "pip>=24"
	@# The pinned CPU torch first: an unpinned torch would pull a multi-GB CUDA build.
	@$(BIN)/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
		|| $(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	@$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]"
	@touch $(STAMP)

run: install
	$(BIN)/helox run configs/demo.yaml

test: install
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	@for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .helox build *.egg-info
