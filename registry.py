"""The model registry: every served model version, and the files that make it.

A model is one entry here plus its modules: ``models/<m>.py`` (the nn.Module and its input canonicalisation),
``train/<m>.py`` (writes the artifact folder), ``handlers/<m>.py`` and its model-config ``handlers/<m>.yaml``.
archive.sh, the Makefile, ``make serve``'s curl lines, the load tests and the test suite read this table; the
k8s tests check the manifests against it.

Standard library only: the Makefile reads it before the venv exists.

    python3 registry.py archives            ARCHIVE MODEL VERSION ARTIFACT_DIR, one line per served version
    python3 registry.py train-command DIR   the command that trains artifact folder DIR
    python3 registry.py makefile            the Makefile's rules: what each artifact and archive is built from
    python3 registry.py variant-models V    TorchServe's --models for A/B variant V of k8s/ (a or b)
    python3 registry.py serve --variant V [TORCHSERVE ARGS]
                                            the image's entrypoint: torchserve in the foreground with --models of
                                            A/B variant V (a: the default versions, b: the candidates)
"""

import ast
import importlib
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Sample:
    """A request body in samples/ with the reply it must get (``label``; None where any valid reply will do),
    sent to ``version`` (None: the default version). Each one is a curl line of ``make serve`` and the README."""

    file: str
    content_type: str
    label: str | None = None
    version: str | None = None


@dataclass(frozen=True)
class Peer:
    """Another server of a model that `make bench` measures next to the bundle's own path, with the same client and
    samples: TorchServe serving ``handler`` (a file), with the model's default weights (``weights``: its model.pt,
    ``model_file`` for a stock handler, and the artifact folder's files) and its model-config (``model_config``;
    otherwise TorchServe's defaults). ``check`` ("module:function") judges its replies (default: the model's);
    ``target`` is the least ratio ours ÷ this peer at 16 users that the benchmark aims at (None: reported only)."""

    name: str
    handler: str
    description: str
    weights: bool = True
    model_file: str | None = None
    model_config: bool = False
    check: str | None = None
    target: float | None = None


@dataclass(frozen=True)
class Load:
    """How the load tests, the benchmark and the fuzz tests exercise a model (tests/load/): payloads with known
    answers, and the check that a reply is a correct answer.

    ``payloads`` and ``check`` are "module:function" names: ``payloads()`` returns ``[tests.load.payloads.Sample]``
    (default None: the model's own samples, with their labels), ``check(body, expected)`` raises
    ``tests.load.checks.WrongAnswer`` (default: a JSON object, whose "label" is the expected one where the sample
    names one). ``weight`` is this model's share of locust users; ``mix`` weighs sample names (default: every
    sample alike).
    """

    payloads: str | None = None
    check: str = "tests.load.checks:check_reply"
    weight: int = 1
    mix: dict[str, int] = field(default_factory=dict)
    peers: tuple[Peer, ...] = ()
    """What `make bench` compares this model's served path with (tests/load/bench.py)."""
    in_process_target: float | None = None
    """The least ratio served ÷ in-process (the same archive without a server) the benchmark aims at."""
    photos: str | None = None
    """"module:function": the payloads of a realistic photo mix (phone-sized JPEGs). `make bench` also measures this
    model and its peers that serve its weights on them (paths MODEL-photos, MODEL-PEER-photos), because a ratio to
    a stock handler depends on the images sent."""


@dataclass(frozen=True)
class Promotion:
    """How ``python -m scripts.promote`` judges a candidate version against the default on labelled requests.

    ``requests`` is a "module:function" name: ``function(record, path=None)`` returns [(key, body, content type,
    truth)] for the examples that the training run of ``record`` (a version's metrics.json) held out, or for the
    labelled data at ``path`` (--data). ``kind``: "classifier" (accuracy; the reply's ``answer`` field is compared
    with the truth) or "regression" (R2 and RMSE of the reply's ``answer`` field)."""

    requests: str
    kind: str = "classifier"
    answer: str = "label"


