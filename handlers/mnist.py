"""Handwritten digits: an image of one digit -> {"label", "probabilities" (top 3), "model", "version"}."""

import copy

import numpy as np
import torch
from torch import nn

from handlers.common import BundleHandler, RequestError, integrated_gradients
from handlers.images import decode_image, image_bytes, protocol_images
from handlers.runtimes import ChannelsLastInput, checked_copy
from models.mnist import CANVAS_SIZE, canonicalize_digit

MAX_IMAGES = 64
"""Images in one Open Inference Protocol request; more are refused with 413."""
DRAFT_SIZE = (8 * CANVAS_SIZE, 8 * CANVAS_SIZE)
"""A JPEG is decoded at the smallest DCT scale that keeps it at least 224 px a side: a phone photo (4032x3024) at
1/8, 504x378, 8x faster, where a digit a tenth of the frame high still spans 30 px, more than the 20 px box that
``canonicalize_digit`` scales it to."""


def read_digit(encoded):
    """The canonical 28x28 digit of an encoded image (``canonicalize_digit``'s ValueError when it holds none)."""
    return canonicalize_digit(decode_image(encoded, channels=1, draft_size=DRAFT_SIZE))


def inference_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """A copy of ``model`` for predictions: channels-last convolutions and in-place ReLUs, same weights.

    On CPU this runs a batch of 16 digits about 4x faster than the stored model: oneDNN convolutions and max
    pooling want channels-last tensors, and in-place activations skip allocating a fresh buffer per layer. The
    original model is kept for explanations (autograd needs its activations), and used for predictions too if the
    copy disagrees with it on a probe batch (``checked_copy``).
    """
    fast = copy.deepcopy(model).to(device, memory_format=torch.channels_last).eval()
    for module in fast.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = True
    probe = torch.randn(4, 1, CANVAS_SIZE, CANVAS_SIZE, generator=torch.Generator().manual_seed(0)).to(device)
    return checked_copy(model, fast, probe, f"channels-last copy of {type(model).__name__}")


class MnistHandler(BundleHandler):
    """Accepts raw image bytes (curl -T digit.png), a multipart form field, or JSON {"data": "<base64 image>"}."""

    def initialize(self, context):
        super().initialize(context)
        self.mean, self.std = self.artifact["input"]["mean"], self.artifact["input"]["std"]

    def eager_model(self):
        return ChannelsLastInput(inference_copy(self.model, self.device))

    def parse(self, payload, as_json):
        return [self._digit(image_bytes(payload, as_json))], False  # normalised in collate, for the whole batch

    def _digit(self, encoded):
        """The canonical 28x28 digit of one encoded image."""
        try:
            return read_digit(encoded)
        except ValueError as err:
            raise RequestError(str(err), kind="InvalidImage") from None

    def collate(self, examples):
        """Canonical 28x28 digits -> one normalised [N, 1, 28, 28] batch."""
        return torch.from_numpy(np.stack(examples)).unsqueeze(1).sub_(self.mean).div_(self.std)

    def output_rows(self, outputs):
        """Softmax and top 3 of the whole batch in two tensor ops: (top probabilities, their classes, every
        probability) per example."""
        probabilities = torch.softmax(outputs, dim=1)
        top = probabilities.topk(3, dim=1)
        return list(zip(top.values.tolist(), top.indices.tolist(), probabilities))

    def format(self, example, output):
        probabilities, classes, _ = output
        return self.top_k_reply(probabilities, classes, len(classes))

    oip_input = ("data", "BYTES")

    def oip_examples(self, tensor):
        return [self._digit(image) for image in protocol_images(tensor, MAX_IMAGES)]

    def oip_outputs(self, rows, replies):
        return {"label": np.array([reply["label"] for reply in replies], dtype=object),
                "probabilities": torch.stack([row[2] for row in rows]).numpy()}

    def explain(self, examples):
        """Integrated Gradients of the predicted class over the 28x28 canonical image (black as baseline)."""
        images = self.collate(examples).to(self.device)
        with torch.inference_mode():
            predicted = self.model(images).argmax(dim=1)
        baseline = torch.full_like(images, -self.mean / self.std)
        maps = integrated_gradients(self.model, images.clone(), predicted, baseline)
        return [{"label": self.labels[label], "attributions": attribution[0].numpy().round(5).tolist(),
                 "shape": [28, 28], "method": "IntegratedGradients", "model": self.model_name, "version": self.version}
                for label, attribution in zip(predicted.tolist(), maps)]
