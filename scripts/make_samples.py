"""Write the digits', reviews' and patients' files of samples/: held-out payloads for the README's curl lines
(`python -m scripts.make_samples`). The detector's come from `python -m train.detector --samples samples`; the
fashion, translator and cyclegan samples are committed as they are."""

import io
import json

import numpy as np
from PIL import Image, ImageFilter

from scripts.server import ROOT
from tests.samples import CROSS_DOMAIN_REVIEWS, heldout_digits, heldout_patients, render_digit

SAMPLES = ROOT / "samples"


def first_heldout(label):
    images, labels = heldout_digits(count=360)
    return images[list(labels).index(label)]


def photo_of(image, size=400):
    """A dark digit on grey, noisy, slightly blurred paper: what a phone photo of a handwritten digit looks like."""
    ink = np.asarray(Image.open(io.BytesIO(render_digit(image, size, dark_on_light=True))), np.float32)
    paper = 0.75 * ink + 50 + np.random.default_rng(0).normal(0, 8, ink.shape)
    photo = Image.fromarray(np.clip(paper, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(2))
    return photo.convert("RGB")


def main():
    SAMPLES.mkdir(exist_ok=True)
    (SAMPLES / "digit_7.png").write_bytes(render_digit(first_heldout(7), size=112))
    photo_of(first_heldout(3)).save(SAMPLES / "digit_3_photo.jpg", quality=85)
    positive, negative = (next(text for text, label in CROSS_DOMAIN_REVIEWS if label == wanted)
                          for wanted in ("positive", "negative"))
    (SAMPLES / "review_positive.txt").write_text(positive + "\n", encoding="utf-8")
    (SAMPLES / "review_negative.txt").write_text(negative + "\n", encoding="utf-8")
    (SAMPLES / "reviews.json").write_text(json.dumps([text for text, _ in CROSS_DOMAIN_REVIEWS], ensure_ascii=False,
                                                     indent=1) + "\n", encoding="utf-8")
    rows, _ = heldout_patients(count=3)
    (SAMPLES / "patient.json").write_text(json.dumps(rows[0], indent=1) + "\n")
    (SAMPLES / "patients.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("wrote", ", ".join(sorted(p.name for p in SAMPLES.iterdir())))


if __name__ == "__main__":
    main()
