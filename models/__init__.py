"""What training and serving share, free of TorchServe: architectures, the artifact manifest, the CPU budget.

An artifact folder (written by ``train/``, packed into an archive by ``archive.sh``) holds ``manifest.json``, which
names everything a handler loads: ``model_module``, ``architecture`` and ``arch_kwargs`` (see ``architecture``),
``weights`` (a plain ``state_dict``), ``files`` (every file the folder must hold) and the model's own keys (labels, vocabulary,
feature statistics, input geometry).
"""

import importlib
import json
import os
from pathlib import Path

import torch
from torch import nn

MANIFEST_FILE = "manifest.json"
METRICS_FILE = "metrics.json"


def architecture(module: str, name: str, **kwargs) -> dict:
    """The manifest keys that name an architecture: ``model_module`` (a module of this package), ``architecture``
    (a key of that module's ``ARCHITECTURES`` table) and ``arch_kwargs`` (what its constructor is called with)."""
    spec = {"model_module": module, "architecture": name, "arch_kwargs": kwargs}
    constructor(spec)  # an unknown name fails at training time, not when the archive is served
    return spec


def constructor(manifest: dict):
    """The constructor the manifest names: ``ARCHITECTURES[architecture]`` of its ``model_module``.

    Each model module lists its constructors explicitly (``ARCHITECTURES = {"DigitCNN": DigitCNN}``); any callable
    that takes ``arch_kwargs`` and returns an ``nn.Module`` fits, e.g. ``torchvision.models.resnet18``.
    """
    module_name = manifest["model_module"]
    if module_name.partition(".")[0] != __name__:
        raise ValueError(f"model_module {module_name!r} is not a module of the {__name__} package")
    table = getattr(importlib.import_module(module_name), "ARCHITECTURES", {})
    try:
        return table[manifest["architecture"]]
    except KeyError:
        raise ValueError(f"{module_name}.ARCHITECTURES has no {manifest['architecture']!r}; "
                         f"it lists: {', '.join(table) or 'nothing'}") from None


def build(manifest: dict) -> nn.Module:
    """A fresh (untrained) model of the manifest's architecture."""
    return constructor(manifest)(**manifest.get("arch_kwargs", {}))


def read_manifest(artifact_dir) -> dict:
    """An artifact folder's manifest, checked for the files it names."""
    path = Path(artifact_dir) / MANIFEST_FILE
    manifest = json.loads(path.read_text(encoding="utf-8"))
    missing = [name for name in manifest.get("files", []) if not (Path(artifact_dir) / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} names files that are not there: {missing}")
    return manifest


def load_model(artifact_dir, manifest: dict, device: torch.device | str = "cpu") -> nn.Module:
    """The manifest's architecture with its weights, on ``device``, in eval mode."""
    model = build(manifest)
    weights = Path(artifact_dir) / manifest["weights"]
    try:
        model.load_state_dict(torch.load(weights, map_location=device, weights_only=True))
    except Exception as err:
        raise RuntimeError(f"cannot load weights {manifest['weights']}: {type(err).__name__}: {err}") from err
    return model.to(device).eval()


def as_tuple(value) -> tuple:
    """A model's inputs or outputs as a tuple: a tuple or list item by item, anything else as the only item."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def available_cpus(cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a container's CPU limit;
    ``os.cpu_count()`` counts the node's cores)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = cgroup_cpu_max.read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cpus
