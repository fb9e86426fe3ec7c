"""Train the CycleGAN (models.cyclegan: two ResNet generators, two PatchGAN critics) and write its artifact folder.

Default data (offline): Fashion-MNIST (train/datasets.py) as two unpaired domains. Domain A is the items as the data
set has them (light on black); domain B is *other* items of the same ten kinds drawn as line drawings (``line_drawing``:
the item's edges as dark strokes on white). The training set's items are split in two halves, one per domain, and so
is the test set's: no item appears in both domains, so no image is ever paired with its translation.

``--data-dir DIR`` trains on the standard CycleGAN layout instead (``trainA/ trainB/ testA/ testB/``, e.g.
horse2zebra: any images Pillow reads, brought to ``--size`` by scaling the shorter side and cropping the centre;
grey when every image is grey, else RGB).

Losses (Zhu et al. 2017, as in the course): least-squares adversarial, cycle consistency (L1, ``--cycle-weight``) and
identity (L1, ``--identity-weight``); Adam (beta1 0.5), constant for the first half of the steps and then decayed
linearly to 0; the critics see a pool of 50 past fakes. The defaults fit the 6-minute budget of a 2-core CPU: small
generators (width 16, one downsampling, 3 residual blocks at 14x14), batches of 8, 2,000 steps at a learning rate of
2e-3 (the paper's 2e-4 with batches of 1 over 200 epochs is days of CPU). docs/models/cyclegan.md has what each
choice bought.

Evaluation on the held-out images, into metrics.json:

- ``cycle_error_a``, ``cycle_error_b``: mean absolute difference, in [0, 1] pixel units, between a held-out image and
  its round trip (A -> B -> A, B -> A -> B);
- with the default data, ``class_preservation``: the share of held-out images whose kind a classifier of the
  *target* domain (a small CNN trained here on that domain's training half, labels included) still recognises after
  translation, both directions pooled (``preservation_a2b``, ``preservation_b2a`` each); and
  ``judge_accuracy_a``/``_b``, each classifier's accuracy on real held-out images of its own domain: the ceiling.

    python -m train.cyclegan --out artifacts/cyclegan --threads 2
"""

import itertools
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from models import architecture, build
from models.cyclegan import PatchDiscriminator, to_model
from train.common import (DataError, build_parser, metrics_record, positive_int, run_cli, seed_everything,
                          write_artifacts)
from train.datasets import fashion_mnist

FASHION_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
POOL_SIZE = 50
STROKE_FROM, STROKE_RAMP = 0.2, 0.2
"""An edge is drawn where its strength passes STROKE_FROM of the item's strongest, fully black STROKE_RAMP above."""
GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def line_drawing(items: np.ndarray) -> np.ndarray:
    """uint8 grey items [N, H, W], light on dark -> their line drawings, uint8 [N, H, W]: where the Sobel edge
    strength of an item passes a fifth of its strongest edge, a dark stroke (anti-aliased over the next fifth) on
    white paper."""
    images = torch.tensor(items, dtype=torch.float32).unsqueeze(1) / 255  # a copy: read-only arrays are welcome
    sobel = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
    kernels = torch.stack([sobel, sobel.T]).unsqueeze(1)
    gradients = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernels)
    strength = gradients.pow(2).sum(dim=1).sqrt()
    relative = strength / strength.flatten(1).amax(dim=1).clamp(min=1e-6).view(-1, 1, 1)
    strokes = ((relative - STROKE_FROM) / STROKE_RAMP).clamp(0, 1)
    return (255 * (1 - strokes)).round().to(torch.uint8).numpy()


