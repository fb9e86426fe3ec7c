"""The storage folders of KServe's TorchServe runtime (k8s/kserve/, k8s/README.md "KServe").

    python -m scripts.kserve OUT [--store model_store_gpu]

writes OUT/<variant>/ for each A/B variant of registry.py (a: default versions, b: candidates), the layout that
the runtime's container reads from its storageUri (mounted at /mnt/models):

    config/config.properties   k8s/kserve/config.properties plus the model_snapshot of the archives below
    config/metrics.yaml        the bundle's metric declarations (metrics_config)
    model-store/<archive>.mar  the variant's archives that speak the Open Inference Protocol, from --store

Only the models whose handler speaks the protocol are served: KServe's data plane offers its v1 and v2 routes only,
and no handler answers v1 (a handler without the protocol hooks, such as a new scaffolded model's, answers
neither); every model of registry.py but the translator speaks v2 today. The snapshot takes each
model's name, version, workers and batching from the archive itself (its manifest and model-config), so it always
describes the files beside it.
"""

import argparse
import importlib
import json
import shutil
import sys
import zipfile
from pathlib import Path

import yaml

import registry

ROOT = registry.ROOT
TEMPLATE = ROOT / "k8s" / "kserve" / "config.properties"
METRICS = ROOT / "metrics.yaml"
DEFAULT_STORE = ROOT / "model_store_gpu"  # ./archive.sh --profile gpu: the GPU model-configs the pods need


def speaks_oip(entry):
    """Whether ``entry``'s handler class has an ``oip_input`` (handlers/common.py: the Open Inference Protocol), its
    own or inherited (a scaffolded model's handler subclasses a shared one)."""
    module = importlib.import_module(entry.handler.removesuffix(".py").replace("/", "."))
    classes = [value for value in vars(module).values()
               if isinstance(value, type) and value.__module__ == module.__name__]
    return any(getattr(cls, "oip_input", None) is not None for cls in classes)


def variant_archives(variant):
    """{model name: archive file} of ``variant`` (registry.py variant-models) whose handler speaks the protocol."""
    pairs = dict(item.split("=", 1) for item in registry.variant_models(variant))
    return {name: file for name, file in pairs.items() if speaks_oip(registry.model(name))}


def archive_entry(path):
    """(model name, version, snapshot entry) read from an archive's manifest and model-config."""
    with zipfile.ZipFile(path) as mar:
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))["model"]
        config = yaml.safe_load(mar.read(manifest["configFile"])) if manifest.get("configFile") else {}
    config = config or {}
    workers = int(config.get("minWorkers", 1))
    return manifest["modelName"], manifest["modelVersion"], {
        "defaultVersion": True, "marName": Path(path).name, "minWorkers": workers,
        "maxWorkers": int(config.get("maxWorkers", workers)), "batchSize": int(config.get("batchSize", 1)),
        "maxBatchDelay": int(config.get("maxBatchDelay", 100)),
        "responseTimeout": int(config.get("responseTimeout", 120))}


def model_snapshot(archives):
    """TorchServe's model_snapshot for ``archives`` (paths): what it loads at start and the KServe wrapper serves."""
    models = {}
    for path in archives:
        name, version, entry = archive_entry(path)
        if name in models:
            raise ValueError(f"{Path(path).name}: model {name} is in the folder twice; one version per model")
        models[name] = {version: entry}
    return {"name": "startup.cfg", "modelCount": len(models), "models": models}


def config_text(archives):
    """k8s/kserve/config.properties with the model_snapshot line of ``archives`` appended."""
    snapshot = json.dumps(model_snapshot(archives), separators=(",", ":"))
    return TEMPLATE.read_text(encoding="utf-8").rstrip("\n") + f"\nmodel_snapshot={snapshot}\n"


def write_folder(out_dir, variant, store=DEFAULT_STORE):
    """``out_dir``: config/ and model-store/ of ``variant``, from the archives in ``store``."""
    out_dir, store, files = Path(out_dir), Path(store), variant_archives(variant).values()
    missing = [file for file in files if not (store / file).is_file()]
    if missing:
        raise FileNotFoundError(f"{store} lacks {', '.join(missing)}: build them first (./archive.sh --profile gpu)")
    shutil.rmtree(out_dir, ignore_errors=True)
    (out_dir / "config").mkdir(parents=True)
    (out_dir / "model-store").mkdir()
    copied = [Path(shutil.copy2(store / file, out_dir / "model-store" / file)) for file in files]
    (out_dir / "config" / "config.properties").write_text(config_text(copied), encoding="utf-8")
    shutil.copy2(METRICS, out_dir / "config" / "metrics.yaml")
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m scripts.kserve", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, metavar="OUT")
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE,
                        help="where the archives are (default model_store_gpu/, from ./archive.sh --profile gpu)")
    args = parser.parse_args(argv)
    try:
        for variant in registry.VARIANTS:
            folder = write_folder(args.out_dir / variant, variant, args.store)
            print(f"kserve: {folder}: {', '.join(sorted(p.name for p in (folder / 'model-store').iterdir()))}")
    except (OSError, ValueError, KeyError) as err:
        print(f"kserve: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
