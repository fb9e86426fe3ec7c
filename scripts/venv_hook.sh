#!/usr/bin/env bash
# Make `torchserve --start --models all` (and --stop) work as written from the repo root once the venv is active:
# append to VENV/bin/activate an export of TS_CONFIG_FILE=<repo>/config.properties, which deactivate unsets again.
#   scripts/venv_hook.sh VENV      (make setup runs it; idempotent; <repo> is the folder that holds VENV)
# Why TS_CONFIG_FILE: it is TorchServe's own setting, read by the launcher (model_store, vmargs) and by the Java
# frontend, which takes it before --ts-config and before its last config snapshot (logs/config/*-snapshot.cfg):
# so a restart always comes back from config.properties (+ load_models=all), never from a stale snapshot.
set -euo pipefail
venv=${1:?usage: $0 VENV}
activate="$venv/bin/activate"
root=$(cd "$(dirname "$venv")" && pwd)
begin="# >>> torchserve-bundle (scripts/venv_hook.sh) >>>"
end="# <<< torchserve-bundle <<<"
test -f "$activate" || { echo "venv_hook.sh: $activate not found" >&2; exit 1; }
# Drop an earlier block (the repo may have moved), then append the current one.
sed -i "\|^$begin\$|,\|^$end\$|d" "$activate"
cat >> "$activate" <<BLOCK
$begin
# TorchServe reads this repo's config.properties: torchserve --start --models all (from the repo root).
export TS_CONFIG_FILE='$root/config.properties'
eval "_bundle_\$(declare -f deactivate)"
deactivate () {
    unset TS_CONFIG_FILE
    _bundle_deactivate "\$@"
    [ "\${1:-}" = nondestructive ] || unset -f _bundle_deactivate
}
$end
BLOCK
echo "==> [setup] $activate exports TS_CONFIG_FILE=$root/config.properties"
