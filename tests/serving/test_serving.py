"""Integration tests: one real TorchServe (token auth ON, free ports) serving every archive of model_store/."""

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import registry
from handlers.common import COUNTER_WRITE_SECONDS
from tests.samples import encode_image, heldout_digits, heldout_patients, heldout_reviews, render_digit

TEXT = {"Content-Type": "text/plain; charset=utf-8"}
JSON = {"Content-Type": "application/json"}


def test_every_archive_is_ready_with_its_version(server):
    assert sorted(server.ready_versions()) == sorted((entry.name, v.version) for entry, v in registry.served())


@pytest.mark.parametrize("entry, sample", [pytest.param(entry, sample, id=Path(sample.file).name)
                                           for entry in registry.served_models() for sample in entry.samples])
def test_every_registry_sample_gets_its_answer_over_http(server, entry, sample):
    """What `make serve` and the README print as curl lines: each sample's request, with its raw body, gets a 200
    that the model's load-test check accepts (and the sample's label, where it names one)."""
    reply = server.predict(entry.name, (registry.ROOT / sample.file).read_bytes(), sample.version,
                           headers={"Content-Type": sample.content_type})
    assert reply.status_code == 200, reply.text[:300]
    registry.resolve(entry.load.check)(reply.content, sample.label)


@pytest.mark.parametrize("size, dark_on_light", [(28, False), (28, True), (120, False), (300, True)])
def test_mnist_predicts_heldout_digits_over_http(server, size, dark_on_light):
    images, labels = heldout_digits(count=20)
    with ThreadPoolExecutor(8) as pool:  # concurrent, so the frontend batches them
        replies = list(pool.map(lambda image: server.predict("mnist", render_digit(image, size, dark_on_light)),
                                images))
    assert [r.status_code for r in replies] == [200] * len(images)
    predicted = [r.json()["label"] for r in replies]
    assert sum(p == str(y) for p, y in zip(predicted, labels)) >= len(labels) - 1, (predicted, labels.tolist())


def test_sentiment_predicts_heldout_reviews_over_http(server):
    texts, labels = heldout_reviews(count=30)
    reply = server.predict("sentiment", json.dumps(texts).encode(), headers=JSON)
    assert reply.status_code == 200
    predicted = [item["label"] for item in reply.json()]
    assert sum(p == y for p, y in zip(predicted, labels)) >= 0.85 * len(labels)
    single = server.predict("sentiment", texts[0].encode("utf-8"), headers=TEXT)
    assert single.json()["label"] == predicted[0]


def test_regression_predicts_heldout_rows_over_http(server):
    rows, targets = heldout_patients()
    reply = server.predict("regression", json.dumps(rows).encode(), headers=JSON)
    assert reply.status_code == 200
    predictions = np.array([item["prediction"] for item in reply.json()])
    r2 = 1 - ((predictions - targets) ** 2).sum() / ((np.array(targets) - np.mean(targets)) ** 2).sum()
    assert r2 > 0.2


def test_explanations_for_each_model(server):
    digit = render_digit(heldout_digits()[0][0], 56)
    mnist = server.inference("POST", "/explanations/mnist", data=digit).json()
    assert np.array(mnist["attributions"]).shape == (28, 28)
    sentiment = server.inference("POST", "/explanations/sentiment", data="服务很好".encode(), headers=TEXT).json()
    assert [t["token"] for t in sentiment["tokens"]] == ["服", "服务", "服务很", "务", "务很", "务很好", "很", "很好", "好"]
    row = heldout_patients()[0][0]
    regression = server.inference("POST", "/explanations/regression", data=json.dumps(row), headers=JSON).json()
    assert set(regression["attributions"]) == set(row)


def test_both_mnist_versions_answer_and_set_default_switches(server):
    digit = render_digit(heldout_digits()[0][0], 64)
    versions = {v: server.predict("mnist", digit, version=v).json()["version"] for v in ("1.0", "2.0")}
    assert versions == {"1.0": "1.0", "2.0": "2.0"}
    assert server.predict("mnist", digit).json()["version"] == "1.0"
    try:
        switched = server.management("PUT", "/models/mnist/2.0/set-default")
        assert switched.status_code == 200, switched.text
        assert server.predict("mnist", digit).json()["version"] == "2.0"
    finally:
        server.management("PUT", "/models/mnist/1.0/set-default")
    assert server.predict("mnist", digit).json()["version"] == "1.0"


def test_scaling_workers_up_and_down(server):
    try:
        scaled = server.management("PUT", "/models/sentiment?min_worker=2&max_worker=2&synchronous=true")
        assert scaled.status_code == 200, scaled.text
        assert len(server.worker_pids("sentiment")) == 2
        assert server.predict("sentiment", "很好".encode(), headers=TEXT).json()["label"] == "positive"
    finally:
        server.management("PUT", "/models/sentiment?min_worker=1&max_worker=1&synchronous=true")
    assert len(server.worker_pids("sentiment")) == 1


