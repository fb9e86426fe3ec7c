"""Image I/O for every image model: the encoded image of a request, decoded with size limits to the model's mode."""

import base64
import io

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from handlers.common import RequestError, bounded_list

MAX_IMAGE_PIXELS = 25_000_000
"""Larger images (e.g. decompression bombs) are refused with 413 before they are decoded."""


def image_bytes(payload, as_json):
    """The encoded image of a request: the raw body or a multipart field, or JSON ``{"data": "<base64>"}``."""
    if as_json and isinstance(payload, dict):
        encoded = payload.get("data")
        if not isinstance(encoded, str):
            raise RequestError('JSON body must be {"data": "<base64-encoded image>"}: '
                               f"field 'data' is {'missing' if encoded is None else type(encoded).__name__}",
                               kind="InvalidField")
        try:
            return base64.b64decode(encoded, validate=True)
        except ValueError as err:  # binascii.Error, or non-ASCII characters
            raise RequestError(f"field 'data' is not valid base64: {err}", kind="InvalidField") from None
    if as_json or not isinstance(payload, (bytes, bytearray)):
        raise RequestError('expected image bytes or JSON {"data": "<base64 image>"}, '
                           f"got JSON {type(payload).__name__}", kind="InvalidInput")
    return payload


def protocol_images(tensor, limit):
    """The encoded images of an Open Inference Protocol BYTES input: raw bytes (binary form) or base64 strings
    (JSON form), at most ``limit`` of them (every image model's ``oip_examples`` starts here)."""
    return [image if isinstance(image, bytes) else image_bytes({"data": image}, as_json=True)
            for image in bounded_list(tensor.data, limit, "images")]


def decode_image(data, channels, max_pixels=MAX_IMAGE_PIXELS):
    """Image bytes in any format and mode Pillow reads -> uint8 array [H, W] (channels=1) or [H, W, 3].

    Upright by its EXIF orientation; transparent pixels count as white paper.
    """
    mode = {1: "L", 3: "RGB"}[channels]
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > max_pixels:
                raise RequestError(f"image of {image.width}x{image.height} pixels is larger than "
                                   f"{max_pixels} pixels", code=413, kind="ImageTooLarge")
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
            elif mode == "L" and image.mode != "L":
                image.draft("L", image.size)  # JPEG: decode the luma channel only
            if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
                image = ImageOps.exif_transpose(image)
            if image.mode != mode:
                image = image.convert(mode)
            # One copy of the pixels: np.asarray(image) reads Image.__array_interface__ twice, each a full tobytes().
            shape = (image.height, image.width) if channels == 1 else (image.height, image.width, channels)
            return np.frombuffer(image.tobytes(), dtype=np.uint8).reshape(shape)
    except RequestError:
        raise
    except Image.DecompressionBombError as err:  # Pillow refuses before we can read the size
        raise RequestError(f"image refused as too large: {err}", code=413, kind="ImageTooLarge") from None
    except UnidentifiedImageError:
        raise RequestError("the body is not an image in a format Pillow reads (PNG, JPEG, GIF, BMP, TIFF, WebP, ...)",
                           kind="InvalidImage") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise RequestError(f"the image could not be decoded: {err}", kind="InvalidImage") from None
