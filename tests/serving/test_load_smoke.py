"""Load smoke test: the locustfile's users against the session TorchServe for a fixed number of requests.

Bounded (a few seconds, 300 requests, one user per unit of the models' load weights, so that every model's user
class gets at least one) and without timing assertions: every reply must be a 200 with
the right content (tests/load/checks.py), for every model. The checks themselves are tested on wrong answers.
"""

import base64
import json
import subprocess
import sys

import numpy as np
import pytest

import registry
from scripts.server import ROOT
from tests.load import checks, cyclegan_load, payloads
from tests.load.checks import WrongAnswer
from tests.samples import encode_image

pytestmark = pytest.mark.slow  # starts a real TorchServe

REQUESTS = 300
USERS = sum(entry.load.weight for entry in registry.MODELS if entry.load_tested)


def test_locust_users_get_correct_answers_from_every_model(server, tmp_path):
    samples = tmp_path / "payloads.json"
    payloads.save(samples, payloads.build_all())  # built here, so the locust process needs no torch
    command = [sys.executable, "-m", "locust", "-f", str(ROOT / "tests/load/locustfile.py"), "--headless",
               "-u", str(USERS), "-r", str(USERS), "-t", "300s", "--stop-timeout", "5", "--host", server.url("inference"),
               "--key-file", str(server.workdir / "key_file.json"), "--payloads", str(samples),
               "--max-requests", str(REQUESTS), "--json-file", str(tmp_path / "stats"), "--only-summary"]
    # --max-requests stops the run, however fast this machine serves them; -t only bounds a run that hangs
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=360)
    report = run.stdout[-3000:] + run.stderr[-3000:]
    assert run.returncode == 0, report  # locust exits 1 when any request failed

    stats = {entry["name"]: entry for entry in json.loads((tmp_path / "stats.json").read_text())}
    assert sum(entry["num_requests"] for entry in stats.values()) >= REQUESTS, report
    assert sum(entry["num_failures"] for entry in stats.values()) == 0, report
    for model in (entry.name for entry in registry.MODELS if entry.load_tested):  # every user class sent requests
        assert any(name.startswith(f"/predictions/{model} ") for name in stats), (model, report)
    sizes = {name.split(" ", 1)[1] for name in stats if name.startswith("/predictions/mnist ")}
    assert len(sizes) >= 3, sizes  # digits of several sizes


MNIST = {"label": "7", "probabilities": {"7": 0.98, "1": 0.015, "2": 0.004}, "model": "mnist", "version": "1.0"}


@pytest.mark.parametrize("reply, expected", [
    ({**MNIST, "label": "1"}, "7"),                                         # label is not the top class
    (MNIST, "3"),                                                           # wrong label for the sample
    ({**MNIST, "probabilities": {"7": 0.5, "1": 0.6, "2": 0.0}}, "7"),      # not sorted
    ({**MNIST, "probabilities": {"7": 0.9, "1": 0.2, "2": 0.1}}, "7"),      # sums to more than 1
    ({**MNIST, "probabilities": {"7": 1.2}}, "7"),                          # not a probability
    ({**MNIST, "probabilities": {"7": 0.9, "x": 0.05}}, "7"),               # unknown class
    ({"probabilities": MNIST["probabilities"]}, "7"),                      # no label
    ({**MNIST, "model": "sentiment"}, "7"),                                 # another model answered
])
def test_mnist_check_rejects_wrong_answers(reply, expected):
    assert checks.check_mnist(json.dumps(MNIST), "7") == "7"
    with pytest.raises(WrongAnswer):
        checks.check_mnist(json.dumps(reply), expected)


