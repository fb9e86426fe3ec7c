"""Build TorchServe archives (.mar) into model_store/ from the training artifacts that registry.py lists.

    ./archive.sh                   every archive in registry.py
    ./archive.sh NAME [NAME ...]   only these: an archive (mnist_v2) or a model (mnist: all of its versions)
    ./archive.sh --list            ARCHIVE MODEL VERSION ARTIFACT_DIR, one line per archive
    ./archive.sh --profile gpu     the same archives with each model's GPU model-config, into model_store_gpu/
    ./archive.sh --triton DIR      a Triton model repository from the exports (scripts/triton.py)

An archive holds the model's handler module as entry point, the handlers/ and models/ packages, every file of the
artifact folder (the weights as the serialized file) and the model's model-config.yaml. Any failure (an untrained
model, a missing file, the archiver failing) stops the build with exit status 1, names the archive, and leaves
the archive already in model_store/ as it was; an unknown name exits with 2.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

import registry
from scripts import triton
from models import read_manifest

ROOT = registry.ROOT
STORE = ROOT / "model_store"
PACKAGES = ("handlers", "models")


class BuildError(RuntimeError):
    """An archive could not be built; the message says which and why."""


class UnknownName(LookupError):
    """A name on the command line is neither an archive nor a model of registry.py."""


def profile_store(profile):
    """Where archives of a model-config profile go: model_store/ for "cpu" (local serving), else model_store_<profile>/
    (not a folder inside model_store/, which `--models all` would try to load as a model)."""
    return STORE if profile == "cpu" else ROOT / f"model_store_{profile}"


def build(entry, version, store=STORE, config=None):
    """model_store/<archive>.mar for ``version`` of ``entry``; ``config`` replaces its cpu model-config."""
    artifacts = ROOT / version.artifacts
    label = f"{version.archive} ({entry.name} {version.version})"
    if not (artifacts / "manifest.json").is_file():
        raise BuildError(f"{label}: {version.artifacts}/manifest.json not found - train it first: {version.train}  "
                         "(or: make train)")
    try:
        manifest = read_manifest(artifacts)
    except (OSError, ValueError) as err:
        raise BuildError(f"{label}: {err}") from err
    config = Path(config or ROOT / entry.configs["cpu"])
    check_model_config(config, label)
    archiver = Path(sys.executable).parent / "torch-model-archiver"
    with tempfile.TemporaryDirectory(dir=store) as staging:
        extra = Path(staging) / "extra"
        for package in PACKAGES:
            shutil.copytree(ROOT / package, extra / package, ignore=shutil.ignore_patterns("__pycache__", "*.yaml"))
            check_compiles(extra, package, label)
        for name in manifest["files"]:
            if name != manifest["weights"]:
                shutil.copy2(artifacts / name, extra / name)
        shutil.copy2(artifacts / "metrics.json", extra / "metrics.json")
        command = [str(archiver), "--force", "--model-name", entry.name, "--version", version.version,
                   "--handler", str(ROOT / entry.handler), "--serialized-file", str(artifacts / manifest["weights"]),
                   "--extra-files", str(extra), "--config-file", str(config),
                   "--export-path", staging]
        try:
            result = subprocess.run(command, capture_output=True, text=True)
        except OSError as err:
            raise BuildError(f"{label}: cannot run {archiver.name}: {err}") from err
        built = Path(staging) / f"{entry.name}.mar"
        if result.returncode != 0 or not built.is_file():
            raise BuildError(f"{label}: torch-model-archiver exited with {result.returncode}: "
                             f"{(result.stderr or result.stdout).strip()[-2000:]}")
        target = Path(store) / f"{version.archive}.mar"
        os.replace(built, target)  # same folder: the old archive is replaced whole or not at all
    return target


def check_model_config(path, label):
    """A model-config TorchServe can load: a YAML mapping (the archiver copies the file without reading it)."""
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise BuildError(f"{label}: model-config {path.name} is not readable YAML: {err}") from err
    if not isinstance(config, dict):
        raise BuildError(f"{label}: model-config {path.name} must be a YAML mapping, got {type(config).__name__}")


def check_compiles(staged, package, label):
    """Every module of ``package`` compiles: a syntax error would otherwise surface only when a worker loads it."""
    for path in sorted((staged / package).rglob("*.py")):
        try:
            compile(path.read_bytes(), str(path), "exec")
        except (SyntaxError, ValueError) as err:
            raise BuildError(f"{label}: {path.relative_to(staged)} does not compile: {err}") from err


def selected(names):
    """The (model, version) pairs that ``names`` select: an archive name selects that archive, another model name
    every version of the model; no names select everything."""
    served = registry.served()
    chosen = []
    for name in names or [version.archive for _, version in served]:
        matches = ([pair for pair in served if pair[1].archive == name]
                   or [pair for pair in served if pair[0].name == name])
        if not matches:
            untrained = [v for m in registry.MODELS for v in m.versions if name in (m.name, v.archive)]
            if untrained:  # an optional version (registry.Version.optional) is built only once trained
                raise BuildError(f"{name}: {untrained[0].artifacts}/manifest.json not found - it is optional and "
                                 f"trained by hand: {untrained[0].train}")
            raise UnknownName(f"no archive or model named {name!r} (see ./archive.sh --list)")
        chosen += [pair for pair in matches if pair not in chosen]
    return chosen


def main(argv=None):
    parser = argparse.ArgumentParser(prog="archive.sh", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("names", nargs="*", help="archives or models to build (default: all)")
    parser.add_argument("--list", action="store_true", help="list the archives and exit")
    parser.add_argument("--profile", default="cpu", choices=sorted({p for m in registry.MODELS for p in m.configs}),
                        help="model-config profile (registry.py configs; default cpu, into model_store/)")
    parser.add_argument("--triton", metavar="DIR", help="write a Triton model repository from the ONNX exports "
                        "into DIR instead (python -m scripts.triton --help)")
    args = parser.parse_args(argv)
    if args.list:
        return registry.main(["archives"])
    if args.triton:
        return triton.main([args.triton])
    store = profile_store(args.profile)
    store.mkdir(parents=True, exist_ok=True)
    try:
        chosen = selected(args.names)
    except UnknownName as err:
        parser.error(str(err))  # exit status 2, as for any other usage error
    try:
        for entry, version in chosen:
            if args.profile not in entry.configs:
                raise BuildError(f"{entry.name} has no {args.profile!r} model-config in registry.py")
            target = build(entry, version, store, ROOT / entry.configs[args.profile])
            size = target.stat().st_size / 1024
            print(f"archive.sh: {target.relative_to(ROOT)}  ({entry.name} {version.version} from "
                  f"{version.artifacts}, {size:.0f} KiB)", flush=True)
    except BuildError as err:
        print(f"archive.sh: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
