"""The cyclegan: the served module, training on the CycleGAN folder layout, the handler in-process (JSON and image
replies, directions, typed errors), and an image over real HTTP."""

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import registry
from models.cyclegan import CycleGAN, to_model, to_pixels
from tests.worker import Request, valid_reason

JSON = "application/json"


def png_bytes(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def sample_bytes():
    return (registry.ROOT / registry.model("cyclegan").samples[0].file).read_bytes()


def test_each_image_goes_through_the_generator_of_its_direction():
    torch.manual_seed(0)
    gan = CycleGAN(channels=1, width=4, blocks=1).eval()
    images = torch.rand(5, 1, 12, 12) * 2 - 1
    to_a = torch.tensor([False, True, True, False, True])
    with torch.inference_mode():
        mixed = gan(images, to_a)
        assert torch.allclose(mixed[~to_a], gan.a2b(images[~to_a]), atol=1e-6)
        assert torch.allclose(mixed[to_a], gan.b2a(images[to_a]), atol=1e-6)
        assert gan(images[:2], torch.tensor([True, True])).shape == (2, 1, 12, 12)  # one direction only


def test_pixels_round_trip_through_the_model_range():
    pixels = np.random.default_rng(0).integers(0, 256, (3, 8, 8), dtype=np.uint8)
    assert np.array_equal(to_pixels(to_model(pixels)), pixels)
    colour = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    assert to_model(colour).shape == (2, 3, 8, 8) and np.array_equal(to_pixels(to_model(colour)), colour)


@pytest.mark.filterwarnings("error")
def test_line_drawings_are_dark_strokes_on_white():
    """Read-only input (what np.asarray of a Pillow image gives) is drawn without a warning."""
    from train.cyclegan import line_drawing

    item = np.zeros((1, 28, 28), dtype=np.uint8)
    item[0, 8:20, 8:20] = 200  # a light square on black
    item.setflags(write=False)
    drawing = line_drawing(item)[0]
    assert drawing[0, 0] == 255 and drawing[14, 14] == 255  # paper outside and inside the square
    assert drawing[8, 14] < 64 and drawing[14, 7] < 64  # its edges are strokes


def test_trains_on_the_cyclegan_folder_layout(tmp_path):
    """trainA/ trainB/ testA/ testB/ of colour images of any size: trained, exported (TorchScript and ONNX checked
    against eager; AOTInductor says why not), with the cycle errors in metrics.json and no class figures."""
    from train import cyclegan

    rng = np.random.default_rng(0)
    for folder, count in (("trainA", 6), ("trainB", 5), ("testA", 2), ("testB", 2)):
        (tmp_path / "data" / folder).mkdir(parents=True)
        for index in range(count):
            pixels = rng.integers(0, 256, (20 + index, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / folder / f"{index}.{'png' if index % 2 else 'jpg'}")
    metrics = cyclegan.main(["--data-dir", str(tmp_path / "data"), "--size", "16", "--epochs", "1",
                             "--steps-per-epoch", "2", "--batch-size", "2", "--width", "4", "--blocks", "1",
                             "--out", str(tmp_path / "out"), "--threads", "1"])
    assert set(metrics["test"]) == {"cycle_error_a", "cycle_error_b"}
    assert metrics["dataset"]["n_trainA"] == 6 and metrics["dataset"]["n_test"] == 4
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["input"] == {"size": 16, "channels": 3, "polarity": {}}
    assert {"file", "max_abs_diff"} <= set(manifest["exports"]["onnx"])
    assert manifest["exports"]["onnx"]["max_abs_diff"] <= 1e-4
    assert "file" in manifest["exports"]["torchscript"]
    (tmp_path / "data" / "testB" / "0.jpg").unlink()
    (tmp_path / "data" / "testB" / "1.png").unlink()
    with pytest.raises(cyclegan.DataError, match="no images in testB/"):
        cyclegan.main(["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "bad")])


@pytest.fixture(scope="module")
def cyclegan_worker(worker):
    return worker("cyclegan")


def test_a_json_request_gets_a_base64_png_of_the_model_size(cyclegan_worker):
    body = json.dumps({"data": base64.b64encode(sample_bytes()).decode()})
    reply = cyclegan_worker.run_one(Request(body, JSON))
    assert reply.status == 200 and reply.content_type == JSON
    assert (reply.body["direction"], reply.body["format"], reply.body["model"]) == ("a2b", "png", "cyclegan")
    with Image.open(io.BytesIO(base64.b64decode(reply.body["image"]))) as image:
        assert (image.format, image.size) == ("PNG", (reply.body["width"], reply.body["height"]))


@pytest.mark.parametrize("accept, content_type, image_format", [
    ("image/png", "image/png", "PNG"), ("image/jpeg", "image/jpeg", "JPEG"),
    ("text/html, image/*;q=0.8", "image/png", "PNG")])
def test_accept_gets_the_image_itself(cyclegan_worker, accept, content_type, image_format):
    reply = cyclegan_worker.run_one(Request(sample_bytes(), "image/png", headers={"Accept": accept}))
    assert reply.status == 200 and reply.content_type == content_type
    with Image.open(io.BytesIO(reply.body)) as image:
        assert image.format == image_format and image.size == (28, 28)


def test_the_same_image_is_answered_alike_in_a_batch_of_both_directions(cyclegan_worker):
    """A batch mixing directions and polarities: each request gets what it gets alone, as a PNG or as JSON, and an
    item sent dark on light the reply of the same item light on dark (the batch's polarity is set per image)."""
    from train.cyclegan import line_drawing

    item = np.asarray(Image.open(io.BytesIO(sample_bytes())).convert("L").resize((28, 28)))
    drawing = png_bytes(line_drawing(item[None])[0])
    as_png = {"Accept": "image/png"}
    requests = [Request(png_bytes(item), "image/png", headers=as_png),
                Request(drawing, "image/png", headers={**as_png, "Direction": "b2a"}),
                Request(json.dumps({"data": base64.b64encode(drawing).decode(), "direction": "b2a"}), JSON),
                Request(png_bytes(255 - item), "image/png", headers=as_png)]
    together = cyclegan_worker.run(*requests)
    alone = [cyclegan_worker.run_one(request) for request in requests]
    assert [reply.status for reply in together] == [200, 200, 200, 200]
    assert [together[i].body for i in (0, 1, 3)] == [alone[i].body for i in (0, 1, 3)]
    assert together[2].body["image"] == alone[2].body["image"] and together[2].body["direction"] == "b2a"
    assert base64.b64decode(together[2].body["image"]) == together[1].body  # the header and the JSON field agree
    assert together[3].body == together[0].body != together[1].body


def test_an_item_comes_back_as_a_drawing_and_a_drawing_as_an_item(cyclegan_worker):
    """The trained generators change the polarity as the domains have it: an item (light on black) becomes dark
    strokes on white paper, and a drawing a light item on black."""
    from train.cyclegan import line_drawing

    item = np.asarray(Image.open(io.BytesIO(sample_bytes())).convert("L").resize((28, 28)))
    to_drawing = cyclegan_worker.run_one(Request(sample_bytes(), "image/png", headers={"Accept": "image/png"}))
    drawing = np.asarray(Image.open(io.BytesIO(to_drawing.body)))
    assert np.median(drawing) > 200, "drawings are mostly white paper"
    to_item = cyclegan_worker.run_one(Request(png_bytes(line_drawing(item[None])[0]), "image/png",
                                              headers={"Accept": "image/png", "Direction": "b2a"}))
    back = np.asarray(Image.open(io.BytesIO(to_item.body)))
    assert np.median(back[[0, -1]]) < 50, "items are on black"


@pytest.mark.parametrize("request_, code, kind", [
    (Request(json.dumps({"data": "", "direction": "sideways"}), JSON), 400, "InvalidField"),
    (Request(json.dumps({"data": "", "colour": "red"}), JSON), 400, "InvalidField"),
    (Request(b"\x89PNG not really", "image/png"), 400, "InvalidImage"),
    (Request(png_bytes(np.full((28, 28), 128, np.uint8)), "image/png"), 400, "InvalidImage"),
    (Request(b"", "image/png", headers={"Accept": "image/gif"}), 400, "EmptyBody"),
    (Request(png_bytes(np.eye(28, dtype=np.uint8) * 255), "image/png", headers={"Accept": "image/gif"}), 406,
     "NotAcceptable"),
    (Request(png_bytes(np.eye(28, dtype=np.uint8) * 255), "image/png", headers={"Direction": "up"}), 400,
     "InvalidField"),
], ids=["direction", "unknown-field", "not-an-image", "uniform", "empty", "gif", "direction-header"])
def test_bad_requests_are_typed_4xx_and_leave_their_neighbours_answered(cyclegan_worker, request_, code, kind):
    bad, good = cyclegan_worker.run(request_, Request(sample_bytes(), "image/png"))
    assert bad.status == code and bad.body["type"] == kind and valid_reason(bad), bad.body
    assert good.status == 200 and good.body["direction"] == "a2b"


@pytest.mark.slow
@pytest.mark.trained
def test_curl_with_accept_png_gets_the_translated_png_over_http(tmp_path):
    """A private TorchServe with the cyclegan alone: Accept: image/png gets the PNG with its Content-Type, the same
    pixels as the JSON reply's base64, and Direction: b2a another image."""
    from tests.fixtures.servers import running, store_with

    with running(tmp_path / "ts", model_store=store_with(tmp_path / "store", "cyclegan"), expect_ready=1) as server:
        image = server.predict("cyclegan", sample_bytes(), headers={"Content-Type": "image/png", "Accept": "image/png"})
        assert image.status_code == 200 and image.headers["Content-Type"] == "image/png"
        assert image.content.startswith(b"\x89PNG\r\n\x1a\n")
        as_json = server.predict("cyclegan", sample_bytes(), headers={"Content-Type": "image/png"})
        assert as_json.status_code == 200 and base64.b64decode(as_json.json()["image"]) == image.content
        other = server.predict("cyclegan", sample_bytes(), headers={"Content-Type": "image/png", "Accept": "image/png",
                                                                      "Direction": "b2a"})
        assert other.status_code == 200 and other.content != image.content
        refused = server.predict("cyclegan", sample_bytes(), headers={"Content-Type": "image/png",
                                                                        "Accept": "image/gif"})
        assert refused.status_code == 406 and refused.json()["type"] == "NotAcceptable"
