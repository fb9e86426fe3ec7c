"""Image I/O for every image model: the encoded image of a request, decoded with size limits to the model's mode
and, for the vision models, resized and cropped to the model's input."""

import base64
import io
from contextlib import contextmanager

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


def decode_image(data, channels, max_pixels=MAX_IMAGE_PIXELS, draft_size=None):
    """Image bytes in any format and mode Pillow reads -> uint8 array [H, W] (channels=1) or [H, W, 3].

    Upright by its EXIF orientation; transparent pixels count as white paper. ``draft_size``: a JPEG may be decoded
    at a reduced DCT scale (1/2 to 1/8) that still covers it.
    """
    with opened_image(data, channels, max_pixels, draft_size) as image:
        return pixels_of(image, channels)


def decode_fitted(data, channels, size, resize=None, max_pixels=MAX_IMAGE_PIXELS):
    """Image bytes -> uint8 array [size, size] (channels=1) or [size, size, 3], as torchvision's
    ``Resize(resize)`` + ``CenterCrop(size)`` would make it: the shorter side scaled to ``resize`` (default
    ``size``), the centre ``size`` x ``size`` kept, in one resampling of the source.

    Lanczos, not bilinear: an image upscaled from the training resolution comes back nearly as it was (bilinear's
    wider blur cost 2-3 points of Fashion-MNIST accuracy on 64-256 px re-encodes). JPEGs are decoded at the
    smallest DCT scale that is still twice the target (``Image.draft``), so a large photo costs about as much as a
    small one.
    """
    resize = resize or size
    with opened_image(data, channels, max_pixels, draft_size=(2 * resize, 2 * resize)) as image:
        scale = resize / min(image.width, image.height)
        side = size / scale  # the crop's side in source pixels
        left, top = (image.width - side) / 2, (image.height - side) / 2
        image = image.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side),
                             reducing_gap=3.0)
        return pixels_of(image, channels)


def pixels_of(image, channels):
    """A decoded image's pixels as uint8 [H, W] or [H, W, channels], in one copy (np.asarray(image) reads
    Image.__array_interface__ twice, each a full tobytes())."""
    shape = (image.height, image.width) if channels == 1 else (image.height, image.width, channels)
    return np.frombuffer(image.tobytes(), dtype=np.uint8).reshape(shape)


@contextmanager
def opened_image(data, channels, max_pixels=MAX_IMAGE_PIXELS, draft_size=None):
    """The decoded image of ``data`` in mode "L" (channels=1) or "RGB", upright by its EXIF orientation,
    transparent pixels composited on white; any problem with the image is a ``RequestError`` (413 when too large).

    ``draft_size``: JPEGs may be decoded at a reduced DCT scale that still covers it (default: full size).
    """
    mode = {1: "L", 3: "RGB"}[channels]
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > max_pixels:
                raise RequestError(f"image of {image.width}x{image.height} pixels is larger than "
                                   f"{max_pixels} pixels", code=413, kind="ImageTooLarge")
            transparent = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
            if not transparent and (draft_size or (mode == "L" and image.mode != "L")):
                image.draft(mode, draft_size or image.size)  # JPEG: the luma channel only, or a smaller scale
            if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # before compositing, which drops the tag
                image = ImageOps.exif_transpose(image)
            if transparent:
                image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
            if image.mode != mode:
                image = image.convert(mode)
            yield image
    except RequestError:
        raise
    except Image.DecompressionBombError as err:  # Pillow refuses before we can read the size
        raise RequestError(f"image refused as too large: {err}", code=413, kind="ImageTooLarge") from None
    except UnidentifiedImageError:
        raise RequestError("the body is not an image in a format Pillow reads (PNG, JPEG, GIF, BMP, TIFF, WebP, ...)",
                           kind="InvalidImage") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise RequestError(f"the image could not be decoded: {err}", kind="InvalidImage") from None