def fashion_domains(data_dir: Path, rng: np.random.Generator, limit: int | None):
    """{"trainA", "trainB", "testA", "testB"}: (uint8 images [N, 28, 28], labels [N]) of Fashion-MNIST, each split's
    items halved at random between the domains, domain B's drawn as line drawings."""
    domains = {}
    for split, train in (("train", True), ("test", False)):
        dataset = fashion_mnist(data_dir, train)
        images, labels = dataset.data.numpy(), dataset.targets.numpy()
        order = rng.permutation(len(images))
        halves = order[: len(order) // 2], order[len(order) // 2:]
        if limit:
            halves = tuple(half[:limit] for half in halves)
        domains[f"{split}A"] = images[halves[0]], labels[halves[0]]
        domains[f"{split}B"] = line_drawing(images[halves[1]]), labels[halves[1]]
    return domains


def fitted(path: Path, channels: int, size: int) -> np.ndarray:
    """An image file as uint8 [size, size] (grey) or [size, size, 3]: shorter side scaled to ``size``, centre crop."""
    with Image.open(path) as image:
        image = image.convert("L" if channels == 1 else "RGB")
        scale = size / min(image.size)
        side = size / scale
        left, top = (image.width - side) / 2, (image.height - side) / 2
        return np.asarray(image.resize((size, size), Image.Resampling.LANCZOS,
                                       box=(left, top, left + side, top + side)))


def folder_domains(data_dir: Path, size: int, limit: int | None):
    """The CycleGAN layout of ``data_dir``: {"trainA", ...}: (uint8 images [N, H, W(, 3)], None), and the channels."""
    files = {}
    for name in ("trainA", "trainB", "testA", "testB"):
        folder = data_dir / name
        found = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        if not found:
            raise DataError(f"--data-dir {data_dir}: no images in {name}/ (expected trainA/ trainB/ testA/ testB/, "
                            "the CycleGAN layout)")
        files[name] = found[:limit] if limit else found
    grey = True
    for path in itertools.chain(*files.values()):
        with Image.open(path) as image:
            grey = image.mode in GREY_MODES
        if not grey:
            break
    channels = 1 if grey else 3
    return {name: (np.stack([fitted(path, channels, size) for path in paths]), None)
            for name, paths in files.items()}, channels


class ImagePool:
    """The last ``POOL_SIZE`` fakes: half of what a critic sees is an older fake (Shrivastava et al.), which steadies
    the adversarial game."""

    def __init__(self, generator: torch.Generator):
        self.images, self.generator = [], generator

    def query(self, fakes: torch.Tensor) -> torch.Tensor:
        shown = []
        for fake in fakes.detach():
            if len(self.images) < POOL_SIZE:
                self.images.append(fake)
                shown.append(fake)
            elif torch.rand(1, generator=self.generator).item() < 0.5:
                slot = int(torch.randint(POOL_SIZE, (1,), generator=self.generator))
                shown.append(self.images[slot])
                self.images[slot] = fake
            else:
                shown.append(fake)
        return torch.stack(shown)


def judge(channels: int, classes: int) -> nn.Module:
    """The small CNN that tells a domain's kinds apart, for ``class_preservation``."""
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.Flatten(),
        nn.Linear(64 * 7 * 7, classes))


