"""Handler unit tests without a server: each archive's handler loaded in-process (tests/worker.py), real samples."""

import base64
import json
import math

import numpy as np
import pytest

import registry
from models.sentiment import TOKENIZERS
from tests.samples import CROSS_DOMAIN_REVIEWS, encode_image, heldout_digits, heldout_patients, heldout_reviews, render_digit
from tests.worker import Request

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
EXPLAIN = {"explain": "True"}


def png_request(image, **render):
    return Request(render_digit(image, **render), "image/png")


def json_request(document, content_type=JSON):
    return Request(json.dumps(document), content_type)


# --- mnist ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, dark_on_light, fmt, mode", [
    (28, False, "PNG", "L"),      # MNIST's own geometry
    (16, False, "PNG", "L"),      # low resolution, near the 8x8 source
    (200, True, "PNG", "RGB"),    # dark ink on light paper, colour
    (640, True, "JPEG", "RGB"),   # a photo-sized JPEG
])
def test_mnist_labels_heldout_digits(worker, size, dark_on_light, fmt, mode):
    images, labels = heldout_digits()
    replies = worker("mnist", batch_size=len(images)).run(
        *(png_request(image, size=size, dark_on_light=dark_on_light, fmt=fmt, mode=mode) for image in images))
    assert all(reply.status == 200 for reply in replies)
    predicted = [reply.body["label"] for reply in replies]
    correct = sum(p == str(y) for p, y in zip(predicted, labels))
    assert correct >= len(labels) - 1, f"{correct}/{len(labels)} correct: {predicted} vs {labels.tolist()}"


def test_mnist_reply_shape_and_versions(worker):
    image, label = heldout_digits()[0][0], heldout_digits()[1][0]
    for stem, version in (("mnist", "1.0"), ("mnist_v2", "2.0")):
        reply = worker(stem).run_one(png_request(image, size=56))
        assert reply.status == 200
        assert reply.body["label"] == str(label)
        assert (reply.body["model"], reply.body["version"]) == ("mnist", version)
        probabilities = reply.body["probabilities"]
        assert len(probabilities) == 3 and list(probabilities)[0] == str(label)
        assert list(probabilities.values()) == sorted(probabilities.values(), reverse=True)


def test_mnist_accepts_json_base64_and_multipart(worker):
    image, label = heldout_digits()[0][3], str(heldout_digits()[1][3])
    encoded = base64.b64encode(render_digit(image, size=64)).decode()
    replies = worker("mnist").run(
        json_request({"data": encoded}),
        json_request({"data": encoded}, content_type="application/json; charset=utf-8"),
        Request(render_digit(image, size=64), "image/png", name="data"),  # multipart field "data"
    )
    assert [(r.status, r.body["label"]) for r in replies] == [(200, label)] * 3


def test_mnist_explanation_is_a_28x28_map_per_item(worker):
    images, labels = heldout_digits()
    replies = worker("mnist").run(*(Request(render_digit(images[i], size=84), "image/png", headers=EXPLAIN)
                                    for i in range(2)))
    for reply, label in zip(replies, labels[:2]):
        assert reply.status == 200
        attributions = np.array(reply.body["attributions"])
        assert attributions.shape == (28, 28)
        assert reply.body["label"] == str(label)
        assert np.abs(attributions).sum() > 0
    assert replies[0].body["attributions"] != replies[1].body["attributions"]


def corrupt_png():
    return render_digit(heldout_digits()[0][0], size=64)[:60]


def one_pixel_png():
    return encode_image(np.full((1, 1), 255))


@pytest.mark.parametrize("request_, code, kind", [
    (Request(b"", "image/png"), 400, "EmptyBody"),
    (Request(b"not an image at all", "image/png"), 400, "InvalidImage"),
    (Request(corrupt_png(), "image/png"), 400, "InvalidImage"),
    (Request(one_pixel_png(), "image/png"), 400, "InvalidImage"),
    (Request(render_digit(np.zeros((8, 8), np.uint8), size=64), "image/png"), 400, "InvalidImage"),  # blank
    (json_request({"image": "abc"}), 400, "InvalidField"),
    (json_request({"data": "%%% not base64 %%%"}), 400, "InvalidField"),
    (json_request({"data": 7}), 400, "InvalidField"),
    (json_request([1, 2, 3]), 400, "InvalidInput"),
    (Request("{broken json", JSON), 400, "InvalidJSON"),
], ids=["empty", "garbage", "truncated", "1x1", "blank", "wrong-key", "bad-base64", "data-not-string", "json-list",
        "broken-json"])
def test_mnist_bad_input_is_a_named_4xx(worker, request_, code, kind):
    reply = worker("mnist").run_one(request_)
    assert reply.status == code
    assert reply.body["code"] == code and reply.body["type"] == kind and reply.body["message"]


