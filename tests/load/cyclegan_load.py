"""The cyclegan's load-test payloads and reply check (registry.py's Load of "cyclegan").

- ``payloads()``: held-out Fashion-MNIST items (never trained on) as PNGs, half sent A->B as they are and half as
  line drawings B->A (JSON ``{"data", "direction"}``), each with the base64 PNG the served archive answers for it
  in-process (its default runtime): a served reply that differs by more than rounding is a serving fault;
- ``check_cyclegan(body, expected)``: a JSON reply ``{"image": base64 PNG, "format", "direction", "width",
  "height", "model", "version"}`` whose PNG decodes at its width and height, and is ``expected`` where the
  sample names one, up to a runtime's rounding (``ROUNDING_LEVELS``, ``ROUNDED_SHARE``);
- ``python -m tests.load.cyclegan_load`` draws docs/img/cyclegan.png from served replies: a private TorchServe with
  model_store/cyclegan.mar, held-out items and drawings sent with ``Accept: image/png``, the PNGs it answers.
"""

import argparse
import base64
import io
import json
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from registry import ROOT
from tests.load.checks import WrongAnswer, parse
from tests.load.payloads import JSON, Sample, heldout_fashion, render_fashion

ROUNDING_LEVELS = 1
"""Gray levels a served pixel may differ from the in-process translation by: another runtime or batch size than the
payload's (the bench's runtime comparison serves eager and TorchScript against ONNX Runtime's replies) can round a
value that lies within float error of half a level the other way."""
ROUNDED_SHARE = 0.01
"""The share of an image's pixels that may differ by ``ROUNDING_LEVELS``; a serving fault (the other direction or
polarity, another item, a wrong normalisation) changes far more."""


def decoded_png(data):
    with Image.open(io.BytesIO(data)) as image:
        if image.format != "PNG":
            raise WrongAnswer(f"image is {image.format}, expected PNG")
        return np.asarray(image)


@cache
def payloads(count=40):
    from tests.worker import Request, Worker
    from train.cyclegan import line_drawing

    worker = Worker(ROOT / "model_store" / "cyclegan.mar", tempfile.mkdtemp(prefix="payloads-cyclegan-"))
    items, _ = heldout_fashion(count)
    drawings = line_drawing(items)
    samples = []
    for index in range(count):
        direction = "a2b" if index % 2 == 0 else "b2a"
        pixels = items[index] if direction == "a2b" else drawings[index]
        body = json.dumps({"data": base64.b64encode(render_fashion(pixels, size=56)).decode(),
                           "direction": direction}).encode()
        reply = worker.run_one(Request(body, JSON))
        if reply.status != 200:
            raise RuntimeError(f"cyclegan answered its own payload with {reply.status}: {reply.body}")
        samples.append(Sample(f"fashion-{direction}", body, JSON, reply.body["image"]))
    return samples


def check_cyclegan(body, expected=None):
    reply = parse(body)
    if not isinstance(reply, dict) or not isinstance(reply.get("image"), str):
        raise WrongAnswer(f"expected a JSON object with a base64 image, got {str(reply)[:120]}")
    if reply.get("format") != "png" or reply.get("direction") not in ("a2b", "b2a"):
        raise WrongAnswer(f"format {reply.get('format')!r}, direction {reply.get('direction')!r}")
    pixels = decoded_png(base64.b64decode(reply["image"]))
    if pixels.shape[:2] != (reply.get("height"), reply.get("width")):
        raise WrongAnswer(f"image of {pixels.shape[1]}x{pixels.shape[0]}, the reply says "
                          f"{reply.get('width')}x{reply.get('height')}")
    if expected is not None and reply["image"] != expected:
        wanted = decoded_png(base64.b64decode(expected))
        if pixels.shape != wanted.shape:
            raise WrongAnswer(f"image of shape {pixels.shape}, the in-process translation's is {wanted.shape}")
        off = np.abs(pixels.astype(np.int16) - wanted)
        differing = np.count_nonzero(off)
        if off.max() > ROUNDING_LEVELS or differing > ROUNDED_SHARE * off.size:
            raise WrongAnswer(f"image differs from the in-process translation at {differing} of "
                              f"{off.size} pixels, by up to {off.max()} gray levels")
    return reply["direction"]


def figure(out, count=8, scale=4):
    """docs/img/cyclegan.png: four rows of ``count`` held-out images, ``scale`` times their size: items, what the
    server answers for them (A->B), drawings of other items, what it answers for those (B->A)."""
    from tests.fixtures.servers import running, store_with
    from train.cyclegan import line_drawing

    items, _ = heldout_fashion(2 * count)
    rows = [items[:count], None, line_drawing(items[count:]), None]
    with tempfile.TemporaryDirectory(prefix="cyclegan-figure-") as folder, \
            running(Path(folder) / "ts", model_store=store_with(Path(folder) / "store", "cyclegan"),
                    expect_ready=1) as server:
        for row, direction in ((1, "a2b"), (3, "b2a")):
            headers = {"Content-Type": "image/png", "Accept": "image/png", "Direction": direction}
            replies = [server.predict("cyclegan", render_fashion(pixels), headers=headers) for pixels in rows[row - 1]]
            for reply in replies:
                if reply.status_code != 200 or reply.headers.get("Content-Type") != "image/png":
                    raise RuntimeError(f"cyclegan answered {reply.status_code}: {reply.text[:200]}")
            rows[row] = np.stack([decoded_png(reply.content) for reply in replies])
    grid = np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)
    image = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.Resampling.NEAREST)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    image.save(out, optimize=True)
    print(f"wrote {out}: {count} items -> drawings, {count} drawings -> items, as served")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="docs/img/cyclegan.png from a served cyclegan")
    parser.add_argument("--out", default=str(ROOT / "docs" / "img" / "cyclegan.png"))
    figure(parser.parse_args().out)
