"""Train the digit CNN (models.mnist.DigitCNN) on scikit-learn's digits (offline) or on MNIST.

Every image goes through models.mnist.canonicalize_digit, the function the served model applies
to each request, so training and serving see the same geometry. Random affine augmentation (and,
with --augment strong, stroke-thickness and blur variation) makes the 8x8-sourced digits transfer
to real MNIST digits and photos.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from models import architecture, build
from models.mnist import CANVAS_SIZE, NORMALIZE, canonicalize_digit
from train.common import (
    DataError,
    build_parser,
    calibration_sample,
    fit,
    metrics_record,
    ordered_batches,
    positive_int,
    predict,
    run_cli,
    seed_everything,
    shuffled_batches,
    train_one_epoch,
    write_artifacts,
)

LABELS = [str(digit) for digit in range(10)]
DATASETS = ("digits", "mnist")


@dataclass(frozen=True)
class Augmentation:
    """Ranges of the random distortions applied to each training image."""

    degrees: float
    scale: float
    shift_pixels: float
    shear: float
    stroke: bool
    blur: bool


AUGMENTATIONS = {
    "none": Augmentation(degrees=0, scale=0, shift_pixels=0, shear=0, stroke=False, blur=False),
    "light": Augmentation(degrees=12, scale=0.1, shift_pixels=2, shear=0.15, stroke=False, blur=False),
    "strong": Augmentation(degrees=20, scale=0.2, shift_pixels=3, shear=0.3, stroke=True, blur=True),
}


@dataclass
class DigitSplit:
    """Train and held-out images (uint8, white digit on black, source geometry) with labels 0..9."""

    name: str
    n_total: int
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def load_split(
    dataset: str = "digits",
    seed: int = 0,
    test_fraction: float = 0.2,
    data_dir: Path = Path("data"),
    limit: int | None = None,
) -> DigitSplit:
    """The exact train/held-out split a training run with these arguments uses.

    digits: scikit-learn's 1,797 8x8 digits (0..16, scaled to 0..255), stratified split by seed.
    mnist: torchvision's MNIST under data_dir (downloaded if absent), its official train/test sets.
    limit keeps the first `limit` samples of each side.
    """
    if dataset == "digits":
        digits = load_digits()
        images = np.round(digits.images * (255 / 16)).astype(np.uint8)
        train_idx, test_idx = train_test_split(
            np.arange(len(images)), test_size=test_fraction, stratify=digits.target, random_state=seed
        )
        split = DigitSplit("sklearn-digits", len(images), images[train_idx], digits.target[train_idx],
                           images[test_idx], digits.target[test_idx])
    elif dataset == "mnist":
        train_set, test_set = (_torchvision_mnist(data_dir, train) for train in (True, False))
        split = DigitSplit("mnist", len(train_set) + len(test_set), train_set.data.numpy(), train_set.targets.numpy(),
                           test_set.data.numpy(), test_set.targets.numpy())
    else:
        raise DataError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    if limit is not None:
        split.train_images, split.train_labels = split.train_images[:limit], split.train_labels[:limit]
        split.test_images, split.test_labels = split.test_images[:limit], split.test_labels[:limit]
    return split


def _torchvision_mnist(data_dir: Path, train: bool):
    from torchvision import datasets

    try:
        return datasets.MNIST(root=data_dir, train=train, download=True)
    except (RuntimeError, OSError) as error:
        reason = " ".join(str(error).split())
        raise DataError(f"cannot load MNIST from {data_dir}/MNIST/raw nor download it: {reason}") from error


def canonical_batch(images: np.ndarray) -> torch.Tensor:
    """Canonicalised images as a float tensor [N, 1, 28, 28] in [0, 1] (not yet normalised)."""
    try:
        canonical = np.stack([canonicalize_digit(image) for image in images])
    except ValueError as error:
        raise DataError(f"training image without a digit: {error}") from error
    return torch.from_numpy(canonical).unsqueeze(1)


def normalize(images: torch.Tensor) -> torch.Tensor:
    mean, std = NORMALIZE
    return (images - mean) / std


def augment(images: torch.Tensor, augmentation: Augmentation, generator: torch.Generator) -> torch.Tensor:
    """Random affine warp (rotation, scale, shear, shift), then optional stroke and blur changes, per image."""
    n = len(images)

    def uniform(half_range: float) -> torch.Tensor:
        return torch.empty(n).uniform_(-half_range, half_range, generator=generator)

    angle = uniform(math.radians(augmentation.degrees))
    zoom = 1 + uniform(augmentation.scale)
    shear = uniform(augmentation.shear)
    shift = 2 * augmentation.shift_pixels / CANVAS_SIZE
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([
        torch.stack([cos, -sin + shear, uniform(shift)], dim=1),
        torch.stack([sin, cos, uniform(shift)], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, align_corners=False)

    if augmentation.stroke:  # blend towards a dilated (thicker) or an eroded (thinner) stroke
        weight = torch.empty(n, 1, 1, 1).uniform_(-1.0, 1.0, generator=generator)
        thicker = F.max_pool2d(images, 3, stride=1, padding=1)
        thinner = -F.max_pool2d(-images, 3, stride=1, padding=1)
        images = images + weight.clamp(min=0) * (thicker - images) + (-weight).clamp(min=0) * (thinner - images)
    if augmentation.blur:
        kernel = torch.tensor([1.0, 2.0, 1.0])
        kernel = (kernel[:, None] * kernel[None, :] / 16).view(1, 1, 3, 3)
        weight = torch.rand(n, 1, 1, 1, generator=generator)
        images = images + weight * (F.conv2d(images, kernel, padding=1) - images)
    return images


def parse_args(argv: list[str] | None = None):
    parser = build_parser(__doc__.splitlines()[0], default_out="artifacts/mnist", default_epochs=30)
    parser.add_argument("--dataset", default="digits", help=f"{' | '.join(DATASETS)} (default %(default)s)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="MNIST root: DIR/MNIST/raw/*-ubyte (default %(default)s)")
    parser.add_argument("--augment", choices=sorted(AUGMENTATIONS), default="light", help="augmentation strength (default %(default)s)")
    parser.add_argument("--width", type=positive_int, default=32, help="channels of the first conv layer (default %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the one-cycle schedule (default %(default)s)")
    return parser.parse_args(argv)


def labelled_requests(record: dict, path: str | None = None) -> list[tuple[str, bytes, str, str]]:
    """Promotion's labelled set (registry.Promotion): the digits that the training run of ``record`` (its
    metrics.json) held out, or the test set of the torchvision MNIST folder ``path``; (key, PNG body, content type,
    label) each."""
    import io

    from PIL import Image

    args = record["args"]
    if path:
        split = load_split("mnist", data_dir=Path(path))
    else:
        split = load_split(args.get("dataset", "digits"), record["seed"], args["test_fraction"],
                           Path(args.get("data_dir") or "data"), args.get("limit"))
    requests = []
    for image, label in zip(split.test_images, split.test_labels):
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
        requests.append((f"{label}:{buffer.getvalue().hex()}", buffer.getvalue(), "image/png", str(int(label))))
    return requests


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    generator = seed_everything(args.seed, threads=args.threads)
    split = load_split(args.dataset, args.seed, args.test_fraction, args.data_dir, args.limit)
    train_images, test_images = canonical_batch(split.train_images), normalize(canonical_batch(split.test_images))
    train_labels, test_labels = torch.from_numpy(split.train_labels).long(), torch.from_numpy(split.test_labels).long()

    spec = architecture("models.mnist", "DigitCNN", width=args.width)
    model = build(spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(train_images) / args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    augmentation = AUGMENTATIONS[args.augment]

    def training_batches():
        for indices in shuffled_batches(len(train_images), args.batch_size, generator):
            yield normalize(augment(train_images[indices], augmentation, generator)), train_labels[indices]

    def evaluate() -> dict[str, float]:
        logits = predict(model, (test_images[i] for i in ordered_batches(len(test_images), 512)))
        return {"accuracy": (logits.argmax(1) == test_labels).float().mean().item()}

    test_metrics, seconds = fit(args.epochs, lambda: train_one_epoch(model, optimizer, loss_fn, training_batches(), scheduler), evaluate)

    mean, std = NORMALIZE
    manifest = {
        "model": "mnist",
        **spec,
        "labels": LABELS,
        "input": {"size": CANVAS_SIZE, "mean": mean, "std": std},
    }
    dataset = {"name": split.name, "n_total": split.n_total, "n_train": len(train_images), "n_test": len(test_images)}
    metrics = metrics_record("mnist", dataset, args, seconds, test_metrics)
    write_artifacts(args.out, model, manifest, metrics,
                    quantization=(normalize(calibration_sample(train_images)), test_images))
    return metrics


if __name__ == "__main__":
    run_cli(main)
