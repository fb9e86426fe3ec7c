"""TorchScript, ONNX and AOTInductor exports of an artifact folder, next to its weights and listed in its manifest.

    python -m train.export ARTIFACT_DIR [ARTIFACT_DIR ...]           TorchScript and ONNX (training runs this)
    python -m train.export --aoti ARTIFACT_DIR [ARTIFACT_DIR ...]    model.pt2 (`make compile`; ~50 s a model)

``--aoti`` is a later step, off the path to the first prediction: ``torch.export.export`` then AOTInductor
(``torch._inductor.aoti_compile_and_package``) compiles the model to a shared library in ``model.pt2`` with the
system's C++ compiler, for the CPU; without a compiler the manifest records that it was skipped and why.

Training also writes ``model.int8.onnx`` for the classifiers whose training script passes calibration inputs
(``quantize``: ONNX Runtime's static int8 quantization of the ONNX export, checked by how often it gives the eager
model's top class on held-out inputs); ``handler.runtime: onnxruntime-int8`` serves it. Exporting ONNX again
removes it (it was made from the old file): retrain to get it back.

Each model module declares what to export with ``export_example(manifest, batch_size)``, which returns
``{"inputs": {name: example tensor}, "outputs": [names], "dynamic": {name: {axis: label}}, "unsupported": {format:
why}}`` (the last two optional). Axis 0 of every input and output is the dynamic batch axis; ``dynamic`` names any
other axis that varies (a sequence length). ``unsupported`` skips a format, and the manifest says why.

Both files are traced at batch 2 and checked against the eager model at batch sizes 1 and 7 (ONNX through ONNX
Runtime): a max abs difference above ``TOLERANCE`` fails the export. Optional keys change that per model (the
detector uses them, cyclegan ``exporter``; the other models declare none, and export as described above):

- ``"wrap": callable``: export ``wrap(model)`` instead of the model, an ``nn.Module`` that takes the inputs
  positionally and returns a tensor or a tuple of tensors (the detector's ``OneImage``: one image in, its boxes,
  labels, scores and masks out);
- ``"exporter": {"onnx": "torchscript"}``: the TorchScript-based ONNX exporter (``dynamo=False``, ``dynamic_axes``)
  instead of the dynamo one, for a model torch.export cannot capture;
- ``"optional": ["onnx"]``: a failed export or parity check of these formats is recorded in the manifest as
  unsupported, with the exact error, instead of failing training (``aoti`` always is; the detector's ONNX, whose
  check can flip near-tied detections of an under-trained model);
- ``"check_batches": [1]``: the model takes one example per call, so axis 0 is not a batch: the example is traced
  and checked at batch 1, the inputs' axis 0 stays fixed at 1, and an output's axis 0 is dynamic only where
  ``dynamic`` names it (e.g. ``{"boxes": {0: "detections"}}``).

The manifest gets ``exports``:

    "exports": {"torchscript": {"file": "model.ts.pt", "inputs": [...], "outputs": [...], "max_abs_diff": ...},
                "onnx": {"file": "model.onnx", "opset": 18, "inputs": [...], ...},
                "aoti": {"file": "model.pt2", "device": "cpu", "inputs": [...], ...},
                "onnx-int8": {"file": "model.int8.onnx", "from": "onnx", ..., "top1_agreement": 0.998}}

with each input and output as ``{"name", "shape", "dtype"}`` (dynamic axes as their label, e.g. "batch").
"""

import argparse
import importlib
import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from models import MANIFEST_FILE, as_tuple, load_model, read_manifest

TORCHSCRIPT_FILE = "model.ts.pt"
ONNX_FILE = "model.onnx"
AOTI_FILE = "model.pt2"
INT8_FILE = "model.int8.onnx"
FORMATS = ("torchscript", "onnx")
"""What training exports; ``aoti`` is compiled on request (``--aoti``)."""
OPSET = 18
TOLERANCE = 1e-4
"""Largest allowed max abs difference between an export's outputs and the eager model's (float32 rounding)."""
TRACE_BATCH = 2
CHECK_BATCHES = (1, 7)
BATCH_AXIS = "batch"
MIN_INT8_AGREEMENT = 0.99
"""Least share of held-out examples on which the int8 export's top class is the eager model's; below it the manifest
records why instead of the file."""
CALIBRATION_BATCH = 32
EXPORTERS = ("dynamo", "torchscript")
"""``torch.onnx.export``'s exporters an ``export_example`` may pick for ONNX (``dynamo=True`` / ``False``)."""


class ExportError(RuntimeError):
    """An export failed or disagrees with the eager model; the message names the folder and the format."""


