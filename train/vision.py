"""Train an image classifier (models/vision/) on Fashion-MNIST (default) or CIFAR-10, on one process or under torchrun.

    python -m train.vision                                      # Fashion-MNIST, the small ResNet: artifacts/fashion
    python -m train.vision --dataset cifar10 --arch resnet18 --out artifacts/cifar10
    torchrun --nproc_per_node 2 -m train.vision --limit 2000    # DistributedDataParallel (gloo on CPU, nccl on CUDA)

Held-out metrics come from each data set's official test set. Fashion-MNIST's images, train and test, are brought
to light-on-dark as the handler brings every request (models.vision.light_on_dark), so that dark-on-light items read
too. Under torchrun every process trains on its share of each epoch (a DistributedSampler) and rank 0 evaluates and
writes the artifacts: the same layout as one process.
"""

import contextlib
import io
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models import architecture, build
from models.vision import LIGHT_ON_DARK, light_on_dark
from train.common import (
    DataError,
    Distributed,
    build_parser,
    calibration_sample,
    fit,
    metrics_record,
    ordered_batches,
    positive_int,
    predict,
    run_cli,
    seed_everything,
    train_one_epoch,
    write_artifacts,
)
from train.datasets import fashion_mnist

DATASETS = {"fashion-mnist": "fashion", "cifar10": "cifar10"}
"""--dataset -> the model name it is served as."""

ARCHS = {  # --arch -> (model module, ARCHITECTURES key)
    "resnet-small": ("models.vision.resnet", "ResNetSmall"),
    "resnet18": ("models.vision.resnet", "ResNet18"),
    "vgg11": ("models.vision.vgg", "VGG11"),
    "vgg16": ("models.vision.vgg", "VGG16"),
    "mobilenet": ("models.vision.mobilenet", "MobileNet"),
}
AUGMENTATIONS = ("none", "flip", "flip-crop")
CROP_PADDING = 2


@dataclass
class ImageSplit:
    """uint8 images [N, C, H, W] and int64 labels of the official train and test sets; ``polarity``: the
    manifest's ``input.polarity`` (``LIGHT_ON_DARK`` where the images were brought to it), else None."""

    name: str
    classes: list[str]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    polarity: str | None = None


PROGRESS_IMAGES = 2000
"""Test images evaluated after each epoch but the last, for the progress line."""


def load_split(dataset: str, data_dir: Path, limit: int | None = None, log=print) -> ImageSplit:
    """The official train/test split of ``dataset`` (Fashion-MNIST's light-on-dark); ``limit`` keeps the first
    ``limit`` images of each side."""
    polarity = None
    if dataset == "fashion-mnist":
        train_set, test_set = (fashion_mnist(data_dir, train, log) for train in (True, False))
        as_tensor = [(torch.from_numpy(light_on_dark(s.data.numpy())).unsqueeze(1), s.targets)
                     for s in (train_set, test_set)]
        polarity = LIGHT_ON_DARK
    elif dataset == "cifar10":
        train_set, test_set = (_cifar10(data_dir, train) for train in (True, False))
        log(f"CIFAR-10 from {data_dir}: {len(train_set)} training images")
        as_tensor = [(torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets))
                     for s in (train_set, test_set)]
    else:
        raise DataError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    (train_images, train_labels), (test_images, test_labels) = ((x[:limit], y[:limit].long()) for x, y in as_tensor)
    return ImageSplit(dataset, list(train_set.classes), train_images, train_labels, test_images, test_labels,
                      polarity)


def _cifar10(data_dir: Path, train: bool):
    from torchvision import datasets

    try:
        return datasets.CIFAR10(root=data_dir, train=train, download=True)
    except Exception as error:  # URLError offline, a corrupt folder: one line, not a traceback
        raise DataError(f"no CIFAR-10: not in {data_dir}/cifar-10-batches-py and the download failed: "
                        f"{type(error).__name__}: {' '.join(str(error).split())}") from None


def channel_statistics(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) of uint8 images [N, C, H, W], as fractions of 255."""
    pixels = images.transpose(0, 1).reshape(images.shape[1], -1).double() / 255
    return [round(v, 4) for v in pixels.mean(1).tolist()], [round(v, 4) for v in pixels.std(1).tolist()]


def augment(images: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips ("flip"), and shifts of up to CROP_PADDING pixels ("flip-crop"), per image."""
    if kind == "none":
        return images
    n, _, height, width = images.shape
    flip = torch.rand(n, generator=generator) < 0.5
    images = torch.where(flip.view(n, 1, 1, 1).to(images.device), images.flip(3), images)
    if kind == "flip-crop":
        padded = F.pad(images, (CROP_PADDING,) * 4)
        dy, dx = (torch.randint(0, 2 * CROP_PADDING + 1, (n,), generator=generator) for _ in range(2))
        rows = (torch.arange(height) + dy[:, None]).to(images.device)
        cols = (torch.arange(width) + dx[:, None]).to(images.device)
        batch = torch.arange(n, device=images.device)[:, None, None]
        images = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return images


