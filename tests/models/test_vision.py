"""The vision slice without a server: architectures, train.vision (Fashion-MNIST, CIFAR-10, DDP), image fitting,
and handlers/vision.py loaded from model_store/fashion.mar by TorchServe's own loader (tests/worker.py)."""

import base64
import hashlib
import io
import json
import pickle
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch
import yaml
from PIL import ExifTags, Image

from handlers import runtimes, vision
from handlers.common import RequestError
from handlers.images import decode_fitted, decode_image
from models import build, load_model, read_manifest
from models.vision import LIGHT_ON_DARK, STRETCH_TO, light_on_dark, mobilenet, resnet, vgg
from scripts.server import ROOT
from tests.cli import CPU_ONLY, run_module
from tests.fixtures.servers import rezip
from tests.load import checks, payloads
from tests.worker import Request, valid_reason
from train import vision as train_vision

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
DATA_DIR = ROOT / "data"
ACCURACY_SLACK = 0.02
"""Served accuracy may be this far below the in-process figure (re-encoding, resampling)."""
BLANK = {  # images without an item: refused with 400 InvalidImage
    "white-png": (Image.new("L", (64, 64), 255), "PNG"),
    "black-jpeg": (Image.new("RGB", (28, 28)), "JPEG"),
    "1x1-png": (Image.new("L", (1, 1), 200), "PNG"),
    "faint-noise-png": (Image.fromarray(np.random.default_rng(0).integers(118, 138, (28, 28), dtype=np.uint8)), "PNG"),
    "transparent-rgba-png": (Image.new("RGBA", (40, 30), (0, 0, 0, 0)), "PNG"),  # white paper once composited
}


def encoded(image, fmt="PNG", **options):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


# --- architectures ---------------------------------------------------------------------------------------------

ARCHITECTURES = [(module.__name__, name) for module in (resnet, vgg, mobilenet) for name in module.ARCHITECTURES]


@pytest.mark.parametrize("module, name", ARCHITECTURES)
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_every_architecture_takes_the_data_sets_channels_and_size(module, name, channels, size):
    model = build({"model_module": module, "architecture": name,
                   "arch_kwargs": {"in_channels": channels, "num_classes": 10, "width": 8}}).eval()
    features = []
    model.cam_layer.register_forward_hook(lambda _, __, output: features.append(output))
    with torch.no_grad():
        logits = model(torch.randn(2, channels, size, size))
    assert logits.shape == (2, 10)
    assert features[0].dim() == 4 and features[0].shape[0] == 2  # a convolutional feature map for Grad-CAM


