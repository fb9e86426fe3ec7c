"""The detector archive's handler, loaded in-process (tests/worker.py), and once over real HTTP: held-out composed
images, boxes and masks in the client's frame, options, semantic output, mixed-size batches, consistency under
scaling and mirroring, bad input failing alone, the reply limit, the CUDA paths (patched), the custom metric."""

import base64
import io
import json
import logging
from functools import cache
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from scripts import draw_detections
from tests.samples import encode_image, training_record
from tests.worker import Request, valid_reason

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
JSON = "application/json"


@cache
def heldout(count=8):
    """Held-out composed images of artifacts/detector, as its training run made them (photos it never saw)."""
    from train.detector import composed_data

    record = training_record("artifacts/detector")
    images = composed_data(Path("data"), record["seed"], 1, count).heldout
    return [images[i] for i in range(count)]


def png(pixels):
    return Request(encode_image(pixels), "image/png")


def as_json(pixels, **options):
    return Request(json.dumps({"data": base64.b64encode(encode_image(pixels)).decode(), **options}), JSON)


def iou(a, b):
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def matched(detections, box, label, threshold=0.5):
    """The best detection of ``label`` overlapping ``box`` by at least ``threshold`` IoU, or None."""
    candidates = [d for d in detections if d["label"] == label and iou(d["box"], box) >= threshold]
    return max(candidates, key=lambda d: iou(d["box"], box), default=None)


def decode(rle):
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


@pytest.fixture(scope="module")
def detector(worker):
    return worker("detector", batch_size=8)


def test_finds_the_heldout_objects_with_boxes_and_masks(detector):
    """Held-out objects found with the right label (box IoU >= 0.5) and their masks; the bars are below the
    quality reached (metrics.json has the COCO AP) so that a broken geometry or mask encoding fails them."""
    from train.detector import FASHION_GROUPS

    names = list(FASHION_GROUPS)
    found, total, mask_ious = 0, 0, []
    for example in heldout():
        reply = detector.run_one(as_json(example.image, score_threshold=0.3))
        assert reply.status == 200, reply.body
        assert reply.body["image_size"] == {"width": 128, "height": 128}
        assert (reply.body["model"], reply.body["version"]) == ("detector", "1.0")
        for box, label, mask in zip(example.boxes.tolist(), example.labels, example.masks.astype(bool)):
            total += 1
            hit = matched(reply.body["detections"], box, names[label - 1])
            if hit is not None:
                found += 1
                predicted = decode(hit["mask"])
                assert predicted.shape == mask.shape
                mask_ious.append((predicted & mask).sum() / (predicted | mask).sum())
    assert found >= 0.6 * total, f"{found}/{total} held-out objects found with the right label"
    assert np.mean(mask_ious) >= 0.6, f"mean mask IoU {np.mean(mask_ious):.2f}"


def test_raw_multipart_and_base64_json_get_the_same_reply(detector):
    image = heldout()[0].image
    replies = detector.run(png(image), Request(encode_image(image), "image/png", name="data"), as_json(image))
    assert [r.status for r in replies] == [200] * 3
    assert replies[0].body == replies[1].body == replies[2].body


def test_boxes_and_masks_are_in_the_clients_frame(detector):
    """A 2x image (resized to the model's scale, the answer scaled back) gives its confident boxes at 2x, within
    6 px of the 256 px image (3 px of the original: resampling moves the model's answer a little)."""
    twins = []
    for example in heldout(24):  # ~30 confident boxes: a share over 8 images (~11 boxes) moves 9 points per box
        small, large = detector.run(png(example.image), png(np.asarray(Image.fromarray(example.image).resize(
            (256, 256), Image.BICUBIC))))
        assert large.body["image_size"] == {"width": 256, "height": 256}
        for detection in small.body["detections"]:
            if detection["score"] >= 0.9:
                scaled = [2 * v for v in detection["box"]]
                twin = matched(large.body["detections"], scaled, detection["label"])
                twins.append(twin is not None and np.abs(np.subtract(twin["box"], scaled)).max() <= 6)
                if twin is not None:
                    assert decode(twin["mask"]).shape == (256, 256)
    assert len(twins) >= 8 and sum(twins) >= 0.85 * len(twins), twins


