"""The fashion archive behind a real TorchServe over real HTTP: accuracy of re-encoded images, hostile input,
top-k and explanations. Starts its own TorchServe (only model_store/fashion.mar) on free ports."""

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from tests.fixtures.servers import running, store_with
from tests.load import checks, payloads
from tests.models.test_vision import ACCURACY_SLACK, FASHION_CLASSES, encoded, in_process_accuracy

pytestmark = pytest.mark.slow
SAMPLE = 200


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision")
    with running(root / "server", model_store=store_with(root / "store", "fashion"), expect_ready=1) as torchserve:
        yield torchserve


@pytest.fixture(scope="module")
def heldout():
    return payloads.heldout_fashion(count=SAMPLE)


def predict_all(server, bodies, content_type):
    """Replies to ``bodies`` sent by 8 concurrent clients, so that the server batches them."""
    def send(body):
        return server.predict("fashion", body, headers={"Content-Type": content_type}, timeout=60)

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(send, bodies))


@pytest.mark.parametrize("size, fmt, mode", [(64, "JPEG", "L"), (128, "PNG", "RGB"), (256, "JPEG", "RGB"),
                                             (200, "PNG", "L")])
def test_served_accuracy_of_reencoded_upscaled_images_is_within_2_points_of_in_process(server, heldout, size, fmt,
                                                                                      mode):
    images, labels = heldout
    replies = predict_all(server, [payloads.render_fashion(i, size, fmt, mode) for i in images],
                          f"image/{fmt.lower()}")
    assert [r.status_code for r in replies] == [200] * len(images)
    served = np.mean([checks.check_fashion(r.content) == label for r, label in zip(replies, labels)])
    expected = in_process_accuracy(images, labels)
    assert served >= expected - ACCURACY_SLACK, f"{fmt} {mode} {size}px: {served:.3f} served, {expected:.3f} in-process"


def test_hostile_input_is_a_json_4xx_and_the_worker_survives(server, heldout):
    pids = server.worker_pids("fashion")
    bomb = encoded(Image.new("L", (6000, 6000)))
    cases = [(b"\xff\xd8\xff garbage", "image/jpeg", 400, "InvalidImage"), (bomb, "image/png", 413, "ImageTooLarge"),
             (json.dumps({"data": "x", "k": 99}), "application/json", 400, "InvalidField"),
             (b"", "image/png", 400, "EmptyBody")]
    for body, content_type, code, kind in cases:
        reply = server.predict("fashion", body, headers={"Content-Type": content_type}, timeout=60)
        assert reply.status_code == code and reply.json()["type"] == kind and reply.json()["code"] == code
    images, labels = heldout
    good = server.predict("fashion", payloads.render_fashion(images[0], 96, "PNG", "RGB"), timeout=60)
    assert good.status_code == 200 and good.json()["label"] == labels[0]
    assert server.worker_pids("fashion") == pids


def test_top_k_and_explanations_over_http(server, heldout):
    images, labels = heldout
    body = payloads.render_fashion(images[2], 128, "JPEG", "RGB")
    document = json.dumps({"data": base64.b64encode(body).decode(), "k": 5})
    reply = server.predict("fashion", document, headers={"Content-Type": "application/json"}, timeout=60)
    assert reply.status_code == 200 and len(reply.json()["probabilities"]) == 5
    assert checks.check_fashion(reply.content, labels[2], labels=FASHION_CLASSES) == labels[2]
    explained = server.inference("POST", "/explanations/fashion", data=body, timeout=60)
    assert explained.status_code == 200 and explained.json()["method"] == "LayerGradCam"
    assert np.array(explained.json()["attributions"]).shape == (28, 28)
