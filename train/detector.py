"""Train the object detector with instance masks (models.detector) and measure it with COCO mAP (pycocotools).

Data sets (``--dataset``):

- ``composed`` (default, offline): Fashion-MNIST items cut out by their exactly-black background and pasted onto
  random crops of the photos that ship inside scikit-image, scikit-learn and matplotlib (flipped, colour-jittered),
  several per image at different scales, some overlapping; boxes and masks are exact by construction. Held-out
  images use Fashion-MNIST's test items on photos that training never sees. Deterministic by ``--seed``.
- ``voc --data-dir DIR``: Pascal VOC through torchvision's ``VOCDetection`` (``DIR/VOCdevkit/VOC<year>``), ``train``
  to train, ``val`` held out. VOC detection has boxes only: the masks trained on are the boxes, and no mask AP is
  reported.
- ``coco --data-dir DIR --ann FILE``: COCO JSON; masks from polygons or RLE through pycocotools; ``--test-fraction``
  of the images held out.

Under ``torchrun --nproc_per_node N -m train.detector`` each process trains on its share of every epoch
(DistributedDataParallel, gloo on the CPU, nccl on CUDA; ``--batch-size`` per process) and rank 0 evaluates and
writes the artifacts, as train.vision does. On a CPU, Mask R-CNN's many small operations keep about one core busy
whatever torch's thread count, so two processes of one thread each use two cores.
"""

import os

# Busy-waiting OpenMP threads make a shared CPU crawl (10x slower convolutions with 2 threads when other processes
# hold the cores); passive waiting costs nothing on an idle machine. Read when torch loads libgomp, so set first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import contextlib
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import skimage
import sklearn.datasets
import torch
import torch.distributed as dist
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from models import architecture, build
from models.detector import encode_mask
from train.common import (DataError, Distributed, build_parser, metrics_record, positive_int, run_cli,
                          seed_everything, write_artifacts, write_json)
from train.datasets import fashion_mnist

DATASETS = ("composed", "voc", "coco")

FASHION_GROUPS = {"top": (0, 2, 4, 6), "trouser": (1,), "dress": (3,), "shoe": (5, 7, 9), "bag": (8,)}
"""The composed data set's classes, as groups of Fashion-MNIST classes: its four upper-body garments (T-shirt/top,
pullover, coat, shirt) differ mostly in texture at 28 px, and so do its three shoes (sandal, sneaker, ankle boot)."""

VOC_LABELS = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
              "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")

SKIMAGE_DATA = Path(skimage.__file__).parent / "data"
SKLEARN_IMAGES = Path(sklearn.datasets.__file__).parent / "images"
MATPLOTLIB_DATA = Path(matplotlib.get_data_path()) / "sample_data"
TRAIN_PHOTOS = tuple(SKIMAGE_DATA / name for name in (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "clock_motion.png", "coffee.png", "coins.png",
    "grass.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "page.png", "retina.jpg", "rocket.jpg",
    "text.png")) + (SKLEARN_IMAGES / "china.jpg",)
HELDOUT_PHOTOS = (SKIMAGE_DATA / "chelsea.png", SKIMAGE_DATA / "gravel.png", SKIMAGE_DATA / "motorcycle_left.png",
                  SKLEARN_IMAGES / "flower.jpg", MATPLOTLIB_DATA / "grace_hopper.jpg")
"""Backgrounds of the held-out images: photos that no training image is cut from."""


@dataclass
class Example:
    """One image (uint8 [H, W, 3]) with its objects: boxes [N, 4] (x1, y1, x2, y2), labels [N] (1-based), masks
    uint8 [N, H, W]."""

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    masks: np.ndarray


@dataclass
class DetectionData:
    """Train and held-out examples (sequences, indexed lazily), the label names, and whether masks are real."""

    name: str
    labels: list[str]
    train: object
    heldout: object
    real_masks: bool = True


# --- composed: Fashion-MNIST cut-outs on photos ------------------------------------------------------------------

