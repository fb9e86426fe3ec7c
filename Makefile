# Two commands for a fresh machine (see README):
#   make serve   train every model on its embedded data, build the archives, start TorchServe, print curl lines
#   make test    the whole pytest suite
# Each step is skipped when its inputs did not change, so re-running is quick.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
READY := $(VENV)/.ready
ARTIFACTS := artifacts/mnist artifacts/mnist-v2 artifacts/sentiment artifacts/regression

.PHONY: setup train archive serve stop test bench k8s-check clean
.DELETE_ON_ERROR:

setup: $(READY)

$(READY): requirements.txt scripts/ensure_java.sh
	@echo "==> [setup] Python venv in $(VENV) with pinned requirements"
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@echo "==> [setup] Java >= 17 for TorchServe"
	@scripts/ensure_java.sh $(VENV)
	@touch $@

train: $(ARTIFACTS:%=%/manifest.json)

# The training command of each artifact folder is listed once, in archive.sh's table.
artifacts/%/manifest.json: $(READY) $(wildcard train/*.py) archive.sh
	@echo "==> [train] $(@D)"
	@$$(./archive.sh --train-command $(@D))

archive: train
	@echo "==> [archive] model_store/"
	@./archive.sh

serve: archive
	@echo "==> [serve] TorchServe with every archive in model_store/"
	@$(PY) -m scripts.server start

stop:
	@$(PY) -m scripts.server stop

test: archive
	@echo "==> [test] pytest"
	@$(PY) -m pytest

bench: archive
	@$(PY) -m tests.load.bench

k8s-check: $(READY)
	@echo "==> [k8s] offline validation of k8s/ (first run builds .venv-checkov)"
	@$(PY) -m pytest tests/test_k8s.py -q

clean:
	rm -rf artifacts model_store/*.mar logs key_file.json
