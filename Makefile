# Two commands for a fresh machine (see README):
#   make serve   train every model on its embedded data, build the archives, start TorchServe, print curl lines
#   make test    the whole pytest suite
# Each step is skipped when its inputs did not change, so re-running is quick. What each artifact folder and
# archive is built from comes from registry.py (`python3 registry.py makefile` writes .make/rules.mk).

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
READY := $(VENV)/.ready
# When this make started (seconds since the epoch): `make serve` reports its times from here, setup included.
STARTED := $(shell date +%s)

.PHONY: setup train archive compile serve stop test test-fast bench docs k8s-check clean
.DELETE_ON_ERROR:

include .make/rules.mk

.make/rules.mk: registry.py
	@mkdir -p $(@D)
	@python3 registry.py makefile > $@

setup: $(READY)

$(READY): requirements.txt scripts/ensure_java.sh scripts/venv_hook.sh
	@echo "==> [setup] Python venv in $(VENV) with pinned requirements"
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@echo "==> [setup] Java >= 17 for TorchServe"
	@scripts/ensure_java.sh $(VENV)
	@scripts/venv_hook.sh $(VENV)
	@touch $@

train: $(ARTIFACTS:%=%/manifest.json)

archive: $(ARCHIVES)

# AOTInductor packages (model.pt2: torch.export + aoti_compile_and_package, for this machine's CPU) of every trained
# version, then the archives that carry them: a later step, off make serve's path (about 50 s a model on 2 cores; it
# needs a C++ compiler, and without one each manifest says it was skipped). `handler.runtime: aoti` serves them.
compile: train
	@echo "==> [compile] AOTInductor: $(ARTIFACTS)"
	@$(PY) -m train.export --aoti $(ARTIFACTS)
	@$(MAKE) --no-print-directory archive

# Serves the models whose archives are up to date at once, then trains, archives and registers the others one at a
# time, so the first models answer while the slow ones train (scripts/server.py).
serve: $(READY)
	@$(PY) -m scripts.server start --since $(STARTED)

stop:
	@$(PY) -m scripts.server stop

# Two pytest processes (pytest-xdist), a test file each at a time: most tests wait on a TorchServe (the JVM, loading
# models), about half a core on average, so two processes fill a 2-core machine. Every test uses free ports and its
# own folders, and the session's fixtures (the in-process workers, one TorchServe) are per process.
PYTEST := $(PY) -m pytest -n 2 --dist loadfile

test: archive
	@scripts/ensure_prometheus.sh
	@echo "==> [test] pytest (2 processes)"
	@$(PYTEST)

# The fast tier: needs no trained artifact, no archive and no TorchServe (handler contracts on tiny models, registry
# and manifest checks, k8s rendering, CLI errors); stops at its first failure. .ci/run runs it before `make test`.
test-fast: $(READY)
	@echo "==> [test-fast] pytest -m 'not slow and not trained' (2 processes)"
	@$(PYTEST) -x -m "not slow and not trained"

# The peer servers (LitServe, KServe, Ray Serve) get their own venv; where it cannot be built, the bench reports
# them as skipped and measures the rest.
bench: archive
	@test -f .venv-peers/.ready -a .venv-peers/.ready -nt requirements-peers.txt || { \
	  echo "==> [bench] peer servers' venv .venv-peers (requirements-peers.txt)"; \
	  scripts/peers_venv.sh || echo "warning: .venv-peers could not be built: the peer servers will be skipped"; }
	@$(PY) -m tests.load.bench $(ARGS)

# The figures of README.md and docs/ (their <!-- generated: NAME --> blocks) from the run records:
# artifacts/*/metrics.json, docs/seeds.json, docs/benchmark*.json, docs/fresh-clone.json (scripts/docs.py).
docs: $(READY)
	@$(PY) -m scripts.docs

k8s-check: $(READY)
	@echo "==> [k8s] offline validation of k8s/ (first run builds .venv-checkov)"
	@$(PY) -m pytest tests/k8s -q

clean:
	rm -rf artifacts model_store/*.mar logs key_file.json .make
