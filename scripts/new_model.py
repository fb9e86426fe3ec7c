"""Add a model to the bundle: its four modules, its model-configs, a sample and one registry entry, from templates
that train on a tiny data set they make, so that `make serve` serves it at once.

    python -m scripts.new_model NAME --task TASK

TASK: image-classification, text-classification, tabular-regression, detection, image-to-image (an unpaired CycleGAN,
image replies) or seq2seq (attention encoder-decoder, streamed tokens).

Writes models/NAME.py, train/NAME.py, handlers/NAME.py, handlers/NAME.yaml (CPU profile), handlers/NAME.gpu.yaml
(the image and k8s/), samples/NAME.{png,txt,json}, and appends NAME's entry to registry.py's MODELS. Everything else
follows from the registry entry: the Makefile's rules, archive.sh, both k8s variants, the dashboard, `make serve`'s
curl lines, the load, fuzz and hostile-HTTP tests. TODO comments mark where your data and architecture go.
Nothing is overwritten: a name that is taken, or a file that exists, is refused (exit 2).
"""

import argparse
import io
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from string import Template

import numpy as np
from PIL import Image, ImageDraw

import registry

ROOT = registry.ROOT
TEMPLATES = Path(__file__).resolve().parent / "templates"
NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")


def stripes_png() -> bytes:
    """A clean 112 px picture of vertical stripes: the image-classification template's "vertical" class."""
    columns = np.arange(112)
    pixels = np.tile(127 + 100 * np.sin(2 * np.pi * columns / 24), (112, 1)).astype(np.uint8)
    return png(Image.fromarray(pixels))


def shapes_png() -> bytes:
    """A 160 px picture of a square and a disc on a dark background: what the detection template learns."""
    image = Image.new("RGB", (160, 160), (40, 30, 50))
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 30, 60, 70), fill=(230, 200, 40))
    draw.ellipse((90, 80, 140, 130), fill=(60, 210, 220))
    return png(image)


def disc_png() -> bytes:
    """A 112 px picture of a light disc on black: what the image-to-image template translates (to dark on white)."""
    image = Image.new("L", (112, 112), 20)
    ImageDraw.Draw(image).ellipse((30, 34, 78, 82), fill=230)
    return png(image)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class Task:
    sample_suffix: str
    content_type: str
    label: str | None  # what the template model answers for the sample (None: any valid reply)
    sample: object  # () -> the sample's bytes
    batch_size: int
    timeout: int


TASKS = {
    "image-classification": Task(".png", "image/png", "vertical", stripes_png, 16, 30),
    "text-classification": Task(".txt", "text/plain; charset=utf-8", "positive",
                                lambda: "the battery was great and reliable\n".encode(), 16, 30),
    "tabular-regression": Task(".json", "application/json", None,
                               lambda: (json.dumps({"rooms": 3, "area": 70, "age": 20}) + "\n").encode(), 16, 10),
    "detection": Task(".png", "image/png", None, shapes_png, 4, 60),
    "image-to-image": Task(".png", "image/png", None, disc_png, 8, 30),
    "seq2seq": Task(".txt", "text/plain; charset=utf-8", None, lambda: "3 1 4\n".encode(), 8, 30),
}


class Refused(Exception):
    """The model cannot be added as asked (exit 2); the message says why."""


def planned_files(name: str, task: Task) -> dict[str, str]:
    """{path relative to the repo: template} of the files the scaffold writes (the sample has no template)."""
    return {f"models/{name}.py": "model.py", f"train/{name}.py": "train.py", f"handlers/{name}.py": "handler.py",
            f"handlers/{name}.yaml": "config.yaml", f"handlers/{name}.gpu.yaml": "config.gpu.yaml",
            f"samples/{name}{task.sample_suffix}": ""}


def render(template: Path, **values) -> str:
    return Template(template.read_text(encoding="utf-8")).substitute(values)


def registry_with(text: str, entry: str) -> str:
    """registry.py's ``text`` with ``entry`` appended to the MODELS tuple."""
    start = text.index("\nMODELS = (\n")
    end = text.index("\n)\n", start)
    return text[:end + 1] + entry + text[end + 1:]


def add_model(name: str, task_name: str, root: Path = ROOT) -> list[str]:
    """Write the model's files and registry entry under ``root``; return the paths written."""
    if not NAME.fullmatch(name):
        raise Refused(f"name {name!r}: lower-case letters, digits and underscores, starting with a letter (it names "
                      f"the Python modules, the archive and the URL /predictions/{name})")
    if name in {entry.name for entry in registry.MODELS} | {v.archive for e in registry.MODELS for v in e.versions}:
        raise Refused(f"{name!r} is already a model or an archive in registry.py")
    task = TASKS[task_name]
    files = planned_files(name, task)
    taken = [path for path in files if (root / path).exists()]
    if taken:
        raise Refused(f"{', '.join(taken)} already exist(s); nothing was written")
    values = {"name": name, "Class": "".join(part.title() for part in name.split("_")),
              "batch_size": task.batch_size, "timeout": task.timeout}
    for path, template in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if template.startswith("config"):
            target.write_text(render(TEMPLATES / f"{template}.tmpl", **values), encoding="utf-8")
        elif template:
            target.write_text(render(TEMPLATES / task_name / f"{template}.tmpl", **values), encoding="utf-8")
        else:
            target.write_bytes(task.sample())
    sample = next(path for path in files if path.startswith("samples/"))
    entry = render(TEMPLATES / "registry_entry.py.tmpl", name=name, sample=sample, content_type=task.content_type,
                   label=f", {json.dumps(task.label)}" if task.label else "")
    registry_file = root / "registry.py"
    registry_file.write_text(registry_with(registry_file.read_text(encoding="utf-8"), entry), encoding="utf-8")
    return [*files, "registry.py"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.new_model", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("name", help="the model's name: modules, archive and URL (/predictions/NAME)")
    parser.add_argument("--task", required=True, choices=sorted(TASKS), help="the template to start from")
    args = parser.parse_args(argv)
    try:
        written = add_model(args.name, args.task)
    except Refused as refused:
        print(f"new_model: {refused}", file=sys.stderr)
        return 2
    print(f"Added {args.name} ({args.task}):\n" + "".join(f"  {path}\n" for path in written)
          + f"Next: `make serve` trains it (seconds) and serves it at /predictions/{args.name}, with a curl line for "
            f"its sample; then look for TODO in the files above.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
