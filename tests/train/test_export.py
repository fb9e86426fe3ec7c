"""Exports (train/export.py) and runtimes (handlers/runtimes.py): the files and their manifest entries, parity of
eager, TorchScript and ONNX Runtime on held-out inputs, and the same handler serving each runtime."""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
import yaml

import registry
from handlers import runtimes
from models import load_model, read_manifest
from models.mnist import canonicalize_digit
from models.sentiment import PAD_ID, encode, tokenize
from scripts.server import ROOT
from tests.fixtures.servers import rezip
from tests.load.runtimes import default_runtime
from tests.samples import heldout_digits, heldout_patients, heldout_reviews, render_digit
from tests.worker import Request, Worker
from train import export
from train.common import CALIBRATION_EXAMPLES

pytestmark = pytest.mark.trained  # reads the built artifacts and archives

TOLERANCE = 1e-4
"""Max abs difference allowed between a runtime's outputs (logits, standardised prediction) and eager's."""
CPU = torch.device("cpu")


def fresh_copy(tmp_path, name):
    """A copy of artifacts/<name> without its exports."""
    folder = shutil.copytree(ROOT / "artifacts" / name, tmp_path / name)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.pop("exports", None)
    manifest["files"] = [f for f in manifest["files"] if f not in (export.TORCHSCRIPT_FILE, export.ONNX_FILE)]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for name in (export.TORCHSCRIPT_FILE, export.ONNX_FILE):
        (folder / name).unlink(missing_ok=True)
    return folder


def test_export_writes_both_files_and_lists_them_in_the_manifest(tmp_path):
    folder = fresh_copy(tmp_path, "regression")
    manifest = export.export(folder)
    assert read_manifest(folder) == manifest  # every listed file is there
    assert {"model.ts.pt", "model.onnx"} <= set(manifest["files"])
    signature = {"inputs": [{"name": "features", "shape": ["batch", 10], "dtype": "float32"}],
                 "outputs": [{"name": "prediction", "shape": ["batch"], "dtype": "float32"}]}
    for fmt, file_name in (("torchscript", "model.ts.pt"), ("onnx", "model.onnx")):
        entry = manifest["exports"][fmt]
        assert entry["file"] == file_name and {k: entry[k] for k in signature} == signature
        assert entry["max_abs_diff"] <= TOLERANCE and entry["checked_batch_sizes"] == [1, 7]
    opset = onnx.load(folder / "model.onnx").opset_import[0].version
    assert manifest["exports"]["onnx"]["opset"] == export.OPSET == opset


def test_sentiment_onnx_has_dynamic_batch_and_token_axes():
    manifest = read_manifest(ROOT / "artifacts/sentiment")
    assert manifest["exports"]["onnx"]["inputs"] == [{"name": "ids", "shape": ["batch", "tokens"], "dtype": "int64"}]
    graph = onnx.load(ROOT / "artifacts/sentiment/model.onnx").graph
    assert [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim] == ["batch", "tokens"]


def test_every_served_artifact_has_both_exports():
    for _, version in registry.served():
        exports = read_manifest(ROOT / version.artifacts).get("exports", {})
        assert set(exports) - {"aoti", "onnx-int8"} == {"torchscript", "onnx"}, (
            f"{version.artifacts}: python -m train.export it")


@pytest.mark.parametrize("artifact", ["mnist", "mnist-v2", "fashion"])
def test_trained_classifiers_have_an_int8_model_that_gives_the_eager_top_class(artifact):
    folder = ROOT / "artifacts" / artifact
    manifest = read_manifest(folder)
    entry = manifest["exports"]["onnx-int8"]
    assert entry["file"] == export.INT8_FILE in manifest["files"] and (folder / entry["file"]).is_file()
    assert entry["top1_agreement"] >= export.MIN_INT8_AGREEMENT
    assert entry["checked_examples"] == json.loads((folder / "metrics.json").read_text())["dataset"]["n_test"]
    assert entry["calibration_examples"] == CALIBRATION_EXAMPLES
    assert (entry["inputs"], entry["outputs"]) == (manifest["exports"]["onnx"]["inputs"],
                                                   manifest["exports"]["onnx"]["outputs"])
    graph = onnx.load(folder / entry["file"]).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in graph.node}
    weights = [onnx.numpy_helper.to_array(tensor) for tensor in graph.initializer
               if tensor.data_type == onnx.TensorProto.INT8]
    assert weights and max(int(np.abs(w.astype(np.int16)).max()) for w in weights) <= 64  # 7 bits: no x86 saturates