class ComposedImages:
    """``count`` composed images of ``size`` (height, width), image ``i`` a pure function of (seed, i). Each object
    is of a class drawn uniformly, then an item of that class."""

    def __init__(self, items: np.ndarray, item_labels: np.ndarray, photos, count: int, seed: int,
                 size=(128, 128), objects=(2, 5), scale=(24, 64)):
        self.items, self.item_labels, self.count, self.seed = items, item_labels, count, seed
        self.by_label = [np.flatnonzero(item_labels == label) for label in np.unique(item_labels)]
        self.photos = [np.asarray(Image.open(path).convert("RGB")) for path in photos]
        self.size, self.objects, self.scale = size, objects, scale

    def __len__(self):
        return self.count

    def __getitem__(self, index: int) -> Example:
        if not 0 <= index < self.count:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index])
        canvas = self.background(rng)
        masks, labels = [], []
        for _ in range(rng.integers(self.objects[0], self.objects[1] + 1)):
            of_label = self.by_label[rng.integers(len(self.by_label))]
            item = int(of_label[rng.integers(len(of_label))])
            pasted = self.paste(rng, canvas, masks, self.items[item])
            if pasted is not None:
                masks.append(pasted)
                labels.append(int(self.item_labels[item]))
        masks = np.stack(masks).astype(np.uint8)
        return Example(canvas, boxes_of(masks), np.array(labels, np.int64), masks)

    def background(self, rng) -> np.ndarray:
        """A random crop of a random photo at ``size``, maybe mirrored, with random brightness, contrast and tint."""
        photo = self.photos[rng.integers(len(self.photos))]
        height, width = self.size
        side = rng.uniform(0.35, 1.0) * min(photo.shape[0] / height, photo.shape[1] / width)
        crop_h, crop_w = max(8, int(height * side)), max(8, int(width * side))
        top, left = rng.integers(photo.shape[0] - crop_h + 1), rng.integers(photo.shape[1] - crop_w + 1)
        crop = Image.fromarray(photo[top:top + crop_h, left:left + crop_w]).resize((width, height), Image.BILINEAR)
        pixels = np.asarray(crop, np.float32)
        if rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        mean = pixels.mean()
        pixels = (pixels - mean) * rng.uniform(0.6, 1.3) + mean * rng.uniform(0.6, 1.3)
        return np.clip(pixels * rng.uniform(0.8, 1.2, 3), 0, 255).astype(np.uint8)

    def paste(self, rng, canvas, masks, item, tries=10):
        """Paste ``item`` (28x28, black background) tinted and scaled at a random place where it hides at most half
        of any object already there (whose masks lose what it covers); its mask, or None when no place was found."""
        side = int(rng.uniform(*self.scale))
        size = (side, max(8, int(side * rng.uniform(0.8, 1.25))))
        gray = np.asarray(Image.fromarray(item).resize(size, Image.BILINEAR), np.float32) / 255
        inside = np.asarray(Image.fromarray((item > 0).astype(np.float32)).resize(size, Image.BILINEAR)) > 0.5
        if rng.random() < 0.5:
            gray, inside = gray[:, ::-1], inside[:, ::-1]
        colour = rng.uniform(0.2, 1.0, 3) * 255
        height, width = self.size
        h, w = inside.shape
        for _ in range(tries):
            top, left = rng.integers(height - h + 1), rng.integers(width - w + 1)
            mask = np.zeros(self.size, bool)
            mask[top:top + h, left:left + w] = inside
            if all((other & ~mask).sum() >= 0.5 * other.sum() for other in masks):
                break
        else:
            return None
        for other in masks:
            other &= ~mask
        texture = (0.3 + 0.7 * gray[..., None]) * colour
        region = canvas[top:top + h, left:left + w]
        region[inside] = texture[inside].astype(np.uint8)
        return mask


def boxes_of(masks: np.ndarray) -> np.ndarray:
    """Tight boxes (x1, y1, x2, y2; x2 and y2 one past the last pixel) of binary masks [N, H, W]."""
    boxes = np.zeros((len(masks), 4), np.float32)
    for i, mask in enumerate(masks):
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        boxes[i] = cols[0], rows[0], cols[-1] + 1, rows[-1] + 1
    return boxes


def fashion_groups() -> np.ndarray:
    """Fashion-MNIST class -> the composed data set's label (1-based, FASHION_GROUPS order)."""
    groups = np.zeros(10, np.int64)
    for position, classes in enumerate(FASHION_GROUPS.values(), start=1):
        groups[list(classes)] = position
    return groups


