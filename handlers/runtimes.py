"""The runtimes a handler predicts with, behind one call: ``runtime(batch) -> outputs on the CPU``.

``handler.runtime`` in model-config.yaml picks one; pre- and post-processing stay in the handler, so the same
handler code serves each of them:

- ``eager``: the ``nn.Module`` built from the manifest's architecture and weights (the default);
- ``torchscript``: the manifest's ``exports.torchscript`` file (``torch.jit.load``);
- ``onnxruntime``: the manifest's ``exports.onnx`` file in an ONNX Runtime session (the CUDA provider on a GPU
  worker when the installed onnxruntime has it, else the CPU one), with the handler's thread budget;
- ``onnxruntime-int8``: the manifest's ``exports.onnx-int8`` file (int8 weights, uint8 activations, which training
  writes for the classifiers it calibrates: ``train.export.quantize``) in the same kind of session;
- ``aoti``: the manifest's ``exports.aoti`` package (``model.pt2``: torch.export + AOTInductor, compiled for the CPU
  by ``python -m train.export --aoti`` / `make compile`), loaded with ``aoti_load_package``; a GPU worker refuses it.

A runtime the artifact cannot run (no such export, or compiled for another device) fails at load with the reason.

A batch is a tensor, or a tuple of tensors in the order of the export's inputs; the eager runtime also takes and
returns nested structures (a detector's list of images in, list of dicts out). The detector's ONNX export takes one
image [1, 3, H, W] per call and returns its (boxes, labels, scores, masks): its handler calls the runtime once per
image.
"""

import contextlib
import logging
import os

import torch
from torch import nn

from models import as_tuple

logger = logging.getLogger(__name__)

RUNTIMES = ("eager", "torchscript", "onnxruntime", "onnxruntime-int8", "aoti")
EXPORTS = {"torchscript": "torchscript", "onnxruntime": "onnx", "onnxruntime-int8": "onnx-int8", "aoti": "aoti"}
"""The manifest export each runtime other than eager loads."""
DEFAULT_RUNTIME = "eager"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(setting, device):
    """The autocast dtype that ``handler.amp`` names (None: off); AMP applies on CUDA only."""
    if setting in (None, False, "off"):
        return None
    if setting not in AMP_DTYPES:
        raise ValueError(f"handler.amp must be one of {', '.join(AMP_DTYPES)} or off, got {setting!r}")
    if device.type != "cuda":
        logger.info("handler.amp=%s ignored on %s: autocast is used on CUDA only", setting, device)
        return None
    return AMP_DTYPES[setting]


def autocast(device, dtype):
    """Autocast to ``dtype`` on ``device``; a no-op when ``dtype`` is None (AMP off)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(value, device):
    """``value`` with every tensor in it (nested in lists, tuples and dicts) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(item, device) for item in value)
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    return value


def equivalence_tolerance(device: torch.device) -> float:
    """How far a faster copy of a model (another memory layout, batch norms folded into convolutions) may drift from
    it on ``device``: float rounding on the CPU; on CUDA, TF32 convolutions (cuDNN's default) round to a 10-bit
    mantissa, about 1e-3 relative."""
    return 1e-3 if device.type == "cpu" else 1e-2


def checked_copy(original: nn.Module, fast: nn.Module, probe: torch.Tensor, what: str) -> nn.Module:
    """``fast`` if it gives ``original``'s outputs on ``probe`` within ``equivalence_tolerance``, else ``original``
    (with a warning naming ``what``): a faster copy is only used when it answers the same."""
    with torch.inference_mode():
        expected, got = original(probe), fast(probe)
    tolerance = equivalence_tolerance(probe.device)
    if torch.allclose(got, expected, rtol=tolerance, atol=tolerance):
        return fast
    logger.warning("%s disagrees with it (max diff %.2g); predicting with the original", what,
                   float((got - expected).abs().max()))
    return original


class ChannelsLastInput(nn.Module):
    """``model`` fed its images in channels-last layout, which oneDNN convolutions and pooling want on the CPU."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.contiguous(memory_format=torch.channels_last))


class TorchRuntime:
    """An eager or TorchScript module on ``device``: whatever the model takes (a tensor, a tuple of tensors as
    several inputs, a list of tensors as one input, as detection models take their images) moved there, whatever
    it returns (tensors, lists of dicts of tensors, ...) moved back to the CPU."""

    def __init__(self, name, module, device):
        self.name, self.module, self.device = name, module, device

    def __call__(self, batch):
        inputs = to_device(batch, self.device)
        with torch.inference_mode():
            outputs = self.module(*inputs) if isinstance(inputs, tuple) else self.module(inputs)
        return to_device(outputs, "cpu")


class OnnxRuntime:
    """An ONNX Runtime session; outputs as CPU tensors (one, or a tuple when the export has several)."""

    def __init__(self, name, path, export, device, threads):
        import onnxruntime

        self.name = name
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        self.session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        self.inputs = [entry["name"] for entry in export["inputs"]]
        self.outputs = [entry["name"] for entry in export["outputs"]]

    def __call__(self, batch):
        feed = {name: tensor.contiguous().numpy() for name, tensor in zip(self.inputs, as_tuple(batch))}
        outputs = [torch.from_numpy(array) for array in self.session.run(self.outputs, feed)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def export_file(model_dir, manifest, fmt, runtime=None):
    """The path and manifest entry of export ``fmt``; a clear error naming ``runtime`` and the manifest's reason
    (an ``"unsupported"`` export, e.g. the detector's torchscript and aoti) when the artifact has none."""
    export = manifest.get("exports", {}).get(fmt)
    if not export or "file" not in export:
        command = {"aoti": "make compile, or python -m train.export --aoti DIR",
                   "onnx-int8": "training writes it for the classifiers it calibrates (train.export.quantize)"
                   }.get(fmt, "python -m train.export DIR")
        why = (export or {}).get("unsupported", f"the artifact folder has no such export ({command})")
        raise ValueError(f"runtime {runtime or fmt} needs the {fmt} export: {why}")
    return os.path.join(model_dir, export["file"]), export


def load(name, model_dir, manifest, device, eager_model, threads=1):
    """The runtime ``name`` for the artifact in ``model_dir``; ``eager_model()`` builds the eager module."""
    if name == "eager":
        return TorchRuntime(name, eager_model(), device)
    if name == "torchscript":
        path, _ = export_file(model_dir, manifest, EXPORTS["torchscript"], name)
        return TorchRuntime(name, torch.jit.load(path, map_location=device).eval(), device)
    if name in ("onnxruntime", "onnxruntime-int8"):
        path, export = export_file(model_dir, manifest, EXPORTS[name], name)
        return OnnxRuntime(name, path, export, device, threads)
    if name == "aoti":
        path, export = export_file(model_dir, manifest, EXPORTS["aoti"], name)
        if export.get("device", "cpu") != device.type:
            raise ValueError(f"runtime aoti: {export['file']} was compiled for {export.get('device', 'cpu')}, this "
                             f"worker runs on {device}; python -m train.export --aoti compiles for the CPU only, "
                             "so use runtime eager or onnxruntime on a GPU")
        from torch._inductor import aoti_load_package

        return TorchRuntime(name, aoti_load_package(path), device)
    raise ValueError(f"handler.runtime {name!r} is not one of {', '.join(RUNTIMES)}")