def test_resnet18_is_cifar_style_a_3x3_stem_without_max_pooling():
    model = resnet.ResNet18()
    stem = model.stem[0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert 11_000_000 < sum(p.numel() for p in model.parameters()) < 11_300_000  # kuangliu's 11.2M


# --- training --------------------------------------------------------------------------------------------------

def train(tmp_path, *args):
    out = tmp_path / "out"
    metrics = train_vision.main(["--out", str(out), "--data-dir", str(DATA_DIR), *args])
    return out, read_manifest(out), metrics


@pytest.mark.slow  # trains
def test_fashion_run_writes_an_artifact_the_handler_can_load(tmp_path):
    out, manifest, metrics = train(tmp_path, "--limit", "256", "--epochs", "1", "--width", "8")
    assert manifest["model"] == "fashion" and manifest["labels"] == FASHION_CLASSES
    assert manifest["model_module"] == "models.vision.resnet" and manifest["architecture"] == "ResNetSmall"
    assert manifest["arch_kwargs"] == {"in_channels": 1, "num_classes": 10, "width": 8}
    assert manifest["input"]["channels"] == 1 and manifest["input"]["size"] == 28
    assert manifest["input"]["crop"] == "center" and len(manifest["input"]["mean"]) == 1
    assert manifest["input"]["polarity"] == LIGHT_ON_DARK
    assert set(manifest["files"]) == {"manifest.json", "model.pt", "model.ts.pt", "model.onnx"}
    assert metrics["dataset"]["name"] == "fashion-mnist" and metrics["dataset"]["n_test"] == 256
    assert metrics["dataset"]["processes"] == 1 and 0.0 <= metrics["test"]["accuracy"] <= 1.0
    model = load_model(out, manifest)
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def write_tiny_cifar(root, per_batch=12):
    """A CIFAR-10 folder in the python pickle format torchvision reads (cifar-10-batches-py), random pixels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8),
                 "labels": rng.integers(0, 10, per_batch).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return folder, names


@pytest.mark.slow  # trains
def test_cifar10_run_reads_the_python_batches_and_records_rgb_input(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    folder, names = write_tiny_cifar(tmp_path / "data")

    def md5(name):
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    # torchvision verifies the official files' checksums: these are the tiny folder's own
    monkeypatch.setattr(CIFAR10, "train_list", [[n, md5(n)] for n, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[n, md5(n)] for n, _ in CIFAR10.test_list])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5("batches.meta")})
    out = tmp_path / "out"
    metrics = train_vision.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--arch", "vgg11",
                                 "--width", "8", "--epochs", "1", "--out", str(out)])
    manifest = read_manifest(out)
    assert manifest["model"] == "cifar10" and manifest["labels"] == names
    assert manifest["architecture"] == "VGG11" and manifest["arch_kwargs"]["in_channels"] == 3
    assert manifest["input"]["channels"] == 3 and manifest["input"]["size"] == 32
    assert len(manifest["input"]["mean"]) == 3 and len(manifest["input"]["std"]) == 3
    assert manifest["input"]["polarity"] is None  # photos: no background to read a polarity from
    assert metrics["dataset"]["n_train"] == 5 * 12 and metrics["dataset"]["n_test"] == 12


def test_test_fraction_is_refused_since_both_data_sets_have_official_test_sets():
    with pytest.raises(SystemExit) as exited:
        train_vision.parse_args(["--test-fraction", "0.1"])
    assert exited.value.code == 2


def test_missing_cifar10_is_one_clear_line_and_exit_2(tmp_path):
    (tmp_path / "data" / "cifar-10-batches-py").mkdir(parents=True)  # there, but without the batches
    env_offline = {"no_proxy": "", "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    result = run_module("train.vision", "--dataset", "cifar10", "--data-dir", tmp_path / "data",
                        "--out", tmp_path / "out", env=env_offline)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("vision.py: error: no CIFAR-10:") and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # trains
def test_torchrun_with_two_cpu_processes_writes_the_single_process_layout(tmp_path):
    single, single_manifest, _ = train(tmp_path / "single", "--limit", "128", "--epochs", "1", "--width", "8")
    out = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run([*torchrun, "-m", "train.vision", "--limit", "128", "--epochs", "1", "--width", "8",
                             "--data-dir", str(DATA_DIR), "--out", str(out)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env=CPU_ONLY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in single.iterdir())
    manifest = read_manifest(out)
    assert manifest == single_manifest  # same architecture, labels and input statistics
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"]["processes"] == 2 and metrics["dataset"]["device"] == "cpu"
    assert result.stdout.count("epoch   1/1") == 1  # one progress line: rank 0's
    state = torch.load(out / "model.pt", weights_only=True)
    assert not any(name.startswith("module.") for name in state)  # DDP's wrapper is not in the weights
    load_model(out, manifest)


def test_distributed_job_uses_nccl_and_the_local_rank_gpu_when_cuda_is_available():
    environ = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    with mock.patch("torch.cuda.is_available", return_value=True), mock.patch("torch.cuda.set_device") as set_device, \
            mock.patch("torch.distributed.init_process_group") as init:
        job = train_vision.Distributed.from_environment(environ)
    assert job.device == torch.device("cuda:1") and (job.rank, job.world_size, job.local_world_size) == (3, 4, 2)
    init.assert_called_once_with("nccl")
    set_device.assert_called_once_with(torch.device("cuda:1"))
    assert not job.is_main


def test_distributed_job_uses_gloo_on_the_cpu_and_nothing_without_torchrun():
    with mock.patch("torch.cuda.is_available", return_value=False), \
            mock.patch("torch.distributed.init_process_group") as init:
        job = train_vision.Distributed.from_environment({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
        alone = train_vision.Distributed.from_environment({})
    init.assert_called_once_with("gloo")
    assert job.device == torch.device("cpu") and job.is_main and alone.world_size == 1


def test_training_batches_reach_a_gpu_through_pinned_memory_without_blocking():
    job = train_vision.Distributed(device=torch.device("cuda:0"))
    batch = mock.MagicMock()
    assert job.to_device(batch) is batch.pin_memory.return_value.to.return_value
    batch.pin_memory.return_value.to.assert_called_once_with(torch.device("cuda:0"), non_blocking=True)


def test_distributed_ranks_split_each_epoch_between_them():
    generator = torch.Generator().manual_seed(0)
    shares = [train_vision.Distributed(rank=r, world_size=2).epoch_indices(10, 4, 0, generator)(1) for r in (0, 1)]
    first, second = (torch.cat(list(share)).tolist() for share in shares)
    assert len(first) == len(second) == 5 and sorted(first + second) == list(range(10))


def test_flip_crop_augmentation_keeps_shape_and_flips_mirror_the_image():
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    flipped = train_vision.augment(images, "flip", torch.Generator().manual_seed(1))
    for original, result in zip(images, flipped):
        assert torch.equal(result, original) or torch.equal(result, original.flip(2))
    assert train_vision.augment(images, "flip-crop", torch.Generator().manual_seed(1)).shape == images.shape
    assert train_vision.augment(images, "none", torch.Generator()) is images


def test_channel_statistics_are_per_channel_fractions_of_255():
    images = torch.zeros(2, 3, 2, 2, dtype=torch.uint8)
    images[:, 1] = 255
    mean, std = train_vision.channel_statistics(images)
    assert mean == [0.0, 1.0, 0.0] and std == [0.0, 0.0, 0.0]


# --- fitting any image to the model's input ------------------------------------------------------------------

def test_fitting_scales_the_shorter_side_and_keeps_the_centre():
    image = Image.new("RGB", (300, 100), "black")
    image.paste((255, 255, 255), (100, 0, 200, 100))  # a white centre square between black sides
    fitted = decode_fitted(encoded(image), channels=3, size=28)
    assert fitted.shape == (28, 28, 3) and fitted[:, 1:-1].min() > 240  # the centre square (its edges blend)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "LA", "I;16", "CMYK"])
@pytest.mark.parametrize("channels", [1, 3])
def test_any_mode_becomes_the_models_channels(mode, channels):
    image = Image.new("RGB", (50, 70), (200, 200, 200)).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG" if mode != "I;16" else "TIFF"
    fitted = decode_fitted(encoded(image, fmt), channels, size=32)
    assert fitted.shape == ((32, 32) if channels == 1 else (32, 32, 3)) and fitted.dtype == np.uint8


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_to_nearly_the_same_pixels():
    ramp = np.linspace(0, 255, 2048)
    photo = Image.fromarray(np.add.outer(ramp, ramp[::-1]).__truediv__(2).astype(np.uint8))  # a smooth 2048 px image
    from PIL.JpegImagePlugin import JpegImageFile

    with mock.patch.object(JpegImageFile, "draft", autospec=True, side_effect=JpegImageFile.draft) as draft:
        fitted = decode_fitted(encoded(photo, "JPEG", quality=95), channels=1, size=28)
    assert draft.call_args.args[1:] == ("L", (56, 56))
    full = decode_fitted(encoded(photo, "PNG"), channels=1, size=28)  # decoded at full size
    assert np.abs(fitted.astype(int) - full.astype(int)).max() <= 4


ORIENTATIONS = {3: 2, 6: -1, 8: 1}
"""EXIF Orientation -> np.rot90's k that turns the stored pixels upright (180°, 90° clockwise, 90° anticlockwise)."""


def tagged(image, fmt, orientation):
    """``image`` encoded as ``fmt`` with an EXIF Orientation tag."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return encoded(image, fmt, exif=exif, **{"JPEG": {"quality": 95}, "WEBP": {"lossless": True}}.get(fmt, {}))


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
@pytest.mark.parametrize("mode, fmt", [("RGB", "JPEG"), ("RGB", "PNG"), ("RGBA", "PNG"), ("RGBA", "WEBP"),
                                       ("L", "JPEG"), ("L", "PNG"), ("LA", "PNG")])
def test_exif_orientation_turns_every_mode_upright(mode, fmt, orientation):
    grey = np.kron(np.arange(12, dtype=np.uint8).reshape(3, 4) * 20 + 20, np.ones((8, 8), np.uint8))  # 3x4 blocks
    image, expected = Image.fromarray(grey).convert(mode), grey
    if mode.endswith("A"):
        alpha = np.full_like(grey, 255)
        alpha[:8, :8] = 0  # the top-left block transparent: white paper once decoded
        image.putalpha(Image.fromarray(alpha))
        expected = np.where(alpha == 0, 255, grey)
    channels = 1 if mode.startswith("L") else 3
    upright = np.rot90(expected, ORIENTATIONS[orientation])
    decoded = decode_image(tagged(image, fmt, orientation), channels)
    assert decoded.shape == (upright.shape if channels == 1 else (*upright.shape, 3))
    assert np.abs(decoded.astype(int) - (upright if channels == 1 else upright[..., None])).max() <= 4


# --- polarity and images without an item ----------------------------------------------------------------------

def item(dark_on_light=False):
    """A 28x28 light item (a 200-grey coat with a white patch) on black, or its negative."""
    pixels = np.zeros((28, 28), np.uint8)
    pixels[4:25, 7:21], pixels[8:12, 10:18] = 200, 255
    return 255 - pixels if dark_on_light else pixels


def test_light_on_dark_inverts_dark_items_on_light_paper_and_keeps_the_others():
    light = item()
    assert np.array_equal(light_on_dark(light), light) and np.array_equal(light_on_dark(item(True)), light)
    batch = np.stack([light, item(True)])[:, None]  # [N, 1, H, W], as training passes them
    assert np.array_equal(light_on_dark(batch), np.stack([light, light])[:, None])


@pytest.mark.parametrize("paper, scale", [(100, 0.15), (200, -0.6)], ids=["faint-on-grey", "dark-on-grey"])
def test_an_item_on_grey_paper_or_faint_is_taken_to_black_and_stretched(paper, scale):
    pixels = (paper + scale * item()).astype(np.uint8)  # contrast 38 and 153 of 255
    assert np.abs(light_on_dark(pixels) - item() * (STRETCH_TO / 255)).max() <= 2


@pytest.mark.parametrize("name", sorted(BLANK))
def test_an_image_without_an_item_is_refused_as_blank_or_uniform(name):
    image, fmt = BLANK[name]
    fitted = decode_fitted(encoded(image, fmt), channels=1, size=28)
    with pytest.raises(ValueError, match="no item found: the image is blank or uniform"):
        light_on_dark(fitted)


@pytest.mark.trained  # the data set as artifacts/fashion was trained on
def test_no_fashion_mnist_test_item_is_refused_and_each_reads_alike_in_either_polarity():
    images, _ = payloads.heldout_fashion(count=10_000)
    assert len(images) == 10_000
    assert np.array_equal(light_on_dark(images), images) and np.array_equal(light_on_dark(255 - images), images)


# --- the handler, in-process ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fashion(worker):
    return worker("fashion", batch_size=16)


@pytest.fixture(scope="module")
def heldout():
    images, labels = payloads.heldout_fashion(count=200)
    return images, labels


def in_process_accuracy(images, labels):
    """The artifact's model on the test images as training evaluated them (28x28 tensors, light on dark, no
    re-encoding)."""
    folder = ROOT / payloads.FASHION_ARTIFACT
    manifest = read_manifest(folder)
    mean, std = manifest["input"]["mean"][0], manifest["input"]["std"][0]
    pixels = torch.from_numpy(light_on_dark(images)).unsqueeze(1)
    with torch.inference_mode():
        logits = load_model(folder, manifest)((pixels.float() / 255 - mean) / std)
    return float(np.mean(np.array(manifest["labels"])[logits.argmax(1).numpy()] == np.array(labels)))


def served_accuracy(run_batch, images, labels, size, fmt, mode):
    requests = [Request(payloads.render_fashion(image, size, fmt, mode), f"image/{fmt.lower()}") for image in images]
    replies = [reply for i in range(0, len(requests), 16) for reply in run_batch(requests[i : i + 16])]
    assert all(reply.status == 200 for reply in replies)
    return float(np.mean([reply.body["label"] == label for reply, label in zip(replies, labels)]))


@pytest.mark.parametrize("size, fmt, mode, inverted", [
    (28, "PNG", "L", False), (64, "JPEG", "RGB", False), (128, "PNG", "RGB", False), (256, "JPEG", "L", False),
    (96, "WEBP", "RGB", False), (28, "PNG", "L", True), (128, "JPEG", "RGB", True)])
def test_reencoded_upscaled_test_images_keep_the_in_process_accuracy(fashion, heldout, size, fmt, mode, inverted):
    images, labels = heldout
    expected = in_process_accuracy(images, labels)
    got = served_accuracy(lambda batch: fashion.run(*batch), 255 - images if inverted else images, labels, size, fmt,
                          mode)
    assert got >= expected - ACCURACY_SLACK, (f"{fmt} {mode} {size}px{' inverted' * inverted}: {got:.3f} against "
                                              f"{expected:.3f} in-process")


@pytest.mark.trained
def test_the_default_model_is_scored_on_the_whole_fashion_mnist_test_set():
    record = json.loads((ROOT / payloads.FASHION_ARTIFACT / "metrics.json").read_text())
    assert record["dataset"]["n_test"] == 10_000  # its accuracy floor: tests/models/test_quality.py


def test_reply_is_top_3_labels_by_name_and_k_is_a_request_option(fashion, heldout):
    images, labels = heldout
    body = payloads.render_fashion(images[0], 64, "PNG", "RGB")
    reply = fashion.run_one(Request(body, "image/png"))
    assert reply.status == 200 and checks.check_fashion(json.dumps(reply.body), labels[0]) == labels[0]
    assert len(reply.body["probabilities"]) == 3 and reply.body["version"] == "1.0"
    document = {"data": base64.b64encode(body).decode(), "k": 10}
    reply = fashion.run_one(Request(json.dumps(document), "application/json"))
    assert list(reply.body["probabilities"]) != [] and set(reply.body["probabilities"]) == set(FASHION_CLASSES)
    assert abs(sum(reply.body["probabilities"].values()) - 1) < 1e-3


@pytest.mark.parametrize("k", [0, 11, "3", 2.5, True, None])
def test_a_bad_k_is_a_400_naming_the_field(fashion, k):
    body = encoded(Image.new("L", (28, 28)))
    document = {"data": base64.b64encode(body).decode(), "k": k}
    reply = fashion.run_one(Request(json.dumps(document), "application/json"))
    assert reply.status == 400 and reply.body["type"] == "InvalidField" and "'k'" in reply.body["message"]
    assert valid_reason(reply)


def test_multipart_field_is_accepted(fashion, heldout):
    images, labels = heldout
    reply = fashion.run_one(Request(payloads.render_fashion(images[1], 28), "image/png", name="data"))
    assert reply.status == 200 and reply.body["label"] == labels[1]


@pytest.mark.parametrize("request_, code, kind", [
    (Request(b"not an image at all"), 400, "InvalidImage"),
    (Request(b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "image/png"), 400, "InvalidImage"),
    (Request(b""), 400, "EmptyBody"),
    (Request('{"data": "%%%"}', "application/json"), 400, "InvalidField"),
    (Request('{"image": "x"}', "application/json"), 400, "InvalidField"),
])
def test_bad_input_is_a_named_4xx(fashion, request_, code, kind):
    reply = fashion.run_one(request_)
    assert (reply.status, reply.body["type"]) == (code, kind) and valid_reason(reply)


@pytest.mark.parametrize("name", sorted(BLANK))
def test_an_image_without_an_item_is_a_400_and_fails_alone(fashion, heldout, name):
    image, fmt = BLANK[name]
    images, labels = heldout
    good = Request(payloads.render_fashion(images[0], 64, "PNG", "L"), "image/png")
    blank, neighbour = fashion.run(Request(encoded(image, fmt), f"image/{fmt.lower()}"), good)
    assert (blank.status, blank.body["type"]) == (400, "InvalidImage") and valid_reason(blank)
    assert "blank or uniform" in blank.body["message"]
    assert neighbour.status == 200 and neighbour.body["label"] == labels[0]


def test_each_image_of_a_batch_is_brought_to_light_on_dark_on_its_own(fashion, heldout):
    """The batch's polarity is set in one call (``collate``): each item must still get its own, as when sent alone."""
    images, _ = heldout
    faint_on_grey = (200 - 0.3 * images[2]).astype(np.uint8)  # dark on light, contrast ~76 of 255: stretched
    requests = [Request(encoded(Image.fromarray(pixels)), "image/png")
                for pixels in (images[0], 255 - images[1], faint_on_grey, 255 - images[3])]
    alone = [fashion.run_one(request) for request in requests]
    together = fashion.run(*requests)
    assert [reply.status for reply in alone + together] == [200] * 8
    assert [reply.body for reply in together] == [reply.body for reply in alone]
    assert [reply.body["label"] for reply in together] == [fashion.run_one(Request(encoded(Image.fromarray(
        pixels)), "image/png")).body["label"] for pixels in images[:4]]  # light on dark as the data set has them


