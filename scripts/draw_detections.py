"""Draw a detector reply onto its image: `python -m scripts.draw_detections IMAGE REPLY.json OUT.png`.

Instances (masks as COCO RLE or polygons) are drawn as translucent masks with their boxes, labels and scores; a
semantic reply (``output=semantic``) as its label map over the image, with the legend's names in the corner.
"""

import argparse
import base64
import io
import json
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageOps
from pycocotools import mask as mask_utils

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]
MASK_OPACITY = 0.45


def instance_mask(mask, size) -> np.ndarray:
    """A reply's mask (RLE dict or polygon list) as a boolean array of ``size`` (width, height)."""
    if isinstance(mask, dict):
        return mask_utils.decode({"size": mask["size"], "counts": mask["counts"].encode("ascii")}).astype(bool)
    canvas = Image.new("L", size)
    for polygon in mask:
        ImageDraw.Draw(canvas).polygon(polygon, fill=1)
    return np.asarray(canvas, bool)


def tint(pixels: np.ndarray, where: np.ndarray, colour) -> None:
    pixels[where] = (1 - MASK_OPACITY) * pixels[where] + MASK_OPACITY * np.array(colour, np.float32)


def draw(image: Image.Image, reply: dict) -> Image.Image:
    """``image`` with the reply drawn on it (the reply's coordinates are the image's own pixels)."""
    image = ImageOps.exif_transpose(image).convert("RGB")
    expected = reply.get("image_size")
    if expected and (expected["width"], expected["height"]) != image.size:
        raise ValueError(f"the reply is for a {expected['width']}x{expected['height']} image, "
                         f"this one is {image.width}x{image.height}")
    pixels = np.asarray(image, np.float32).copy()
    if "label_map" in reply:
        label_map = np.asarray(Image.open(io.BytesIO(base64.b64decode(reply["label_map"]["data"]))))
        for index in np.unique(label_map[label_map > 0]):
            tint(pixels, label_map == index, PALETTE[(int(index) - 1) % len(PALETTE)])
        drawn = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        names = [f"{index}: {name}" for index, name in reply["legend"].items() if index != "0"]
        ImageDraw.Draw(drawn).multiline_text((4, 4), "\n".join(names), fill="white", stroke_width=2,
                                             stroke_fill="black")
        return drawn
    labels = sorted({detection["label"] for detection in reply["detections"]})
    colours = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}
    for detection in reply["detections"]:
        if "mask" in detection:
            tint(pixels, instance_mask(detection["mask"], image.size), colours[detection["label"]])
    drawn = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    pen = ImageDraw.Draw(drawn)
    for detection in reply["detections"]:
        colour = colours[detection["label"]]
        x1, y1, x2, y2 = detection["box"]
        pen.rectangle((x1, y1, x2 - 1, y2 - 1), outline=colour, width=2)
        pen.text((x1 + 2, max(0, y1 - 12)), f"{detection['label']} {detection['score']:.2f}", fill=colour,
                 stroke_width=1, stroke_fill="black")
    return drawn


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", help="the image that was sent")
    parser.add_argument("reply", help="the detector's JSON reply for it")
    parser.add_argument("out", help="where to write the drawing (PNG)")
    args = parser.parse_args(argv)
    try:
        with open(args.reply, encoding="utf-8") as f:
            reply = json.load(f)
        if not isinstance(reply, dict) or not ({"detections", "label_map"} & set(reply)):
            raise ValueError("not a detector reply (no 'detections' or 'label_map')")
        draw(Image.open(args.image), reply).save(args.out)
    except (OSError, ValueError, KeyError) as err:
        print(f"draw_detections: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