def test_a_mirrored_image_gives_mirrored_boxes(detector):
    """Confident boxes of a mirrored image are the mirrored boxes, within 8 px (the model is trained with flips,
    not built symmetric)."""
    twins = []
    for example in heldout(24):  # ~30 confident boxes, as for the 2x test: over 8 images one box moves 8 points
        plain, mirrored = detector.run(png(example.image), png(example.image[:, ::-1]))
        for detection in plain.body["detections"]:
            if detection["score"] >= 0.9:
                x1, y1, x2, y2 = detection["box"]
                flipped = [128 - x2, y1, 128 - x1, y2]
                twin = matched(mirrored.body["detections"], flipped, detection["label"])
                twins.append(twin is not None and np.abs(np.subtract(twin["box"], flipped)).max() <= 8)
    assert len(twins) >= 8 and sum(twins) >= 0.85 * len(twins), twins


def test_mixed_size_batch_answers_as_alone_and_a_bad_image_fails_alone(detector):
    wide = np.asarray(Image.fromarray(heldout()[3].image).resize((300, 180)))
    tall = SAMPLES / "detector_composed_2.png"
    requests = [png(heldout()[4].image), png(wide), Request(b"\x89PNG\r\n\x1a\n broken", "image/png"),
                Request(tall.read_bytes(), "image/png"), png(heldout()[5].image)]
    alone = [detector.run_one(request) for request in requests]
    batch = detector.run(*requests)
    assert [r.status for r in batch] == [200, 200, 400, 200, 200]
    assert batch[2].body["type"] == "InvalidImage" and valid_reason(batch[2])
    assert batch[1].body["image_size"] == {"width": 300, "height": 180}
    for one, together in zip(alone, batch):
        if one.status != 200:
            assert one.body == together.body
            continue
        assert_same_detections(one.body["detections"], together.body["detections"])
        assert_same_detections(together.body["detections"], one.body["detections"])


def assert_same_detections(these, those, threshold=0.5, margin=0.05):
    """Each detection of ``these`` clear of the score threshold is in ``those``: same label, box within 1.5 px,
    score within 0.02 (float rounding differs with the batch)."""
    for detection in these:
        if detection["score"] >= threshold + margin:
            twin = matched(those, detection["box"], detection["label"], threshold=0.9)
            assert twin is not None, f"{detection} not in {those}"
            assert abs(twin["score"] - detection["score"]) < 0.02
            assert np.abs(np.subtract(twin["box"], detection["box"])).max() < 1.5


def test_options_as_headers_for_a_raw_body(detector):
    image = encode_image(heldout()[5].image)
    one, semantic = detector.run(Request(image, "image/png", headers={"Max-Detections": "1"}),
                                 Request(image, "image/png", headers={"output": "semantic"}))
    assert len(one.body["detections"]) == 1 and "label_map" in semantic.body
    bad = detector.run_one(Request(image, "image/png", headers={"Score-Threshold": "high"}))
    assert bad.status == 400 and "option 'score_threshold' must be a number" in bad.body["message"]


def test_score_threshold_and_max_detections(detector):
    image = heldout()[5].image
    everything, top_one, confident = detector.run(
        as_json(image, score_threshold=0.0, max_detections=100), as_json(image, max_detections=1),
        as_json(image, score_threshold=0.9))
    scores = [d["score"] for d in everything.body["detections"]]
    assert scores == sorted(scores, reverse=True) and len(scores) > 1
    assert len(top_one.body["detections"]) == 1 and top_one.body["detections"][0]["score"] == scores[0]
    assert all(d["score"] >= 0.9 for d in confident.body["detections"])
    assert len(confident.body["detections"]) == sum(score >= 0.9 for score in scores)


@pytest.mark.parametrize("options, message", [
    ({"score_threshold": 1.5}, "option 'score_threshold' must be a number from 0.0 to 1.0, got 1.5"),
    ({"max_detections": 0}, "option 'max_detections' must be an integer from 1 to 100, got 0"),
    ({"max_detections": 2.5}, "must be an integer"),
    ({"max_detections": "many"}, "option 'max_detections' must be a number"),
    ({"output": "panoptic"}, "option 'output' must be one of instances, semantic"),
    ({"mask_format": "bitmap"}, "option 'mask_format' must be one of rle, polygons"),
    ({"treshold": 0.3}, 'unknown option "treshold"'),
])
def test_bad_options_are_a_400_naming_the_option(detector, options, message):
    reply = detector.run_one(as_json(heldout()[0].image, **options))
    assert reply.status == 400 and reply.body["type"] == "InvalidField"
    assert message in reply.body["message"]