def example(manifest: dict, batch_size: int) -> dict:
    """The model module's ``export_example`` at ``batch_size``."""
    module = importlib.import_module(manifest["model_module"])
    if not hasattr(module, "export_example"):
        raise ExportError(f"{manifest['model_module']} has no export_example(manifest, batch_size)")
    return module.export_example(manifest, batch_size)


def batched(spec: dict) -> bool:
    """Whether axis 0 is a batch axis: not when the model takes one example per call (``check_batches`` [1])."""
    return list(spec.get("check_batches", CHECK_BATCHES)) != [1]


def axes(name: str, spec: dict) -> dict:
    """The named dynamic axes of tensor ``name``: the batch axis 0 (unless the model takes one example per call) and
    the ``dynamic`` ones."""
    return {**({0: BATCH_AXIS} if batched(spec) else {}), **spec.get("dynamic", {}).get(name, {})}


def signature(names, tensors, spec: dict) -> list[dict]:
    """``{"name", "shape", "dtype"}`` per tensor, the dynamic axes (``axes``) named instead of sized."""
    return [{"name": name,
             "shape": [axes(name, spec).get(axis, size) for axis, size in enumerate(tensor.shape)],
             "dtype": str(tensor.dtype).removeprefix("torch.")}
            for name, tensor in zip(names, tensors)]


def max_abs_diff(model, run, manifest: dict, check_batches=CHECK_BATCHES) -> float:
    """Largest difference between ``run(inputs)`` and the eager model over the check batches, every output compared
    (an output of another shape fails)."""
    worst = 0.0
    for batch_size in check_batches:
        inputs = tuple(example(manifest, batch_size)["inputs"].values())
        with torch.inference_mode():
            expected = as_tuple(model(*inputs))
        got = tuple(run(inputs))
        if len(got) != len(expected):
            raise ExportError(f"the export gives {len(got)} outputs, the eager model {len(expected)}")
        for index, (want, out) in enumerate(zip(expected, got)):
            out = torch.as_tensor(np.asarray(out))
            if out.shape != want.shape:
                raise ExportError(f"output {index} is {list(out.shape)} at batch {batch_size}, the eager model's "
                                  f"{list(want.shape)}")
            if out.numel():
                worst = max(worst, float((out - want).abs().max()))
    return worst


def to_torchscript(model, inputs: tuple, path: Path):
    """Traced TorchScript; returns the function that runs the saved file."""
    with warnings.catch_warnings():  # TorchScript is deprecated in favour of torch.export, and still what C++ loads
        warnings.simplefilter("ignore", FutureWarning)
        with torch.no_grad():
            traced = torch.jit.trace(model, inputs, check_trace=False)
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path), map_location="cpu").eval()

    def run(batch):
        with torch.inference_mode():
            return as_tuple(loaded(*batch))
    return run


def to_onnx(model, inputs: tuple, path: Path, names: dict, spec: dict):
    """ONNX (opset ``OPSET``, weights inside the file) with the exporter ``spec`` names (dynamo unless
    ``"exporter": {"onnx": "torchscript"}``); returns the function that runs it in ONNX Runtime."""
    import onnx
    import onnxruntime

    exporter = spec.get("exporter", {}).get("onnx", "dynamo")
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown ONNX exporter {exporter!r}; one of {', '.join(EXPORTERS)}")
    if exporter == "dynamo":
        torch.onnx.export(model, inputs, str(path), input_names=names["inputs"], output_names=names["outputs"],
                          opset_version=OPSET, dynamic_shapes=dynamic_shapes(names, spec), dynamo=True,
                          external_data=False, verbose=False)
    else:  # traced (torch.jit.trace): what torchvision documents for its detection models
        dynamic_axes = {name: axes(name, spec) for name in names["inputs"] + names["outputs"] if axes(name, spec)}
        with warnings.catch_warnings():  # the trace's TracerWarnings and the exporter's deprecation notice
            warnings.simplefilter("ignore")
            with torch.no_grad():
                torch.onnx.export(model, inputs, str(path), input_names=names["inputs"],
                                  output_names=names["outputs"], opset_version=OPSET, dynamic_axes=dynamic_axes,
                                  dynamo=False, verbose=False)
    onnx.checker.check_model(str(path), full_check=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(batch):
        return session.run(names["outputs"], {name: tensor.numpy() for name, tensor in zip(names["inputs"], batch)})
    return run


def dynamic_shapes(names: dict, spec: dict) -> tuple:
    """torch.export's dynamic shapes of the inputs: the batch axis and the ``dynamic`` axes of each."""
    return tuple({axis: torch.export.Dim(label) for axis, label in axes(name, spec).items()}
                 for name in names["inputs"])


def to_aoti(model, inputs: tuple, path: Path, names: dict, spec: dict):
    """torch.export, then AOTInductor into a .pt2 package for the CPU; returns the function that runs the package."""
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    program = torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes(names, spec))
    aoti_compile_and_package(program, package_path=str(path))
    loaded = aoti_load_package(str(path))

    def run(batch):
        with torch.inference_mode():
            return as_tuple(loaded(*batch))
    return run


