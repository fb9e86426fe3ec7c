"""handlers/common.py's contract, in-process: optional explanations, forward-pass chunks, reply bounds, devices."""

import io
import json
import logging
import subprocess
import sys
import time

import pytest
import torch

from handlers.common import BATCH_RECEIVED_LINE, CounterBuffer, RequestError, libc, quiet_batch_log, quote
from handlers.runtimes import TorchRuntime, equivalence_tolerance, to_device
from handlers.mnist import inference_copy
from models import architecture, build
from scripts.server import ROOT
from tests.samples import heldout_patients
from tests.worker import Request, valid_reason

JSON = "application/json"


def test_a_model_without_explanations_answers_them_with_a_typed_404(tiny_regression, monkeypatch):
    regression = tiny_regression
    monkeypatch.setattr(regression.handler, "explain", None)
    reply = regression.run_one(Request(json.dumps(heldout_patients()[0][0]), JSON, headers={"explain": "True"}))
    assert (reply.status, reply.body["type"]) == (404, "ExplanationsNotSupported")
    assert valid_reason(reply)


def test_forward_passes_never_exceed_max_forward_examples(tiny_regression, monkeypatch):
    regression = tiny_regression
    sizes = []
    predict = regression.handler.predict
    monkeypatch.setattr(regression.handler, "predict", lambda batch: sizes.append(len(batch)) or predict(batch))
    monkeypatch.setattr(regression.handler, "max_forward_examples", 32)
    rows = heldout_patients()[0]
    replies = regression.run(Request(json.dumps(rows * 5), JSON), Request(json.dumps(rows[0]), JSON))
    assert [reply.status for reply in replies] == [200, 200] and len(replies[0].body) == 100
    assert sizes == [32, 32, 32, 5]  # 101 examples of two requests, in chunks of at most 32


def test_a_reply_over_max_reply_bytes_is_a_413_and_its_batch_neighbours_are_answered(tiny_regression, monkeypatch):
    regression = tiny_regression
    monkeypatch.setattr(regression.handler, "max_reply_bytes", 2000)
    rows = heldout_patients()[0]
    big, small = regression.run(Request(json.dumps(rows * 10), JSON), Request(json.dumps(rows[0]), JSON))
    assert (big.status, big.body["type"]) == (413, "ReplyTooLarge") and "limit of 2000" in big.body["message"]
    assert small.status == 200 and "prediction" in small.body


def test_error_reasons_are_fixed_phrases_and_client_text_is_quoted_escaped_and_bounded():
    err = RequestError(f"unknown feature {quote('a' + chr(13) + chr(10) + 'b' * 100)}", code=400)
    assert err.reason == "Bad Request" and "\\r\\n" in err.message and "\r" not in err.message
    assert err.message.endswith('..." (103 characters)')
    assert RequestError("x", code=413).reason == "Request Entity Too Large"
    assert "\\ud800" in RequestError(quote("\ud800")).message.encode("utf-8").decode()  # encodable


def test_to_device_moves_tensors_nested_in_lists_tuples_and_dicts():
    moved = to_device({"images": [torch.ones(1)], "sizes": (torch.zeros(2), 3)}, "meta")
    assert moved["images"][0].device.type == "meta" and moved["sizes"][0].device.type == "meta"
    assert moved["sizes"][1] == 3 and isinstance(moved["sizes"], tuple)


def test_the_eager_runtime_passes_through_what_the_model_takes_and_returns():
    class Detector(torch.nn.Module):  # a list of images in, a list of dicts out, like torchvision's detectors
        def forward(self, images):
            return [{"boxes": image.sum().reshape(1, 1), "size": image.shape[-1]} for image in images]

    answers = TorchRuntime("eager", Detector(), torch.device("cpu"))([torch.ones(1, 2, 2), torch.ones(1, 3, 3)])
    assert [answer["boxes"].item() for answer in answers] == [4.0, 9.0] and answers[1]["size"] == 3
    two_inputs = TorchRuntime("eager", torch.nn.Bilinear(2, 3, 1), torch.device("cpu"))((torch.ones(4, 2),
                                                                                          torch.ones(4, 3)))
    assert two_inputs.shape == (4, 1)


def test_channels_last_copy_is_checked_with_a_device_aware_tolerance(monkeypatch):
    assert equivalence_tolerance(torch.device("cpu")) == 1e-3  # float rounding of a re-laid-out or folded copy
    assert equivalence_tolerance(torch.device("cuda", 0)) >= 1e-2  # TF32 convolutions on CUDA
    model = build(architecture("models.mnist", "DigitCNN", width=4)).eval()
    assert inference_copy(model, torch.device("cpu")) is not model
    allclose = torch.allclose
    monkeypatch.setattr(torch, "allclose", lambda *args, **kwargs: False)  # the copy drifted beyond the tolerance
    assert inference_copy(model, torch.device("cpu")) is model  # falls back to the original
    monkeypatch.setattr(torch, "allclose", allclose)


class RecordingMetric:
    """A TorchServe CachingMetric stand-in that records the metric lines it would write."""

    def __init__(self):
        self.lines = []

    def add_or_update(self, value, dimension_values=(), request_id=""):
        self.lines.append((value, list(dimension_values)))