def test_mnist_refuses_huge_images_with_413(worker):
    from PIL import Image
    import io

    buffer = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buffer, format="PNG")  # 36 Mpx, a few KiB compressed
    reply = worker("mnist").run_one(Request(buffer.getvalue(), "image/png"))
    assert (reply.status, reply.body["type"]) == (413, "ImageTooLarge")


def test_mnist_bad_request_fails_alone_in_its_batch(worker):
    images, labels = heldout_digits()
    replies = worker("mnist").run(png_request(images[0]), Request(b"garbage", "image/png"), png_request(images[1]),
                                  Request(b"", "image/png"))
    assert [r.status for r in replies] == [200, 400, 200, 400]
    assert [replies[0].body["label"], replies[2].body["label"]] == [str(labels[0]), str(labels[1])]


# --- sentiment -------------------------------------------------------------------------------------------------------

def test_sentiment_labels_heldout_reviews(worker):
    texts, labels = heldout_reviews()
    replies = worker("sentiment", batch_size=len(texts)).run(*(Request(text, TEXT) for text in texts))
    predicted = [reply.body["label"] for reply in replies]
    correct = sum(p == y for p, y in zip(predicted, labels))
    assert correct >= 0.85 * len(labels), f"{correct}/{len(labels)}"


def test_sentiment_json_forms_and_list_order(worker):
    texts, labels = zip(*CROSS_DOMAIN_REVIEWS)
    replies = worker("sentiment").run(json_request(list(texts)), json_request({"text": texts[0]}),
                                      Request(texts[3].encode("utf-8"), "application/octet-stream"))
    assert [r.status for r in replies] == [200, 200, 200]
    assert [item["label"] for item in replies[0].body] == list(labels)
    assert replies[1].body["label"] == labels[0] and replies[2].body["label"] == labels[3]
    for item in replies[0].body:
        assert 0.5 <= item["score"] <= 1.0


def test_sentiment_explanation_names_tokens_for_each_item(worker):
    texts = ["质量很好，非常满意", "太差了，很失望"]
    sentiment = worker("sentiment")
    tokenize = TOKENIZERS[sentiment.handler.artifact["tokenizer"]]  # the served model's tokenizer, as trained
    replies = sentiment.run(*(Request(text, TEXT, headers=EXPLAIN) for text in texts))
    for reply, text, label in zip(replies, texts, ["positive", "negative"]):
        assert reply.status == 200 and reply.body["label"] == label
        tokens = [item["token"] for item in reply.body["tokens"]]
        assert tokens == tokenize(text) and tokens[:2] == [text[0], text[:2]]  # in reading order
        strongest = max(reply.body["tokens"], key=lambda item: abs(item["attribution"]))
        assert strongest["token"] in text and strongest["attribution"] > 0.01  # it supports the predicted label


@pytest.mark.parametrize("request_, code, kind", [
    (Request(b"", TEXT), 400, "EmptyBody"),
    (Request("   \n\t ", TEXT), 400, "EmptyText"),
    (Request(b"\xff\xfe\xfa bad bytes", "application/octet-stream"), 400, "InvalidEncoding"),
    (Request(b"\xc3\x28", TEXT), 400, "InvalidEncoding"),
    (json_request({"text": 5}), 400, "InvalidField"),
    (json_request({"review": "好"}), 400, "InvalidField"),
    (json_request(["好", None]), 400, "InvalidField"),
    (json_request([]), 400, "InvalidInput"),
    (json_request(["好"] * 1000), 413, "TooManyTexts"),
    (Request("[not json", JSON), 400, "InvalidJSON"),
], ids=["empty", "blank", "latin1", "bad-utf8", "text-not-string", "wrong-key", "null-in-list", "empty-list",
        "too-many", "broken-json"])
def test_sentiment_bad_input_is_a_named_4xx(worker, request_, code, kind):
    reply = worker("sentiment").run_one(request_)
    assert (reply.status, reply.body["type"]) == (code, kind)
    assert reply.body["message"]


@pytest.mark.parametrize("charset", ["utf-8", "UTF-16", "utf-16-le", "gb18030", "GBK", "big5", "utf-32"])
def test_sentiment_reads_the_charset_its_content_type_names(worker, charset):
    text = "质量很好，非常满意，下次还来" if charset != "big5" else "質量很好，非常滿意，下次還來"
    reply = worker("sentiment").run_one(Request(text.encode(charset), f"text/plain; charset={charset}"))
    assert reply.status == 200 and reply.body["label"] == "positive", reply.body
    as_json = worker("sentiment").run_one(Request(json.dumps({"text": text}, ensure_ascii=False).encode(charset),
                                                  f"application/json; charset={charset}"))
    assert as_json.status == 200 and as_json.body["label"] == "positive", as_json.body