@dataclass(frozen=True)
class Quality:
    """A held-out figure of metrics.json's "test" section that a version's training is judged by.

    ``goal`` is what training aims at: reported (README, docs/models), never asserted, since the same seed trains to
    different
    figures on different CPUs. The test asserts a floor: the worst figure of several seeds measured on one machine
    (docs/seeds.json, written by ``python -m scripts.seeds``) less ``margin``."""

    metric: str
    goal: float
    margin: float


@dataclass(frozen=True)
class Version:
    """One served version: model_store/<archive>.mar, built from the artifact folder its training command writes."""

    version: str
    archive: str
    artifacts: str
    train: str
    optional: bool = False
    """Built and served only when its artifacts exist (trained by hand, e.g. on a GPU); make never trains it."""
    quality: tuple[Quality, ...] = ()

    @property
    def light(self) -> bool:
        """Its training runs on one torch thread (``--threads 1`` in its command, so its figures are the same however
        it is built): `make serve` builds two light versions side by side; the others alone, on every core."""
        words = shlex.split(self.train)
        return "--threads" in words[:-1] and words[words.index("--threads") + 1] == "1"

    @property
    def trained(self) -> bool:
        return (ROOT / self.artifacts / "manifest.json").is_file()


@dataclass(frozen=True)
class Model:
    name: str
    model_module: str
    train_module: str
    handler: str
    configs: dict[str, str]
    """model-config.yaml per profile ("cpu": local serving and the CPU overlay; "gpu": the image and k8s/)."""
    versions: tuple[Version, ...]
    """The first is the default version."""
    samples: tuple[Sample, ...] = field(default=())
    load: Load = field(default_factory=Load)
    promotion: Promotion | None = None
    candidate: str | None = None
    """The version that variant b of the Kubernetes A/B test serves (k8s/20-torchserve-b.yaml); variant a, and b
    when this is None, serve the default version."""

    @property
    def load_tested(self) -> bool:
        """Whether the load tests have payloads for this model: its own, or samples of its default version."""
        return self.load.payloads is not None or any(sample.version is None for sample in self.samples)

    @property
    def sources(self) -> tuple[str, ...]:
        """The files whose change means the model must be retrained: its model and training modules and every
        repository module they import, directly or not (read from their import statements)."""
        found = set()
        for module in (self.model_module, self.train_module):
            found |= repository_imports(ROOT / module)
        return tuple(sorted(str(path.relative_to(ROOT)) for path in found))