def composed_data(data_dir: Path, seed: int, n_train: int, n_heldout: int) -> DetectionData:
    def split(train, photos, count, split_seed):
        dataset = fashion_mnist(data_dir, train=train)
        return ComposedImages(dataset.data.numpy(), fashion_groups()[dataset.targets.numpy()], photos, count,
                              split_seed)

    return DetectionData("composed Fashion-MNIST cut-outs on package photos", list(FASHION_GROUPS),
                         split(True, TRAIN_PHOTOS, n_train, seed), split(False, HELDOUT_PHOTOS, n_heldout, seed + 1))


# --- real formats ------------------------------------------------------------------------------------------------

class VocImages:
    """torchvision ``VOCDetection`` as Examples: non-difficult objects, their boxes as masks."""

    def __init__(self, data_dir: Path, year: str, image_set: str):
        from torchvision.datasets import VOCDetection

        try:
            self.voc = VOCDetection(str(data_dir), year=year, image_set=image_set, download=False)
        except (RuntimeError, OSError, ValueError) as err:
            raise DataError(f"no Pascal VOC {year} {image_set!r} set under {data_dir}/VOCdevkit: {err}") from None

    def __len__(self):
        return len(self.voc)

    def __getitem__(self, index: int) -> Example:
        image, target = self.voc[index]
        image = np.array(image.convert("RGB"))
        objects = [obj for obj in target["annotation"].get("object", []) if obj.get("difficult", "0") != "1"]
        boxes = np.array([[float(obj["bndbox"][key]) for key in ("xmin", "ymin", "xmax", "ymax")]
                          for obj in objects], np.float32).reshape(-1, 4)
        boxes[:, :2] -= 1  # VOC's pixel indices are 1-based and inclusive
        labels = np.array([VOC_LABELS.index(obj["name"]) + 1 for obj in objects], np.int64)
        masks = np.zeros((len(objects), *image.shape[:2]), np.uint8)
        for mask, (x1, y1, x2, y2) in zip(masks, boxes.round().astype(int)):
            mask[y1:y2, x1:x2] = 1
        return Example(image, boxes, labels, masks)


class CocoImages:
    """Images of a COCO JSON as Examples (crowd regions left out); masks from polygons or RLE via pycocotools."""

    def __init__(self, coco: COCO, image_dir: Path, image_ids, categories: list[int]):
        self.coco, self.image_dir, self.image_ids, self.categories = coco, image_dir, list(image_ids), categories

    def __len__(self):
        return len(self.image_ids)

    def __getitem__(self, index: int) -> Example:
        info = self.coco.imgs[self.image_ids[index]]
        image = np.array(Image.open(self.image_dir / info["file_name"]).convert("RGB"))
        annotations = [a for a in self.coco.imgToAnns[info["id"]] if not a.get("iscrowd", 0)]
        masks = np.stack([self.coco.annToMask(a) for a in annotations]) if annotations else \
            np.zeros((0, *image.shape[:2]), np.uint8)
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations)],
                         np.float32).reshape(-1, 4)
        labels = np.array([self.categories.index(a["category_id"]) + 1 for a in annotations], np.int64)
        return Example(image, boxes, labels, masks)


def coco_data(data_dir: Path, annotations: Path | None, seed: int, test_fraction: float) -> DetectionData:
    if annotations is None:
        raise DataError("--dataset coco needs --ann FILE (a COCO instances JSON)")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(annotations))
    except (OSError, ValueError, KeyError, AssertionError) as err:
        raise DataError(f"cannot read COCO annotations {annotations}: {type(err).__name__}: {err}") from None
    categories = sorted(coco.cats)
    ids = np.random.default_rng(seed).permutation(sorted(coco.imgs))
    n_heldout = max(1, round(len(ids) * test_fraction))
    if len(ids) < 2:
        raise DataError(f"{annotations} lists {len(ids)} images; at least 2 are needed (train and held out)")
    return DetectionData(f"COCO {annotations.name}", [coco.cats[c]["name"] for c in categories],
                         CocoImages(coco, data_dir, ids[n_heldout:], categories),
                         CocoImages(coco, data_dir, ids[:n_heldout], categories))