def test_polygons_on_request_trace_the_rle_masks(detector):
    image = heldout()[6].image
    rle, polygons = detector.run(as_json(image), as_json(image, mask_format="polygons"))
    assert len(rle.body["detections"]) == len(polygons.body["detections"]) > 0
    for a, b in zip(rle.body["detections"], polygons.body["detections"]):
        assert a["box"] == b["box"] and isinstance(b["mask"], list) and len(b["mask"][0]) >= 6
        drawn = draw_detections.instance_mask(b["mask"], (128, 128))
        mask = decode(a["mask"])
        assert (drawn & mask).sum() / (drawn | mask).sum() > 0.8


def test_semantic_output_is_a_label_map_at_the_original_size(detector):
    image = np.asarray(Image.fromarray(heldout()[7].image).resize((200, 150)))
    instances, semantic = detector.run(as_json(image), as_json(image, output="semantic"))
    assert semantic.status == 200 and semantic.body["image_size"] == {"width": 200, "height": 150}
    legend = semantic.body["legend"]
    assert legend["0"] == "background" and list(legend.values())[1:] == ["top", "trouser", "dress", "shoe", "bag"]
    label_map = np.asarray(Image.open(io.BytesIO(base64.b64decode(semantic.body["label_map"]["data"]))))
    assert label_map.shape == (150, 200) and label_map.dtype == np.uint8
    for detection in instances.body["detections"]:
        inside = label_map[decode(detection["mask"])]
        index = int(next(key for key, name in legend.items() if name == detection["label"]))
        assert (inside == index).mean() > 0.5 or detection["score"] < 0.9


def test_a_reply_over_the_limit_is_a_413_not_a_dead_worker(detector):
    request = as_json(heldout()[0].image, mask_format="polygons")
    size = len(json.dumps(detector.run_one(request).body, separators=(",", ":")).encode())
    with mock.patch.object(detector.handler, "max_reply_bytes", size - 1):
        too_large, small = detector.run(request, as_json(heldout()[0].image, max_detections=1))
    assert too_large.status == 413 and too_large.body["type"] == "ReplyTooLarge" and valid_reason(too_large)
    assert str(size) in too_large.body["message"]
    assert small.status == 200, "only the reply over the limit fails"


def test_a_mask_crop_holds_the_pixels_of_the_whole_upsampled_mask():
    """handlers.detector.mask_crop against upsampling the whole map, on random masks and sizes (both ways)."""
    import torch.nn.functional as F

    from handlers.detector import mask_crop

    rng = np.random.default_rng(0)
    for _ in range(100):
        height, width = rng.integers(1, 60, 2)
        target = tuple(int(n) for n in rng.integers(1, 300, 2))
        mask = torch.zeros(1, height, width)
        top, left = rng.integers(0, height), rng.integers(0, width)
        mask[0, top : top + rng.integers(1, 20), left : left + rng.integers(1, 20)] = float(rng.uniform(0.4, 1.0))
        mask *= torch.from_numpy(rng.uniform(0, 1.3, mask.shape)).float()
        whole = (F.interpolate(mask[None], size=target, mode="bilinear", align_corners=False)[0, 0] > 0.5).numpy()
        pasted = np.zeros(target, bool)
        crop = mask_crop(mask, *target)
        if crop is not None:
            row, col, pixels = crop
            pasted[row : row + pixels.shape[0], col : col + pixels.shape[1]] = pixels
        assert (pasted == whole).all()


def test_masks_are_bounded_by_max_mask_pixels_before_they_are_made(detector):
    """Masks x image pixels above ``max_mask_pixels``: asked for, a 413 naming what fits; by default, fewer masks,
    and the reply says how many it kept at most."""
    image = heldout()[5].image  # 128 x 128
    with mock.patch.object(detector.handler, "max_mask_pixels", 128 * 128 * 3):
        asked, default, fitting = detector.run(as_json(image, score_threshold=0.0, max_detections=4),
                                               as_json(image, score_threshold=0.0),
                                               as_json(image, score_threshold=0.0, max_detections=3))
    assert (asked.status, asked.body["type"]) == (413, "TooManyMaskPixels") and valid_reason(asked)
    assert "ask for at most 3 (Max-Detections)" in asked.body["message"]
    assert default.status == 200 and default.body["max_detections"] == 3 and len(default.body["detections"]) == 3
    assert fitting.status == 200 and len(fitting.body["detections"]) == 3
    assert detector.run_one(as_json(image)).body["max_detections"] == 20  # the model-config's default fits