MODELS = (
    Model(
        name="mnist",
        model_module="models/mnist.py",
        train_module="train/mnist.py",
        handler="handlers/mnist.py",
        configs={"cpu": "handlers/mnist.yaml", "gpu": "handlers/mnist.gpu.yaml"},
        versions=(
            Version("1.0", "mnist", "artifacts/mnist", "python -m train.mnist --out artifacts/mnist --threads 1",
                    quality=(Quality("accuracy", goal=0.99, margin=0.01),)),
            Version("2.0", "mnist_v2", "artifacts/mnist-v2",
                    "python -m train.mnist --out artifacts/mnist-v2 --seed 2 --epochs 40 --augment strong --threads 1",
                    quality=(Quality("accuracy", goal=0.99, margin=0.01),)),
        ),
        samples=(Sample("samples/digit_7.png", "image/png", "7"),
                 Sample("samples/digit_3_photo.jpg", "image/jpeg", "3", version="2.0")),
        load=Load("tests.load.payloads:digits", "tests.load.checks:check_mnist", weight=3,
                  mix={"digit-28px": 4, "digit-64px-paper": 3, "digit-128px": 2, "digit-300px-paper": 1},
                  peers=(Peer("ceiling", "tests/load/noop_handler.py", "no-op handler, this model's model-config: TorchServe's own "
                            "cost per request", weights=False, model_config=True, check="tests.load.checks:check_noop",
                            target=0.5),
                       Peer("ceiling-unbatched", "tests/load/noop_handler.py", "no-op handler, TorchServe defaults "
                            "(batchSize 1, a worker per core)", weights=False, check="tests.load.checks:check_noop"),
                         Peer("stock", "tests/load/stock_handler.py", "stock image_classifier handler, TorchServe "
                              "defaults", model_file="tests/load/stock_model.py",
                              check="tests.load.checks:check_stock_mnist", target=2.5)),
                  photos="tests.load.payloads:digit_photos"),
        promotion=Promotion("train.mnist:labelled_requests"),
        candidate="2.0",
    ),
    Model(
        name="sentiment",
        model_module="models/sentiment.py",
        train_module="train/sentiment.py",
        handler="handlers/sentiment.py",
        configs={"cpu": "handlers/sentiment.yaml", "gpu": "handlers/sentiment.gpu.yaml"},
        versions=(Version("1.0", "sentiment", "artifacts/sentiment",
                          "python -m train.sentiment --arch tfidf --out artifacts/sentiment --threads 1",
                          quality=(Quality("accuracy", goal=0.85, margin=0.01),)),),
        samples=(Sample("samples/review_positive.txt", "text/plain; charset=utf-8", "positive"),
                 Sample("samples/review_negative.txt", "text/plain; charset=utf-8", "negative")),
        load=Load("tests.load.payloads:reviews", "tests.load.checks:check_sentiment", weight=2,
                  peers=(Peer("naive", "tests/load/naive_sentiment.py", "the same model behind a per-request "
                              "handler, TorchServe defaults"),)),
        promotion=Promotion("train.sentiment:labelled_requests"),
    ),
    Model(
        name="regression",
        model_module="models/regression.py",
        train_module="train/regression.py",
        handler="handlers/regression.py",
        configs={"cpu": "handlers/regression.yaml", "gpu": "handlers/regression.gpu.yaml"},
        versions=(Version("1.0", "regression", "artifacts/regression",
                          "python -m train.regression --out artifacts/regression --threads 1",
                          quality=(Quality("r2", goal=0.45, margin=0.05),)),),
        samples=(Sample("samples/patient.json", "application/json"),),
        load=Load("tests.load.payloads:patients", "tests.load.checks:check_regression"),
        promotion=Promotion("train.regression:labelled_requests", kind="regression", answer="prediction"),
    ),
    Model(
        name="fashion",
        model_module="models/vision/resnet.py",
        train_module="train/vision.py",
        handler="handlers/vision.py",
        configs={"cpu": "handlers/vision.yaml", "gpu": "handlers/vision.gpu.yaml"},
        versions=(Version("1.0", "fashion", "artifacts/fashion",
                          "python -m train.vision --dataset fashion-mnist --out artifacts/fashion",
                          quality=(Quality("accuracy", goal=0.92, margin=0.01),)),),
        samples=(Sample("samples/fashion_ankle_boot.jpg", "image/jpeg", "Ankle boot"),),
        load=Load("tests.load.payloads:fashion", "tests.load.checks:check_fashion", weight=2,
                  peers=(Peer("stock", "tests/load/stock_fashion_handler.py", "stock image_classifier handler, "
                              "TorchServe defaults", model_file="tests/load/stock_fashion_model.py",
                              check="tests.load.checks:check_stock_fashion", target=5.0),),
                  in_process_target=0.7, photos="tests.load.payloads:fashion_photos"),
    ),
    Model(
        name="cifar10",
        model_module="models/vision/resnet.py",
        train_module="train/vision.py",
        handler="handlers/vision.py",
        configs={"cpu": "handlers/vision.yaml", "gpu": "handlers/vision.gpu.yaml"},
        versions=(Version("1.0", "cifar10", "artifacts/cifar10",
                          "python -m train.vision --dataset cifar10 --arch resnet18 --epochs 30 --augment flip-crop "
                          "--out artifacts/cifar10",
                          optional=True),),
    ),
    Model(
        name="detector",
        model_module="models/detector.py",
        train_module="train/detector.py",
        handler="handlers/detector.py",
        configs={"cpu": "handlers/detector.yaml", "gpu": "handlers/detector.gpu.yaml"},
        versions=(Version("1.0", "detector", "artifacts/detector",
                          "torchrun --standalone --nproc_per_node 2 -m train.detector --batch-size 4 "
                          "--out artifacts/detector",
                          quality=(Quality("box_map_50", goal=0.80, margin=0.03),
                                   Quality("mask_map_50", goal=0.75, margin=0.03))),),
        samples=(Sample("samples/detector_composed_1.jpg", "image/jpeg"),
                 Sample("samples/detector_composed_2.png", "image/png")),
        load=Load("tests.load.payloads:detector", "tests.load.checks:check_detector"),
    ),
    Model(
        name="translator",
        model_module="models/translator.py",
        train_module="train/translator.py",
        handler="handlers/translator.py",
        configs={"cpu": "handlers/translator.yaml", "gpu": "handlers/translator.gpu.yaml"},
        versions=(Version("1.0", "translator", "artifacts/translator",
                          "python -m train.translator --out artifacts/translator --threads 1",
                          quality=(Quality("bleu_beam", goal=0.99, margin=0.015),
                                   Quality("em_beam", goal=0.995, margin=0.01),
                                   Quality("bleu_greedy", goal=0.99, margin=0.015),
                                   Quality("em_greedy", goal=0.995, margin=0.01))),),
        samples=(Sample("samples/translator.txt", "text/plain; charset=utf-8",
                        "soixante et onze mille six cent quatre-vingt-trois"),),
        load=Load(check="tests.load.translator_load:check_translator",
                  payloads="tests.load.translator_load:payloads"),
    ),
    Model(
        name="cyclegan",
        model_module="models/cyclegan.py",
        train_module="train/cyclegan.py",
        handler="handlers/cyclegan.py",
        configs={"cpu": "handlers/cyclegan.yaml", "gpu": "handlers/cyclegan.gpu.yaml"},
        versions=(Version("1.0", "cyclegan", "artifacts/cyclegan",
                          "python -m train.cyclegan --out artifacts/cyclegan --threads 2",
                          quality=(Quality("class_preservation", goal=0.8, margin=0.03),)),),
        samples=(Sample("samples/cyclegan_sneaker.png", "image/png"),),
        load=Load(check="tests.load.cyclegan_load:check_cyclegan", payloads="tests.load.cyclegan_load:payloads"),
    ),
)