def test_counters_are_written_at_once_after_a_quiet_interval_and_summed_under_load():
    requests, errors = RecordingMetric(), RecordingMetric()
    counters = CounterBuffer(interval=0.3)
    counters.add(requests, 4, ["m", "1.0"])
    counters.batch_done()
    assert requests.lines == [(4, ["m", "1.0"])]  # the first batch: written at once
    for _ in range(5):  # batches inside the interval: summed, one line per metric and dimensions
        counters.add(requests, 2, ["m", "1.0"])
        counters.add(errors, 1, ["m", "1.0"])
        counters.batch_done()
    assert requests.lines == [(4, ["m", "1.0"])] and errors.lines == []
    deadline = time.monotonic() + 5
    while not errors.lines and time.monotonic() < deadline:  # the timer writes what the last batch left
        time.sleep(0.05)
    assert requests.lines == [(4, ["m", "1.0"]), (10, ["m", "1.0"])] and errors.lines == [(5, ["m", "1.0"])]


def test_quiet_batch_log_drops_torchserves_per_batch_line_and_nothing_else():
    stream = io.StringIO()
    output = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(output)
    level = root.level
    root.setLevel(logging.INFO)  # setLevel, not .level: it clears the loggers' cached levels
    try:
        quiet_batch_log()
        quiet_batch_log()  # one filter, however many handlers of the worker initialise
        assert len(output.filters) == 1
        logging.info(BATCH_RECEIVED_LINE, 1796463487)  # as ts/protocol/otf_message_handler.py logs it
        logging.info("Backend received inference at: %s", "a handler's own line")
        logging.getLogger("ts.metrics").info("[METRICS]PredictionTime.ms:1.0|#ModelName:mnist")
    finally:
        root.removeHandler(output)
        root.setLevel(level)
    assert stream.getvalue().splitlines() == ["Backend received inference at: a handler's own line",
                                              "[METRICS]PredictionTime.ms:1.0|#ModelName:mnist"]


def test_a_forward_pass_that_raises_is_a_500_for_its_requests_and_they_are_counted(tiny_regression, monkeypatch):
    regression = tiny_regression
    written = RecordingMetric()
    monkeypatch.setattr(regression.handler, "metric_requests", written)
    monkeypatch.setattr(regression.handler, "counters", CounterBuffer(interval=0.0))
    monkeypatch.setattr(regression.handler, "predict", lambda batch: 1 / 0)
    reply = regression.run_one(Request(json.dumps(heldout_patients()[0][0]), JSON))
    assert (reply.status, reply.body["type"]) == (500, "InternalError") and valid_reason(reply)
    assert "ZeroDivisionError" in reply.body["message"] and "division" not in reply.body["message"]
    assert written.lines == [(1, ["regression", "1.0"])]


@pytest.mark.parametrize("hook", ["parse", "collate", "format"])
def test_any_exception_of_one_request_fails_it_alone_and_its_neighbours_are_answered(tiny_regression, monkeypatch,
                                                                                      hook):
    """Per-request isolation holds for exceptions that are not the handler's own error type, raised while reading
    one request (parse), in a forward pass (collate: the batch is then retried request by request) or while
    formatting its reply: a bug that one request meets gives it a 500, and its neighbours are answered."""
    handler = tiny_regression.handler
    poisoned = set()  # ids of the examples of the request that the bug is met by
    parse, original = handler.parse, getattr(handler, hook)

    def tagging_parse(payload, as_json):
        examples, many = parse(payload, as_json)
        if isinstance(payload, dict) and payload.get("age") == 0.05:
            if hook == "parse":
                raise ValueError("a bug that only this request meets")
            poisoned.update(map(id, examples))
        return examples, many

    def failing(*args):
        examples = args[0] if hook == "collate" else [args[0]]
        if poisoned & set(map(id, examples)):
            raise ValueError("a bug that only this request meets")
        return original(*args)

    monkeypatch.setattr(handler, "parse", tagging_parse)
    if hook != "parse":
        monkeypatch.setattr(handler, hook, failing)
    rows = heldout_patients()[0]
    replies = tiny_regression.run(*(Request(json.dumps(row), JSON) for row in (rows[0], {**rows[1], "age": 0.05},
                                                                               rows[2])))
    assert [replies[0].status, replies[2].status] == [200, 200] and "prediction" in replies[2].body
    assert (replies[1].status, replies[1].body["type"]) == (500, "InternalError") and valid_reason(replies[1])
    assert "ValueError" in replies[1].body["message"] and "only this request" not in replies[1].body["message"]


HEAP_PROBE = """
import sys
from handlers.common import bound_heap


def resident():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS:"))


if sys.argv[1] == "bounded":
    bound_heap()
before = resident()
for _ in range(2):  # the first buffer is mapped and unmapped, and by default raises glibc's threshold past its size
    block = bytearray(24 * 2**20)
    del block
print(resident() - before)
"""


@pytest.mark.skipif(libc() is None, reason="glibc's allocator only")
def test_a_worker_gives_a_large_buffer_back_to_the_os_whatever_came_before():
    """bound_heap (every worker's initialize): glibc alone keeps the second 24 MB buffer on the heap once freed."""
    kept = {mode: int(subprocess.run([sys.executable, "-c", HEAP_PROBE, mode], cwd=ROOT, check=True,
                                     capture_output=True, text=True).stdout) for mode in ("default", "bounded")}
    assert kept["default"] > 16 * 2**20, kept  # what a 12-megapixel request left behind in a worker
    assert kept["bounded"] < 4 * 2**20, kept