@pytest.mark.parametrize("body, code, kind", [
    (b"", 400, "EmptyBody"),
    (b"not an image at all", 400, "InvalidImage"),
    (encode_image(np.zeros((5000, 5001), np.uint8)), 413, "ImageTooLarge"),
])
def test_bad_bodies_are_typed_4xx(detector, body, code, kind):
    reply = detector.run_one(Request(body, "image/png"))
    assert (reply.status, reply.body["type"]) == (code, kind) and valid_reason(reply)


def test_detections_per_image_metric(detector, caplog):
    with caplog.at_level(logging.INFO):
        reply = detector.run_one(png(heldout()[0].image))
    count = len(reply.body["detections"])
    lines = [r.getMessage() for r in caplog.records if "DetectionsPerImage" in r.getMessage()]
    assert lines and lines[-1].startswith(f"[METRICS]DetectionsPerImage.Count:{count}|#ModelName:detector,")
    assert "#type:HISTOGRAM" in lines[-1]


def test_cuda_paths_move_inputs_to_the_gpu_and_autocast(detector):
    """No GPU here: the device is patched, and tensors' .to() records where they were sent."""
    handler = detector.handler
    sent = []
    real_to = torch.Tensor.to

    def record_to(tensor, *args, **kwargs):
        if args and isinstance(args[0], torch.device) and args[0].type == "cuda":
            sent.append(args[0])
            return real_to(tensor, "cpu", *args[1:], **kwargs)
        return real_to(tensor, *args, **kwargs)

    cuda = torch.device("cuda", 1)
    with mock.patch.object(handler, "device", cuda), mock.patch.object(handler.runtime, "device", cuda), \
            mock.patch.object(handler, "amp", torch.float16), mock.patch.object(torch.Tensor, "to", record_to), \
            mock.patch("torch.autocast", side_effect=lambda *a, **k: mock.MagicMock(args=a, kwargs=k)) as autocast:
        outputs = handler.predict([torch.rand(3, 64, 96), torch.rand(3, 80, 80)])
    assert sent == [cuda, cuda] and len(outputs) == 2
    autocast.assert_called_once_with(device_type="cuda", dtype=torch.float16)
    with mock.patch.object(handler, "amp", None), mock.patch.object(handler, "device", cuda):
        assert not isinstance(handler.autocast(), torch.autocast)


def test_gpu_id_selects_that_cuda_device():
    from handlers.common import select_device

    with mock.patch("torch.cuda.is_available", return_value=True), mock.patch("torch.cuda.set_device") as chosen:
        assert select_device({"gpu_id": 1}) == torch.device("cuda", 1)
    chosen.assert_called_once_with(torch.device("cuda", 1))


def test_draw_detections_draws_a_served_reply(detector, tmp_path):
    sample = SAMPLES / "detector_composed_1.jpg"
    reply = detector.run_one(Request(sample.read_bytes(), "image/jpeg"))
    (tmp_path / "reply.json").write_text(json.dumps(reply.body))
    assert draw_detections.main([str(sample), str(tmp_path / "reply.json"), str(tmp_path / "out.png")]) == 0
    drawn = np.asarray(Image.open(tmp_path / "out.png").convert("RGB"), np.int16)
    original = np.asarray(Image.open(sample).convert("RGB"), np.int16)
    assert drawn.shape == original.shape and reply.body["detections"]
    x1, y1, x2, y2 = map(int, reply.body["detections"][0]["box"])
    assert np.abs(drawn[y1 + 1:y2 - 1, x1 + 1:x2 - 1] - original[y1 + 1:y2 - 1, x1 + 1:x2 - 1]).mean() > 10
    assert draw_detections.main([str(sample), str(SAMPLES / "detector_composed.json"), str(tmp_path / "x.png")]) == 1


def test_samples_hold_the_objects_they_list(detector):
    truth = json.loads((SAMPLES / "detector_composed.json").read_text())
    for name, objects in truth.items():
        reply = detector.run_one(Request((SAMPLES / name).read_bytes(), "image/jpeg"))
        found = sum(matched(reply.body["detections"], o["box"], o["label"]) is not None for o in objects)
        assert found >= len(objects) - 1, (name, reply.body["detections"], objects)