def train_judge(images: torch.Tensor, labels: np.ndarray, generator: torch.Generator, epochs: int = 2) -> nn.Module:
    """A ``judge`` fitted to one domain's labelled training images (Adam, ``epochs`` epochs)."""
    model = judge(images.shape[1], int(labels.max()) + 1)
    targets = torch.from_numpy(labels).long()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(images), generator=generator).split(128):
            loss = F.cross_entropy(model(images[batch]), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.inference_mode()
def in_batches(function, images: torch.Tensor, size: int = 500) -> torch.Tensor:
    return torch.cat([function(batch) for batch in images.split(size)])


def accuracy(model: nn.Module, images: torch.Tensor, labels: np.ndarray) -> float:
    return float((in_batches(model, images).argmax(dim=1).numpy() == labels).mean())


def evaluate(gan, domains: dict, generator: torch.Generator, log=print) -> dict[str, float]:
    """Held-out cycle errors and, where the domains are labelled, class preservation (see the module's doc)."""
    gan.eval()
    test_a, test_b = to_model(domains["testA"][0]), to_model(domains["testB"][0])
    fake_b, fake_a = in_batches(gan.a2b, test_a), in_batches(gan.b2a, test_b)
    figures = {"cycle_error_a": float((in_batches(gan.b2a, fake_b) - test_a).abs().mean() / 2),
               "cycle_error_b": float((in_batches(gan.a2b, fake_a) - test_b).abs().mean() / 2)}
    if domains["trainA"][1] is None:
        return figures
    started = time.perf_counter()
    judge_a = train_judge(to_model(domains["trainA"][0]), domains["trainA"][1], generator)
    judge_b = train_judge(to_model(domains["trainB"][0]), domains["trainB"][1], generator)
    labels_a, labels_b = domains["testA"][1], domains["testB"][1]
    figures |= {"judge_accuracy_a": accuracy(judge_a, test_a, labels_a),
                "judge_accuracy_b": accuracy(judge_b, test_b, labels_b),
                "preservation_a2b": accuracy(judge_b, fake_b, labels_a),
                "preservation_b2a": accuracy(judge_a, fake_a, labels_b)}
    figures["class_preservation"] = ((figures["preservation_a2b"] * len(labels_a)
                                      + figures["preservation_b2a"] * len(labels_b)) / (len(labels_a) + len(labels_b)))
    log(f"judges trained in {time.perf_counter() - started:.1f}s", flush=True)
    return figures


def add_gan_options(parser, steps_per_epoch: int = 400, width: int = 16, blocks: int = 3, downsamplings: int = 1):
    """The CycleGAN's training options (what ``train_gan`` reads), with these defaults."""
    parser.add_argument("--steps-per-epoch", type=positive_int, default=steps_per_epoch,
                        help="generator updates per epoch (default %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--width", type=positive_int, default=width, help="generator and critic base channels")
    parser.add_argument("--blocks", type=positive_int, default=blocks, help="residual blocks per generator")
    parser.add_argument("--downsamplings", type=positive_int, default=downsamplings,
                        help="stride-2 steps before the residual blocks: the paper's 2 leave a 7x7 map of a 28x28 "
                             "image, 1 a 14x14 one, which keeps more of the items' kinds (default %(default)s)")
    parser.add_argument("--cycle-weight", type=float, default=5.0,
                        help="the paper's is 10; here 10 let A->B hide grey levels in dark blobs (default %(default)s)")
    parser.add_argument("--identity-weight", type=float, default=1.0,
                        help="the paper's is half the cycle weight; the domains here differ in polarity, which an "
                             "identity mapping fights (default %(default)s)")
    parser.add_argument("--lr", type=float, default=2e-3)


def train_gan(gan, train_a: torch.Tensor, train_b: torch.Tensor, args, generator: torch.Generator) -> float:
    """Fit ``gan`` (a ``CycleGAN``) to unpaired images of its two domains ([N, C, H, W] in [-1, 1]) with two fresh
    critics, as the module's doc says; the seconds it took."""
    channels = train_a.shape[1]
    critic_a, critic_b = PatchDiscriminator(channels, args.width), PatchDiscriminator(channels, args.width)
    steps = args.epochs * args.steps_per_epoch
    adam = {"lr": args.lr, "betas": (0.5, 0.999)}
    optimizer_g = torch.optim.Adam(gan.parameters(), **adam)
    optimizer_d = torch.optim.Adam([*critic_a.parameters(), *critic_b.parameters()], **adam)
    decay = lambda step: min(1.0, 2 * (1 - step / steps))  # noqa: E731  constant, then linear to 0
    schedulers = [torch.optim.lr_scheduler.LambdaLR(optimizer, decay) for optimizer in (optimizer_g, optimizer_d)]
    pool_a, pool_b = ImagePool(generator), ImagePool(generator)

    def adversarial(scores, real: bool):
        return F.mse_loss(scores, torch.full_like(scores, 1.0 if real else 0.0))

    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        gan.train()
        epoch_started, totals = time.perf_counter(), np.zeros(3)
        for _ in range(args.steps_per_epoch):
            real_a = train_a[torch.randint(len(train_a), (args.batch_size,), generator=generator)]
            real_b = train_b[torch.randint(len(train_b), (args.batch_size,), generator=generator)]
            fake_b, fake_a = gan.a2b(real_a), gan.b2a(real_b)
            for critic in (critic_a, critic_b):
                critic.requires_grad_(False)
            loss_gan = adversarial(critic_b(fake_b), True) + adversarial(critic_a(fake_a), True)
            loss_cycle = F.l1_loss(gan.b2a(fake_b), real_a) + F.l1_loss(gan.a2b(fake_a), real_b)
            loss_identity = F.l1_loss(gan.a2b(real_b), real_b) + F.l1_loss(gan.b2a(real_a), real_a)
            loss_g = loss_gan + args.cycle_weight * loss_cycle + args.identity_weight * loss_identity
            optimizer_g.zero_grad()
            loss_g.backward()
            optimizer_g.step()
            for critic in (critic_a, critic_b):
                critic.requires_grad_(True)
            loss_d = 0.5 * sum(adversarial(critic(real), True) + adversarial(critic(pool.query(fake)), False)
                               for critic, real, fake, pool in ((critic_a, real_a, fake_a, pool_a),
                                                                (critic_b, real_b, fake_b, pool_b)))
            optimizer_d.zero_grad()
            loss_d.backward()
            optimizer_d.step()
            for scheduler in schedulers:
                scheduler.step()
            totals += [loss_gan.item(), loss_cycle.item(), loss_d.item()]
        mean = totals / args.steps_per_epoch
        print(f"epoch {epoch:3d}/{args.epochs}  adversarial {mean[0]:.3f}  cycle {mean[1]:.4f}  critics {mean[2]:.3f}  "
              f"{time.perf_counter() - epoch_started:.1f}s", flush=True)
    return time.perf_counter() - started


def fit_and_write(name: str, module: str, domains: dict, channels: int, args, generator: torch.Generator,
                  dataset: dict, polarity: dict, domain_names: dict) -> dict:
    """Build the ``CycleGAN`` of ``module``, train it on ``domains`` (``fashion_domains``' shape), evaluate it and
    write ``args.out``: the manifest names ``name``, the input (size, channels, each domain's ``polarity``, may be
    empty) and what each domain is (``domain_names``); metrics.json the held-out figures. Returns the metrics."""
    dataset = {**dataset, **{f"n_{split}": len(images) for split, (images, _) in domains.items()}}
    dataset["n_test"] = dataset["n_testA"] + dataset["n_testB"]
    train_a, train_b = to_model(domains["trainA"][0]), to_model(domains["trainB"][0])
    spec = architecture(module, "CycleGAN", channels=channels, width=args.width, blocks=args.blocks,
                        downsamplings=args.downsamplings)
    gan = build(spec)
    seconds = train_gan(gan, train_a, train_b, args, generator)
    test = evaluate(gan, domains, generator)
    print("held-out " + "  ".join(f"{name} {value:.4f}" for name, value in test.items()), flush=True)
    manifest = {"model": name, **spec, "input": {"size": train_a.shape[-1], "channels": channels, "polarity": polarity},
                "domains": domain_names}
    metrics = metrics_record(name, dataset, args, seconds, test)
    write_artifacts(args.out, gan, manifest, metrics)
    return metrics


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser(__doc__.splitlines()[0], default_out="artifacts/cyclegan", default_epochs=5,
                          held_out_split=False)
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="a CycleGAN folder (trainA/ trainB/ testA/ testB/); default: Fashion-MNIST items and "
                             "line drawings")
    parser.add_argument("--fashion-dir", type=Path, default=Path("data"),
                        help="where Fashion-MNIST is cached (default %(default)s; train/datasets.py finds it)")
    parser.add_argument("--size", type=int, default=28, help="image side with --data-dir, a multiple of "
                        "2 ** --downsamplings (default %(default)s; Fashion-MNIST is 28)")
    add_gan_options(parser)
    args = parser.parse_args(argv)
    if args.size % 2 ** args.downsamplings:
        parser.error(f"--size must be a multiple of {2 ** args.downsamplings} ({args.downsamplings} stride-2 "
                     f"downsamplings), got {args.size}")
    generator = seed_everything(args.seed, threads=args.threads)
    rng = np.random.default_rng(args.seed)
    if args.data_dir is None:
        domains, channels = fashion_domains(args.fashion_dir, rng, args.limit), 1
        dataset = {"name": "Fashion-MNIST: A = items as photographed (light on black), B = other items as line "
                           "drawings (Sobel edges, dark on white); disjoint items per domain",
                   "labels": FASHION_LABELS}
        polarity = {"a": "light-on-dark", "b": "dark-on-light"}
        domain_names = {"a": "items (Fashion-MNIST, light on black)", "b": "line drawings (dark on white)"}
    else:
        domains, channels = folder_domains(args.data_dir, args.size, args.limit)
        dataset = {"name": f"CycleGAN folders of {args.data_dir}"}
        polarity, domain_names = {}, {"a": f"{args.data_dir}/trainA", "b": f"{args.data_dir}/trainB"}
    return fit_and_write("cyclegan", "models.cyclegan", domains, channels, args, generator, dataset, polarity,
                         domain_names)


if __name__ == "__main__":
    run_cli(main)