def test_decompression_bomb_is_a_413_and_a_bad_image_fails_alone(fashion, heldout):
    images, labels = heldout
    bomb = encoded(Image.new("L", (6000, 6000)))  # 36 Mpx of zeros: a few KiB of PNG
    good = [Request(payloads.render_fashion(image, 128, "JPEG", "RGB"), "image/jpeg") for image in images[:3]]
    replies = fashion.run(good[0], Request(bomb, "image/png"), good[1], Request(b"garbage"), good[2])
    assert [r.status for r in replies] == [200, 413, 200, 400, 200]
    assert replies[1].body["type"] == "ImageTooLarge"
    assert [replies[i].body["label"] for i in (0, 2, 4)] == labels[:3]


def test_explanation_is_a_grad_cam_map_at_the_input_size(fashion, heldout):
    images, _ = heldout
    body = payloads.render_fashion(images[0], 128, "PNG", "RGB")
    reply = fashion.run_one(Request(body, "image/png", headers={"explain": "True"}))
    assert reply.status == 200 and reply.body["method"] == "LayerGradCam" and reply.body["shape"] == [28, 28]
    attributions = np.array(reply.body["attributions"])
    assert attributions.shape == (28, 28) and attributions.min() >= 0 and attributions.max() == pytest.approx(1)
    assert reply.body["label"] in FASHION_CLASSES


