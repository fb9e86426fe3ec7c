"""Object detection with instance masks: an image of any size -> its objects, in the client's pixel coordinates.

Reply per image: ``{"detections": [{"label", "score", "box": [x1, y1, x2, y2], "mask"}], "image_size": {"width",
"height"}, "model", "version"}``, the mask as COCO RLE (``{"size": [h, w], "counts"}``, pycocotools'
``mask.decode`` reads it) or, with ``mask_format=polygons``, as COCO polygons ``[[x1, y1, x2, y2, ...], ...]``.
``output=semantic`` answers a PNG label map at the image's size instead (one class index per pixel, 0 for the
background, base64) with its legend.

Options: ``score_threshold``, ``max_detections`` (defaults and bounds under ``handler:`` in detector.yaml),
``mask_format`` (rle | polygons), ``output`` (instances | semantic); next to ``data`` in a JSON body, as form fields,
or as headers (``Score-Threshold``, ``Max-Detections``, ``Mask-Format``, ``Output``). TorchServe 0.12 does not pass
the query string to the handler.

Open Inference Protocol (handlers/oip.py): input ``data``, BYTES [N], one encoded image per element, with the default
options (``oip_examples``); outputs ``detections`` BYTES [N], each the plain reply of its image as JSON text, and the
same detections as tensors padded to the request's ``max_detections`` K, as TensorRT's and TensorFlow's detection
models answer on Triton (``num_detections`` and padded boxes, scores, classes): ``count`` INT64 [N], ``boxes`` FP32
[N, K, 4], ``scores`` FP32 [N, K], ``labels`` BYTES [N, K] (``oip_outputs``).
"""

import base64
import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image
from skimage.measure import approximate_polygon, find_contours  # at load: 50 MB the first polygon would add
from ts.metrics.metric_type_enum import MetricTypes

from handlers.common import (BundleHandler, RequestError, compact_json, declared_metric, decode_text, finite_number,
                             quote)
from handlers.images import image_bytes, opened_image, pixels_of, protocol_images
from models.detector import OUTPUTS as EXPORT_OUTPUTS, encode_mask, working_size

OUTPUTS = ("instances", "semantic")
MASK_FORMATS = ("rle", "polygons")
NUMERIC_OPTIONS = {"score_threshold": float, "max_detections": int}
DEFAULT_BOUNDS = {"score_threshold": {"default": 0.5, "min": 0.0, "max": 1.0},
                  "max_detections": {"default": 20, "min": 1, "max": 100}}
OPTIONS = (*NUMERIC_OPTIONS, "output", "mask_format")
"""Options a request may set: JSON or form fields, or headers for a raw body (-H 'Max-Detections: 5')."""
POLYGON_TOLERANCE = 1.0
"""Pixels a simplified polygon may stray from the mask's outline."""


DEFAULT_MAX_MASK_PIXELS = 100_000_000
"""Masks x image pixels one request may ask for (``handler.max_mask_pixels``): each mask is encoded at the
image's size, so this bounds the mask stage's work whatever the image and ``max_detections``."""
LARGE_IMAGE_PIXELS = 4_000_000
"""Images above this size leave the heap trimmed after their batch (``BundleHandler.large_batch``): their decoding
and full-size masks take tens of MB that glibc would otherwise keep."""
MAX_PROTOCOL_IMAGES = 16
"""Images in one Open Inference Protocol request; more are refused with 413 (each is a forward pass and its masks:
16 are four of the CPU profile's batches)."""


def upright_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of an encoded image as shown (EXIF orientation applied), from its header alone; None when
    Pillow cannot read it (``opened_image`` then says why)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):  # a quarter turn
                width, height = height, width
            return height, width
    except Exception:  # whatever Pillow raises for a bad header is reported by opened_image
        return None


def mask_polygons(mask: np.ndarray, top: int = 0, left: int = 0) -> list[list[float]]:
    """A binary mask's outlines as COCO polygons (x, y pairs, pixel-edge coordinates), simplified by
    ``POLYGON_TOLERANCE``; parts of fewer than three points are left out. ``mask`` may be a crop whose first pixel
    is at (``top``, ``left``) of the image."""
    padded = np.pad(mask, 1)  # outlines close around parts touching the border
    polygons = []
    for contour in find_contours(padded.astype(np.float32), 0.5):
        points = approximate_polygon(contour, POLYGON_TOLERANCE) - 1 + 0.5  # row/col of pixel centres -> edges
        if len(points) >= 4:  # closed: the first point repeats
            polygons.append([round(float(v), 1) for row, col in points for v in (col + left, row + top)])
    return polygons