def test_every_default_runtime_has_its_export_in_the_artifacts_it_serves():
    for entry, version in registry.served():
        runtime = default_runtime(entry)
        if runtime != "eager":
            exports = read_manifest(ROOT / version.artifacts)["exports"]
            assert "file" in exports.get(runtimes.EXPORTS[runtime], {}), f"{version.artifacts}: {runtime}"


def int8_copy(tmp_path):
    """A copy of artifacts/mnist quantized with seven held-out digits as calibration and check inputs."""
    folder = shutil.copytree(ROOT / "artifacts" / "mnist", tmp_path / "mnist")
    inputs = heldout_batch(folder, read_manifest(folder))
    return folder, export.quantize(folder, inputs, inputs)


def test_quantize_lists_the_int8_model_and_the_runtime_serves_its_top_classes(tmp_path):
    folder, manifest = int8_copy(tmp_path)
    entry = manifest["exports"]["onnx-int8"]
    assert read_manifest(folder) == manifest and export.INT8_FILE in manifest["files"]
    assert (entry["calibration_examples"], entry["checked_examples"]) == (7, 7)
    int8 = runtimes.load("onnxruntime-int8", str(folder), manifest, CPU, None)
    batch = heldout_batch(folder, manifest)
    agreement = (int8(batch).argmax(1) == load_model(folder, manifest)(batch).argmax(1)).float().mean()
    assert int8.name == "onnxruntime-int8" and round(float(agreement), 4) == entry["top1_agreement"]


def test_an_int8_model_below_the_agreement_floor_is_recorded_with_its_figure(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "MIN_INT8_AGREEMENT", 1.01)
    folder, manifest = int8_copy(tmp_path)
    assert manifest["exports"]["onnx-int8"] == {
        "unsupported": "int8 export gives the eager model's top class on 1.0000 of 7 held-out inputs, below 1.01",
        "top1_agreement": 1.0, "checked_examples": 7}
    assert export.INT8_FILE not in manifest["files"] and not (folder / export.INT8_FILE).exists()
    with pytest.raises(ValueError, match="runtime onnxruntime-int8 needs the onnx-int8 export: int8 export gives"):
        runtimes.load("onnxruntime-int8", str(folder), manifest, CPU, None)


def test_exporting_onnx_again_removes_the_int8_model_made_from_the_old_file(tmp_path):
    folder, _ = int8_copy(tmp_path)
    manifest = export.export(folder)
    assert "onnx-int8" not in manifest["exports"] and export.INT8_FILE not in manifest["files"]
    assert not (folder / export.INT8_FILE).exists()
    with pytest.raises(ValueError, match="needs the onnx-int8 export: .*training writes it"):
        runtimes.load("onnxruntime-int8", str(folder), manifest, CPU, None)


def test_a_model_module_without_export_example_fails_clearly(tmp_path, monkeypatch, capsys):
    import models.regression

    monkeypatch.delattr(models.regression, "export_example")
    assert export.main([str(fresh_copy(tmp_path, "regression"))]) == 1
    assert "models.regression has no export_example(manifest, batch_size)" in capsys.readouterr().err


def test_an_unsupported_format_is_recorded_with_its_reason(tmp_path, monkeypatch):
    import models.regression

    declared = models.regression.export_example
    monkeypatch.setattr(models.regression, "export_example",
                        lambda manifest, n: {**declared(manifest, n), "unsupported": {"onnx": "a custom op"}})
    folder = fresh_copy(tmp_path, "regression")
    manifest = export.export(folder)
    assert manifest["exports"]["onnx"] == {"unsupported": "a custom op"}
    assert "model.onnx" not in manifest["files"] and not (folder / "model.onnx").exists()
    with pytest.raises(ValueError, match="needs the onnx export: a custom op"):
        runtimes.load("onnxruntime", str(folder), manifest, CPU, None)