@pytest.mark.trained
def test_the_eager_runtime_runs_channels_last_batch_norms_fused_on_the_cpu_with_amp_off(tmp_path):
    handler = fashion_with(tmp_path, runtime="eager").handler
    assert handler.device == torch.device("cpu") and handler.amp is None and handler.threads == 1
    weight = handler.model.stages[-1][0].conv2.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    fused = handler.runtime.module
    assert fused is not handler.model and not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    described = handler.describe_handle()
    assert described["input"]["size"] == 28 and described["amp"] is None and described["training"]["test"]


# --- the CUDA paths, by patching (no GPU here) -----------------------------------------------------------------

def gpu_handler(device="cuda:1", amp=None):
    """A VisionHandler as initialize leaves it on a GPU, without one: device, normalisation, AMP (a model that reads
    either polarity)."""
    handler = vision.VisionHandler()
    handler.device, handler.channels, handler.amp, handler.light_on_dark = torch.device(device), 1, amp, False
    handler.mean, handler.std = torch.tensor(0.5).view(1, 1, 1, 1), torch.tensor(0.25).view(1, 1, 1, 1)
    return handler


def test_a_gpu_batch_is_pinned_and_copied_without_blocking_in_channels_last():
    handler = gpu_handler()
    examples = [(np.full((28, 28), 255, dtype=np.uint8), 3)] * 2
    pinned = []
    with mock.patch.object(torch.Tensor, "pin_memory", lambda tensor: pinned.append(tensor) or tensor):
        batch = handler.collate(examples)
    assert len(pinned) == 1 and pinned[0].shape == (2, 1, 28, 28)
    fake = mock.MagicMock()
    fake.to.return_value = batch  # stands in for the copy on cuda:1
    images = handler.model_input(fake)
    fake.to.assert_called_once_with(torch.device("cuda:1"), non_blocking=True)
    assert images.is_contiguous(memory_format=torch.channels_last) and torch.allclose(images, torch.tensor(2.0))


