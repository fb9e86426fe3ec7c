"""cyclegan: an image -> the same image translated to the other domain (models/cyclegan.py, docs/models/cyclegan.md).

Input: the raw image (curl -T item.png), a multipart field, or JSON ``{"data": "<base64 image>", "direction":
"a2b"}``. ``direction`` (``a2b``, the default, or ``b2a``) may also be a form field or a ``Direction`` header. Any
image Pillow reads is fitted to the model's input (the shorter side scaled, the centre cropped, grey or RGB) and,
where the manifest names each domain's polarity (the default model: items light on dark, drawings dark on light),
brought to the source domain's polarity whichever was sent; a blank or uniform image is a 400 ``InvalidImage``.

Reply: with ``Accept: image/png`` (or ``image/jpeg``, or ``image/*`` for PNG) the translated image itself, at the
model's size, with that Content-Type; otherwise JSON ``{"image": "<base64 PNG>", "format": "png", "direction",
"width", "height", "model", "version"}``. An Accept that names only image types other than these is a 406.

Open Inference Protocol (handlers/oip.py): input ``data``, BYTES [N], one encoded image per element, translated A->B;
output ``image``, UINT8 [N, H, W] (grey) or [N, H, W, 3].

No explanations: a generator's output is an image, not a class to attribute.
"""

import base64
import io

import numpy as np
import torch
from PIL import Image

from handlers.common import BinaryReply, BundleHandler, RequestError, quote
from handlers.images import decode_fitted, image_bytes, protocol_images
from handlers.vision import VisionHandler
from models.cyclegan import DIRECTIONS, to_model, to_pixels
from models.vision import LIGHT_ON_DARK, light_on_dark

IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/*": "PNG"}
"""Accept media types answered with the image itself, and the format each gets."""
PROTOCOL = "protocol"
"""The media type of an Open Inference Protocol example: its reply is the raw pixels (``oip_outputs``)."""
MAX_PROTOCOL_IMAGES = 64
"""Images in one Open Inference Protocol request; more are refused with 413."""


def accepted_image_type(accept):
    """The image media type an Accept header asks for first (``IMAGE_TYPES``), None for JSON; an Accept that names
    image types only, none of them ours, is a 406."""
    ranges = [part.split(";")[0].strip().lower() for part in (accept or "").split(",") if part.strip()]
    for media_range in ranges:
        if media_range in IMAGE_TYPES:
            return "image/png" if media_range == "image/*" else media_range
    if ranges and all(media_range.startswith("image/") for media_range in ranges):
        raise RequestError(f"cannot answer Accept {quote(accept)}: the translated image comes as image/png or "
                           "image/jpeg, or as JSON", code=406, kind="NotAcceptable")
    return None


def encoded(pixels, image_format):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format, **({"quality": 90} if image_format == "JPEG" else {}))
    return buffer.getvalue()


class CycleganHandler(BundleHandler):
    """Both generators, batched: each image goes through the one its direction names."""

    def initialize(self, context):
        super().initialize(context)
        spec = self.artifact["input"]
        self.size, self.channels = spec["size"], spec["channels"]
        self.polarity = spec.get("polarity") or {}

    # --- reading ---------------------------------------------------------------------------------------------------

    def parse_request(self, idx, row, name, payload, as_json):
        options = self.request_options(idx, row, name, payload, as_json, ("direction",))
        direction = options.get("direction", DIRECTIONS[0])
        if direction not in DIRECTIONS:
            raise RequestError(f"direction must be one of {', '.join(DIRECTIONS)}, got {quote(str(direction))}",
                               kind="InvalidField")
        media_type = accepted_image_type(self.request_header(idx, "accept"))
        return [self.example(image_bytes(payload, as_json), direction, media_type)], False

    def example(self, data, direction, media_type=None):
        """An encoded image -> {"pixels": uint8 at the model's size, "direction", "media_type": the reply's image
        type, None for JSON, ``PROTOCOL`` for the Open Inference Protocol}. Where the source domain has a polarity,
        a blank or uniform image is a 400 here, and ``collate`` brings the batch to each source's polarity."""
        pixels = decode_fitted(data, self.channels, self.size)
        if self.polarity.get(direction[0]) is not None:
            VisionHandler.require_item(pixels)
        return {"pixels": pixels, "direction": direction, "media_type": media_type}

    # --- predicting ------------------------------------------------------------------------------------------------

    def collate(self, examples):
        """(images [N, C, H, W] in [-1, 1], to_a [N] bool): what ``CycleGAN.forward`` and its exports take. Each
        image is in its source domain's polarity, by one ``light_on_dark`` for the images whose source has one."""
        pixels = np.stack([example["pixels"] for example in examples])
        sources = [self.polarity.get(example["direction"][0]) for example in examples]
        polar = [i for i, source in enumerate(sources) if source is not None]
        if polar:
            pixels[polar] = light_on_dark(pixels[polar])
            dark_on_light = [i for i in polar if sources[i] != LIGHT_ON_DARK]
            pixels[dark_on_light] = 255 - pixels[dark_on_light]
        return to_model(pixels), torch.tensor([example["direction"] == "b2a" for example in examples])

    def output_rows(self, outputs):
        return list(to_pixels(outputs))

    # --- replies ---------------------------------------------------------------------------------------------------

    def format(self, example, output):
        media_type = example["media_type"]
        if media_type == PROTOCOL:  # oip_outputs answers the pixels: nothing to encode
            return {"direction": example["direction"]}
        if media_type is not None:
            return BinaryReply(encoded(output, IMAGE_TYPES[media_type]), media_type, example["direction"])
        return {"image": base64.b64encode(encoded(output, "PNG")).decode("ascii"), "format": "png",
                "direction": example["direction"], "width": self.size, "height": self.size,
                "model": self.model_name, "version": self.version}

    def label_of(self, reply):
        """Replies are counted by direction."""
        return reply.label if isinstance(reply, BinaryReply) else reply["direction"]

    # --- the Open Inference Protocol -------------------------------------------------------------------------------

    oip_input = ("data", "BYTES")

    def oip_examples(self, tensor):
        return [self.example(image, DIRECTIONS[0], PROTOCOL) for image in protocol_images(tensor, MAX_PROTOCOL_IMAGES)]

    def oip_outputs(self, rows, replies):
        return {"image": np.stack(rows)}