@pytest.mark.parametrize("body, content_type, code, kind, message", [
    ("好".encode("utf-16-le"), "text/plain; charset=klingon", 415, "UnsupportedCharset", 'unsupported charset "klingon"'),
    ("好".encode(), "text/plain; charset=rot13", 415, "UnsupportedCharset", "accepted: utf-8, utf-16"),
    ("good value".encode("utf-16-le"), TEXT, 400, "InvalidEncoding", "NUL characters"),
    ("好".encode("utf-16"), TEXT, 400, "InvalidEncoding", "not valid utf-8 text"),
    ("好".encode("gb18030") + b"\xff", "text/plain; charset=gb18030", 400, "InvalidEncoding", "not valid gb18030"),
], ids=["unknown", "not-a-text-codec", "utf-16-as-utf-8", "utf-16-bom-as-utf-8", "bad-gb18030"])
def test_sentiment_refuses_text_it_cannot_decode_as_sent(worker, body, content_type, code, kind, message):
    reply = worker("sentiment").run_one(Request(body, content_type))
    assert (reply.status, reply.body["type"]) == (code, kind) and message in reply.body["message"], reply.body


def test_sentiment_says_when_a_text_is_longer_than_it_reads(worker):
    sentiment = worker("sentiment")
    read = sentiment.handler.max_tokens
    short, long = sentiment.run(Request("质量很好，非常满意", TEXT), Request("质量很好，非常满意" * 200, TEXT))
    assert short.body["truncated"] is False and "tokens_read" not in short.body
    assert long.body["truncated"] is True and long.body["tokens_read"] == read and long.body["label"] == "positive"


def test_sentiment_normalises_no_more_text_than_it_reads(worker, monkeypatch):
    """NFKC expands some characters 18-fold (U+FDFA): the normalisation sees a bounded prefix of any text."""
    import unicodedata

    from models import sentiment as sentiment_model

    seen = []
    normalize = unicodedata.normalize
    monkeypatch.setattr(sentiment_model.unicodedata, "normalize", lambda form, text: seen.append(len(text)) or
                        normalize(form, text))
    sentiment = worker("sentiment")
    reply = sentiment.run_one(Request("\ufdfa" * 1_000_000, TEXT))
    assert reply.status == 200 and reply.body["truncated"] is True
    assert seen and max(seen) <= 4 * (2 * (sentiment.handler.max_tokens + 1) + 3), max(seen)


# --- regression ------------------------------------------------------------------------------------------------------

def test_regression_predicts_heldout_patients(worker):
    rows, targets = heldout_patients()
    reply = worker("regression").run_one(json_request(rows))
    predictions = np.array([item["prediction"] for item in reply.body])
    assert reply.status == 200 and len(predictions) == len(rows)
    residual = ((predictions - targets) ** 2).sum()
    total = ((np.array(targets) - np.mean(targets)) ** 2).sum()
    assert 1 - residual / total > 0.2, "held-out R² through the handler"
    single = worker("regression").run_one(json_request(rows[0]))
    assert single.body == {"prediction": reply.body[0]["prediction"]}


def test_regression_explanation_names_every_feature(worker):
    rows, _ = heldout_patients()
    replies = worker("regression").run(*(json_request(row) for row in rows[:2]), )
    explained = worker("regression").run(*(Request(json.dumps(row), JSON, headers=EXPLAIN) for row in rows[:2]))
    for row, plain, reply in zip(rows, replies, explained):
        attributions = reply.body["attributions"]
        assert set(attributions) == set(row)
        # Integrated Gradients is complete: attributions sum to prediction minus the baseline's prediction.
        total = sum(attributions.values())
        assert math.isclose(total, plain.body["prediction"] - reply.body["baseline_prediction"], rel_tol=0.05,
                            abs_tol=0.5)


def regression_row(**changes):
    row = dict(heldout_patients()[0][0])
    row.update(changes)
    return {k: v for k, v in row.items() if v is not ...}


@pytest.mark.parametrize("document, field", [
    (regression_row(bmi=...), "bmi"),                   # missing
    (regression_row(height=170.0), "height"),           # unknown
    (regression_row(age="fifty"), "age"),               # not a number
    (regression_row(bp=True), "bp"),                    # booleans are not numbers
    (regression_row(s1=float("nan")), "s1"),            # NaN
    (regression_row(s2=float("inf")), "s2"),            # infinity
    (regression_row(s3=None), "s3"),                    # null
], ids=["missing", "unknown", "string", "bool", "nan", "inf", "null"])
def test_regression_bad_field_is_a_400_naming_it(worker, document, field):
    reply = worker("regression").run_one(Request(json.dumps(document), JSON))  # json.dumps writes NaN/Infinity
    assert (reply.status, reply.body["type"]) == (400, "InvalidField")
    assert f'"{field}"' in reply.body["message"]