def compiler_missing() -> str | None:
    """Why AOTInductor cannot compile here (no C++ compiler on PATH), or None."""
    if shutil.which("g++") or shutil.which("c++"):
        return None
    return "no C++ compiler (g++ or c++) on PATH: AOTInductor compiles the model into a shared library"


def export(artifact_dir, formats=FORMATS) -> dict:
    """Write the exports ``formats`` (default model.ts.pt and model.onnx) into ``artifact_dir`` and list them in its
    manifest, keeping its other exports; returns the manifest."""
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    model = load_model(artifact_dir, manifest)
    spec = example(manifest, TRACE_BATCH)
    if not batched(spec):  # one example per call: traced as it is checked
        spec = example(manifest, 1)
    if "wrap" in spec:
        model = spec["wrap"](model).eval()
    check_batches = list(spec.get("check_batches", CHECK_BATCHES))
    unsupported = spec.get("unsupported", {})
    optional = {"aoti", *spec.get("optional", ())}
    inputs = tuple(spec.get("inputs", {}).values())
    names = {"inputs": list(spec.get("inputs", {})), "outputs": list(spec.get("outputs", []))}
    if "aoti" in formats and "aoti" not in unsupported:
        if inputs:
            why = compiler_missing()
        else:
            why = (f"{manifest['model_module']}.export_example declares no inputs: "
                   + "; ".join(f"{fmt}: {reason}" for fmt, reason in unsupported.items()))
        unsupported = {**unsupported, "aoti": why} if why else unsupported
    if not set(formats) <= set(unsupported):  # something to trace: the eager model's signature
        with torch.inference_mode():
            outputs = as_tuple(model(*inputs))
        io = {"inputs": signature(names["inputs"], inputs, spec),
              "outputs": signature(names["outputs"], outputs, spec)}
    writers = {"torchscript": (TORCHSCRIPT_FILE, lambda path: to_torchscript(model, inputs, path), {}),
               "onnx": (ONNX_FILE, lambda path: to_onnx(model, inputs, path, names, spec),
                        {"opset": OPSET, **({"exporter": "torchscript"} if spec.get("exporter", {}).get("onnx")
                                            == "torchscript" else {})}),
               "aoti": (AOTI_FILE, lambda path: to_aoti(model, inputs, path, names, spec),
                        {"device": "cpu", "torch": torch.__version__})}
    writers = {fmt: writer for fmt, writer in writers.items() if fmt in formats}
    replaced = {fmt: writers[fmt][0] for fmt in writers}
    if "onnx" in formats:  # the int8 model was made from the old ONNX file
        replaced["onnx-int8"] = INT8_FILE
        (artifact_dir / INT8_FILE).unlink(missing_ok=True)
    exports = {fmt: entry for fmt, entry in manifest.get("exports", {}).items() if fmt not in replaced}
    files = [name for name in manifest["files"] if name not in replaced.values()]
    for fmt, (file_name, write, extra) in writers.items():
        why = unsupported.get(fmt)
        if why:
            exports[fmt] = {"unsupported": why}
            print(f"{artifact_dir}: {fmt} export skipped: {why}", flush=True)
            continue
        try:
            diff = max_abs_diff(model, write(artifact_dir / file_name), manifest, check_batches)
        except Exception as err:
            why = f"{fmt} export failed: {type(err).__name__}: {str(err).splitlines()[0][:500]}"
        else:
            why = (f"{fmt} export differs from the eager model by {diff:.3g} (tolerance {TOLERANCE})"
                   if diff > TOLERANCE else None)
        if why and fmt not in optional:
            raise ExportError(f"{artifact_dir}: {why}")
        if why:  # an optional format: the manifest keeps the exact error, and the other exports serve
            (artifact_dir / file_name).unlink(missing_ok=True)
            exports[fmt] = {"unsupported": why}
            print(f"{artifact_dir}: {fmt} export skipped: {why}", flush=True)
            continue
        exports[fmt] = {"file": file_name, **extra, **io, "max_abs_diff": float(f"{diff:.3g}"),
                        "checked_batch_sizes": check_batches}
        files.append(file_name)
    manifest = write_manifest(artifact_dir, {**manifest, "files": files, "exports": exports})
    shown = ", ".join(f"{fmt}: {entry.get('file', 'unsupported')}" for fmt, entry in exports.items())
    print(f"exported {artifact_dir}: {shown} (max abs diff to eager "
          f"{max((e.get('max_abs_diff', 0.0) for e in exports.values()), default=0.0):.2g})", flush=True)
    return manifest


