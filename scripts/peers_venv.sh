#!/usr/bin/env bash
# The peer servers' venv for `make bench` (tests/load/peers/): LitServe, KServe and Ray Serve from
# requirements-peers.txt, never in the serving venv. It reads torch, torchvision and the project's other packages
# from .venv through a .pth file, so the peers run the very same builds. Usage: scripts/peers_venv.sh [VENV] [PEERS]
set -euo pipefail
serving=${1:-.venv}
peers=${2:-.venv-peers}
test -x "$peers/bin/python" || python3 -m venv "$peers"
site_of() { "$1/bin/python" -c 'import site; print(site.getsitepackages()[0])'; }
site_of "$serving" > "$(site_of "$peers")/serving-venv.pth"
"$peers/bin/pip" install --quiet --disable-pip-version-check -r requirements-peers.txt
touch "$peers/.ready"