def test_an_export_beyond_the_tolerance_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "TOLERANCE", -1.0)
    with pytest.raises(export.ExportError, match="torchscript export differs from the eager model"):
        export.export(fresh_copy(tmp_path, "regression"))


# --- parity on held-out inputs -------------------------------------------------------------------------------------

def heldout_batch(artifact, manifest):
    """Seven held-out inputs, model-ready, canonicalised as the handlers do."""
    if manifest["model"] == "mnist":
        digits = np.stack([canonicalize_digit(image) for image in heldout_digits(count=7)[0]])
        mean, std = manifest["input"]["mean"], manifest["input"]["std"]
        return (torch.from_numpy(digits).unsqueeze(1) - mean) / std
    if manifest["model"] == "sentiment":
        vocab = {token: i for i, token in enumerate(json.loads((artifact / manifest["vocab"]).read_text()))}
        ids = [encode(tokenize(text), vocab, manifest["max_tokens"]) for text in heldout_reviews(count=7)[0]]
        batch = torch.full((len(ids), max(map(len, ids))), PAD_ID, dtype=torch.long)
        for row, example in enumerate(ids):
            batch[row, : len(example)] = torch.tensor(example)
        return batch
    rows = np.array([[row[f] for f in manifest["features"]] for row in heldout_patients(count=7)[0]])
    return torch.from_numpy(((rows - manifest["feature_mean"]) / manifest["feature_std"]).astype(np.float32))


@pytest.mark.parametrize("batch_size", [1, 7])
@pytest.mark.parametrize("artifact", ["mnist", "mnist-v2", "sentiment", "regression"])
def test_runtimes_agree_with_eager_on_heldout_inputs(artifact, batch_size):
    folder = ROOT / "artifacts" / artifact
    manifest = read_manifest(folder)
    model = load_model(folder, manifest)
    batch = heldout_batch(folder, manifest)[:batch_size]
    trained = ("eager", "torchscript", "onnxruntime")  # what training exports (aoti: `make compile`, below)
    outputs = {name: runtimes.load(name, str(folder), manifest, CPU, lambda: model)(batch) for name in trained}
    for name in trained[1:]:
        assert outputs[name].shape == outputs["eager"].shape
        assert float((outputs[name] - outputs["eager"]).abs().max()) <= TOLERANCE, name
        if outputs["eager"].ndim == 2:  # classifiers: the served label
            assert outputs[name].argmax(1).tolist() == outputs["eager"].argmax(1).tolist(), name


# --- the runtime switch in the handler -----------------------------------------------------------------------------

def archive_with_runtime(tmp_path, stem, runtime):
    """model_store/<stem>.mar with ``handler.runtime`` set in its model-config."""
    entry, _ = registry.archive(stem)
    config_file = ROOT / entry.configs["cpu"]
    config = yaml.safe_load(config_file.read_text())
    config.setdefault("handler", {})["runtime"] = runtime
    target = tmp_path / f"{stem}-{runtime}.mar"
    return rezip(ROOT / "model_store" / f"{stem}.mar", target, entry.name,
                 replace={config_file.name: yaml.safe_dump(config).encode()})


@pytest.mark.parametrize("stem, requests", [
    ("mnist", lambda: [Request(render_digit(image, 56), "image/png") for image in heldout_digits(count=12)[0]]),
    ("sentiment", lambda: [Request(text.encode(), "text/plain") for text in heldout_reviews(count=12)[0]]),
    ("regression", lambda: [Request(json.dumps(row), "application/json") for row in heldout_patients(count=12)[0]]),
])
def test_the_same_handler_serves_every_runtime_with_identical_replies(tmp_path, stem, requests):
    replies = {}
    for runtime in ("eager", "torchscript", "onnxruntime"):  # aoti: compiled on request, tested below
        worker = Worker(archive_with_runtime(tmp_path, stem, runtime), tmp_path / runtime, batch_size=16)
        assert worker.handler.runtime.name == runtime == worker.handler.describe_handle()["runtime"]
        replies[runtime] = worker.run(*requests())
        assert {reply.status for reply in replies[runtime]} == {200}
    labels = {runtime: [r.body.get("label", r.body.get("prediction")) for r in rs] for runtime, rs in replies.items()}
    assert labels["torchscript"] == labels["eager"] == labels["onnxruntime"]


