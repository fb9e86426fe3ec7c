"""Handwritten digits: the CNN and MNIST-style canonicalisation shared by training, and the TorchServe handler."""

import base64
import copy
import io
import logging

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from handlers.common import BundleHandler, RequestError, entry_point, integrated_gradients

logger = logging.getLogger(__name__)

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

    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])
    background = float(np.median(border))
    if background > (darkest + brightest) / 2:  # dark ink on light paper
        ink_sign, ink_peak = -1.0, background - darkest
    else:
        ink_sign, ink_peak = 1.0, brightest - background
    ink = ink_sign * (image - background) > INK_THRESHOLD * ink_peak
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    crop = image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    digit = np.clip(ink_sign * (crop - background) / ink_peak, 0.0, 1.0)

    height, width = digit.shape
    scale = DIGIT_BOX / max(height, width)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    digit = np.asarray(Image.fromarray(digit, mode="F").resize(new_size, Image.Resampling.BILINEAR))

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


# --- TorchServe handler ----------------------------------------------------------------------------------------------

MAX_IMAGE_PIXELS = 25_000_000
"""Larger images (e.g. decompression bombs) are refused with 413 before they are decoded."""


def decode_grayscale(data: bytes) -> np.ndarray:
    """PNG/JPEG/... bytes -> 2-D uint8 array; transparent pixels count as white paper."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise RequestError(f"image of {image.width}x{image.height} pixels is larger than "
                                   f"{MAX_IMAGE_PIXELS} pixels", code=413, kind="ImageTooLarge")
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
            elif image.mode not in ("L", "RGB"):
                image = image.convert("RGB")
            if image.mode != "L":
                image.draft("L", image.size)  # JPEG: decode the luma channel only
                image = image.convert("L")
            # One copy of the pixels: np.asarray(image) reads Image.__array_interface__ twice, each a full tobytes().
            return np.frombuffer(image.tobytes(), dtype=np.uint8).reshape(image.height, image.width)
    except RequestError:
        raise
    except Image.DecompressionBombError as err:  # Pillow refuses before we can read the size
        raise RequestError(f"image refused as too large: {err}", code=413, kind="ImageTooLarge") from None
    except UnidentifiedImageError:
        raise RequestError("the body is not an image in a format Pillow reads (PNG, JPEG, GIF, BMP, TIFF, WebP, ...)",
                           kind="InvalidImage") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise RequestError(f"the image could not be decoded: {err}", kind="InvalidImage") from None


def inference_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """A copy of ``model`` for predictions: channels-last convolutions and in-place ReLUs, same weights.

    On CPU this runs a batch of 16 digits about 4x faster than the stored model: oneDNN convolutions and max
    pooling want channels-last tensors (torch's NCHW max_pool2d is the single slowest op of the plain model), and
    in-place activations skip allocating a fresh multi-MB buffer per layer. The original model is kept for
    explanations (autograd needs its activations). If the copy disagrees with the original on a probe batch beyond
    float rounding (a future architecture it does not suit), the original is used.
    """
    fast = copy.deepcopy(model).to(device, memory_format=torch.channels_last).eval()
    for module in fast.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = True
    probe = torch.randn(4, 1, CANVAS_SIZE, CANVAS_SIZE, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        expected = model(probe)
        got = fast(probe.contiguous(memory_format=torch.channels_last))
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
        logger.warning("channels-last copy of %s disagrees with it (max diff %.2g); predicting with the original",
                       type(model).__name__, float((got - expected).abs().max()))
        return model
    return fast


class MnistHandler(BundleHandler):
    """An image of one handwritten digit -> {"label", "probabilities" (top 3), "model", "version"}.

    Accepts raw image bytes (curl -T digit.png), a multipart form field, or JSON {"data": "<base64 image>"}.
    """

    model_class = DigitCNN

    def initialize(self, context):
        super().initialize(context)
        self.mean, self.std = self.artifact["input"]["mean"], self.artifact["input"]["std"]
        self.inference_model = inference_copy(self.model, self.device)

    def parse(self, payload, as_json):
        if as_json and isinstance(payload, dict):
            payload = self._base64_image(payload)
        elif as_json or not isinstance(payload, (bytes, bytearray)):
            raise RequestError('expected image bytes or JSON {"data": "<base64 image>"}, '
                               f"got JSON {type(payload).__name__}", kind="InvalidInput")
        try:
            digit = canonicalize_digit(decode_grayscale(payload))
        except ValueError as err:
            raise RequestError(str(err), kind="InvalidImage") from None
        return [digit], False  # normalised in collate, for the whole batch at once

    @staticmethod
    def _base64_image(document):
        encoded = document.get("data")
        if not isinstance(encoded, str):
            raise RequestError('JSON body must be {"data": "<base64-encoded image>"}: '
                               f"field 'data' is {'missing' if encoded is None else type(encoded).__name__}",
                               kind="InvalidField")
        try:
            return base64.b64decode(encoded, validate=True)
        except ValueError as err:  # binascii.Error, or non-ASCII characters
            raise RequestError(f"field 'data' is not valid base64: {err}", kind="InvalidField") from None

    def collate(self, examples):
        """Canonical 28x28 digits -> one normalised [N, 1, 28, 28] batch."""
        return torch.from_numpy(np.stack(examples)).unsqueeze(1).sub_(self.mean).div_(self.std)

    def predict(self, batch):
        with torch.inference_mode():
            return self.inference_model(batch.to(self.device).contiguous(memory_format=torch.channels_last)).cpu()

    def output_rows(self, outputs):
        """Softmax and top 3 of the whole batch in two tensor ops: one (probabilities, classes) pair per example."""
        top = torch.softmax(outputs, dim=1).topk(3, dim=1)
        return list(zip(top.values.tolist(), top.indices.tolist()))

    def format(self, example, output):
        probabilities, classes = output
        return {"label": self.labels[classes[0]],
                "probabilities": {self.labels[i]: round(p, 4) for p, i in zip(probabilities, classes)},
                "model": self.model_name, "version": self.version}

    def explanations(self, examples):
        """Integrated Gradients of the predicted class over the 28x28 canonical image (black as baseline)."""
        images = self.collate(examples).to(self.device)
        with torch.inference_mode():
            predicted = self.model(images).argmax(dim=1)
        baseline = torch.full_like(images, -self.mean / self.std)
        maps = integrated_gradients(self.model, images.clone(), predicted, baseline)
        return [{"label": self.labels[label], "attributions": attribution[0].numpy().round(5).tolist(),
                 "shape": [28, 28], "method": "IntegratedGradients", "model": self.model_name, "version": self.version}
                for label, attribution in zip(predicted.tolist(), maps)]


handle = entry_point(MnistHandler)