def write_manifest(artifact_dir: Path, manifest: dict) -> dict:
    """``manifest`` as the artifact's manifest.json (indented UTF-8, as training writes it); returns it."""
    (artifact_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                              encoding="utf-8")
    return manifest


def quantize(artifact_dir, calibration: torch.Tensor, held_out: torch.Tensor) -> dict:
    """``model.int8.onnx``: the artifact's ONNX export with int8 weights (per output channel) and uint8 activations,
    by ONNX Runtime's static quantization (QDQ format), the activations' ranges calibrated on ``calibration``
    (training inputs as the model takes them, e.g. normalised images). Listed in the manifest as
    ``exports["onnx-int8"]`` with ``top1_agreement``: the share of ``held_out`` inputs whose top class it gives as
    the eager model does. Below MIN_INT8_AGREEMENT the manifest says why instead (the figure kept), and the file is
    removed. For single-input classifiers; training calls it (``train.common.write_artifacts``). Returns the
    manifest.

    The weights take 7 bits (``reduce_range``, within +-64): x86 CPUs without VNNI multiply uint8 activations by
    int8 weights with VPMADDUBSW, which adds each pair of products into an int16 that saturates at 32,767 (255 x 127
    x 2 would exceed it, 255 x 64 x 2 cannot), so every x86 CPU computes what the agreement was measured on, not
    only those with VNNI (uint8 activations stay: int8 or uint8 throughout ran 2.2-2.4x slower here)."""
    import onnxruntime
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process
    from onnxruntime.quantization import quantize_static

    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    source = manifest.get("exports", {}).get("onnx", {})
    if "file" not in source or len(source["inputs"]) != 1:
        raise ExportError(f"{artifact_dir}: int8 quantization needs an ONNX export with one input")
    name = source["inputs"][0]["name"]

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration.split(CALIBRATION_BATCH))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {name: batch.numpy()}

    path = artifact_dir / INT8_FILE
    prepared = artifact_dir / "model.int8-prepared.onnx"
    try:
        quant_pre_process(str(artifact_dir / source["file"]), str(prepared))  # shapes inferred, graph optimised
        quantize_static(str(prepared), str(path), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=True)
    finally:
        prepared.unlink(missing_ok=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = load_model(artifact_dir, manifest)
    agree = 0
    with torch.inference_mode():
        for batch in held_out.split(256):
            quantized = session.run(None, {name: batch.numpy()})[0].argmax(axis=1)
            agree += int((model(batch).argmax(dim=1).numpy() == quantized).sum())
    agreement = agree / len(held_out)
    measured = {"top1_agreement": round(agreement, 4), "checked_examples": len(held_out)}
    files = [file for file in manifest["files"] if file != INT8_FILE]
    if agreement < MIN_INT8_AGREEMENT:
        path.unlink()
        entry = {"unsupported": f"int8 export gives the eager model's top class on {agreement:.4f} of "
                                f"{len(held_out)} held-out inputs, below {MIN_INT8_AGREEMENT}", **measured}
    else:
        files.append(INT8_FILE)
        entry = {"file": INT8_FILE, "from": "onnx", "inputs": source["inputs"], "outputs": source["outputs"],
                 "quantization": "static int8 (onnxruntime.quantization, QDQ, per-channel 7-bit weights)",
                 "calibration_examples": len(calibration), **measured}
    manifest = write_manifest(artifact_dir, {**manifest, "files": files,
                                             "exports": {**manifest["exports"], "onnx-int8": entry}})
    print(f"quantized {artifact_dir}: {entry.get('file', entry.get('unsupported'))} (top-1 agreement with eager "
          f"{agreement:.4f} on {len(held_out)} held-out inputs; {len(calibration)} calibration inputs)", flush=True)
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.splitlines()[0])
    parser.add_argument("artifact_dirs", nargs="+", type=Path, metavar="ARTIFACT_DIR")
    parser.add_argument("--aoti", action="store_true", help="compile model.pt2 with AOTInductor (instead of the "
                        "TorchScript and ONNX exports)")
    args = parser.parse_args(argv)
    for artifact_dir in args.artifact_dirs:
        try:
            export(artifact_dir, ("aoti",) if args.aoti else FORMATS)
        except (ExportError, OSError, ValueError) as err:
            print(f"train.export: {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
