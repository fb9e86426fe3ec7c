"""Real request bodies with known answers for the load tests and the benchmark.

- digits: held-out digits (never seen in training) rendered as PNG at several sizes and both polarities;
- reviews: held-out Chinese reviews as UTF-8 text;
- patients: held-out rows of the regression data set as JSON objects;
- fashion: Fashion-MNIST test images (never seen in training) re-encoded as JPEG and PNG, upscaled, grey and RGB;
- the photo mix of mnist and fashion (registry ``Load.photos``): the same held-out digits and items as a phone
  photographs them, 4032x3024 JPEGs with sensor noise;
- detector: held-out composed images (photos and items training never saw) as PNG and JPEG at two sizes.

"Easy" samples only: a digit or review is kept when the trained models in artifacts/ (loaded here, in-process,
with the handlers' own preprocessing) give the known label with a clear margin. A served reply that disagrees
with the known label is then a serving fault (a mixed-up batch, a broken decode), not a model error, and the
load tests count it as a failure. Run from the repo root (artifacts/ and the training data must be there).
"""

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from registry import ROOT
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
PHONE = "phone"
"""The size of a rendering that is a phone photo (``phone_photo``)."""
DIGIT_PHOTOS = {"digit-phone-jpeg": (PHONE, True)}  # the photo mix (registry Load.photos)
PHONE_FRAME = (4032, 3024)
"""A 12-megapixel phone camera's frame (4:3)."""


@dataclass(frozen=True)
class Sample:
    name: str  # the request name in reports, e.g. "digit-28px"
    body: bytes
    content_type: str
    expected: object  # the known label, or None where any valid reply is right (regression)


def phone_photo(pixels, dark_on_light=False, seed=0, fill=0.75):
    """A small grey image (a digit, an item) as a phone photographs it: a 4032x3024 RGB JPEG (quality 90), the image
    upscaled (bicubic) to ``fill`` of the frame's height in its centre, on the image's background (white paper for
    ``dark_on_light``, inverting the image), with the sensor's noise (which is what makes photos megabytes)."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.asarray(pixels, dtype=np.uint8)
    if dark_on_light:
        pixels = 255 - pixels
    width, height = PHONE_FRAME
    side = round(height * fill)
    frame = Image.new("L", PHONE_FRAME, int(np.median(np.concatenate([pixels[0], pixels[-1]]))))
    frame.paste(Image.fromarray(pixels).resize((side, side), Image.Resampling.BICUBIC),
                ((width - side) // 2, (height - side) // 2))
    rgb = np.repeat(np.asarray(frame, dtype=np.int16)[..., None], 3, axis=2)
    rgb += np.random.default_rng(seed).integers(-6, 7, rgb.shape, dtype=np.int16)
    buffer = io.BytesIO()
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _mnist_models():
    from models import load_model, read_manifest

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

    from handlers.mnist import read_digit

    images, labels = heldout_digits(count=count)
    models = _mnist_models()
    samples = []
    for name in renderings:
        size, dark_on_light = {**DIGIT_RENDERINGS, **DIGIT_PHOTOS}[name]
        bodies = [phone_photo(image, dark_on_light, seed) if size == PHONE else render_digit(image, size, dark_on_light)
                  for seed, image in enumerate(images)]
        canonical = torch.from_numpy(np.stack([read_digit(b) for b in bodies])).unsqueeze(1)
        easy = np.ones(len(bodies), dtype=bool)
        with torch.inference_mode():
            for model, mean, std in models:
                probabilities = torch.softmax(model((canonical - mean) / std), dim=1)
                confidence, predicted = probabilities.max(dim=1)
                easy &= (predicted.numpy() == labels) & (confidence.numpy() >= MIN_CONFIDENCE)
        content_type = "image/jpeg" if size == PHONE else "image/png"
        samples += [Sample(name, body, content_type, str(label))
                    for body, label, keep in zip(bodies, labels, easy) if keep]
    return samples


@cache
def reviews(count=120):
    """Held-out reviews that the served sentiment archive (loaded in-process, its own handler code) labels
    correctly with probability >= MIN_CONFIDENCE."""
    import tempfile

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


FASHION_ARTIFACT = "artifacts/fashion"
FASHION_MIN_CONFIDENCE = 0.7
"""Lower than MIN_CONFIDENCE: trained with label smoothing 0.1, the model's top probability stays near 0.93."""
FASHION_RENDERINGS = {  # name: (size px, format, mode)
    "fashion-28px-png": (28, "PNG", "L"),  # the data set's own geometry
    "fashion-64px-jpeg-rgb": (64, "JPEG", "RGB"),
    "fashion-128px-png-rgb": (128, "PNG", "RGB"),
    "fashion-256px-jpeg": (256, "JPEG", "L"),
}
FASHION_PHOTOS = {"fashion-phone-jpeg": (PHONE, "JPEG", "RGB")}  # the photo mix (registry Load.photos)


def render_fashion(pixels, size=28, fmt="PNG", mode="L"):
    """A 28x28 Fashion-MNIST image as ``fmt`` bytes, upscaled (bicubic) to ``size`` px, in ``mode``."""
    import io

    from PIL import Image

    image = Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