def test_cpu_batches_are_not_pinned():
    pinned = []
    with mock.patch.object(torch.Tensor, "pin_memory", lambda tensor: pinned.append(tensor) or tensor):
        gpu_handler("cpu").collate([(np.zeros((28, 28), dtype=np.uint8), 3)])
    assert pinned == []


@pytest.mark.parametrize("setting, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), (False, None),
                                            (None, None), ("off", None)])
def test_amp_setting_of_the_model_config_on_cuda(setting, dtype):
    assert runtimes.amp_dtype(setting, torch.device("cuda:0")) == dtype


def test_amp_is_ignored_on_the_cpu_and_a_typo_fails_loading():
    assert runtimes.amp_dtype("bf16", torch.device("cpu")) is None
    with pytest.raises(ValueError, match="handler.amp must be one of bf16, fp16"):
        runtimes.amp_dtype("fp8", torch.device("cuda:0"))


def test_predictions_on_cuda_run_under_autocast_with_the_configured_dtype():
    handler = gpu_handler("cuda:0", amp=torch.bfloat16)
    with mock.patch("torch.autocast") as autocast:
        handler.autocast()
    autocast.assert_called_once_with(device_type="cuda", dtype=torch.bfloat16)


def fashion_with(tmp_path, batch_size=8, **settings):
    """The fashion archive loaded in-process with ``settings`` in the ``handler`` section of its model-config."""
    from tests.worker import Worker

    config = yaml.safe_load((ROOT / "handlers" / "vision.yaml").read_text())
    config["handler"].update(settings)
    tmp_path.mkdir(parents=True, exist_ok=True)
    archive = rezip(ROOT / "model_store" / "fashion.mar", tmp_path / "fashion.mar", "fashion",
                    replace={"vision.yaml": yaml.safe_dump(config).encode()})
    return Worker(archive, tmp_path / "unpacked", batch_size=batch_size)


