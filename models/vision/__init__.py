"""The course's image classifiers (chapter 6), one module per family, in the style of kuangliu/pytorch-cifar.

Every constructor takes ``in_channels`` and ``num_classes`` (from the data), accepts any input size (global
average pooling before the classifier) and exposes ``cam_layer``: the module whose output is the last convolutional
feature map, which the handler's Grad-CAM explanations attribute to.

Grey items on a plain background (Fashion-MNIST) are read in either polarity: training and the handler both bring
images to light-on-dark with ``light_on_dark`` when the manifest's input says ``"polarity": "light-on-dark"``.
"""

import numpy as np
import torch

from models.mnist import median_of_rows

LIGHT_ON_DARK = "light-on-dark"
"""The manifest's ``input.polarity`` of a model trained and served on ``light_on_dark`` images."""

MIN_CONTRAST = 0.1
"""Least (max - min) intensity, as a fraction of 255, of an image holding an item. Every Fashion-MNIST image has
at least 254 of 255; below a tenth an image is blank or uniform (a 1x1 image too) and is refused."""

STRETCH_TO = 224
"""The contrast (of 255) that a fainter image's levels are stretched to. Items on grey paper or faint ones read as well
as the data set's own (0.92 of Fashion-MNIST test items at contrast 38, against 0.75 unstretched); stretching all the
way to 255 cost 0.1-0.25 points on upscaled re-encodes, where resampling dims thin highlights to about 200."""


def light_background(images: np.ndarray, darkest: np.ndarray, lightest: np.ndarray) -> np.ndarray:
    """Whether each grey image [..., H, W], of extremes ``darkest`` and ``lightest`` [...], is dark on light: the
    median of its border is above its mid-range (the rule models/mnist.py reads digits' polarity by)."""
    border = np.concatenate([images[..., 0, :], images[..., -1, :], images[..., 1:-1, 0], images[..., 1:-1, -1]],
                            axis=-1)
    return median_of_rows(border) > (darkest + lightest) / 2


def require_contrast(contrast: float) -> None:
    """Raise ValueError, with a message fit for a client, when an image's contrast (its lightest level less its
    darkest, of 255) is below MIN_CONTRAST: it is blank or uniform, with no item to read and no polarity to read
    it in."""
    if contrast < MIN_CONTRAST * 255:
        raise ValueError(f"no item found: the image is blank or uniform (contrast {int(contrast)} of 255 "
                         f"between its darkest and lightest pixels; at least {MIN_CONTRAST * 255:.0f} needed)")


def light_on_dark(images: np.ndarray) -> np.ndarray:
    """uint8 grey images [..., H, W] as light items on black, as Fashion-MNIST stores them: each image's darkest
    level is taken to black (its lightest, if it is dark on light, which is inverted) and a contrast below
    STRETCH_TO is stretched to it. Fashion-MNIST's own images come back unchanged, in either polarity.

    Raises ``require_contrast``'s ValueError when an image is blank or uniform. One call for a batch costs about
    a fifth as much per image as one call per image (a few dozen small NumPy calls either way).
    """
    darkest = images.min(axis=(-2, -1), keepdims=True).astype(np.float32)
    lightest = images.max(axis=(-2, -1), keepdims=True)
    contrast = lightest - darkest
    require_contrast(contrast.min())
    span = np.maximum(contrast, STRETCH_TO)
    levels = (images - darkest) * (span / contrast)
    invert = light_background(images, darkest[..., 0, 0], lightest[..., 0, 0])[..., None, None]
    return np.rint(np.where(invert, span - levels, levels)).astype(np.uint8)


def export_example(manifest: dict, batch_size: int) -> dict:
    """What train/export.py traces and checks (every family's module re-exports it): normalised images
    [N, C, size, size] in, logits [N, classes] out."""
    size, channels = manifest["input"]["size"], manifest["input"]["channels"]
    images = torch.randn(batch_size, channels, size, size, generator=torch.Generator().manual_seed(batch_size))
    return {"inputs": {"images": images}, "outputs": ["logits"]}