def mask_crop(mask: torch.Tensor, height: int, width: int):
    """A mask probability map [1, h, w] at the model's size -> (top, left, binary crop) at the image's size
    ``height`` x ``width``, or None when no pixel is in it.

    The same pixels as bilinearly upsampling the whole map (align_corners=False) and keeping those over 0.5, computed
    only where they can be: an upsampled pixel over 0.5 has a source neighbour over 0.5, so the crop covers the
    source rows and columns that have one, plus one on each side. Its cost is the mask's area, not the image's."""
    probabilities = mask[0].float()
    rows = torch.nonzero((probabilities > 0.5).any(dim=1)).flatten()
    cols = torch.nonzero((probabilities > 0.5).any(dim=0)).flatten()
    if not len(rows):
        return None
    source_height, source_width = probabilities.shape
    if (source_height, source_width) == (height, width):
        top, left = int(rows[0]), int(cols[0])
        return top, left, (probabilities[top : int(rows[-1]) + 1, left : int(cols[-1]) + 1] > 0.5).numpy()

    def span(first, last, source, target):
        # target pixel i samples source coordinate (i + 0.5) * source / target - 0.5
        scale = target / source
        return max(0, int((first - 0.5) * scale - 0.5)), min(target, int((last + 2.5) * scale + 0.5) + 1)

    top, bottom = span(int(rows[0]), int(rows[-1]), source_height, height)
    left, right = span(int(cols[0]), int(cols[-1]), source_width, width)
    ys = ((torch.arange(top, bottom) + 0.5) * (source_height / height) - 0.5) * 2 / (source_height - 1) - 1 \
        if source_height > 1 else torch.zeros(bottom - top)
    xs = ((torch.arange(left, right) + 0.5) * (source_width / width) - 0.5) * 2 / (source_width - 1) - 1 \
        if source_width > 1 else torch.zeros(right - left)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None].float()  # [1, rows, cols, (x, y)]
    crop = F.grid_sample(probabilities[None, None], grid, mode="bilinear", padding_mode="border", align_corners=True)
    return top, left, (crop[0, 0] > 0.5).numpy()


