"""Image classification: any image -> {"label", "probabilities" (top k), "model", "version"}.

Any format, mode and size Pillow reads is brought to the model's input as the artifact manifest describes it
(``input``: channels, size, resize, crop, mean, std, polarity): grey or RGB, the shorter side scaled to ``resize``,
the centre ``size`` x ``size`` crop; with ``polarity: light-on-dark`` (Fashion-MNIST) light items on a dark
background, as in training, whichever polarity was sent, and a blank or uniform image is refused (400 InvalidImage).
Requests: the raw body (curl -T photo.jpg), a multipart field, or JSON ``{"data": "<base64 image>", "k": 5}``;
``k`` (top classes in the reply) defaults to ``handler.top_k``.

On CUDA (TorchServe's ``gpu_id``) a batch travels as uint8 through pinned memory with a non-blocking copy and is
normalised on the GPU; the model runs channels-last with batch norms folded into the convolutions, under autocast
when ``handler.amp`` (bf16 or fp16) is set.
"""

import numpy as np
import torch
from torch.fx.experimental.optimization import fuse

from handlers.common import BundleHandler, RequestError, quote
from handlers.images import decode_fitted, image_bytes, protocol_images
from handlers.runtimes import checked_copy
from models.vision import LIGHT_ON_DARK, light_on_dark, require_contrast

DEFAULT_TOP_K = 3
MAX_PROTOCOL_IMAGES = 64
"""Images in one Open Inference Protocol request; more are refused with 413."""


