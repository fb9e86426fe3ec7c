"""Content checks of the served models' replies, shared by the locustfile, the benchmark and the smoke test.

Each ``check_*`` takes the raw reply body (bytes or text) and what the sample is known to be, returns what it read
(the label, the prediction, the detector's number of detections; nothing for the no-op) and raises ``WrongAnswer``
naming the problem when the reply is not a correct answer.
No locust import here: importing locust monkey-patches the process with gevent, which the threaded benchmark
client and pytest must not get.
"""

import json
import math

DIGITS = [str(d) for d in range(10)]
SENTIMENT_LABELS = ("negative", "positive")
EPS = 1e-3
"""Slack for probabilities rounded to 4 decimals by the handler."""


class WrongAnswer(Exception):
    """A reply that arrived with 200 but is not a correct answer."""


def parse(body):
    """The reply as JSON: raw bytes or text from the wire, or an already decoded object (in-process workers)."""
    if isinstance(body, (dict, list)):
        return body
    if isinstance(body, (bytes, bytearray)):
        body = bytes(body).decode("utf-8", errors="replace")
    try:
        return json.loads(body)
    except ValueError:
        raise WrongAnswer(f"reply is not JSON: {body[:120]!r}") from None


def _probabilities(mapping, keys, top, what):
    """Values of a {label: probability} map: known labels, each in [0, 1], sorted descending, sum <= 1 + EPS."""
    if not isinstance(mapping, dict) or not mapping:
        raise WrongAnswer(f"{what}: expected a non-empty {{label: probability}} object, got {mapping!r}")
    if len(mapping) > top:
        raise WrongAnswer(f"{what}: {len(mapping)} entries, expected at most {top}")
    unknown = [key for key in mapping if key not in keys]
    if unknown:
        raise WrongAnswer(f"{what}: unknown labels {unknown}")
    values = list(mapping.values())
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0 for v in values):
        raise WrongAnswer(f"{what}: probabilities outside [0, 1]: {values}")
    if values != sorted(values, reverse=True):
        raise WrongAnswer(f"{what}: probabilities not sorted from most to least likely: {values}")
    if sum(values) > 1.0 + EPS:
        raise WrongAnswer(f"{what}: probabilities sum to {sum(values):.4f} > 1")
    return values


def check_reply(body, expected=None):
    """Any model's reply (registry.Load's default check): a JSON object; its "label" is ``expected`` where the sample
    names a label. Returns the label (None when the reply has none)."""
    reply = parse(body)
    if not isinstance(reply, dict) or not reply:
        raise WrongAnswer(f"expected a non-empty JSON object, got {str(reply)[:120]}")
    if expected is not None and str(reply.get("label")) != str(expected):
        raise WrongAnswer(f"label {reply.get('label')!r}, expected {expected!r}")
    return reply.get("label")


def check_mnist(body, expected=None, model="mnist"):
    """Our mnist reply: {"label", "probabilities" (top 3, sorted), "model", "version"}; label == ``expected``."""
    reply = parse(body)
    if not isinstance(reply, dict):
        raise WrongAnswer(f"expected a JSON object, got {type(reply).__name__}")
    label = reply.get("label")
    if label not in DIGITS:
        raise WrongAnswer(f"label {label!r} is not a digit")
    probabilities = reply.get("probabilities")
    _probabilities(probabilities, DIGITS, 3, "probabilities")
    if next(iter(probabilities)) != label:
        raise WrongAnswer(f"label {label} is not the most likely class of {probabilities}")
    if model is not None and reply.get("model") != model:
        raise WrongAnswer(f"model {reply.get('model')!r}, expected {model!r}")
    if expected is not None and label != str(expected):
        raise WrongAnswer(f"label {label}, expected {expected}")
    return label


def check_stock_mnist(body, expected=None):
    """TorchServe's stock image_classifier reply: {class: probability} for the top 5, sorted. Returns the top label.

    The stock handler does not canonicalise digits, so its label is not required to be right (the benchmark reports
    how often it is).
    """
    reply = parse(body)
    values = _probabilities(reply, DIGITS, 5, "stock reply")
    if len(values) != 5:
        raise WrongAnswer(f"stock reply: {len(values)} classes, expected the top 5")
    return next(iter(reply))