def png_base64(label_map: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(label_map).save(buffer, format="PNG", optimize=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class DetectorHandler(BundleHandler):
    """Accepts raw image bytes (curl -T photo.jpg), a multipart form field, or JSON {"data": "<base64 image>"}."""


    def initialize(self, context):
        super().initialize(context)
        config = self.model_config.get("handler") or {}
        self.min_size, self.max_size = self.artifact["input"]["min_size"], self.artifact["input"]["max_size"]
        self.bounds = {name: {**DEFAULT_BOUNDS[name], **(config.get(name) or {})} for name in NUMERIC_OPTIONS}
        self.max_mask_pixels = int(config.get("max_mask_pixels", DEFAULT_MAX_MASK_PIXELS))
        self.metric_detections = declared_metric(context.metrics, "DetectionsPerImage", "Count",
                                                 ["ModelName", "ModelVersion"], MetricTypes.HISTOGRAM)

    # --- a request -------------------------------------------------------------------------------------------------

    def parse_request(self, idx, row, name, payload, as_json):
        asked = self.request_options(idx, row, name, payload, as_json, OPTIONS)
        options = self.options(asked)
        example = self.decoded(image_bytes(payload, as_json))
        options["max_detections"] = self.mask_budget(options["max_detections"], example["height"] * example["width"],
                                                     asked="max_detections" in asked)
        return [{**example, **options}], False

    def decoded(self, data):
        """An encoded image -> ``{"image": float [3, h, w] at the model's working size, "height", "width"}`` (the
        image's size as shown, EXIF orientation applied); any problem with the image is a ``RequestError``."""
        known = upright_size(data)
        # a JPEG is decoded at the smallest DCT scale that covers the model's size, not at its full size
        draft = None if known is None else (max(working_size(*known, self.min_size, self.max_size)),) * 2
        with opened_image(data, channels=3, draft_size=draft) as decoded:
            height, width = known or (decoded.height, decoded.width)
            size = working_size(height, width, self.min_size, self.max_size)
            resized = decoded if decoded.size == size[::-1] else decoded.resize(size[::-1], Image.BILINEAR)
            pixels = pixels_of(resized, channels=3)
        self.large_batch |= height * width > LARGE_IMAGE_PIXELS
        image = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255)  # decoded pixels are read-only
        return {"image": image, "height": height, "width": width}

    # --- the Open Inference Protocol -------------------------------------------------------------------------------

    oip_input = ("data", "BYTES")

    def oip_examples(self, tensor):
        """Each encoded image of the protocol's BYTES input, decoded as ``parse_request`` decodes a body, with the
        default options. The images share the request's mask budget (``max_mask_pixels``): ``max_detections`` is
        lowered to what fits all of them, and a request whose images take more than the budget at one mask each is
        a 413. A bad image is a 400 naming its place in the input."""
        options = self.options({})
        examples = []
        for index, data in enumerate(protocol_images(tensor, MAX_PROTOCOL_IMAGES)):
            try:
                examples.append(self.decoded(data))
            except RequestError as err:
                raise RequestError(f"image {index} of input {quote(tensor.name)}: {err.message}", code=err.code,
                                   kind=err.kind) from None
        pixels = sum(example["height"] * example["width"] for example in examples)
        if pixels > self.max_mask_pixels:
            raise RequestError(f"{len(examples)} images of {pixels} pixels in all exceed the limit of "
                               f"{self.max_mask_pixels} mask pixels per request at one mask each; send fewer or "
                               "smaller images per request", code=413, kind="TooManyMaskPixels")
        options["max_detections"] = self.mask_budget(options["max_detections"], pixels, asked=False)
        return [{**example, **options} for example in examples]

    def oip_outputs(self, rows, replies):
        """``detections``: each image's plain reply as JSON text; ``count``, ``boxes``, ``scores``, ``labels``: its
        detections as tensors padded to the request's ``max_detections`` (zeros, and "" for a label), the values of
        the reply (boxes in the image's pixels, x1, y1, x2, y2)."""
        k = max(reply["max_detections"] for reply in replies)  # one value per request (oip_examples)
        boxes = np.zeros((len(replies), k, 4), np.float32)
        scores = np.zeros((len(replies), k), np.float32)
        labels = np.full((len(replies), k), "", dtype=object)
        for row, reply in enumerate(replies):
            for column, detection in enumerate(reply["detections"]):
                boxes[row, column], scores[row, column] = detection["box"], detection["score"]
                labels[row, column] = detection["label"]
        return {"detections": np.array([compact_json(reply) for reply in replies], dtype=object),
                "count": np.array([len(reply["detections"]) for reply in replies], np.int64),
                "boxes": boxes, "scores": scores, "labels": labels}

    def options(self, fields):
        """The request's options (``request_options``) with the model-config's defaults; an out-of-bounds value is
        a 400."""
        options = {"output": self.choice(fields, "output", OUTPUTS),
                   "mask_format": self.choice(fields, "mask_format", MASK_FORMATS)}
        for name, kind in NUMERIC_OPTIONS.items():
            bounds = self.bounds[name]
            value = fields.get(name, bounds["default"])
            if isinstance(value, (bytes, bytearray, str)):
                try:
                    value = float(decode_text(value).strip())
                except ValueError:
                    raise RequestError(f"option {name!r} must be a number, got {quote(decode_text(value))}",
                                       kind="InvalidField") from None
            value = finite_number(value, name)
            if kind is int and value != int(value) or not bounds["min"] <= value <= bounds["max"]:
                raise RequestError(f"option {name!r} must be {'an integer' if kind is int else 'a number'} from "
                                   f"{bounds['min']} to {bounds['max']}, got {value:g}", kind="InvalidField")
            options[name] = kind(value)
        return options

    def mask_budget(self, max_detections, pixels, asked):
        """``max_detections`` within ``max_mask_pixels``: the default is lowered to what fits an image of ``pixels``
        (the reply says how many it kept); a number the request asked for that does not fit is a 413."""
        fitting = max(1, self.max_mask_pixels // pixels)
        if max_detections <= fitting:
            return max_detections
        if asked:
            raise RequestError(f"{max_detections} masks at this image's size ({pixels} pixels) exceed the limit of "
                               f"{self.max_mask_pixels} mask pixels per request; ask for at most {fitting} "
                               "(Max-Detections) or send a smaller image", code=413, kind="TooManyMaskPixels")
        return fitting

    @staticmethod
    def choice(fields, name, allowed):
        value = fields.get(name, allowed[0])
        value = decode_text(value).strip() if isinstance(value, (bytes, bytearray, str)) else value
        if value not in allowed:
            raise RequestError(f"option {name!r} must be one of {', '.join(allowed)}, got {quote(value)}",
                               kind="InvalidField")
        return value

    # --- a batch ---------------------------------------------------------------------------------------------------

    def collate(self, examples):
        return [example["image"] for example in examples]

    def predict(self, batch):
        """Each image's ``{"boxes", "labels", "scores", "masks"}``. Eager: one forward pass per image size in the
        batch (the model takes a list of them); mixing sizes in one pass would zero-pad the smaller images to the
        largest, which changes the answer near their edges: an image gets the same answer alone as in any batch.
        onnxruntime: one call per image, as the export takes one image [1, 3, H, W] and returns its (boxes, labels,
        scores, masks). torchscript and aoti fail at load: the manifest says why the detector has neither."""
        if self.runtime.name != "eager":
            with torch.inference_mode():
                return [dict(zip(EXPORT_OUTPUTS, self.runtime(image[None]))) for image in batch]
        by_size = {}
        for index, image in enumerate(batch):
            by_size.setdefault(tuple(image.shape), []).append(index)
        outputs = [None] * len(batch)
        with torch.inference_mode(), self.autocast():
            for indices in by_size.values():
                for index, answer in zip(indices, self.runtime([batch[i] for i in indices])):
                    outputs[index] = answer
        return outputs

    def format(self, example, output):
        keep = (output["scores"] >= example["score_threshold"]).nonzero().flatten()[:example["max_detections"]]
        height, width = example["height"], example["width"]
        scale = torch.tensor([width, height, width, height]) / torch.tensor(example["image"].shape[2:0:-1] * 2)
        boxes = (output["boxes"][keep].float() * scale).clamp(min=0)
        boxes = torch.minimum(boxes, torch.tensor([width, height, width, height], dtype=boxes.dtype))
        masks = output["masks"][keep]
        labels, scores = output["labels"][keep].tolist(), output["scores"][keep].float().tolist()
        self.metric_detections.add_or_update(len(keep), self._dims())
        crops = [mask_crop(mask, height, width) for mask in masks]
        reply = {"image_size": {"width": width, "height": height}, "max_detections": example["max_detections"]}
        if example["output"] == "semantic":
            label_map = np.zeros((height, width), np.uint8)
            for index in reversed(range(len(keep))):  # the highest score painted last, on top
                if crops[index] is not None:
                    top, left, crop = crops[index]
                    label_map[top : top + crop.shape[0], left : left + crop.shape[1]][crop] = labels[index]
            reply["label_map"] = {"format": "png", "data": png_base64(label_map)}
            reply["legend"] = {"0": "background", **{str(i): name for i, name in enumerate(self.labels, start=1)}}
        else:
            canvas = np.zeros((height, width), np.uint8, order="F") if example["mask_format"] == "rle" else None
            detections = []
            for index, (label, score) in enumerate(zip(labels, scores)):
                detections.append({"label": self.labels[label - 1], "score": round(score, 4),
                                   "box": [round(v, 1) for v in boxes[index].tolist()],
                                   "mask": self.encode(crops[index], canvas)})
            reply["detections"] = detections
        return {**reply, "model": self.model_name, "version": self.version}

    @staticmethod
    def encode(crop, canvas):
        """A mask crop (``mask_crop``) as COCO RLE at the image's size, pasted into ``canvas`` (zeros, Fortran
        order; cleared again after), or as polygons when ``canvas`` is None."""
        if crop is None:
            return encode_mask(canvas) if canvas is not None else []
        top, left, pixels = crop
        if canvas is None:
            return mask_polygons(pixels, top, left)
        window = canvas[top : top + pixels.shape[0], left : left + pixels.shape[1]]
        window[...] = pixels
        try:
            return encode_mask(canvas)
        finally:
            window[...] = 0