class VisionHandler(BundleHandler):
    """Top-k labels for any image, batched; Grad-CAM explanations at the model's input size."""

    def initialize(self, context):
        super().initialize(context)
        options = self.model_config.get("handler") or {}
        self.max_top_k = min(int(options.get("max_top_k", len(self.labels))), len(self.labels))
        self.top_k = min(int(options.get("top_k", DEFAULT_TOP_K)), self.max_top_k)

    def read_input_spec(self):
        """The manifest's input: crop, polarity, channels, sizes, normalisation (what requests are fitted to)."""
        spec = self.artifact["input"]
        if spec.get("crop", "center") != "center":
            raise RuntimeError(f"{self.model_name}: input crop {spec['crop']!r} is not supported (only 'center')")
        if spec.get("polarity") not in (None, LIGHT_ON_DARK):
            raise RuntimeError(f"{self.model_name}: input polarity {spec['polarity']!r} is not supported "
                               f"(only {LIGHT_ON_DARK!r})")
        self.light_on_dark = spec.get("polarity") == LIGHT_ON_DARK
        self.channels, self.size, self.resize = spec["channels"], spec["size"], spec.get("resize", spec["size"])
        self.mean = torch.tensor(spec["mean"], device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(spec["std"], device=self.device).view(1, -1, 1, 1)

    def load_model(self):
        """The stored model, channels-last: oneDNN and cuDNN convolutions run fastest on NHWC tensors."""
        self.read_input_spec()
        return super().load_model().to(memory_format=torch.channels_last)

    def eager_model(self):
        """What ``handler.runtime: eager`` predicts with: the fused copy."""
        return self.fused_copy()

    def fused_copy(self):
        """The model with each batch norm folded into its convolution (torch.fx), for predictions: 1.5x faster
        on a CPU for the small ResNet. Explanations keep the original (Grad-CAM hooks its ``cam_layer``); so do
        predictions if the copy disagrees with it on a probe batch (``checked_copy``)."""
        fused = fuse(self.model).to(memory_format=torch.channels_last)
        probe = torch.rand(2, self.channels, self.size, self.size, generator=torch.Generator().manual_seed(0))
        probe = self.model_input((probe * 255).to(torch.uint8))
        return checked_copy(self.model, fused, probe, f"fused copy of {self.artifact['architecture']}")

    # --- hooks -----------------------------------------------------------------------------------------------------

    def parse(self, payload, as_json):
        k = self.requested_k(payload) if as_json and isinstance(payload, dict) else self.top_k
        return [(self.fitted(image_bytes(payload, as_json)), k)], False

    def fitted(self, encoded):
        """An encoded image fitted to the model's input size and crop, as uint8 pixels. A model that reads light
        items on dark refuses a blank or uniform image here (400), and ``collate`` sets the batch's polarity."""
        pixels = decode_fitted(encoded, self.channels, self.size, self.resize)
        if self.light_on_dark:
            self.require_item(pixels)
        return pixels

    @staticmethod
    def require_item(pixels):
        """A 400 InvalidImage for fitted grey pixels that are blank or uniform (``light_on_dark`` refuses them)."""
        try:
            require_contrast(int(pixels.max()) - int(pixels.min()))
        except ValueError as err:
            raise RequestError(str(err), kind="InvalidImage") from None

    oip_input, oip_output_names = ("data", "BYTES"), ("label",)

    def oip_examples(self, tensor):
        """Each encoded image of the protocol's BYTES input, fitted as ``parse`` fits a body (the default k)."""
        return [(self.fitted(image), self.top_k) for image in protocol_images(tensor, MAX_PROTOCOL_IMAGES)]

    def requested_k(self, document):
        k = document.get("k", self.top_k)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.max_top_k:
            raise RequestError(f"field 'k' must be an integer from 1 to {self.max_top_k}, got {quote(str(k))}",
                               kind="InvalidField")
        return k

    def collate(self, examples):
        """uint8 [N, C, H, W] (channels-last in memory), light on dark where the model reads that polarity (one
        ``light_on_dark`` for the batch, a fifth of the cost of one per image), pinned when it goes to a GPU."""
        images = np.stack([pixels for pixels, _ in examples])
        stacked = torch.from_numpy(light_on_dark(images) if self.light_on_dark else images)
        batch = stacked.unsqueeze(1) if self.channels == 1 else stacked.permute(0, 3, 1, 2)
        return batch.pin_memory() if self.device.type == "cuda" else batch

    def model_input(self, batch):
        """A collated uint8 batch on the device, normalised, channels-last."""
        images = batch.to(self.device, non_blocking=True).float().div_(255).sub_(self.mean).div_(self.std)
        return images.contiguous(memory_format=torch.channels_last)

    def predict(self, batch):
        """Logits of the normalised batch from the configured runtime (handlers/runtimes.py)."""
        with torch.inference_mode(), self.autocast():
            return self.runtime(self.model_input(batch)).float()

    def output_rows(self, outputs):
        """Softmax and the classes by probability for the whole batch at once: (probabilities, classes) per row."""
        top = torch.softmax(outputs, dim=1).topk(self.max_top_k, dim=1)
        return list(zip(top.values.tolist(), top.indices.tolist()))

    def format(self, example, output):
        _, k = example
        probabilities, classes = output
        return self.top_k_reply(probabilities, classes, k)

    def explain(self, examples):
        """Grad-CAM (captum's LayerGradCam) of the predicted class on the model's last convolutional feature map
        (``cam_layer``), upsampled to the input size: one backward pass per image, where Integrated Gradients
        needs dozens, and a class-specific map of where the evidence is, rather than per-pixel noise."""
        from captum.attr import LayerAttribution, LayerGradCam

        images = self.model_input(self.collate(examples))
        with torch.inference_mode():
            predicted = self.model(images).argmax(dim=1)
        with torch.enable_grad():
            maps = LayerGradCam(self.model, self.model.cam_layer).attribute(
                images.clone().requires_grad_(), target=predicted, relu_attributions=True)
        maps = LayerAttribution.interpolate(maps.detach(), (self.size, self.size), interpolate_mode="bilinear")
        maps = maps / maps.flatten(1).amax(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)  # each map's peak at 1
        return [{"label": self.labels[label], "attributions": attribution[0].cpu().numpy().round(4).tolist(),
                 "shape": [self.size, self.size], "method": "LayerGradCam", "model": self.model_name,
                 "version": self.version} for label, attribution in zip(predicted.tolist(), maps)]

    def describe_handle(self):
        return {**super().describe_handle(), "input": self.artifact["input"],
                "amp": None if self.amp is None else str(self.amp).removeprefix("torch.")}