def load_data(args) -> DetectionData:
    if args.dataset == "composed":
        return composed_data(args.data_dir, args.seed, args.train_images, args.heldout_images)
    if args.dataset == "voc":
        return DetectionData(f"Pascal VOC {args.year}", list(VOC_LABELS), VocImages(args.data_dir, args.year, "train"),
                             VocImages(args.data_dir, args.year, "val"), real_masks=False)
    if args.dataset == "coco":
        return coco_data(args.data_dir, args.ann, args.seed, args.test_fraction)
    raise DataError(f"unknown --dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}")


def limited(examples, limit):
    """The first ``limit`` examples (all when None)."""
    return [examples[i] for i in range(min(len(examples), limit or len(examples)))]


# --- training ----------------------------------------------------------------------------------------------------

def to_tensors(example: Example, flip: bool = False):
    """An Example -> (float image [3, H, W] in 0..1, torchvision target), mirrored left-right when ``flip``."""
    image = torch.from_numpy(np.ascontiguousarray(example.image)).permute(2, 0, 1).float().div_(255)
    boxes, masks = torch.from_numpy(example.boxes), torch.from_numpy(example.masks)
    if flip:
        image, masks = image.flip(-1), masks.flip(-1)
        boxes = torch.stack([image.shape[-1] - boxes[:, 2], boxes[:, 1], image.shape[-1] - boxes[:, 0],
                             boxes[:, 3]], dim=1)
    return image, {"boxes": boxes, "labels": torch.from_numpy(example.labels), "masks": masks}


def model_spec(args, num_classes: int) -> dict:
    """The manifest's architecture: the small backbone, or ResNet-50 FPN (--arch resnet50 or --weights coco)."""
    sizes = {"min_size": args.min_size, "max_size": args.max_size}
    if args.arch == "resnet50" or args.weights == "coco":
        return architecture("models.detector", "MaskRCNNResNet50FPN", num_classes=num_classes,
                            frozen_batchnorm=args.weights == "coco", **sizes)
    return architecture("models.detector", "SmallMaskRCNN", num_classes=num_classes, width=args.width, **sizes)


def coco_pretrained(model):
    """``model`` (MaskRCNNResNet50FPN) with torchvision's COCO weights, all but the class-specific predictors."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    try:
        state = MaskRCNN_ResNet50_FPN_Weights.COCO_V1.get_state_dict(progress=True)
    except Exception as err:  # URLError, hash mismatch, ...: one line, not a traceback
        raise DataError(f"--weights coco: cannot download torchvision's COCO Mask R-CNN weights "
                        f"({type(err).__name__}: {err}); train from scratch without --weights") from None
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape}, strict=False)
    print("--weights coco: torchvision's COCO Mask R-CNN weights loaded (class predictors trained from scratch)")
    return model


def train(model, examples, args, job, generator, log=print) -> float:
    """AdamW with linear warm-up and cosine decay over ``--epochs`` passes of mini-batches (random left-right
    flips), this process's share of each under torchrun; one progress line per ``--log-every`` steps. Returns the
    mean loss of the last epoch."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=1e-4)
    epoch_batches = job.epoch_indices(len(examples), args.batch_size, args.seed, generator)
    steps = args.epochs * math.ceil(len(examples) / job.world_size / args.batch_size)
    warmup = min(100, steps // 5 + 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps)))))
    model.train()
    started, step = time.perf_counter(), 0
    for epoch in range(1, args.epochs + 1):
        total, batches = 0.0, 0
        for indices in epoch_batches(epoch):
            flips = torch.rand(len(indices), generator=generator) < 0.5
            images, targets = zip(*(to_tensors(examples[int(i)], bool(f)) for i, f in zip(indices, flips)))
            losses = model([image.to(job.device) for image in images],
                           [{key: value.to(job.device) for key, value in target.items()} for target in targets])
            loss = sum(losses.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total, batches, step = total + loss.item(), batches + 1, step + 1
            if step % args.log_every == 0 or step == steps:
                parts = "  ".join(f"{name.removeprefix('loss_')} {value.item():.3f}" for name, value in losses.items())
                log(f"epoch {epoch}/{args.epochs}  step {step}/{steps}  loss {loss.item():.3f} ({parts})  "
                    f"{time.perf_counter() - started:.0f}s", flush=True)
    return total / max(1, batches)


# --- COCO evaluation ---------------------------------------------------------------------------------------------

def coco_ground_truth(examples, labels: list[str]) -> COCO:
    """The examples' objects as an in-memory pycocotools COCO (image ids 1.., category ids 1..)."""
    images, annotations = [], []
    for image_id, example in enumerate(examples, start=1):
        images.append({"id": image_id, "height": example.image.shape[0], "width": example.image.shape[1]})
        for box, label, mask in zip(example.boxes, example.labels, example.masks):
            x1, y1, x2, y2 = map(float, box)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(mask.sum()), "iscrowd": 0,
                                "segmentation": encode_mask(mask)})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": i, "name": name} for i, name in enumerate(labels, start=1)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


