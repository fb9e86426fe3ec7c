"""A Triton Inference Server model repository built from the artifacts' exports (``./archive.sh --triton DIR``).

    python -m scripts.triton DIR [--format onnx|torchscript]

writes, for every model of registry.py whose export Triton can batch (not the translator: no export; not the
detector: one image per call), ``DIR/<model>/config.pbtxt`` and one numbered folder per served version
(registry order: mnist 1.0 is ``1/``, 2.0 is ``2/``) holding ``model.onnx`` (backend onnxruntime) or ``model.pt``
(pytorch_libtorch, whose tensors Triton names ``<name>__<index>``), plus ``labels.txt`` for classifiers. Batching
follows the model-config: ``max_batch_size`` = batchSize, the dynamic batcher's delay = maxBatchDelay.

Triton serves the tensors only: decoding images, tokenising text and standardising features (what our handlers
do before the model) and softmax/labels after it are the client's job, or an ensemble's (a python-backend model
in front). The written repository is then checked (``check_repository``): each config parsed with Triton's
ModelConfig schema (and, for ONNX, compared with the graph), and each version's file loaded and run by the library
that serves it (onnxruntime / torch.jit.load) at batch 1 and 7 on inputs built from the config, its outputs
compared with the config, labels.txt and the eager model (train/export.py's TOLERANCE). A difference fails the
command, naming model, version and file; each version checked prints its max abs diff.
"""

import argparse
import importlib.util
import shutil
import sys
import warnings
from functools import cache
from pathlib import Path

import numpy as np
import torch
import yaml

import registry
from models import as_tuple, load_model, read_manifest
from train.export import CHECK_BATCHES, TOLERANCE

ROOT = registry.ROOT
FORMATS = {"onnx": ("onnx", "model.onnx", 'backend: "onnxruntime"'),
           "torchscript": ("torchscript", "model.pt", 'platform: "pytorch_libtorch"')}
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "int64": "TYPE_INT64",
                "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}
ONNX_TYPES = {"TYPE_FP32": 1, "TYPE_UINT8": 2, "TYPE_INT8": 3, "TYPE_INT32": 6, "TYPE_INT64": 7, "TYPE_BOOL": 9,
              "TYPE_FP16": 10, "TYPE_FP64": 11}
