"""A Triton Inference Server model repository built from the artifacts' exports (``./archive.sh --triton DIR``).

    python -m scripts.triton DIR [--format onnx|torchscript]

writes, for every model of registry.py, ``DIR/<model>/config.pbtxt`` and one numbered folder per served version
(registry order: mnist 1.0 is ``1/``, 2.0 is ``2/``) holding ``model.onnx`` (backend onnxruntime) or ``model.pt``
(pytorch_libtorch, whose tensors Triton names ``<name>__<index>``), plus ``labels.txt`` for classifiers. Batching
follows the model-config: ``max_batch_size`` = batchSize, the dynamic batcher's delay = maxBatchDelay.

Triton serves the tensors only: decoding images, tokenising text and standardising features (what our handlers
do before the model) and softmax/labels after it are the client's job, or an ensemble's (a python-backend model
in front). Every written config is checked against the export: parsed with Triton's own ModelConfig schema, and
its names, dims and dtypes compared with the ONNX graph read by the ``onnx`` package.
"""

import argparse
import importlib.util
import shutil
import sys
from functools import cache
from pathlib import Path

import yaml

import registry
from models import read_manifest

ROOT = registry.ROOT
FORMATS = {"onnx": ("onnx", "model.onnx", 'backend: "onnxruntime"'),
           "torchscript": ("torchscript", "model.pt", 'platform: "pytorch_libtorch"')}
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "int64": "TYPE_INT64",
                "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}
ONNX_TYPES = {"TYPE_FP32": 1, "TYPE_UINT8": 2, "TYPE_INT8": 3, "TYPE_INT32": 6, "TYPE_INT64": 7, "TYPE_BOOL": 9,
              "TYPE_FP16": 10, "TYPE_FP64": 11}
"""Triton data type -> onnx.TensorProto element type."""


class RepositoryError(RuntimeError):
    """A model cannot be written, or a written config does not match its export."""


def dims(shape):
    """Triton dims of an export shape: the batch axis dropped, other named (dynamic) axes -1."""
    return [size if isinstance(size, int) else -1 for size in shape[1:]]


def tensor_config(entry, name):
    """One ``input``/``output`` entry; a tensor that is only the batch axis is dims [1] reshaped to []."""
    shape = dims(entry["shape"])
    reshape = "" if shape else " reshape: { shape: [ ] }"
    shown = ", ".join(map(str, shape or [1]))
    return f'  {{ name: "{name}" data_type: {TRITON_TYPES[entry["dtype"]]} dims: [ {shown} ]{reshape} }}'