@torch.no_grad()
def detect(model, examples, device, batch_size: int = 8) -> list[dict]:
    """COCO result entries (bbox, segmentation, score, category) for every example, image ids 1.."""
    model.eval()
    results = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        outputs = model([to_tensors(example)[0].to(device) for example in chunk])
        for image_id, output in enumerate(outputs, start=start + 1):
            masks = (output["masks"][:, 0] > 0.5).cpu().numpy()
            for box, label, score, mask in zip(output["boxes"].tolist(), output["labels"].tolist(),
                                               output["scores"].tolist(), masks):
                results.append({"image_id": image_id, "category_id": label, "score": score,
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                "segmentation": encode_mask(mask)})
    return results


def coco_metrics(ground_truth: COCO, results: list[dict], labels: list[str], kinds=("bbox", "segm")) -> dict:
    """COCO AP@[.5:.95], AP@.5 and AP@.75 per kind ("box_map", "box_map_50", ..., "mask_map_50"), and AP@.5 per
    class ("box_ap_50/<label>")."""
    metrics = {}
    for kind in kinds:
        name = {"bbox": "box", "segm": "mask"}[kind]
        if not results:
            metrics.update({f"{name}_map": 0.0, f"{name}_map_50": 0.0, f"{name}_map_75": 0.0})
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            evaluation = COCOeval(ground_truth, ground_truth.loadRes(results), kind)
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        stats = [max(0.0, float(value)) for value in evaluation.stats[:3]]  # -1: no ground truth of that kind
        metrics.update({f"{name}_map": stats[0], f"{name}_map_50": stats[1], f"{name}_map_75": stats[2]})
        # precision[iou, recall, category, area, max_dets]: IoU 0.5, all areas, 100 detections
        precision = evaluation.eval["precision"][0, :, :, 0, -1]
        for category, label in zip(evaluation.params.catIds, labels):
            valid = precision[:, evaluation.params.catIds.index(category)]
            metrics[f"{name}_ap_50/{label}"] = max(0.0, float(valid[valid > -1].mean())) if (valid > -1).any() else 0.0
    return metrics


# --- command line ------------------------------------------------------------------------------------------------

SAMPLE_FILES = (("detector_composed_1.jpg", (240, 320)), ("detector_composed_2.png", (300, 200)))
"""samples/: held-out composed images (photos and items training never saw) at sizes and aspects not trained on."""


def write_samples(out_dir: Path, data_dir: Path, seed: int) -> None:
    """Write SAMPLE_FILES into ``out_dir`` with their objects (labels, boxes) in ``detector_composed.json``."""
    items = fashion_mnist(data_dir, train=False)
    truth = {}
    for index, (name, size) in enumerate(SAMPLE_FILES):
        scale = min(size) / 128  # objects as large, relative to the image, as in training
        images = ComposedImages(items.data.numpy(), fashion_groups()[items.targets.numpy()], HELDOUT_PHOTOS,
                                len(SAMPLE_FILES), seed + 2, size, (3, 5), (24 * scale, 64 * scale))
        example = images[index]
        Image.fromarray(example.image).save(out_dir / name, quality=92)
        truth[name] = [{"label": list(FASHION_GROUPS)[label - 1], "box": box.tolist()}
                       for label, box in zip(example.labels, example.boxes)]
    write_json(out_dir / "detector_composed.json", truth)
    print(f"wrote {', '.join(name for name, _ in SAMPLE_FILES)} and detector_composed.json into {out_dir}")


