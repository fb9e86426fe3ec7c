#!/usr/bin/env bash
# Prometheus for tests/serving/test_prometheus.py: Debian's package where apt-get can run (as root), else a note that the
# test will be skipped. Never fails the build.
if command -v prometheus >/dev/null; then exit 0; fi
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "==> [test] installing Debian's prometheus (apt-get) for tests/serving/test_prometheus.py"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq prometheus >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq prometheus >/dev/null 2>&1; }
fi
command -v prometheus >/dev/null || echo "==> [test] Prometheus is not installed: tests/serving/test_prometheus.py will be skipped"
exit 0