def test_metrics_endpoint_has_torchserve_and_custom_metrics(server):
    server.predict("mnist", render_digit(heldout_digits()[0][0], 28))
    server.predict("regression", b"{}", headers=JSON)
    rejected = 'RejectedRequests{ModelName="regression",ModelVersion="1.0",ErrorType="InvalidField"'
    deadline = time.monotonic() + 2 * COUNTER_WRITE_SECONDS + 5  # counters are written at most once a second
    while rejected not in (metrics := server.metrics()) and time.monotonic() < deadline:
        time.sleep(0.2)
    for name in ("ts_inference_requests_total", "ts_inference_latency_microseconds", "ts_queue_latency_microseconds",
                 "PredictionsByLabel", "RejectedRequests", "HandlerRequests", "PreprocessMilliseconds", "HandlerTime",
                 "PredictionTime"):
        assert f"\n{name}{{" in metrics, name
    for counter in ("PredictionsByLabel", "RejectedRequests", "HandlerRequests", "PreprocessMilliseconds"):
        assert f"# TYPE {counter} counter" in metrics, counter  # Prometheus can rate() them
    assert rejected in metrics


def test_worker_log_keeps_the_handlers_lines_without_torchserves_noise(server):
    """TorchServe's "Backend received inference at" line, logged for every batch before the handler runs, never
    reaches model_log.log (handlers.common.quiet_batch_log), nor does an "Overriding existing key" line for each
    handler metric at a worker's start (handlers.common.declared_metric); the handler's own lines still do."""
    for _ in range(3):
        assert server.predict("mnist", render_digit(heldout_digits()[0][0], 28)).status_code == 200
    reply = server.predict("mnist", b"\x89PNG\r\n\x1a\n truncated", headers={"Content-Type": "image/png"})
    assert reply.status_code == 400, reply.text
    log = server.workdir / "logs" / "model_log.log"
    deadline = time.monotonic() + 10
    while "mnist rejected request 0: 400" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)  # the frontend copies each worker's stdout to the log in order, behind the reply
    text = log.read_text()
    assert "mnist rejected request 0: 400" in text and "ready on cpu" in text
    assert "Backend received inference" not in text
    assert "Overriding existing key" not in text


BAD_REQUESTS = [  # (model, body, headers, status, error type)
    ("mnist", b"", {}, 400, "EmptyBody"),
    ("mnist", b"\x89PNG\r\n\x1a\n truncated", {"Content-Type": "image/png"}, 400, "InvalidImage"),
    ("mnist", encode_image(np.full((1, 1), 255)), {"Content-Type": "image/png"}, 400, "InvalidImage"),
    ("mnist", b'{"data": 12}', JSON, 400, "InvalidField"),
    ("sentiment", b"\xff\xfe\xfa", TEXT, 400, "InvalidEncoding"),
    ("sentiment", b"  ", TEXT, 400, "EmptyText"),
    ("sentiment", b'{"text": ["nested"]}', JSON, 400, "InvalidField"),
    ("regression", b'{"age": NaN}', JSON, 400, "InvalidField"),
    ("regression", b'{"age": Infinity}', JSON, 400, "InvalidField"),
    ("regression", b'[{"age": "x"}]', JSON, 400, "InvalidField"),
    ("regression", b"not json", JSON, 400, "InvalidJSON"),
]


def test_bad_input_matrix_gets_named_4xx_and_workers_survive(server):
    pids = {entry.name: server.worker_pids(entry.name) for entry in registry.served_models()}
    for model, body, headers, status, kind in BAD_REQUESTS:
        reply = server.predict(model, body, headers=headers)
        assert reply.status_code == status, (model, body[:20], reply.text)
        assert reply.json()["type"] == kind and reply.json()["code"] == status and reply.json()["message"]
    oversized = server.predict("sentiment", "好".encode() * 2_000_000, headers=TEXT)  # 6 MB > max_request_size
    assert oversized.status_code == 413
    assert {model: server.worker_pids(model) for model in pids} == pids
    assert server.predict("sentiment", "很好".encode(), headers=TEXT).status_code == 200


def test_mixed_batch_good_and_bad_requests_concurrently(server):
    images, labels = heldout_digits(count=12)
    bodies = [render_digit(image, 40) if i % 3 else b"garbage" for i, image in enumerate(images)]
    pids = server.worker_pids("mnist", "1.0")
    with ThreadPoolExecutor(len(bodies)) as pool:
        replies = list(pool.map(lambda body: server.predict("mnist", body, version="1.0"), bodies))
    for i, (reply, label) in enumerate(zip(replies, labels)):
        if i % 3:
            assert reply.status_code == 200 and reply.json()["label"] == str(label)
        else:
            assert reply.status_code == 400 and reply.json()["type"] == "InvalidImage"
    assert server.worker_pids("mnist", "1.0") == pids


def test_customized_describe_shows_training_metrics(server):
    described = server.management("GET", "/models/regression?customized=true").json()[0]
    custom = described["customizedMetadata"]
    assert custom["training"]["test"]["r2"] >= 0.40