def parse_args(argv: list[str] | None = None):
    parser = build_parser(__doc__.splitlines()[0], default_out="artifacts/detector", default_epochs=1)
    parser.add_argument("--dataset", choices=DATASETS, default="composed", help="(default %(default)s)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"),
                        help="Fashion-MNIST root, VOC root (holding VOCdevkit/) or COCO image folder")
    parser.add_argument("--ann", type=Path, help="--dataset coco: the instances JSON")
    parser.add_argument("--year", default="2012", help="--dataset voc: the VOC year (default %(default)s)")
    parser.add_argument("--train-images", type=positive_int, default=17600,
                        help="composed training images, each made when it is used (default %(default)s: 2,200 steps "
                             "of 2 x 4 images, the knee of held-out AP against steps, docs/models/detector.md)")
    parser.add_argument("--heldout-images", type=positive_int, default=200, help="composed held-out images")
    parser.add_argument("--arch", choices=("small", "resnet50"), default="small",
                        help="backbone: the small one built here, or ResNet-50 FPN (for GPUs)")
    parser.add_argument("--weights", choices=("coco",), help="start from torchvision's COCO weights (needs internet;"
                                                             " implies --arch resnet50)")
    parser.add_argument("--width", type=positive_int, default=16, help="channels of the small backbone's first stage")
    parser.add_argument("--min-size", type=positive_int, default=128, help="images are resized to this short side")
    parser.add_argument("--max-size", type=positive_int, default=256, help="... and at most this long side")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default %(default)s)")
    parser.add_argument("--log-every", type=positive_int, default=25, help="steps between progress lines")
    parser.add_argument("--samples", type=Path, metavar="DIR", help="write the composed sample images and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.samples:
        return write_samples(args.samples, args.data_dir, args.seed)
    job = Distributed.from_environment()
    generator = seed_everything(args.seed, job.local_world_size, args.threads)
    log = job.log
    with contextlib.nullcontext() if job.is_main else contextlib.redirect_stdout(io.StringIO()):
        data = load_data(args)  # where the data came from: said once, by rank 0
    heldout = limited(data.heldout, args.limit)
    training = data.train if args.limit is None else limited(data.train, args.limit)
    if not len(training) or not heldout:
        raise DataError(f"{data.name}: {len(training)} training and {len(heldout)} held-out images; need both")
    log(f"{data.name}: {len(training)} training, {len(heldout)} held-out images, classes {', '.join(data.labels)}"
        + (f"; {job.world_size} processes" if job.world_size > 1 else ""), flush=True)

    spec = model_spec(args, num_classes=len(data.labels) + 1)
    model = build(spec)
    if args.weights == "coco":
        model = coco_pretrained(model)
    model.to(job.device, memory_format=torch.channels_last)  # oneDNN's convolutions: ~8 % faster steps on a CPU
    started, cpu_started = time.perf_counter(), time.process_time()
    loss = train(job.wrap(model), training, args, job, generator, log)
    train_seconds = time.perf_counter() - started
    cpu_seconds = torch.tensor([time.process_time() - cpu_started], dtype=torch.float64)
    if job.world_size > 1:
        dist.all_reduce(cpu_seconds)  # every process's CPU time
    if not job.is_main:  # rank 0 evaluates and writes the artifacts
        job.finish()
        return {}
    kinds = ("bbox", "segm") if data.real_masks else ("bbox",)
    test = coco_metrics(coco_ground_truth(heldout, data.labels), detect(model, heldout, job.device), data.labels,
                        kinds)
    log("held-out " + "  ".join(f"{name} {value:.3f}" for name, value in test.items()), flush=True)

    manifest = {"model": "detector", **spec, "labels": data.labels,
                "input": {"min_size": args.min_size, "max_size": args.max_size}, "real_masks": data.real_masks}
    dataset = {"name": data.name, "n_train": len(training), "n_test": len(heldout)}
    metrics = metrics_record("detector", dataset, args, train_seconds, {**test, "final_train_loss": loss})
    metrics["train_cpu_seconds"] = round(cpu_seconds.item(), 1)  # on a shared machine: the work, not the waiting
    metrics["torch_threads"], metrics["processes"] = torch.get_num_threads(), job.world_size
    metrics["evaluation"] = "pycocotools COCOeval on the held-out images (AP@[.5:.95], AP@.5, AP@.75)"
    model.cpu()
    write_artifacts(args.out, model, manifest, metrics)
    job.finish()
    return metrics


if __name__ == "__main__":
    run_cli(main)