@pytest.mark.slow
def test_served_over_http_with_options_and_hostile_bodies(tmp_path):
    from tests.fixtures.servers import running, store_with

    with running(tmp_path / "ts", model_store=store_with(tmp_path / "store", "detector")) as server:
        sample = (SAMPLES / "detector_composed_1.jpg").read_bytes()
        plain = server.predict("detector", sample)
        assert plain.status_code == 200 and plain.json()["detections"]
        top = server.predict("detector", sample, headers={"Max-Detections": "1", "mask-format": "polygons"})
        assert top.status_code == 200 and len(top.json()["detections"]) == 1
        assert isinstance(top.json()["detections"][0]["mask"], list)
        bad = server.predict("detector", sample, headers={"Score-Threshold": "7"})
        assert bad.status_code == 400 and bad.json()["type"] == "InvalidField"
        form = server.inference("POST", "/predictions/detector", files={"data": sample}, data={"output": "semantic"})
        assert form.status_code == 200 and "label_map" in form.json()
        for body in (b"\x00" * 100, b"GIF89a\x01\x00", encode_image(np.zeros((5000, 5001), np.uint8))):
            assert server.predict("detector", body).status_code in (400, 413)
        semantic = server.inference("POST", "/predictions/detector", json={
            "data": base64.b64encode(sample).decode(), "output": "semantic"})
        assert semantic.status_code == 200 and semantic.json()["label_map"]["format"] == "png"
        again = server.predict("detector", sample)
        assert again.json() == plain.json(), "the worker survived and answers as before"


# --- the runtimes: onnxruntime (model.onnx, one image per call); torchscript and aoti fail at load ---------------

def archive_with_runtime(tmp_path, runtime):
    """model_store/detector.mar with ``handler.runtime`` set in its model-config."""
    import yaml

    from tests.fixtures.servers import rezip

    root = SAMPLES.parent
    config = yaml.safe_load((root / "handlers/detector.yaml").read_text())
    config["handler"]["runtime"] = runtime
    return rezip(root / "model_store/detector.mar", tmp_path / f"detector-{runtime}.mar", "detector",
                 replace={"detector.yaml": yaml.safe_dump(config).encode()})


def test_onnxruntime_serves_the_samples_as_eager_does(detector, tmp_path):
    """The handler with ``runtime: onnxruntime`` predicts the eager model's detections for the registry's samples
    (same labels, boxes within 1e-3 px at the working size), and replies the same."""
    import registry
    from tests.worker import Worker

    served = Worker(archive_with_runtime(tmp_path, "onnxruntime"), tmp_path / "unpacked", batch_size=8)
    assert served.handler.runtime.name == "onnxruntime" == served.handler.describe_handle()["runtime"]
    samples = [SAMPLES.parent / sample.file for sample in registry.model("detector").samples]
    images = [detector.handler.decoded(path.read_bytes())["image"] for path in samples]
    for want, got in zip(detector.handler.predict(images), served.handler.predict(images)):
        assert set(got) == {"boxes", "labels", "scores", "masks"} and len(got["labels"]) > 10
        assert torch.equal(got["labels"], want["labels"])
        assert float((got["boxes"] - want["boxes"]).abs().max()) <= 1e-3
        assert float((got["scores"] - want["scores"]).abs().max()) <= 1e-3
        assert float((got["masks"] - want["masks"]).abs().max()) <= 1e-3
    for path in samples:
        request = Request(path.read_bytes(), "image/png" if path.suffix == ".png" else "image/jpeg")
        want, got = detector.run_one(request), served.run_one(request)
        assert got.status == want.status == 200
        assert [d["label"] for d in got.body["detections"]] == [d["label"] for d in want.body["detections"]]
        for mine, theirs in zip(got.body["detections"], want.body["detections"]):
            assert mine["box"] == pytest.approx(theirs["box"], abs=0.11)  # rounded to 0.1 px in the reply


AOTI_REASONS = {True: "torch.export.export.* GuardOnDataDependentSymNode",  # after `make compile` tried
               False: r"the artifact folder has no such export \(make compile"}


@pytest.mark.trained
@pytest.mark.parametrize("runtime", ["torchscript", "aoti"])
def test_torchscript_and_aoti_fail_at_load_with_the_manifests_reason(tmp_path, runtime):
    from models import read_manifest
    from tests.worker import Worker

    reason = "not exported: torch.jit.trace" if runtime == "torchscript" else AOTI_REASONS[
        "aoti" in read_manifest(SAMPLES.parent / "artifacts/detector")["exports"]]
    with pytest.raises(RuntimeError, match=f"detector 1.0: runtime {runtime} needs the {runtime} export: {reason}"):
        Worker(archive_with_runtime(tmp_path, runtime), tmp_path / "unpacked")