def config_text(name, export, fmt, model_config, versions, labelled):
    """config.pbtxt of a model."""
    names = {side: [entry["name"] if fmt == "onnx" else f"{entry['name']}__{i}" for i, entry in enumerate(export[side])]
             for side in ("inputs", "outputs")}
    tensors = {side: [tensor_config(entry, tensor_name) for entry, tensor_name in zip(export[side], names[side])]
               for side in names}
    if labelled:
        tensors["outputs"][0] = tensors["outputs"][0][:-2] + ' label_filename: "labels.txt" }'
    delay_us = int(float(model_config.get("maxBatchDelay", 0)) * 1000)
    return "\n".join([
        f'name: "{name}"',
        FORMATS[fmt][2],
        f"max_batch_size: {int(model_config.get('batchSize', 1))}",
        f"version_policy: {{ specific: {{ versions: [ {', '.join(map(str, versions))} ] }} }}",
        "input [", ",\n".join(tensors["inputs"]), "]",
        "output [", ",\n".join(tensors["outputs"]), "]",
        f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}", ""])


def exportable(fmt):
    """The registry's models whose served versions can be in a repository of ``fmt``; the others are named, with
    the reason their manifest gives (e.g. the detector)."""
    key = FORMATS[fmt][0]
    chosen = []
    for entry in registry.MODELS:
        versions = registry.served_versions(entry)
        exports = [read_manifest(ROOT / v.artifacts).get("exports", {}).get(key, {}) for v in versions]
        unsupported = next((export["unsupported"] for export in exports if "unsupported" in export), None)
        if unsupported:
            print(f"triton: {entry.name} left out: {unsupported}", file=sys.stderr)
        elif versions:
            chosen.append(entry)
    return chosen


def write_model(entry, out_dir, fmt):
    """``out_dir/<model>/``: config.pbtxt, labels.txt when the model has labels, one folder per version."""
    key, file_name, _ = FORMATS[fmt]
    model_dir = Path(out_dir) / entry.name
    shutil.rmtree(model_dir, ignore_errors=True)
    exports = []
    versions = registry.served_versions(entry)
    for number, version in enumerate(versions, start=1):
        manifest = read_manifest(ROOT / version.artifacts)
        export = manifest.get("exports", {}).get(key)
        if not export or "file" not in export:
            why = (export or {}).get("unsupported", f"no {key} export: python -m train.export {version.artifacts}")
            raise RepositoryError(f"{entry.name} {version.version}: {why}")
        (model_dir / str(number)).mkdir(parents=True)
        shutil.copy2(ROOT / version.artifacts / export["file"], model_dir / str(number) / file_name)
        exports.append((export, manifest))
    export, manifest = exports[0]
    if any((e["inputs"], e["outputs"]) != (export["inputs"], export["outputs"]) for e, _ in exports):
        raise RepositoryError(f"{entry.name}: its versions' exports differ in inputs or outputs; one config cannot "
                              "describe them")
    labels = manifest.get("labels")
    if labels:
        (model_dir / "labels.txt").write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")
    model_config = yaml.safe_load((ROOT / entry.configs["cpu"]).read_text()) or {}
    text = config_text(entry.name, export, fmt, model_config, range(1, len(exports) + 1), bool(labels))
    (model_dir / "config.pbtxt").write_text(text, encoding="utf-8")
    return model_dir


@cache
def model_config_schema():
    """Triton's model_config protobuf module (ModelConfig, DataType), from the tritonclient package: its grpc folder
    holds the generated module, and importing it by path needs none of the grpc extra."""
    import tritonclient

    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_config(model_dir):
    """A model folder's config.pbtxt parsed with Triton's schema (a typo in a field name fails here)."""
    from google.protobuf import text_format

    return text_format.Parse((Path(model_dir) / "config.pbtxt").read_text(), model_config_schema().ModelConfig())


def validate(model_dir):
    """Check config.pbtxt against every version's model.onnx: names, dtypes and dims (batch axis first, dynamic
    axes -1). Returns the problems found (empty: valid)."""
    import onnx

    config = read_config(model_dir)
    problems = []
    versions = sorted(p for p in Path(model_dir).iterdir() if p.is_dir())
    if [int(p.name) for p in versions] != list(config.version_policy.specific.versions):
        problems.append(f"version folders {[p.name for p in versions]} are not the config's versions")
    for version in versions:
        graph = onnx.load(str(version / "model.onnx")).graph
        initializers = {init.name for init in graph.initializer}
        for side, declared, actual in (("input", config.input, [v for v in graph.input if v.name not in initializers]),
                                       ("output", config.output, graph.output)):
            if [t.name for t in declared] != [v.name for v in actual]:
                problems.append(f"{version.name}: {side} names {[t.name for t in declared]} != ONNX "
                                f"{[v.name for v in actual]}")
                continue
            for tensor, value in zip(declared, actual):
                problems += tensor_problems(f"{version.name}: {side} {tensor.name}", tensor, value, config)
    return problems


def tensor_problems(where, tensor, value, config):
    """How a config tensor disagrees with an ONNX graph value (dtype, batch axis, dims)."""
    import onnx

    problems = []
    data_type = model_config_schema().DataType.Name(tensor.data_type)
    element = value.type.tensor_type.elem_type
    if ONNX_TYPES.get(data_type) != element:
        problems.append(f"{where}: {data_type}, but the graph's is {onnx.TensorProto.DataType.Name(element)}")
    graph_dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
    if config.max_batch_size > 0:
        if graph_dims[:1] != [-1]:
            problems.append(f"{where}: max_batch_size > 0, but the graph's first axis is not dynamic: {graph_dims}")
        graph_dims = graph_dims[1:]
    declared = list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)
    if declared != graph_dims:
        problems.append(f"{where}: dims {declared}, but the graph's are {graph_dims} (batch axis dropped)")
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(prog="archive.sh --triton", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, metavar="DIR")
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="model file per version (default onnx)")
    args = parser.parse_args(argv)
    try:
        for entry in exportable(args.format):
            model_dir = write_model(entry, args.out_dir, args.format)
            if args.format == "onnx":
                problems, checked = validate(model_dir), "config checked against the ONNX graph"
            else:
                read_config(model_dir)
                problems, checked = [], "config parsed with Triton's schema"
            if problems:
                raise RepositoryError(f"{model_dir}: " + "; ".join(problems))
            print(f"triton: {model_dir} ({len(entry.versions)} version(s), {args.format}, {checked})", flush=True)
    except (RepositoryError, OSError, ValueError) as err:
        print(f"triton: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
