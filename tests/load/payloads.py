"""Real request bodies with known answers for the load tests and the benchmark.

- digits: held-out digits (never seen in training) rendered as PNG at several sizes and both polarities;
- reviews: held-out Chinese reviews as UTF-8 text;
- patients: held-out rows of the regression data set as JSON objects.

"Easy" samples only: a digit or review is kept when the trained models in artifacts/ (loaded here, in-process,
with the handlers' own preprocessing) give the known label with a clear margin. A served reply that disagrees
with the known label is then a serving fault (a mixed-up batch, a broken decode), not a model error, and the
load tests count it as a failure. Run from the repo root (artifacts/ and the training data must be there).
"""

import json
from dataclasses import dataclass
from functools import cache

from tests.samples import heldout_digits, heldout_patients, heldout_reviews, render_digit

MNIST_ARTIFACTS = ("artifacts/mnist", "artifacts/mnist-v2")  # both versions are served as "mnist"
MIN_CONFIDENCE = 0.9

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"

DIGIT_RENDERINGS = {  # name: (size px, dark ink on light paper)
    "digit-28px": (28, False),    # MNIST's own geometry
    "digit-64px-paper": (64, True),
    "digit-128px": (128, False),
    "digit-300px-paper": (300, True),  # a scan-sized image: decoding dominates
}


@dataclass(frozen=True)
class Sample:
    name: str  # the request name in reports, e.g. "digit-28px"
    body: bytes
    content_type: str
    expected: object  # the known label, or None where any valid reply is right (regression)


def _mnist_models():
    from models import load_model, read_manifest
    from scripts.server import ROOT

    models = []
    for folder in MNIST_ARTIFACTS:
        manifest = read_manifest(ROOT / folder)
        models.append((load_model(ROOT / folder, manifest), manifest["input"]["mean"], manifest["input"]["std"]))
    return models


@cache
def digits(renderings=tuple(DIGIT_RENDERINGS), count=40):
    """Held-out digits, each rendering of ``renderings``, that every served mnist version labels confidently."""
    import numpy as np
    import torch

    from handlers.images import decode_image
    from models.mnist import canonicalize_digit

    images, labels = heldout_digits(count=count)
    models = _mnist_models()
    samples = []
    for name in renderings:
        size, dark_on_light = DIGIT_RENDERINGS[name]
        bodies = [render_digit(image, size, dark_on_light) for image in images]
        canonical = torch.from_numpy(np.stack([canonicalize_digit(decode_image(b, channels=1)) for b in bodies])).unsqueeze(1)
        easy = np.ones(len(bodies), dtype=bool)
        with torch.inference_mode():
            for model, mean, std in models:
                probabilities = torch.softmax(model((canonical - mean) / std), dim=1)
                confidence, predicted = probabilities.max(dim=1)
                easy &= (predicted.numpy() == labels) & (confidence.numpy() >= MIN_CONFIDENCE)
        samples += [Sample(name, body, "image/png", str(label))
                    for body, label, keep in zip(bodies, labels, easy) if keep]
    return samples


@cache
def reviews(count=120):
    """Held-out reviews that the served sentiment archive (loaded in-process, its own handler code) labels
    correctly with probability >= MIN_CONFIDENCE."""
    import tempfile

    from scripts.server import ROOT
    from tests.worker import Request, Worker

    worker = Worker(ROOT / "model_store" / "sentiment.mar", tempfile.mkdtemp(prefix="payloads-sentiment-"))
    texts, labels = heldout_reviews(count=count)
    samples = []
    for text, label in zip(texts, labels):
        reply = worker.run_one(Request(text.encode("utf-8"), TEXT))
        if reply.status == 200 and reply.body["label"] == label and reply.body["score"] >= MIN_CONFIDENCE:
            samples.append(Sample("review", text.encode("utf-8"), TEXT, label))
    return samples


@cache
def patients(count=20):
    """Held-out rows of the regression data set; any finite prediction is a valid answer."""
    rows, _ = heldout_patients(count=count)
    return [Sample("patient", json.dumps(row).encode(), JSON, None) for row in rows]


# --- a payload file, so that a load generator needs neither torch nor the training data -------------------------

def save(path, samples):
    """Write {model: [sample, ...]} to ``path`` as JSON (bodies base64-encoded)."""
    import base64

    document = {model: [{"name": s.name, "body": base64.b64encode(s.body).decode(), "content_type": s.content_type,
                        "expected": s.expected} for s in items] for model, items in samples.items()}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(document, f)


def load(path):
    """{model: [Sample, ...]} from a file written by ``save``."""
    import base64

    with open(path, encoding="utf-8") as f:
        document = json.load(f)
    return {model: [Sample(item["name"], base64.b64decode(item["body"]), item["content_type"], item["expected"])
                   for item in items] for model, items in document.items()}


def build_all():
    """{model: samples} for every model the registry load-tests."""
    import registry

    return {entry.name: registry.resolve(entry.load.payloads)() for entry in registry.MODELS if entry.load}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write the load tests' payloads (with known answers) to a file.")
    parser.add_argument("--out", default="payloads.json")
    out = parser.parse_args().out
    built = build_all()
    save(out, built)
    print(f"{out}: " + ", ".join(f"{len(items)} for {model}" for model, items in built.items()))