def test_an_unknown_runtime_fails_the_load_naming_the_choices(tmp_path):
    with pytest.raises(RuntimeError, match="handler.runtime 'tensorrt' is not one of eager, torchscript, onnxruntime, "
                                           "onnxruntime-int8, aoti"):
        Worker(archive_with_runtime(tmp_path, "regression", "tensorrt"), tmp_path / "unpacked")


def test_aoti_without_a_package_fails_at_load_saying_how_to_compile(tmp_path):
    """An archive whose manifest has no aoti export (before `make compile`) and asks for that runtime."""
    manifest = read_manifest(ROOT / "artifacts/regression")
    manifest["exports"].pop("aoti", None)
    archive = archive_with_runtime(tmp_path, "regression", "aoti")
    uncompiled = rezip(archive, tmp_path / "uncompiled.mar", "regression",
                       replace={"manifest.json": json.dumps(manifest).encode()})
    with pytest.raises(RuntimeError, match=r"runtime aoti needs the aoti export: .*make compile, or python -m train.export "
                                           r"--aoti DIR"):
        Worker(uncompiled, tmp_path / "unpacked")


def test_an_aoti_package_compiled_for_another_device_fails_at_load():
    manifest = {"exports": {"aoti": {"file": "model.pt2", "device": "cpu"}}}
    with pytest.raises(ValueError, match="model.pt2 was compiled for cpu, this worker runs on cuda:0; .* compiles for "
                                         "the CPU only, so use runtime eager or onnxruntime on a GPU"):
        runtimes.load("aoti", "/nowhere", manifest, torch.device("cuda:0"), None)


@pytest.mark.slow  # compiles with AOTInductor (~50 s each)
@pytest.mark.parametrize("stem", ["mnist", "fashion"])
def test_an_aoti_package_serves_over_http_with_the_eager_answers(tmp_path, stem):
    """`make compile`'s export for one model, served by TorchServe with ``handler.runtime: aoti``: every load-test
    sample gets the eager handler's answer."""
    from tests.fixtures.servers import running
    from tests.load import payloads

    entry, version = registry.archive(stem)
    folder = shutil.copytree(ROOT / version.artifacts, tmp_path / "artifact")
    manifest = export.export(folder, ("aoti",))
    compiled = manifest["exports"]["aoti"]
    assert compiled["file"] == export.AOTI_FILE and compiled["max_abs_diff"] <= 1e-4 and compiled["device"] == "cpu"
    config_file = ROOT / entry.configs["cpu"]
    config = yaml.safe_load(config_file.read_text())
    config["handler"]["runtime"] = "aoti"
    store = tmp_path / "store"
    store.mkdir()
    rezip(ROOT / "model_store" / f"{stem}.mar", store / f"{stem}.mar", entry.name,
          replace={config_file.name: yaml.safe_dump(config).encode(),
                   "manifest.json": (folder / "manifest.json").read_bytes()},
          add={export.AOTI_FILE: (folder / export.AOTI_FILE).read_bytes()})
    samples = payloads.of_model(entry)[:24]
    eager = Worker(archive_with_runtime(tmp_path, stem, "eager"), tmp_path / "eager", batch_size=8)
    expected = eager.run(*(Request(sample.body, sample.content_type) for sample in samples))
    with running(tmp_path / "ts", model_store=store, models=f"{entry.name}={stem}.mar", expect_ready=1) as server:
        described = server.management("GET", f"/models/{entry.name}?customized=true").json()[0]
        assert described["customizedMetadata"]["runtime"] == "aoti"
        for sample, want in zip(samples, expected):
            reply = server.predict(entry.name, sample.body, headers={"Content-Type": sample.content_type})
            assert reply.status_code == 200 and reply.json()["label"] == want.body["label"], sample.name
            assert reply.json()["probabilities"] == pytest.approx(want.body["probabilities"], abs=2e-4)


