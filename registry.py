"""The model registry: every served model version, and the files that make it.

A model is one entry here plus its modules: ``models/<m>.py`` (the nn.Module and its input canonicalisation),
``train/<m>.py`` (writes the artifact folder), ``handlers/<m>.py`` and its model-config ``handlers/<m>.yaml``.
archive.sh, the Makefile, ``make serve``'s curl lines, the load tests and the test suite read this table; the
k8s tests check the manifests against it.

Standard library only: the Makefile reads it before the venv exists.

    python3 registry.py archives            ARCHIVE MODEL VERSION ARTIFACT_DIR, one line per served version
    python3 registry.py train-command DIR   the command that trains artifact folder DIR
    python3 registry.py makefile            the Makefile's rules: what each artifact and archive is built from
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Sample:
    """A request body in samples/ with the reply it must get (``label``; None where any valid reply will do)."""

    file: str
    content_type: str
    label: str | None = None


@dataclass(frozen=True)
class Version:
    """One served version: model_store/<archive>.mar, built from the artifact folder its training command writes."""

    version: str
    archive: str
    artifacts: str
    train: str


@dataclass(frozen=True)
class Model:
    name: str
    model_module: str
    train_module: str
    handler: str
    configs: dict[str, str]
    """model-config.yaml per profile ("cpu": what local serving and the CPU overlay use)."""
    versions: tuple[Version, ...]
    """The first is the default version."""
    samples: tuple[Sample, ...] = field(default=())

    @property
    def sources(self) -> tuple[str, ...]:
        """The files whose change means the model must be retrained."""
        return (self.model_module, self.train_module, "train/common.py")


MODELS = (
    Model(
        name="mnist",
        model_module="models/mnist.py",
        train_module="train/mnist.py",
        handler="handlers/mnist.py",
        configs={"cpu": "handlers/mnist.yaml"},
        versions=(
            Version("1.0", "mnist", "artifacts/mnist", "python -m train.mnist --out artifacts/mnist"),
            Version("2.0", "mnist_v2", "artifacts/mnist-v2",
                    "python -m train.mnist --out artifacts/mnist-v2 --seed 2 --epochs 40 --augment strong"),
        ),
        samples=(Sample("samples/digit_7.png", "image/png", "7"),
                 Sample("samples/digit_3_photo.jpg", "image/jpeg", "3")),
    ),
    Model(
        name="sentiment",
        model_module="models/sentiment.py",
        train_module="train/sentiment.py",
        handler="handlers/sentiment.py",
        configs={"cpu": "handlers/sentiment.yaml"},
        versions=(Version("1.0", "sentiment", "artifacts/sentiment",
                          "python -m train.sentiment --out artifacts/sentiment"),),
        samples=(Sample("samples/review_positive.txt", "text/plain; charset=utf-8", "positive"),
                 Sample("samples/review_negative.txt", "text/plain; charset=utf-8", "negative")),
    ),
    Model(
        name="regression",
        model_module="models/regression.py",
        train_module="train/regression.py",
        handler="handlers/regression.py",
        configs={"cpu": "handlers/regression.yaml"},
        versions=(Version("1.0", "regression", "artifacts/regression",
                          "python -m train.regression --out artifacts/regression"),),
        samples=(Sample("samples/patient.json", "application/json"),),
    ),
    Model(
        name="detector",
        model_module="models/detector.py",
        train_module="train/detector.py",
        handler="handlers/detector.py",
        configs={"cpu": "handlers/detector.yaml"},
        versions=(Version("1.0", "detector", "artifacts/detector",
                          "python -m train.detector --out artifacts/detector"),),
        samples=(Sample("samples/detector_composed_1.jpg", "image/jpeg"),
                 Sample("samples/detector_composed_2.png", "image/png")),
    ),
)


def model(name: str) -> Model:
    for entry in MODELS:
        if entry.name == name:
            return entry
    raise KeyError(f"no model {name!r} in registry.py (models: {', '.join(m.name for m in MODELS)})")


def served() -> list[tuple[Model, Version]]:
    """Every (model, version) that archive.sh builds and TorchServe serves, in table order."""
    return [(entry, version) for entry in MODELS for version in entry.versions]


def archive(stem: str) -> tuple[Model, Version]:
    """The (model, version) built as model_store/<stem>.mar."""
    for entry, version in served():
        if version.archive == stem:
            return entry, version
    raise KeyError(f"no archive {stem!r} in registry.py")


def curl_examples(inference: str) -> list[str]:
    """Working curl lines for each model's samples ($TOKEN holds the inference key)."""
    lines = []
    for entry in MODELS:
        for position, sample in enumerate(entry.samples[:2]):
            path = f"/predictions/{entry.name}"
            if position and len(entry.versions) > 1:
                path += f"/{entry.versions[1].version}"
            elif position:
                continue
            if sample.content_type.startswith("image/"):
                body = f"-T {sample.file}"
            else:
                body = f"-H 'Content-Type: {sample.content_type}' --data-binary @{sample.file}"
            lines.append(f'curl -H "Authorization: Bearer $TOKEN" {body} {inference}{path}')
    first = MODELS[0]
    lines.append(f'curl -H "Authorization: Bearer $TOKEN" -T {first.samples[0].file} {inference}/explanations/{first.name}')
    return lines


def makefile_rules() -> str:
    """Make rules: each artifact folder from its model's sources (and its training command, through a stamp file
    that changes only when the command does), each archive from its artifacts, handler and model-config."""
    rules = [f"ARTIFACTS := {' '.join(v.artifacts for _, v in served())}",
             f"ARCHIVES := {' '.join(f'model_store/{v.archive}.mar' for _, v in served())}", ""]
    for entry, version in served():
        stamp = f".make/{version.archive}.train"
        write_if_changed(ROOT / stamp, version.train + "\n")
        rules += [f"{version.artifacts}/manifest.json: $(READY) {' '.join(entry.sources)} {stamp}",
                  f"\t@echo '==> [train] {version.artifacts}'",
                  f"\t@{version.train}",
                  f"model_store/{version.archive}.mar: {version.artifacts}/manifest.json {entry.handler} "
                  f"{entry.configs['cpu']} $(wildcard handlers/*.py models/*.py) scripts/archive.py",
                  f"\t@./archive.sh {version.archive}", ""]
    return "\n".join(rules)


def write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def main(argv: list[str]) -> int:
    command, *args = argv or ["archives"]
    if command == "archives":
        for entry, version in served():
            print(version.archive, entry.name, version.version, version.artifacts)
    elif command == "train-command" and len(args) == 1:
        commands = [version.train for _, version in served() if version.artifacts == args[0].rstrip("/")]
        if not commands:
            print(f"registry.py: no artifact folder {args[0]!r}", file=sys.stderr)
            return 2
        print(commands[0])
    elif command == "makefile":
        print(makefile_rules())
    else:
        print(__doc__.split("\n\n")[-1], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