@pytest.mark.trained
def test_fashion_serves_with_the_runtime_its_model_config_names(fashion):
    configured = yaml.safe_load((ROOT / "handlers" / "vision.yaml").read_text())["handler"]["runtime"]
    assert fashion.handler.runtime.name == configured and fashion.handler.describe_handle()["runtime"] == configured


@pytest.mark.trained
@pytest.mark.parametrize("runtime", ["torchscript", "onnxruntime"])
def test_every_runtime_serves_fashion_with_the_eager_answers(tmp_path, runtime):
    """``handler.runtime`` is honoured by the vision handler: the export answers as the eager model does."""
    eager = fashion_with(tmp_path / "eager", runtime="eager")
    other = fashion_with(tmp_path / runtime, runtime=runtime)
    assert other.handler.runtime.name == runtime and other.handler.describe_handle()["runtime"] == runtime
    images, _ = payloads.heldout_fashion(count=8)
    requests = [Request(payloads.render_fashion(image), "image/png") for image in images]
    eager_replies, other_replies = eager.run(*requests), other.run(*requests)
    assert [reply.body["label"] for reply in other_replies] == [reply.body["label"] for reply in eager_replies]
    for a, b in zip(eager_replies, other_replies):
        assert a.body["probabilities"] == pytest.approx(b.body["probabilities"], abs=2e-4)


