#!/usr/bin/env bash
# Build TorchServe archives into model_store/ from the training artifacts listed in registry.py.
#   ./archive.sh [NAME ...]   every archive, or only these archives or models
#   ./archive.sh --list       ARCHIVE MODEL VERSION ARTIFACT_DIR per archive
# The work is done by scripts/archive.py (./archive.sh --help); this wrapper finds the venv's Python.
set -euo pipefail
cd "$(dirname "$0")"
python=python3
if [ -x .venv/bin/python ]; then python=.venv/bin/python; fi
exec "$python" -m scripts.archive "$@"
