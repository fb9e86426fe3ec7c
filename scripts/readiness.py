"""Readiness of a TorchServe pod: every model version it serves has its minimum of READY workers.

    python readiness.py [--config FILE] [--models NAME=FILE ...] [--model-store DIR] [--management URL]

TorchServe's /ping looks at default versions only, so a pod whose non-default version (B's mnist 2.0 next to 1.0)
failed to load, or is still loading, reads Healthy. This check asks the management API on loopback instead, for each
archive the pod was started with: the archive's model name and version (from its MAR-INF/MANIFEST.json) must be
registered, and at least minWorkers (at least 1) of its workers READY. Exit 0 ready, 1 not ready, each problem on
one line; it is the exec readiness probe of k8s/20-torchserve-*.yaml, whose startup probe only waits for the
management API (the image's python, standard library only, so a probe costs ~50 ms of CPU).

Defaults, for the pod: the management address and model store from --config (the ConfigMap's config.properties);
the archives from --models of the container's own command line (PID 1: `torchserve ... --models mnist=mnist.mar ...`),
so the probe checks exactly what the Deployment names. ``--models all`` means every archive in the store.
"""

import argparse
import json
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

DEFAULT_CONFIG = "/opt/torchserve/config/config.properties"


def properties(path):
    props = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")):
            key, _, value = line.partition("=")
            props[key.strip()] = value.strip()
    return props


def launcher_models(pid=1):
    """The values of --models on the command line of process ``pid`` (the container's torchserve)."""
    words = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    if "--models" not in words:
        return []
    values = []
    for word in words[words.index("--models") + 1:]:
        if not word or word.startswith("-"):
            break
        values.append(word)
    return values


def expected_versions(models, store):
    """[(model, version, archive)] for ``NAME=FILE`` / ``FILE`` / ``all`` entries; unreadable archives raise."""
    files = []
    for entry in models:
        if entry.lower() == "all":
            files += [("", path.name) for path in sorted(Path(store).glob("*.mar"))]
        else:
            name, _, file = entry.rpartition("=")
            files.append((name, file))
    expected = []
    for name, file in files:
        with zipfile.ZipFile(Path(store) / file) as archive:
            model = json.loads(archive.read("MAR-INF/MANIFEST.json"))["model"]
        expected.append((name or model["modelName"], model["modelVersion"], file))
    return expected


def get(url, token):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=5) as reply:
        return json.loads(reply.read())


def problems(management, expected, token=None):
    """One line per version that is not ready (empty: every version is ready)."""
    found = []
    for model, version, file in expected:
        try:
            described = get(f"{management}/models/{model}/{version}", token)[0]
        except urllib.error.HTTPError as err:
            reason = "not registered (its archive failed to load?)" if err.code == 404 else f"HTTP {err.code}"
            found.append(f"{model} {version} ({file}): {reason}")
            continue
        workers = described.get("workers", [])
        ready = sum(worker["status"] == "READY" for worker in workers)
        wanted = max(1, int(described.get("minWorkers", 1)))
        if ready < wanted:
            states = ", ".join(sorted(worker["status"] for worker in workers)) or "no workers"
            found.append(f"{model} {version} ({file}): {ready}/{wanted} workers READY ({states})")
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="TorchServe's config.properties (%(default)s)")
    parser.add_argument("--models", nargs="+", help="archives as given to torchserve (default: PID 1's --models)")
    parser.add_argument("--model-store", help="default: model_store of --config")
    parser.add_argument("--management", help="default: management_address of --config")
    parser.add_argument("--key-file", help="TorchServe's key_file.json, where token authorization is on")
    args = parser.parse_args(argv)
    try:
        props = properties(args.config) if Path(args.config).is_file() else {}
        management = (args.management or props.get("management_address", "http://127.0.0.1:8081")).rstrip("/")
        store = args.model_store or props.get("model_store", "model_store")
        models = args.models or launcher_models()
        if not models:
            print("not ready: no archives to check (pass --models)")
            return 1
        expected = expected_versions(models, store)
        token = json.loads(Path(args.key_file).read_text())["management"]["key"] if args.key_file else None
        found = problems(management, expected, token)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:  # URLError is an OSError
        print(f"not ready: {type(err).__name__}: {err}")
        return 1
    for line in found:
        print(f"not ready: {line}")
    if not found:
        print("ready: " + ", ".join(f"{model} {version}" for model, version, _ in expected))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