@pytest.mark.trained
def test_a_runtime_the_artifact_cannot_run_fails_at_load_naming_it(tmp_path):
    with pytest.raises(RuntimeError, match="handler.runtime 'tensorrt' is not one of eager, torchscript"):
        fashion_with(tmp_path, runtime="tensorrt")


@pytest.mark.trained
def test_archive_with_amp_in_its_model_config_loads_on_the_cpu_with_amp_off(tmp_path):
    worker = fashion_with(tmp_path, amp="bf16")
    assert worker.handler.model_config["handler"]["amp"] == "bf16" and worker.handler.amp is None
    images, labels = payloads.heldout_fashion(count=1)
    reply = worker.run_one(Request(payloads.render_fashion(images[0]), "image/png"))
    assert reply.status == 200 and reply.body["label"] == labels[0]


@pytest.mark.trained
def test_an_archive_whose_manifest_names_another_polarity_fails_loading(tmp_path):
    from tests.worker import Worker

    manifest = read_manifest(ROOT / payloads.FASHION_ARTIFACT)
    manifest["input"]["polarity"] = "dark-on-light"
    patched = rezip(ROOT / "model_store" / "fashion.mar", tmp_path / "fashion_polarity.mar", "fashion",
                    replace={"manifest.json": json.dumps(manifest).encode()})
    with pytest.raises(RuntimeError, match="input polarity 'dark-on-light' is not supported"):
        Worker(patched, tmp_path / "unpacked")


def test_a_fused_copy_that_disagrees_with_the_model_is_not_used(fashion):
    handler = fashion.handler
    module = sys.modules[type(handler).__module__]  # the archive's copy of handlers/vision.py
    with mock.patch.object(module, "fuse", side_effect=lambda model: torch.nn.Sequential(model, torch.nn.ReLU())):
        assert handler.fused_copy() is handler.model  # ReLU on the logits changes them


def test_requested_k_must_fit_the_configured_bounds():
    handler = gpu_handler("cpu")
    handler.top_k, handler.max_top_k = 3, 5
    assert handler.requested_k({}) == 3 and handler.requested_k({"k": 5}) == 5
    with pytest.raises(RequestError, match="from 1 to 5"):
        handler.requested_k({"k": 6})