@pytest.mark.parametrize("request_, kind", [
    (Request(b"", JSON), "EmptyBody"),
    (Request("{]", JSON), "InvalidJSON"),
    (json_request("a string"), "InvalidInput"),
    (json_request([1, 2]), "InvalidInput"),
    (json_request([]), "InvalidInput"),
], ids=["empty", "broken-json", "json-string", "list-of-numbers", "empty-list"])
def test_regression_wrong_shape_is_a_400(worker, request_, kind):
    reply = worker("regression").run_one(request_)
    assert (reply.status, reply.body["type"]) == (400, kind)


# --- shared behaviour ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stem", [version.archive for _, version in registry.served()])
def test_handler_runs_on_cpu_with_one_torch_thread(worker, stem):
    import torch

    handler = worker(stem).handler
    assert str(handler.device) == "cpu" and handler.threads == 1 and torch.get_num_threads() == 1


def test_describe_reports_training_metrics(worker):
    from tests.samples import training_record

    handler = worker("sentiment").handler
    described = handler.describe_handle()
    from train import sentiment

    default = sentiment.ARCHS[sentiment.DEFAULT_ARCH].architecture
    assert described["architecture"] == default and described["labels"] == ["negative", "positive"]
    assert described["training"] == training_record("artifacts/sentiment")


def test_regression_error_lists_every_problem_of_a_row(worker):
    reply = worker("regression").run_one(json_request([regression_row(), {"age": 50, "bmi": "high", "height": 1}]))
    assert reply.status == 400
    message = reply.body["message"]
    assert message.startswith("row 1: ")
    for problem in ('unknown feature "height"', 'missing feature "bp"', 'missing feature "s6"',
                    'field "bmi" must be a number, got str'):
        assert problem in message


def test_device_is_the_gpu_torchserve_assigned_when_cuda_is_available(monkeypatch):
    import torch

    from handlers.common import select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU assigned, no CUDA in this torch/machine
    assert select_device({"gpu_id": 1}) == torch.device("cpu")
    selected = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", selected.append)
    assert select_device({"gpu_id": 1}) == torch.device("cuda:1") and selected == [torch.device("cuda:1")]
    assert select_device({"gpu_id": None}) == torch.device("cpu")  # TorchServe started without GPUs


def test_torch_threads_fit_workers_into_the_cpus_this_process_may_use(monkeypatch):
    import torch

    import handlers.common
    from handlers.common import configure_threads

    monkeypatch.setattr(handlers.common, "available_cpus", lambda: 8)
    try:
        assert configure_threads({"minWorkers": 2}) == 4 and torch.get_num_threads() == 4
        assert configure_threads({"minWorkers": 16}) == 1
        assert configure_threads({"minWorkers": 2, "handler": {"torch_threads": 3}}) == 3
    finally:
        torch.set_num_threads(1)


def test_handler_metrics_are_taken_as_metrics_yaml_declares_them(tmp_path, caplog):
    """TorchServe's cache holds every metric metrics.yaml declares: the handler takes those (adding one again logs
    "Overriding existing key", a line per metric at every worker start), adds one a config does not declare, and
    refuses a declaration whose dimensions differ from the ones it writes."""
    import logging

    from ts.metrics.metric_type_enum import MetricTypes

    from handlers.common import declared_metric
    from tests.worker import metrics_cache

    dims = ["ModelName", "ModelVersion"]
    shipped = metrics_cache()
    with caplog.at_level(logging.WARNING):
        metric = declared_metric(shipped, "HandlerRequests", "Count", dims)
        histogram = declared_metric(shipped, "DetectionsPerImage", "Count", dims, MetricTypes.HISTOGRAM)
    assert metric is shipped.get_metric("HandlerRequests", MetricTypes.COUNTER)
    assert histogram is shipped.get_metric("DetectionsPerImage", MetricTypes.HISTOGRAM)
    assert caplog.records == []
    with pytest.raises(ValueError, match=r"declares HandlerRequests with dimensions \['ModelName', 'ModelVersion'\]"):
        declared_metric(shipped, "HandlerRequests", "Count", dims + ["Label"])

    (tmp_path / "metrics.yaml").write_text("model_metrics:\n  counter:\n    - {name: Other, unit: Count, dimensions: []}\n")
    undeclared = metrics_cache(tmp_path / "metrics.yaml")
    added = declared_metric(undeclared, "HandlerRequests", "Count", dims)
    assert added is undeclared.get_metric("HandlerRequests", MetricTypes.COUNTER) and added.dimension_names == dims