@cache
def heldout_fashion(count=200):
    """(uint8 images [count, 28, 28], class names) of the first ``count`` Fashion-MNIST test images, found where
    training found them (artifacts/fashion's --data-dir, else Debian's package)."""
    from pathlib import Path

    from train.datasets import fashion_mnist
    from tests.samples import training_record

    data_dir = Path(training_record(FASHION_ARTIFACT)["args"]["data_dir"])
    test_set = fashion_mnist(data_dir if data_dir.is_absolute() else ROOT / data_dir, train=False)
    return test_set.data[:count].numpy(), [test_set.classes[int(y)] for y in test_set.targets[:count]]


@cache
def fashion(renderings=tuple(FASHION_RENDERINGS), count=80, confident_only=True):
    """Held-out Fashion-MNIST images in each rendering; with ``confident_only``, those that artifacts/fashion
    (in-process, through the handler's own decoding) labels right with FASHION_MIN_CONFIDENCE."""
    import numpy as np
    import torch

    from handlers.images import decode_fitted
    from models import load_model, read_manifest

    folder = ROOT / FASHION_ARTIFACT
    manifest = read_manifest(folder)
    spec = manifest["input"]
    model = load_model(folder, manifest)
    mean, std = (torch.tensor(spec[key]).view(1, -1, 1, 1) for key in ("mean", "std"))
    images, labels = heldout_fashion(count)
    samples = []
    for name in renderings:
        size, fmt, mode = {**FASHION_RENDERINGS, **FASHION_PHOTOS}[name]
        bodies = [phone_photo(image, seed=seed, fill=1.0) if size == PHONE else render_fashion(image, size, fmt, mode)
                  for seed, image in enumerate(images)]
        keep = np.ones(len(bodies), dtype=bool)
        if confident_only:
            pixels = np.stack([decode_fitted(b, spec["channels"], spec["size"], spec["resize"]) for b in bodies])
            batch = torch.from_numpy(pixels).reshape(len(bodies), spec["size"], spec["size"], -1).permute(0, 3, 1, 2)
            with torch.inference_mode():
                probabilities = torch.softmax(model((batch.float() / 255 - mean) / std), dim=1)
            confidence, predicted = probabilities.max(dim=1)
            keep = (np.array(manifest["labels"])[predicted.numpy()] == np.array(labels)) & (
                confidence.numpy() >= FASHION_MIN_CONFIDENCE)
        content_type = f"image/{fmt.lower()}"
        samples += [Sample(name, body, content_type, label) for body, label, ok in zip(bodies, labels, keep) if ok]
    return samples


def digit_photos():
    """The photo mix of mnist: held-out digits photographed on paper by a phone (``phone_photo``)."""
    return digits(tuple(DIGIT_PHOTOS), count=16)


def fashion_photos():
    """The photo mix of fashion: held-out items photographed by a phone (``phone_photo``)."""
    return fashion(tuple(FASHION_PHOTOS), count=16)


DETECTOR_ARTIFACT = "artifacts/detector"
DETECTOR_RENDERINGS = {  # name: (height, width, format)
    "composed-128px-png": (128, 128, "PNG"),  # the training geometry
    "composed-240x320-jpeg": (240, 320, "JPEG"),  # a larger photo of another aspect, resized by the handler
}


@cache
def detector(renderings=tuple(DETECTOR_RENDERINGS), count=16):
    """Held-out composed images (train/detector.py's held-out photos and Fashion-MNIST test items) in each rendering;
    the expected answer is the image's size and that at least one object is found (each holds 2 to 5)."""
    import io
    from pathlib import Path

    from PIL import Image

    from tests.samples import training_record
    from train.datasets import fashion_mnist
    from train.detector import HELDOUT_PHOTOS, ComposedImages, fashion_groups

    data_dir = Path(training_record(DETECTOR_ARTIFACT)["args"]["data_dir"])
    items = fashion_mnist(data_dir if data_dir.is_absolute() else ROOT / data_dir, train=False)
    samples = []
    for name, (height, width, fmt) in DETECTOR_RENDERINGS.items():
        if name not in renderings:
            continue
        scale = min(height, width) / 128  # objects as large, relative to the image, as in training
        images = ComposedImages(items.data.numpy(), fashion_groups()[items.targets.numpy()], HELDOUT_PHOTOS, count,
                                seed=1000 + height, size=(height, width), scale=(24 * scale, 64 * scale))
        for example in images:
            buffer = io.BytesIO()
            Image.fromarray(example.image).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            samples.append(Sample(name, buffer.getvalue(), f"image/{fmt.lower()}", {"width": width, "height": height}))
    return samples


def spread(samples, count):
    """``count`` of ``samples`` evenly spaced through the list, so that a batch has each rendering in proportion
    (the samples are grouped by rendering); repeats some when there are fewer than ``count``."""
    return [samples[index * len(samples) // count] for index in range(count)]


def of_model(entry):
    """The load-test payloads of a registry entry: its ``load.payloads``, else the samples of its default version."""
    if entry.load.payloads:
        import registry

        return registry.resolve(entry.load.payloads)()
    return [Sample(Path(sample.file).stem, (ROOT / sample.file).read_bytes(), sample.content_type, sample.label)
            for sample in entry.samples if sample.version is None]


def build_all():
    """{model: samples} for every model the registry load-tests."""
    import registry

    return {entry.name: of_model(entry) for entry in registry.MODELS if entry.load_tested}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write the load tests' payloads (with known answers) to a file.")
    parser.add_argument("--out", default="payloads.json")
    out = parser.parse_args().out
    built = build_all()
    save(out, built)
    print(f"{out}: " + ", ".join(f"{len(items)} for {model}" for model, items in built.items()))
