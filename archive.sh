#!/usr/bin/env bash
# Build TorchServe archives (.mar) into model_store/ from the training artifacts.
#
#   ./archive.sh                        build every archive in the table below
#   ./archive.sh NAME [NAME ...]        build only these (mnist builds both mnist versions; mnist_v2 just 2.0)
#   ./archive.sh --list                 print "NAME VERSION FILE ARTIFACT_DIR" for every archive
#   ./archive.sh --train-command DIR    print the command that trains artifact folder DIR
#
# Each archive holds: the handler (handlers/<name>.py) as entry point, the whole handlers/ package (shared layer
# and model code), every file of the artifact folder (weights, manifest.json, metrics.json, vocab...) and
# handlers/<name>.yaml as its model-config.yaml.
set -euo pipefail
cd "$(dirname "$0")"

#  archive      model       version  artifact folder        training command
ARCHIVES="
mnist         mnist       1.0      artifacts/mnist        python -m train.mnist --out artifacts/mnist
mnist_v2      mnist       2.0      artifacts/mnist-v2     python -m train.mnist --out artifacts/mnist-v2 --seed 2 --epochs 40 --augment strong
sentiment     sentiment   1.0      artifacts/sentiment    python -m train.sentiment --out artifacts/sentiment
regression    regression  1.0      artifacts/regression   python -m train.regression --out artifacts/regression
"
STORE=model_store

rows() { echo "$ARCHIVES" | grep -v '^\s*$'; }

build() {  # build ARCHIVE MODEL VERSION ARTIFACT_DIR TRAIN_COMMAND...
  local archive=$1 model=$2 version=$3 dir=$4; shift 4
  if [ ! -f "$dir/manifest.json" ]; then
    echo "archive.sh: $archive $version: $dir/manifest.json not found - train it first: $*  (or: make train)" >&2
    return 1
  fi
  local staging
  staging=$(mktemp -d)
  trap 'rm -rf "$staging"' RETURN
  mkdir -p "$staging/extra/handlers"
  cp handlers/*.py "$staging/extra/handlers/"
  cp "$dir"/* "$staging/extra/"
  rm "$staging/extra/model.pt"  # shipped as the serialized file
  torch-model-archiver --force --model-name "$model" --version "$version" \
    --handler "handlers/$model.py" --serialized-file "$dir/model.pt" \
    --extra-files "$staging/extra" --config-file "handlers/$model.yaml" \
    --export-path "$staging"
  mv "$staging/$model.mar" "$STORE/$archive.mar"
  echo "archive.sh: $STORE/$archive.mar  ($model $version from $dir, $(du -h "$STORE/$archive.mar" | cut -f1))"
}

case "${1:-}" in
  --list)
    rows | awk '{print $2, $3, $1 ".mar", $4}'
    exit 0 ;;
  --train-command)
    rows | awk -v dir="${2:?usage: ./archive.sh --train-command DIR}" '$4 == dir {for (i = 5; i <= NF; i++) printf "%s%s", $i, (i < NF ? " " : "\n"); found = 1} END {exit !found}' \
      || { echo "archive.sh: no artifact folder '$2' in the table" >&2; exit 2; }
    exit 0 ;;
  -h|--help)
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 0 ;;
esac

command -v torch-model-archiver >/dev/null || { echo "archive.sh: torch-model-archiver not found: activate the venv (source .venv/bin/activate) or run make archive" >&2; exit 1; }
mkdir -p "$STORE"
wanted=("$@")
built=0 failed=0
while read -r archive model version dir train_command; do
  if [ ${#wanted[@]} -gt 0 ] && [[ ! " ${wanted[*]} " =~ " $archive " ]] && [[ ! " ${wanted[*]} " =~ " $model " ]]; then
    continue
  fi
  if build "$archive" "$model" "$version" "$dir" $train_command; then built=$((built + 1)); else failed=$((failed + 1)); fi
done < <(rows)
if [ $((built + failed)) -eq 0 ]; then
  echo "archive.sh: no archive named: ${wanted[*]} (see ./archive.sh --list)" >&2
  exit 2
fi
[ "$failed" -eq 0 ] || exit 1