def repository_imports(path: Path) -> set[Path]:
    """``path`` and every module of this repository it imports, transitively (absolute and relative imports; the
    packages' ``__init__.py`` files included)."""
    seen, todo = set(), [path]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        package = current.parent.relative_to(ROOT).parts
        for node in ast.walk(ast.parse(current.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name.split(".") for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = list(package[:len(package) - node.level + 1]) if node.level else []
                base += node.module.split(".") if node.module else []
                names = [base] + [base + [alias.name] for alias in node.names]
            else:
                continue
            for parts in names:
                todo += [module for depth in range(1, len(parts) + 1) for module in module_files(parts[:depth])]
    return seen


def module_files(parts: list[str]) -> list[Path]:
    """The file of module ``a.b.c`` (["a", "b", "c"]) in this repository: a/b/c.py or a/b/c/__init__.py, if any."""
    folder = ROOT.joinpath(*parts)
    return [candidate for candidate in (folder.with_suffix(".py"), folder / "__init__.py") if candidate.is_file()]


def model(name: str) -> Model:
    for entry in MODELS:
        if entry.name == name:
            return entry
    raise KeyError(f"no model {name!r} in registry.py (models: {', '.join(m.name for m in MODELS)})")


def served() -> list[tuple[Model, Version]]:
    """Every (model, version) that archive.sh builds and TorchServe serves, in table order: optional versions only
    when their artifacts exist."""
    return [(entry, version) for entry in MODELS for version in entry.versions
            if not version.optional or version.trained]


def served_versions(entry: Model) -> list[Version]:
    """The versions of ``entry`` that are built and served (an optional one only once it is trained)."""
    return [version for served_entry, version in served() if served_entry is entry]


def served_models() -> list[Model]:
    """The models with at least one served version (an optional model is left out until it is trained)."""
    return [entry for entry in MODELS if served_versions(entry)]


def archive(stem: str) -> tuple[Model, Version]:
    """The (model, version) built as model_store/<stem>.mar."""
    for entry, version in served():
        if version.archive == stem:
            return entry, version
    raise KeyError(f"no archive {stem!r} in registry.py")


def curl_examples(inference: str, ready: set[tuple[str, str]] | None = None) -> list[str]:
    """A working curl line for every sample ($TOKEN holds the inference key), then an explanation of the first;
    with ``ready``, only the samples whose (model, version) is in it."""
    lines = []
    for entry in MODELS:
        for sample in entry.samples:
            if ready is None or (entry.name, sample.version or entry.versions[0].version) in ready:
                version = f"/{sample.version}" if sample.version else ""
                lines.append(curl(sample, f"{inference}/predictions/{entry.name}{version}"))
    first = MODELS[0]
    if ready is None or (first.name, first.versions[0].version) in ready:
        lines.append(curl(first.samples[0], f"{inference}/explanations/{first.name}"))
    return lines


def curl(sample: Sample, url: str) -> str:
    """The curl command that sends ``sample`` to ``url`` as its raw body."""
    if sample.content_type.startswith("image/"):
        body = f"-T {sample.file}"
    else:
        body = f"-H 'Content-Type: {sample.content_type}' --data-binary @{sample.file}"
    return f'curl -H "Authorization: Bearer $TOKEN" {body} {url}'


def resolve(name: str):
    """The object a "module:attribute" name (as ``Load`` holds them) refers to."""
    module, _, attribute = name.partition(":")
    return getattr(importlib.import_module(module), attribute)


VARIANTS = ("a", "b")


def variant_models(variant: str) -> list[str]:
    """TorchServe's ``--models`` for a pod of A/B ``variant`` ("a": each model's default version; "b": its
    ``candidate``, else the default), as NAME=ARCHIVE.mar; optional models are not in the image."""
    if variant not in VARIANTS:
        raise KeyError(f"no variant {variant!r} (variants: {', '.join(VARIANTS)})")
    models = []
    for entry in MODELS:
        wanted = entry.candidate if variant == "b" and entry.candidate else entry.versions[0].version
        version = next(v for v in entry.versions if v.version == wanted)
        if not version.optional:
            models.append(f"{entry.name}={version.archive}.mar")
    return models


def makefile_rules() -> str:
    """Make rules: each artifact folder from its model's sources (and its training command, through a stamp file
    that changes only when the command does), each archive from its artifacts, handler and model-config.
    Optional versions get no training rule, and their archive is among ARCHIVES only while their artifacts exist."""
    every = [(entry, version) for entry in MODELS for version in entry.versions]
    archives = [f"$(if $(wildcard {v.artifacts}/manifest.json),model_store/{v.archive}.mar)" if v.optional
                else f"model_store/{v.archive}.mar" for _, v in every]
    rules = ["PACKAGED := $(shell find handlers models -name '*.py' -not -path '*/__pycache__/*')",
             f"ARTIFACTS := {' '.join(v.artifacts for _, v in every if not v.optional)}",
             f"ARCHIVES := {' '.join(archives)}", ""]
    for entry, version in every:
        if not version.optional:
            stamp = f".make/{version.archive}.train"
            write_if_changed(ROOT / stamp, version.train + "\n")
            rules += [f"{version.artifacts}/manifest.json: $(READY) {' '.join(entry.sources)} {stamp}",
                      f"\t@echo '==> [train] {version.artifacts}'",
                      f"\t@{version.train}"]
        rules += [f"model_store/{version.archive}.mar: {version.artifacts}/manifest.json {entry.handler} "
                  f"{entry.configs['cpu']} $(PACKAGED) scripts/archive.py",
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
    elif command == "variant-models" and len(args) == 1 or command == "serve" and args[:1] == ["--variant"]:
        variant = args[0] if command == "variant-models" else args[1] if len(args) > 1 else ""
        try:
            models = variant_models(variant)
        except KeyError as error:
            print(f"registry.py: {error.args[0]}", file=sys.stderr)
            return 2
        if command == "variant-models":
            print(" ".join(models))
        else:
            # The image's entrypoint (k8s/20-torchserve-*.yaml): exec, so that TorchServe stays PID 1 and
            # scripts/readiness.py reads the --models it serves from PID 1's command line.
            os.execvp("torchserve", ["torchserve", "--foreground", "--ncs", *args[2:], "--models", *models])
    else:
        print(__doc__.split("\n\n")[-1], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
