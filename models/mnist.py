"""Handwritten digits: the CNN and the MNIST-style canonicalisation that training and the handler both apply."""

import numpy as np
import torch
from PIL import Image
from torch import nn

CANVAS_SIZE = 28
DIGIT_BOX = 20
NORMALIZE = (0.1307, 0.3081)
"""(mean, std) applied to canonical images before the CNN: the classic MNIST pixel statistics."""

INK_THRESHOLD = 0.2
"""Fraction of the ink's intensity above which a pixel counts for the digit's bounding box."""

MIN_CONTRAST = 0.1
"""Least (max - min) intensity, as a fraction of the value range, for an image to hold a digit."""


class DigitCNN(nn.Module):
    """Two conv+pool blocks then two fully connected layers: 1x28x28 (normalised) -> 10 logits."""

    def __init__(self, width: int = 32, hidden: int = 128, num_classes: int = 10, dropout: float = 0.25):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(2 * width * 7 * 7, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


def _value_range(gray: np.ndarray, brightest: float) -> float:
    """Full scale of the pixel values: 1 for floats in [0, 1], 255 for 8-bit values, else the maximum."""
    if np.issubdtype(gray.dtype, np.floating) and brightest <= 1.0:
        return 1.0
    return 255.0 if brightest <= 255 else float(brightest)


def median_of_rows(values: np.ndarray) -> np.ndarray:
    """``np.median(values, axis=-1)``, the same values by a partial sort (np.median sorts a copy: 4x slower for one
    image's border, a third of ``models.vision.light_on_dark``'s time)."""
    middle = values.shape[-1] // 2
    if values.shape[-1] % 2:
        return np.partition(values, middle, axis=-1)[..., middle].astype(np.float64)
    return np.partition(values, (middle - 1, middle), axis=-1)[..., middle - 1 : middle + 1].mean(axis=-1)


def canonicalize_digit(gray: np.ndarray) -> np.ndarray:
    """Bring a grayscale digit image of any size, range and polarity to MNIST's canonical form.

    Returns a float32 28x28 array in [0, 1], white digit on black, made with MNIST's recipe:
    the ink's bounding box is scaled (aspect ratio kept, anti-aliased) to fit a 20x20 box, which
    is pasted into the 28x28 canvas so that the ink's centre of mass falls on pixel (14, 14).

    Polarity is read from the border: a light border (median above mid-grey) means dark ink on
    light paper, and the image is inverted. The border's level is taken as the background and
    the ink is rescaled from it to the ink's extreme, so photos of grey paper get a black background.

    Raises ValueError (with a message fit for a client) when the input is not a 2-D array or has
    no digit: a blank or uniform image (all background or all ink, a 1x1 image) or one whose
    contrast is below MIN_CONTRAST of its value range.
    """
    gray = np.asarray(gray)
    if gray.ndim != 2 or gray.size == 0:
        raise ValueError(f"expected a non-empty 2-D grayscale image, got an array of shape {gray.shape}")
    if not (np.issubdtype(gray.dtype, np.number) or gray.dtype == np.bool_):
        raise ValueError(f"expected numeric pixel values, got dtype {gray.dtype}")
    image = gray.astype(np.float32)
    darkest, brightest = float(image.min()), float(image.max())
    if not np.isfinite(darkest + brightest):
        raise ValueError("image contains NaN or infinite pixel values")
    contrast = brightest - darkest
    if contrast < MIN_CONTRAST * _value_range(gray, brightest):
        raise ValueError("no digit found: the image is blank or uniform (no contrast between ink and paper)")

    background = float(median_of_rows(np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])))
    if background > (darkest + brightest) / 2:  # dark ink on light paper
        ink_sign, ink_peak = -1.0, background - darkest
    else:
        ink_sign, ink_peak = 1.0, brightest - background
    ink = ink_sign * (image - background) > INK_THRESHOLD * ink_peak
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    crop = image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    digit = crop - background  # in place from here: the handler runs this per request
    digit *= ink_sign
    digit /= ink_peak
    np.clip(digit, 0.0, 1.0, out=digit)

    height, width = digit.shape
    scale = DIGIT_BOX / max(height, width)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = Image.frombuffer("F", (width, height), digit, "raw", "F", 0, 1).resize(new_size,
                                                                                   Image.Resampling.BILINEAR)
    digit = np.frombuffer(resized.tobytes(), dtype=np.float32).reshape(new_size[1], new_size[0])

    return _paste_centred_by_mass(digit)


def _paste_centred_by_mass(digit: np.ndarray) -> np.ndarray:
    """Paste digit into a black 28x28 canvas with its centre of mass on pixel (14, 14), kept inside."""
    height, width = digit.shape
    mass = float(digit.sum())
    if mass > 0:
        centre_row = float(digit.sum(axis=1) @ np.arange(height)) / mass
        centre_col = float(digit.sum(axis=0) @ np.arange(width)) / mass
    else:
        centre_row, centre_col = (height - 1) / 2, (width - 1) / 2
    half = CANVAS_SIZE // 2
    top = min(max(round(half - centre_row), 0), CANVAS_SIZE - height)
    left = min(max(round(half - centre_col), 0), CANVAS_SIZE - width)
    canvas = np.zeros((CANVAS_SIZE, CANVAS_SIZE), dtype=np.float32)
    canvas[top : top + height, left : left + width] = np.clip(digit, 0.0, 1.0)
    return canvas


ARCHITECTURES = {"DigitCNN": DigitCNN}
"""The constructors a manifest may name (``models.architecture``)."""


def export_example(manifest: dict, batch_size: int) -> dict:
    """What train/export.py traces and checks: normalised digits [N, 1, 28, 28] in, logits [N, 10] out."""
    size = manifest["input"]["size"]
    images = torch.randn(batch_size, 1, size, size, generator=torch.Generator().manual_seed(batch_size))
    return {"inputs": {"images": images}, "outputs": ["logits"]}