@pytest.mark.parametrize("check, good, bad, expected", [
    (checks.check_sentiment, {"label": "positive", "score": 0.93}, {"label": "negative", "score": 0.93}, "positive"),
    (checks.check_sentiment, {"label": "negative", "score": 0.71}, {"label": "neutral", "score": 0.9}, None),
    (checks.check_sentiment, {"label": "negative", "score": 0.71}, {"label": "negative", "score": 0.2}, None),
    (checks.check_regression, {"prediction": 151.2}, {"prediction": None}, None),
    (checks.check_regression, {"prediction": -3}, {"prediction": "1.0"}, None),
    (checks.check_stock_mnist, {"7": 0.9, "1": 0.05, "2": 0.02, "3": 0.01, "4": 0.01}, {"7": 0.9, "1": 0.05}, None),
])
def test_other_checks_accept_right_and_reject_wrong_answers(check, good, bad, expected):
    check(json.dumps(good).encode(), expected)
    with pytest.raises(WrongAnswer):
        check(json.dumps(bad).encode(), expected)


DETECTION = {"label": "bag", "score": 0.91, "box": [10.0, 12.5, 60.0, 70.0], "mask": {"size": [128, 128], "counts": "x"}}
DETECTOR = {"detections": [DETECTION, {**DETECTION, "score": 0.6}], "image_size": {"width": 128, "height": 128},
            "model": "detector", "version": "1.0"}


@pytest.mark.parametrize("reply", [
    {**DETECTOR, "detections": []},                                               # nothing found
    {**DETECTOR, "image_size": {"width": 320, "height": 240}},                    # another image's size
    {**DETECTOR, "detections": [{**DETECTION, "box": [10, 12, 160, 70]}]},        # box outside the image
    {**DETECTOR, "detections": [{**DETECTION, "box": [60, 12, 10, 70]}]},         # x2 < x1
    {**DETECTOR, "detections": [{**DETECTION, "score": 1.5}]},                    # not a probability
    {**DETECTOR, "detections": [{**DETECTION, "mask": {"size": [64, 64]}}]},      # mask in another frame
    {**DETECTOR, "detections": [{**DETECTION, "score": 0.6}, DETECTION]},         # not sorted by score
    {**DETECTOR, "model": "fashion"},                                             # another model answered
])
def test_detector_check_accepts_a_right_reply_and_rejects_wrong_ones(reply):
    expected = {"width": 128, "height": 128}
    assert checks.check_detector(json.dumps(DETECTOR), expected) == 2
    with pytest.raises(WrongAnswer):
        checks.check_detector(json.dumps(reply), expected)


@pytest.mark.parametrize("body", [b"", b"<html>", b"NaN", b'{"prediction": NaN}', b'{"prediction": Infinity}'])
def test_regression_check_rejects_non_json_and_non_finite(body):
    with pytest.raises(WrongAnswer):
        checks.check_regression(body)


def cyclegan_reply(pixels):
    """A cyclegan JSON reply carrying ``pixels`` as a base64 PNG."""
    return json.dumps({"image": base64.b64encode(encode_image(pixels)).decode(), "format": "png", "direction": "a2b",
                       "width": pixels.shape[1], "height": pixels.shape[0], "model": "cyclegan", "version": "1.0"})


TRANSLATION = np.random.default_rng(0).integers(2, 254, (28, 28), dtype=np.uint8)


def nudged(pixels, count, levels):
    """``pixels`` with its first ``count`` pixels ``levels`` gray levels brighter."""
    out = pixels.copy()
    out.flat[:count] += np.uint8(levels)
    return out


@pytest.mark.parametrize("served, right", [
    (TRANSLATION, True),
    (nudged(TRANSLATION, 1, 1), True),                  # one value rounded the other way by another runtime
    (nudged(TRANSLATION, 7, 1), True),                  # under 1 % of the pixels, by one level
    (nudged(TRANSLATION, 1, 2), False),                 # two levels: not rounding
    (nudged(TRANSLATION, 9, 1), False),                 # over 1 % of the pixels
    (255 - TRANSLATION, False),                         # the other polarity
    (TRANSLATION[:, :27].copy(), False),                # another size
])
def test_cyclegan_check_allows_a_runtimes_rounding_and_nothing_more(served, right):
    expected = json.loads(cyclegan_reply(TRANSLATION))["image"]
    if right:
        assert cyclegan_load.check_cyclegan(cyclegan_reply(served), expected) == "a2b"
    else:
        with pytest.raises(WrongAnswer, match="differs|shape"):
            cyclegan_load.check_cyclegan(cyclegan_reply(served), expected)