def parse_args(argv: list[str] | None = None):
    parser = build_parser(__doc__.splitlines()[0], default_out="artifacts/fashion", default_epochs=5,
                          held_out_split=False)  # Fashion-MNIST and CIFAR-10 have official test sets
    parser.add_argument("--dataset", default="fashion-mnist", help=f"{' | '.join(DATASETS)} (default %(default)s)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"),
                        help="data root: DIR/FashionMNIST/raw or DIR/cifar-10-batches-py (default %(default)s)")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="resnet-small",
                        help="architecture (default %(default)s; resnet18 is the choice for a GPU)")
    parser.add_argument("--width", type=positive_int, default=None, help="base channels (default: the arch's own)")
    parser.add_argument("--augment", choices=AUGMENTATIONS, default="none",
                        help="(default %(default)s: in 5 epochs flips cost Fashion-MNIST accuracy)")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="per process (default %(default)s)")
    parser.add_argument("--lr", type=float, default=4e-3,
                        help="peak learning rate of the one-cycle AdamW schedule (default %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    job = Distributed.from_environment()
    generator = seed_everything(args.seed, job.local_world_size, args.threads)
    log = job.log
    split = load_split(args.dataset, args.data_dir, args.limit, log)
    mean, std = channel_statistics(split.train_images)
    channels, size = split.train_images.shape[1], split.train_images.shape[-1]
    mean_t, std_t = (torch.tensor(v, device=job.device).view(1, -1, 1, 1) for v in (mean, std))

    def normalize(images: torch.Tensor) -> torch.Tensor:
        return ((images.float() / 255 - mean_t) / std_t).contiguous(memory_format=torch.channels_last)

    module, name = ARCHS[args.arch]
    width = {} if args.width is None else {"width": args.width}
    spec = architecture(module, name, in_channels=channels, num_classes=len(split.classes), **width)
    model = build(spec).to(job.device, memory_format=torch.channels_last)  # oneDNN and cuDNN: ~25% faster
    trained = job.wrap(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    epoch_batches = job.epoch_indices(len(split.train_images), args.batch_size, args.seed, generator)
    steps_per_epoch = math.ceil(len(split.train_images) / job.world_size / args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    test_images = split.test_images
    epoch = 0

    def training_batches():
        for indices in epoch_batches(epoch):
            images = augment(normalize(job.to_device(split.train_images[indices])), args.augment, generator)
            yield images, job.to_device(split.train_labels[indices])

    def run_epoch() -> float:
        nonlocal epoch
        epoch += 1
        return train_one_epoch(trained, optimizer, loss_fn, training_batches(), scheduler)

    def evaluate() -> dict[str, float]:
        """The test set's accuracy after the last epoch; after the others (progress lines only), that of its first
        PROGRESS_IMAGES images: a fifth of the cost (a 10,000-image pass takes ~3 s on 2 cores)."""
        if not job.is_main:
            return {}
        count = len(test_images) if epoch == args.epochs else min(PROGRESS_IMAGES, len(test_images))
        batches = (normalize(job.to_device(test_images[i])) for i in ordered_batches(count, 500))
        correct = (predict(model, batches).argmax(1).cpu() == split.test_labels[:count]).float().mean().item()
        return {"accuracy" if count == len(test_images) else f"accuracy of {count:,} images": correct}

    quiet = contextlib.nullcontext() if job.is_main else contextlib.redirect_stdout(io.StringIO())
    with quiet:  # one progress line per epoch, from rank 0
        test_metrics, seconds = fit(args.epochs, run_epoch, evaluate)
    metrics = None
    if job.is_main:
        model_name = DATASETS[args.dataset]
        manifest = {"model": model_name, **spec, "labels": split.classes,
                    "input": {"channels": channels, "size": size, "resize": size, "crop": "center",
                              "mean": mean, "std": std, "polarity": split.polarity}}
        dataset = {"name": split.name, "n_total": len(split.train_images) + len(split.test_images),
                   "n_train": len(split.train_images), "n_test": len(split.test_images),
                   "processes": job.world_size, "device": job.device.type,
                   "parameters": sum(p.numel() for p in model.parameters())}
        metrics = metrics_record(model_name, dataset, args, seconds, test_metrics)

        def model_inputs(images):  # as the exports take them
            return normalize(job.to_device(images)).cpu().contiguous()

        held_out = torch.cat([model_inputs(test_images[i]) for i in ordered_batches(len(test_images), 500)])
        write_artifacts(args.out, model.cpu(), manifest, metrics,
                        quantization=(model_inputs(calibration_sample(split.train_images)), held_out))
    job.finish()
    return metrics


if __name__ == "__main__":
    run_cli(main)