def test_onnxruntime_takes_the_cuda_provider_on_a_gpu_worker(monkeypatch):
    import onnxruntime

    sessions = []
    available = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: available)
    monkeypatch.setattr(onnxruntime, "InferenceSession",
                        lambda path, options, providers: sessions.append((options, providers)))
    manifest = read_manifest(ROOT / "artifacts/regression")
    runtimes.load("onnxruntime", str(ROOT / "artifacts/regression"), manifest, torch.device("cuda:1"), None, 3)
    options, providers = sessions[0]
    assert providers == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (3, 1)


# --- the detector: ONNX through the TorchScript-based exporter, one image per call --------------------------------

def detector_sample_images():
    """The registry's detector samples at the model's working size, as the handler decodes them ([1, 3, H, W])."""
    from PIL import Image

    from models.detector import working_size

    manifest = read_manifest(ROOT / "artifacts/detector")
    images = []
    for sample in registry.model("detector").samples:
        with Image.open(ROOT / sample.file) as image:
            image = image.convert("RGB")
            size = working_size(image.height, image.width, manifest["input"]["min_size"], manifest["input"]["max_size"])
            image = image.resize(size[::-1], Image.BILINEAR) if image.size != size[::-1] else image
            pixels = np.asarray(image).copy()
        images.append(torch.from_numpy(pixels).permute(2, 0, 1).float().div(255)[None])
    return images


def test_the_detector_has_an_onnx_export_and_says_why_not_the_others():
    manifest = read_manifest(ROOT / "artifacts/detector")
    onnx_entry = manifest["exports"]["onnx"]
    assert onnx_entry["file"] == export.ONNX_FILE and onnx_entry["exporter"] == "torchscript"
    assert onnx_entry["inputs"] == [{"name": "image", "shape": [1, 3, "height", "width"], "dtype": "float32"}]
    assert [(o["name"], o["shape"]) for o in onnx_entry["outputs"]] == [
        ("boxes", ["detections", 4]), ("labels", ["detections"]), ("scores", ["detections"]),
        ("masks", ["detections", 1, "height", "width"])]
    assert onnx_entry["checked_batch_sizes"] == [1] and onnx_entry["max_abs_diff"] <= TOLERANCE
    graph = onnx.load(ROOT / "artifacts/detector/model.onnx").graph
    assert [d.dim_value or d.dim_param for d in graph.input[0].type.tensor_type.shape.dim] == [1, 3, "height",
                                                                                               "width"]
    assert manifest["exports"]["torchscript"]["unsupported"].startswith("not exported: torch.jit.trace")
    if "aoti" in manifest["exports"]:  # after `make compile`: the attempt failed, and the manifest says why
        assert "GuardOnDataDependentSymNode" in manifest["exports"]["aoti"]["unsupported"]


def test_the_detector_onnx_export_matches_eager_on_the_registry_samples():
    """All four outputs of each image, in ONNX Runtime (the handler's runtime) against eager, within 1e-4."""
    from models.detector import OneImage

    folder = ROOT / "artifacts/detector"
    manifest = read_manifest(folder)
    model = OneImage(load_model(folder, manifest)).eval()
    session = runtimes.load("onnxruntime", str(folder), manifest, CPU, None)
    for image in detector_sample_images():
        with torch.inference_mode():
            expected = model(image)
        got = session(image)
        assert len(expected[0]) > 10  # a real scene: many detections (box_score_thresh is 0)
        assert torch.equal(got[1], expected[1])  # labels
        for name, want, out in zip(("boxes", "labels", "scores", "masks"), expected, got):
            assert out.shape == want.shape, name
            assert float((out - want).abs().max()) <= TOLERANCE, name


def test_exporting_the_detector_writes_only_its_onnx(tmp_path):
    manifest = export.export(fresh_copy(tmp_path, "detector"))
    assert manifest["exports"]["onnx"]["file"] == "model.onnx" and "model.onnx" in manifest["files"]
    assert set(manifest["exports"]) == {"torchscript", "onnx"}
    assert not (tmp_path / "detector" / "model.ts.pt").exists()
    assert manifest["exports"]["onnx"]["max_abs_diff"] <= TOLERANCE
