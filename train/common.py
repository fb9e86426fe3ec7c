"""Shared training helpers: common flags, seeding, mini-batches, the epoch loop, torchrun jobs and artifact writing."""

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from models import available_cpus
from train.export import export, quantize

Batch = tuple[torch.Tensor, torch.Tensor]


class DataError(ValueError):
    """Unusable training data or arguments; the command line reports it in one line and exits with 2."""


def build_parser(description: str, default_out: str, default_epochs: int,
                 held_out_split: bool = True) -> argparse.ArgumentParser:
    """Argument parser with the flags every training script shares; ``held_out_split``: the script draws its own
    held-out split (``--test-fraction``), else its data sets have official test sets and the flag does not exist."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--epochs", type=positive_int, default=default_epochs, help="training epochs (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the initialisation and the shuffling (default %(default)s)")
    parser.add_argument("--out", type=Path, default=Path(default_out), help="artifact folder to write (default %(default)s)")
    if held_out_split:
        parser.add_argument("--test-fraction", type=fraction, default=0.2, help="held-out fraction (default %(default)s; train.mnist --dataset mnist keeps its official test set)")
    parser.add_argument("--limit", type=positive_int, default=None, help="use at most this many training and held-out samples (smoke tests)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch threads (default: this process's share of the CPUs it may use); the figures of a "
                             "seed depend on it")
    return parser


@dataclass
class Distributed:
    """This process's place in a torchrun job (world_size 1 without one) and the device it trains on."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_environment(cls, environ=os.environ) -> "Distributed":
        """torchrun's RANK/LOCAL_RANK/WORLD_SIZE; nccl on a CUDA device per local rank, gloo on the CPU."""
        world_size = int(environ.get("WORLD_SIZE", 1))
        local_rank = int(environ.get("LOCAL_RANK", 0))
        cuda = torch.cuda.is_available()
        device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
        job = cls(int(environ.get("RANK", 0)), local_rank, world_size,
                  int(environ.get("LOCAL_WORLD_SIZE", world_size)), device)
        if world_size > 1:
            if cuda:
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if cuda else "gloo")
        return job

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, *args, **kwargs) -> None:
        """print, on rank 0 only: a torchrun job reports once."""
        if self.is_main:
            print(*args, **kwargs)

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.world_size == 1:
            return model
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def epoch_indices(self, n_samples: int, batch_size: int, seed: int, generator: torch.Generator):
        """A callable giving each epoch's index batches: this rank's share (DistributedSampler) or all of them."""
        if self.world_size == 1:
            return lambda epoch: shuffled_batches(n_samples, batch_size, generator)
        sampler = DistributedSampler(range(n_samples), self.world_size, self.rank, shuffle=True, seed=seed)

        def batches(epoch):
            sampler.set_epoch(epoch)
            return torch.tensor(list(sampler)).split(batch_size)

        return batches

    def finish(self) -> None:
        """Under torchrun: wait for every process, then leave the process group (rank 0 evaluates meanwhile)."""
        if self.world_size > 1:
            dist.barrier()
            dist.destroy_process_group()

    def to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """A CPU batch on the training device: through pinned memory with an asynchronous copy on CUDA."""
        if self.device.type != "cuda":
            return batch
        return batch.pin_memory().to(self.device, non_blocking=True)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def fraction(text: str) -> float:
    """argparse type: a float strictly between 0 and 1."""
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def run_cli(main: Callable[[list[str] | None], object]) -> None:
    """Run a script's main on sys.argv, turning a DataError into one line on stderr and exit code 2 (as argparse does)."""
    try:
        main(None)
    except DataError as error:
        print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
        sys.exit(2)


def seed_everything(seed: int, processes: int = 1, threads: int | None = None) -> torch.Generator:
    """Seed Python, NumPy and torch, set torch's thread count to ``threads`` (``--threads``), else to this process's
    share of the CPUs available (the ``processes`` of a torchrun job on one node share them); return a torch
    generator."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads or max(1, available_cpus() // processes))
    return torch.Generator().manual_seed(seed)


def shuffled_batches(n_samples: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index tensors of a random permutation of range(n_samples), batch_size at a time."""
    yield from torch.randperm(n_samples, generator=generator).split(batch_size)