"""Triton data type -> onnx.TensorProto element type."""
NUMPY_TYPES = {triton: numpy for numpy, triton in TRITON_TYPES.items()}
"""Triton data type -> numpy (and torch) dtype name."""
BACKEND_FILES = {"onnxruntime": "model.onnx", "pytorch_libtorch": "model.pt"}
"""Triton's default model file name of a backend (or platform)."""


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
    the reason their manifest gives, or that their export has no batch axis (the detector's)."""
    key = FORMATS[fmt][0]
    chosen = []
    for entry in registry.MODELS:
        versions = registry.served_versions(entry)
        exports = [read_manifest(ROOT / v.artifacts).get("exports", {}).get(key, {}) for v in versions]
        unsupported = next((export["unsupported"] for export in exports if "unsupported" in export), None)
        unbatched = next((export for export in exports if export.get("inputs") and
                          export["inputs"][0]["shape"][0] != "batch"), None)
        if unbatched and not unsupported:  # e.g. the detector's ONNX file: one image per call
            unsupported = (f"its {key} export takes input {unbatched['inputs'][0]['shape']} (no dynamic batch axis), "
                           "and this repository's configs batch on axis 0")
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


def model_file(config):
    """The file name and backend that Triton loads for a config."""
    backend = config.backend or config.platform
    if backend not in BACKEND_FILES:
        raise RepositoryError(f"{config.name}: backend {backend!r} is not one this check can run")
    return config.default_model_filename or BACKEND_FILES[backend], backend


def config_inputs(config, batch_size, seed, vocab_size):
    """Arrays for the config's inputs at ``batch_size``, in the layout the model receives (``reshape`` applied):
    -1 dims are a small length, integers are token ids below ``vocab_size``."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for tensor in config.input:
        dtype = NUMPY_TYPES[model_config_schema().DataType.Name(tensor.data_type)]
        shape = list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)
        shape = [3 + 2 * batch_size if size == -1 else size for size in shape]
        shape = [batch_size, *shape] if config.max_batch_size > 0 else shape
        if dtype.startswith("float"):
            arrays[tensor.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == "bool":
            arrays[tensor.name] = rng.integers(0, 2, shape).astype(bool)
        elif vocab_size is None:
            raise RepositoryError(f"{config.name}: integer input {tensor.name}, but the manifest's arch_kwargs have "
                                  "no vocab_size to draw ids below")
        else:
            arrays[tensor.name] = rng.integers(0, vocab_size, shape).astype(dtype)
    return arrays


def runner(path, backend, config):
    """``run(arrays) -> {output name: array}`` with the library that serves ``backend``: ONNX Runtime, or
    torch.jit.load with tensors matched by their ``<name>__<index>`` suffix."""
    if backend == "onnxruntime":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [t.name for t in config.output]
        return lambda arrays: dict(zip(names, session.run(names, arrays)))
    with warnings.catch_warnings():  # TorchScript is deprecated in favour of torch.export, and still what C++ loads
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def index(name):
        prefix, _, number = name.rpartition("__")
        if not prefix or not number.isdigit():
            raise RepositoryError(f"{name}: a pytorch_libtorch tensor must be named <name>__<index>")
        return int(number)

    def run(arrays):
        inputs = sorted(arrays.items(), key=lambda item: index(item[0]))
        with torch.inference_mode():
            outputs = as_tuple(module(*(torch.from_numpy(array) for _, array in inputs)))
        return {t.name: outputs[index(t.name)].numpy() for t in config.output}
    return run


def eager_order(config, backend, path):
    """{"input"|"output": {config tensor name: index among the eager model's inputs or outputs, or None}}: the
    ONNX graph's order, or the ``__<index>`` suffix for pytorch_libtorch."""
    if backend != "onnxruntime":
        return {side: {t.name: int(t.name.rpartition("__")[2]) if t.name.rpartition("__")[2].isdigit() else None
                       for t in tensors} for side, tensors in (("input", config.input), ("output", config.output))}
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    names = {"input": [v.name for v in graph.input if v.name not in initializers],
             "output": [v.name for v in graph.output]}
    return {side: {t.name: names[side].index(t.name) if t.name in names[side] else None for t in tensors}
            for side, tensors in (("input", config.input), ("output", config.output))}


def check_batches(config):
    """The batch sizes a version is run at: train/export.py's (1 and 7), within max_batch_size (0: no batch axis)."""
    if config.max_batch_size <= 0:
        return [0]
    return sorted({min(batch, config.max_batch_size) for batch in CHECK_BATCHES})


def check_version(model_dir, config, number, version):
    """Run version folder ``number`` (registry ``version``) at the check batches; returns its max abs diff to the
    eager model, or raises RepositoryError naming model, version, file and the difference."""
    file_name, backend = model_file(config)
    path = Path(model_dir) / str(number) / file_name
    where = f"{config.name} {version.version} ({path.relative_to(Path(model_dir).parent)}, {backend})"
    manifest = read_manifest(ROOT / version.artifacts)
    model = load_model(ROOT / version.artifacts, manifest)
    try:
        run = runner(path, backend, config)
        order = eager_order(config, backend, path)
    except RepositoryError as err:
        raise RepositoryError(f"{where}: {err}") from None
    except Exception as err:
        raise RepositoryError(f"{where}: cannot load: {type(err).__name__}: {err}") from None
    unknown = [name for side in order for name, index in order[side].items() if index is None]
    if unknown or sorted(order["input"].values()) != list(range(len(config.input))):
        raise RepositoryError(f"{where}: config tensors {unknown or list(order['input'])} do not match the model's "
                              "inputs and outputs")
    schema, worst = model_config_schema(), 0.0
    for batch_size in check_batches(config):
        arrays = config_inputs(config, batch_size, batch_size, manifest.get("arch_kwargs", {}).get("vocab_size"))
        try:
            got = run(arrays)
        except Exception as err:
            raise RepositoryError(f"{where}: batch {batch_size} fails on the config's inputs "
                                  f"{ {n: list(a.shape) for n, a in arrays.items()} }: {type(err).__name__}: "
                                  f"{str(err).splitlines()[0][:300]}") from None
        eager_inputs = sorted(arrays.items(), key=lambda item: order["input"][item[0]])
        with torch.inference_mode():
            expected = as_tuple(model(*(torch.from_numpy(array) for _, array in eager_inputs)))
        for tensor in config.output:
            array, index = np.asarray(got[tensor.name]), order["output"][tensor.name]
            dtype = NUMPY_TYPES[schema.DataType.Name(tensor.data_type)]
            shape = list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)
            shape = [batch_size, *shape] if config.max_batch_size > 0 else shape
            if array.dtype != np.dtype(dtype):
                raise RepositoryError(f"{where}: output {tensor.name} is {array.dtype}, the config says {dtype}")
            if len(shape) != array.ndim or any(want not in (-1, size) for want, size in zip(shape, array.shape)):
                raise RepositoryError(f"{where}: output {tensor.name} has shape {list(array.shape)} at batch "
                                      f"{batch_size}, the config says {shape}")
            if index >= len(expected) or tuple(expected[index].shape) != array.shape:
                raise RepositoryError(f"{where}: output {tensor.name} {list(array.shape)} is not the eager model's "
                                      f"output {index}")
            diff = float(np.abs(array - expected[index].numpy()).max(initial=0.0))
            if not diff <= TOLERANCE:
                raise RepositoryError(f"{where}: output {tensor.name} differs from the eager model of "
                                      f"{version.artifacts} by {diff:.3g} at batch {batch_size} (tolerance "
                                      f"{TOLERANCE})")
            worst = max(worst, diff)
            if tensor.label_filename:
                lines = (Path(model_dir) / tensor.label_filename).read_text(encoding="utf-8").splitlines()
                if len(lines) != array.shape[-1]:
                    raise RepositoryError(f"{where}: {tensor.label_filename} has {len(lines)} lines, output "
                                          f"{tensor.name} has {array.shape[-1]} classes")
    return worst


def check_repository(directory, models=None):
    """Check every model folder of ``directory`` (or those named in ``models``): config, versions, and each version
    run against its eager model. Prints one line per version; returns [(model, version, max abs diff)], or raises
    RepositoryError listing every problem."""
    results, problems = [], []
    folders = sorted(p for p in Path(directory).iterdir() if (p / "config.pbtxt").is_file())
    for model_dir in folders if models is None else [Path(directory) / name for name in models]:
        try:
            config = read_config(model_dir)
            entry = next((e for e in registry.MODELS if e.name == config.name), None)
            if entry is None or config.name != model_dir.name:
                raise RepositoryError(f"{model_dir}: config names {config.name!r}, not a registry model of this "
                                      "folder's name")
            versions = registry.served_versions(entry)
            numbers = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
            if numbers != list(config.version_policy.specific.versions) or numbers != list(
                    range(1, len(versions) + 1)):
                raise RepositoryError(f"{config.name}: version folders {numbers}, config versions "
                                      f"{list(config.version_policy.specific.versions)}, served versions "
                                      f"{[v.version for v in versions]}")
            if model_file(config)[1] == "onnxruntime":
                found = validate(model_dir)
                if found:
                    raise RepositoryError(f"{config.name}: " + "; ".join(found))
        except Exception as err:  # a config Triton's schema rejects too (text_format.ParseError)
            problems.append(str(err) if isinstance(err, RepositoryError) else f"{model_dir.name}: {err}")
            continue
        for number, version in zip(numbers, versions):
            try:
                diff = check_version(model_dir, config, number, version)
            except Exception as err:
                problems.append(str(err) if isinstance(err, RepositoryError)
                                else f"{config.name} {version.version}: {type(err).__name__}: {err}")
                continue
            results.append((config.name, version.version, diff))
            print(f"triton: checked {config.name} {version.version} ({model_dir.name}/{number}/{model_file(config)[0]})"
                  f": ran at batch {', '.join(map(str, check_batches(config)))} from config.pbtxt, max abs diff to "
                  f"eager {diff:.3g}", flush=True)
    if problems:
        raise RepositoryError("repository check failed:\n  " + "\n  ".join(problems))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(prog="archive.sh --triton", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, metavar="DIR")
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="model file per version (default onnx)")
    args = parser.parse_args(argv)
    try:
        written = []
        for entry in exportable(args.format):
            model_dir = write_model(entry, args.out_dir, args.format)
            written.append(model_dir.name)
            print(f"triton: {model_dir} ({len(registry.served_versions(entry))} version(s), {args.format})",
                  flush=True)
        check_repository(args.out_dir, written)
    except (RepositoryError, OSError, ValueError) as err:
        print(f"triton: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