def check_sentiment(body, expected=None):
    """{"label": "positive"|"negative", "score": probability of that label}; label == ``expected``."""
    reply = parse(body)
    if not isinstance(reply, dict):
        raise WrongAnswer(f"expected a JSON object, got {type(reply).__name__}")
    label, score = reply.get("label"), reply.get("score")
    if label not in SENTIMENT_LABELS:
        raise WrongAnswer(f"label {label!r} is not one of {SENTIMENT_LABELS}")
    if not isinstance(score, (int, float)) or isinstance(score, bool) or not 0.5 - EPS <= score <= 1.0:
        raise WrongAnswer(f"score {score!r} of the predicted label is not a probability in [0.5, 1]")
    if expected is not None and label != expected:
        raise WrongAnswer(f"label {label}, expected {expected}")
    return label


def check_regression(body, expected=None):
    """{"prediction": finite number}. Returns the prediction (``expected`` is unused: any finite value passes)."""
    reply = parse(body)
    prediction = reply.get("prediction") if isinstance(reply, dict) else None
    if isinstance(prediction, bool) or not isinstance(prediction, (int, float)) or not math.isfinite(prediction):
        raise WrongAnswer(f"prediction {prediction!r} is not a finite number")
    return prediction


NOOP_REPLY = b'{"ok":true}'


def check_noop(body, expected=None):
    """The benchmark's no-op handler answers every request with NOOP_REPLY."""
    if bytes(body) != NOOP_REPLY:
        raise WrongAnswer(f"no-op reply {bytes(body)[:80]!r}, expected {NOOP_REPLY!r}")
    return None


def check_fashion(body, expected=None, model="fashion", labels=None):
    """Our vision reply: {"label", "probabilities" (top 3 by default, sorted), "model", "version"}; label ==
    ``expected``. ``labels``: the model's class names (default: those of the probabilities map itself)."""
    reply = parse(body)
    if not isinstance(reply, dict):
        raise WrongAnswer(f"expected a JSON object, got {type(reply).__name__}")
    probabilities = reply.get("probabilities")
    _probabilities(probabilities, labels or list(probabilities or {}), 10, "probabilities")
    label = reply.get("label")
    if next(iter(probabilities)) != label:
        raise WrongAnswer(f"label {label!r} is not the most likely class of {probabilities}")
    if model is not None and reply.get("model") != model:
        raise WrongAnswer(f"model {reply.get('model')!r}, expected {model!r}")
    if expected is not None and label != expected:
        raise WrongAnswer(f"label {label!r}, expected {expected!r}")
    return label


def check_stock_fashion(body, expected=None):
    """TorchServe's stock image_classifier reply for the fashion weights: the top 5 {class name: probability}.
    Returns the top label; it is not required to be right (the benchmark reports how often it is)."""
    reply = parse(body)
    values = _probabilities(reply, list(reply) if isinstance(reply, dict) else [], 5, "stock reply")
    if len(values) != 5:
        raise WrongAnswer(f"stock reply: {len(values)} classes, expected the top 5")
    return next(iter(reply))


def check_detector(body, expected=None, model="detector"):
    """Our detector reply: {"detections": [{"label", "score", "box", "mask"}], "image_size", "model", "version"};
    ``expected`` is {"width", "height"} of the image, and at least one object must be found (every held-out
    composed image holds two to five). Returns the number of detections."""
    reply = parse(body)
    if not isinstance(reply, dict) or not isinstance(reply.get("detections"), list):
        raise WrongAnswer(f"expected a JSON object with a detections list, got {str(reply)[:120]}")
    if model is not None and reply.get("model") != model:
        raise WrongAnswer(f"model {reply.get('model')!r}, expected {model!r}")
    size = reply.get("image_size")
    if expected is not None and size != expected:
        raise WrongAnswer(f"image_size {size}, expected {expected}")
    detections = reply["detections"]
    if not detections:
        raise WrongAnswer("no object found in an image that holds two to five")
    for detection in detections:
        score, box, mask = detection.get("score"), detection.get("box"), detection.get("mask")
        if not isinstance(score, (int, float)) or not 0.0 <= score <= 1.0:
            raise WrongAnswer(f"score {score!r} outside [0, 1]")
        if size and not (isinstance(box, list) and len(box) == 4 and 0 <= box[0] <= box[2] <= size["width"]
                         and 0 <= box[1] <= box[3] <= size["height"]):
            raise WrongAnswer(f"box {box!r} is not [x1, y1, x2, y2] inside the image {size}")
        if size and not (isinstance(mask, dict) and mask.get("size") == [size["height"], size["width"]]):
            raise WrongAnswer(f"mask {str(mask)[:80]} is not RLE at the image's size {size}")
    scores = [d["score"] for d in detections]
    if scores != sorted(scores, reverse=True):
        raise WrongAnswer(f"detections not sorted by score: {scores}")
    return len(detections)