def ordered_batches(n_samples: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Index tensors of range(n_samples) in order, batch_size at a time (evaluation)."""
    yield from torch.arange(n_samples).split(batch_size)


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    batches: Iterable[Batch],
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> float:
    """One pass of gradient steps over (inputs, targets) batches; returns the sample-weighted mean loss.

    scheduler, if given, steps after every batch.
    """
    model.train()
    total_loss, n_seen = 0.0, 0
    for inputs, targets in batches:
        optimizer.zero_grad()
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total_loss += loss.item() * len(targets)
        n_seen += len(targets)
    return total_loss / n_seen


@torch.no_grad()
def predict(model: nn.Module, inputs: Iterable[torch.Tensor]) -> torch.Tensor:
    """Model outputs for batches of inputs, concatenated, in evaluation mode."""
    model.eval()
    return torch.cat([model(batch) for batch in inputs])


def fit(epochs: int, run_epoch: Callable[[], float], evaluate: Callable[[], dict[str, float]]) -> tuple[dict[str, float], float]:
    """The epoch loop: train, evaluate on held-out data, print one progress line per epoch.

    Returns the last held-out metrics and the training seconds (evaluation included).
    """
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        epoch_start = time.perf_counter()
        loss = run_epoch()
        metrics = evaluate()
        shown = "  ".join(f"held-out {name} {value:.4f}" for name, value in metrics.items())
        print(f"epoch {epoch:3d}/{epochs}  loss {loss:.4f}  {shown}  {time.perf_counter() - epoch_start:.1f}s", flush=True)
    return metrics, time.perf_counter() - start


CALIBRATION_EXAMPLES = 512
"""Training inputs that calibrate an int8 model's activation ranges (``train.export.quantize``)."""


def calibration_sample(inputs: torch.Tensor, count: int = CALIBRATION_EXAMPLES) -> torch.Tensor:
    """``count`` of the training ``inputs``, spread evenly over the set: the calibration inputs of ``quantize``."""
    return inputs[torch.linspace(0, len(inputs) - 1, min(count, len(inputs))).long()]


def write_artifacts(
    out_dir: Path,
    model: nn.Module,
    manifest: dict,
    metrics: dict,
    extra_files: dict[str, object] | None = None,
    quantization: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Write model.pt (plain state_dict), extra JSON files, manifest.json and metrics.json into out_dir, then the
    TorchScript and ONNX exports (train/export.py), and with ``quantization`` = (calibration inputs, held-out
    inputs) the int8 ONNX model (``train.export.quantize``).

    manifest (which names the architecture, see models.architecture) gets the common keys "weights" and "files"
    (every file the handler loads, manifest.json included) added; extra_files maps a file name to the
    JSON-serialisable object to write there.
    """
    extra_files = extra_files or {}
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {name.removeprefix("module."): tensor for name, tensor in model.state_dict().items()}
    torch.save(state, out_dir / "model.pt")
    for name, content in extra_files.items():
        write_json(out_dir / name, content)
    manifest = {**manifest, "weights": "model.pt", "files": ["manifest.json", "model.pt", *extra_files]}
    write_json(out_dir / "manifest.json", manifest)
    write_json(out_dir / "metrics.json", metrics)
    print(f"wrote {out_dir}: {', '.join(manifest['files'])}, metrics.json")
    export(out_dir)  # model.ts.pt and model.onnx, added to the manifest
    if quantization is not None:
        quantize(out_dir, *quantization)  # model.int8.onnx


def write_json(path: Path, content: object) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def metrics_record(model_name: str, dataset: dict, args: argparse.Namespace, train_seconds: float, test: dict) -> dict:
    """metrics.json content as the contract lays it out."""
    return {
        "model": model_name,
        "dataset": dataset,
        "seed": args.seed,
        "epochs": args.epochs,
        "train_seconds": round(train_seconds, 2),
        "test": {name: round(float(value), 6) for name, value in test.items()},
        "args": {name: str(value) if isinstance(value, Path) else value for name, value in vars(args).items()},
    }
