"""No input may kill a worker or stall its model: hostile requests over real HTTP against the session TorchServe.

In-process tests never reach the Java frontend, where a CR/LF in a reason phrase or a reply over
``max_response_size`` kills the worker. Each hostile request here is sent as COPIES concurrent copies while good
requests for the same model are in flight (so the frontend batches them together): every copy must get a 2xx or
4xx with a JSON body, every good request must succeed within CHEAP_DEADLINE seconds, and the model's worker pids
must be unchanged. At the end, each worker's resident memory must be back within RSS_SLACK of where it started.
"""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import registry
from scripts.server import CONFIG, ROOT, read_properties
from tests.samples import heldout_digits, heldout_patients, render_digit

pytestmark = pytest.mark.slow

TEXT = {"Content-Type": "text/plain; charset=utf-8"}
JSON = {"Content-Type": "application/json"}
MAX_RESPONSE = int(read_properties(CONFIG)["max_response_size"])
GOOD_ALONGSIDE = 6
"""Good requests sent together with each hostile one, so that they share its batch."""
COPIES = 8
"""Concurrent copies of each hostile request."""
CHEAP_DEADLINE = 5.0
"""Seconds within which a good request to the same model is answered while the hostile copies run: each stage's
work is bounded before it runs, so no copy holds the worker for long."""
RSS_SLACK = 100 * 2**20
"""Resident memory a worker may keep after the hostile run, over what it held after its first requests."""

CONTROL = "\r\n\x00\x1b\x7f\u0085\u2028 HTTP/1.1 200 OK\r\nX-Injected: 1\r\n\r\n"
"""Carriage return, line feed, NUL, ESC, DEL, NEL, LINE SEPARATOR, then a forged status line and header."""
LONG = "k" * 100_000
NFKC_BOMB = "\ufdfa" * 1_300_000
"""3.9 MB of UTF-8 (under max_request_size) that NFKC normalisation would expand to 23 million characters."""


def large_photo():
    """A 4000 x 3000 JPEG (12 megapixels) of the detector's held-out objects: every mask at this size is large."""
    import io

    from PIL import Image

    sample = Image.open(ROOT / registry.model("detector").samples[0].file).convert("RGB")
    buffer = io.BytesIO()
    sample.resize((4000, 3000), Image.BILINEAR).save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


PHOTO = large_photo()
EVERYTHING = {"Content-Type": "image/jpeg", "Score-Threshold": "0", "Max-Detections": "100"}


def good_request(model):
    """(body, headers) of ``model``'s first sample in registry.py, which it answers with a 200."""
    sample = registry.model(model).samples[0]
    return (ROOT / sample.file).read_bytes(), {"Content-Type": sample.content_type}


def row(**changes):
    """A held-out regression row with ``changes`` (new keys or values)."""
    return {**heldout_patients()[0][0], **changes}


def hostile(name, model, body, headers=None, path="predictions"):
    return pytest.param(model, body if isinstance(body, bytes) else json.dumps(body).encode(), headers or JSON, path,
                        id=name)


EVERY_MODEL = [  # (name, body, headers, path): sent to every served model
    ("nested-5000", b"[" * 5000 + b"]" * 5000, JSON, "predictions"),
    ("json-keys-crlf", json.dumps({CONTROL: 1}).encode(), JSON, "predictions"),
    ("control-text", CONTROL.encode("utf-8"), TEXT, "predictions"),
    ("garbage-as-png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, {"Content-Type": "image/png"}, "predictions"),
    ("explain-garbage", b"\r\n\x00", {"Content-Type": "image/png"}, "explanations"),
]
HOSTILE = [  # (model, body, headers, path): every field a handler quotes in an error, and the lists' limits
    *[pytest.param(entry.name, body, headers, path, id=f"{entry.name}-{name}")
      for entry in registry.served_models() for name, body, headers, path in EVERY_MODEL],
    hostile("regression-key-crlf", "regression", row(**{CONTROL: 1})),
    hostile("regression-key-newline-11-bytes", "regression", b'{"a\\nb": 1}'),
    hostile("regression-key-lone-surrogate", "regression", b'{"\\ud800\\udfff\\udc00": 1}'),
    hostile("regression-value-crlf", "regression", row(age=CONTROL)),
    hostile("regression-value-surrogate", "regression", b'{"age": "\\ud800"}'),
    hostile("regression-long-key", "regression", row(**{LONG: 1})),
    hostile("regression-long-value", "regression", row(age=LONG)),
    hostile("regression-many-unknown-keys", "regression", {f"{CONTROL}{i}": i for i in range(5000)}),
    hostile("regression-list-item-crlf", "regression", [row(), CONTROL]),
    hostile("regression-rows-over-limit", "regression", [row()] * 1025),
    hostile("regression-1e300", "regression", row(age=1e300)),
    hostile("regression-int-1e400", "regression", row(age=10 ** 400)),
    hostile("regression-NaN", "regression", b'{"age": NaN}'),
    hostile("regression-utf-16", "regression", b"\xff\xfe" + "{}".encode("utf-16-le")),
    hostile("regression-duplicate-key", "regression", b'{"age": 1, "age": "x"}'),
    hostile("sentiment-keys-crlf", "sentiment", {CONTROL: "x", "text": "好"}),
    hostile("sentiment-long-key", "sentiment", {LONG: "x"}),
    hostile("sentiment-surrogate-text", "sentiment", b'{"text": "\\ud800\\ud800"}'),
    hostile("sentiment-control-text", "sentiment", CONTROL.encode("utf-8"), TEXT),
    hostile("sentiment-nul-only", "sentiment", b"\x00\x00", TEXT),
    hostile("sentiment-texts-over-limit", "sentiment", ["好"] * 257),
    hostile("sentiment-list-of-non-strings", "sentiment", [CONTROL, {CONTROL: 1}]),
    hostile("mnist-data-crlf", "mnist", {"data": CONTROL}),
    hostile("mnist-data-surrogate", "mnist", b'{"data": "\\ud800"}'),
    hostile("mnist-text-body", "mnist", CONTROL.encode("utf-8"), TEXT),
    hostile("sentiment-nfkc-bomb", "sentiment", NFKC_BOMB.encode("utf-8"), TEXT),
    hostile("sentiment-nfkc-bomb-json", "sentiment", {"text": NFKC_BOMB[:600_000]}),  # 6 bytes each: \ufdfa
    hostile("sentiment-unknown-charset", "sentiment", "好".encode("utf-8"), {"Content-Type": "text/plain; charset=x"}),
    hostile("sentiment-utf-16-as-utf-8", "sentiment", "nice value".encode("utf-16-le"), TEXT),
    hostile("detector-12mp-every-mask", "detector", PHOTO, EVERYTHING),
    hostile("detector-12mp-every-polygon", "detector", PHOTO, {**EVERYTHING, "Mask-Format": "polygons"}),
    hostile("detector-12mp-semantic", "detector", PHOTO, {**EVERYTHING, "Output": "semantic"}),
    hostile("detector-12mp-default-masks", "detector", PHOTO, {**EVERYTHING, "Max-Detections": None}),
    hostile("mnist-oip-superscript-length", "mnist", b"{}", {**JSON, "Inference-Header-Content-Length": "\u00b2"}),
    hostile("regression-explain-crlf", "regression", row(**{CONTROL: 1}), path="explanations"),
    hostile("sentiment-explain-crlf", "sentiment", {CONTROL: "x"}, path="explanations"),
]


def send(server, model, body, headers, path="predictions"):
    headers = {name: value for name, value in headers.items() if value is not None}  # None: the header left out
    return server.inference("POST", f"/{path}/{model}", data=body, headers=headers, timeout=60)


def pids_of_every_model(server):
    return {entry.name: server.worker_pids(entry.name) for entry in registry.served_models()}


def with_good_requests(server, model, send_hostile, copies=1):
    """``copies`` concurrent ``send_hostile()`` together with GOOD_ALONGSIDE good requests for ``model``, half of
    them sent after the hostile ones: (hostile replies, good replies, the slowest good reply's seconds)."""
    body, headers = good_request(model)

    def timed_good():
        started = time.monotonic()
        return send(server, model, body, headers), time.monotonic() - started

    with ThreadPoolExecutor(GOOD_ALONGSIDE + copies) as pool:
        good = [pool.submit(timed_good) for _ in range(GOOD_ALONGSIDE // 2)]
        bad = [pool.submit(send_hostile) for _ in range(copies)]
        good += [pool.submit(timed_good) for _ in range(GOOD_ALONGSIDE - len(good))]
        answered = [future.result() for future in good]
        return ([future.result() for future in bad], [reply for reply, _ in answered],
                max(seconds for _, seconds in answered))


def assert_clean_reply(reply):
    """A 2xx or a 4xx whose JSON body names the problem; the status line carries only the fixed phrase."""
    assert 200 <= reply.status_code < 300 or 400 <= reply.status_code < 500, (reply.status_code, reply.text[:300])
    if reply.status_code >= 400:
        body = reply.json()
        if set(body) == {"error"}:  # a request in the Open Inference Protocol gets the protocol's error body
            message = body["error"]
        else:
            assert set(body) == {"code", "type", "message"} and body["code"] == reply.status_code, body
            message = body["message"]
        assert "\r" not in message and "\n" not in message and "\x00" not in message
        assert len(message) < 2000, len(message)
    assert "X-Injected" not in reply.headers
    assert len(reply.content) <= MAX_RESPONSE


def resident_bytes(pid):
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


@pytest.fixture(scope="module")
def resident_at_start(server):
    """Each served model's worker pids and resident memory after a few batches of good requests: first-call
    allocations made, and what glibc keeps between ordinary batches (the working set; only a batch with a large
    input gives the heap back)."""
    memory = {}
    for entry in registry.served_models():
        body, headers = good_request(entry.name)
        for _ in range(3):
            concurrent = COPIES + GOOD_ALONGSIDE
            with ThreadPoolExecutor(concurrent) as pool:
                replies = list(pool.map(lambda _: send(server, entry.name, body, headers), range(concurrent)))
            assert all(reply.status_code == 200 for reply in replies)
        memory[entry.name] = {pid: resident_bytes(pid) for pid in server.worker_pids(entry.name)}
    return memory


@pytest.mark.parametrize("model, body, headers, path", HOSTILE)
def test_hostile_request_leaves_the_batch_and_the_worker_alive(server, resident_at_start, model, body, headers, path):
    before = pids_of_every_model(server)
    bad, good, slowest = with_good_requests(server, model, lambda: send(server, model, body, headers, path), COPIES)
    for reply in bad:
        assert_clean_reply(reply)
    assert [reply.status_code for reply in good] == [200] * len(good), [reply.text[:200] for reply in good]
    assert slowest < CHEAP_DEADLINE, f"a good request waited {slowest:.1f} s behind {COPIES} hostile copies"
    assert pids_of_every_model(server) == before, "a worker was replaced"


def test_client_text_reaches_the_body_escaped_and_bounded_never_the_status_line(server):
    reply = send(server, "regression", json.dumps(row(**{CONTROL: 1})).encode(), JSON)
    assert (reply.status_code, reply.reason) == (400, "Bad Request")
    assert reply.json()["type"] == "InvalidField"
    assert json.dumps(CONTROL)[1:30] in reply.json()["message"]  # quoted as a JSON string: \r\n\u0000...
    long = send(server, "regression", json.dumps(row(**{LONG: 1})).encode(), JSON).json()["message"]
    assert "(100000 characters)" in long and LONG not in long


# --- reading what was sent, or saying it could not --------------------------------------------------------------------

def test_text_is_read_in_its_charset_and_a_cut_is_said(server):
    review = "质量很好，非常满意，下次还来"
    for charset in ("gb18030", "utf-16", "big5"):
        text = review if charset != "big5" else "質量很好，非常滿意，下次還來"
        reply = send(server, "sentiment", text.encode(charset), {"Content-Type": f"text/plain; charset={charset}"})
        assert reply.status_code == 200 and reply.json()["label"] == "positive", (charset, reply.text)
    unknown = send(server, "sentiment", review.encode(), {"Content-Type": "text/plain; charset=klingon"})
    assert (unknown.status_code, unknown.json()["type"]) == (415, "UnsupportedCharset")
    as_utf8 = send(server, "sentiment", "nice value".encode("utf-16-le"), TEXT)
    assert (as_utf8.status_code, as_utf8.json()["type"]) == (400, "InvalidEncoding")
    long = send(server, "sentiment", (review * 100).encode(), TEXT).json()
    assert long["truncated"] is True and long["tokens_read"] == 600 and long["label"] == "positive"


def test_masks_beyond_the_budget_are_refused_before_they_are_made(server):
    asked = send(server, "detector", PHOTO, EVERYTHING)
    assert (asked.status_code, asked.json()["type"]) == (413, "TooManyMaskPixels")
    assert "ask for at most 8 (Max-Detections)" in asked.json()["message"]
    default = send(server, "detector", PHOTO, {"Content-Type": "image/jpeg", "Score-Threshold": "0"}).json()
    assert default["max_detections"] == 8 and len(default["detections"]) <= 8
    assert default["image_size"] == {"width": 4000, "height": 3000}
    assert all(d["mask"]["size"] == [3000, 4000] for d in default["detections"])


# --- the largest request each model accepts --------------------------------------------------------------------------

def largest_requests():
    """(model, path, body, headers): the longest lists each model accepts, on both APIs, with long items."""
    review = ("这家店的东西质量很好，物流也很快，客服态度非常热情，下次还会再来购买。" * 20)[:400]
    digit = render_digit(heldout_digits()[0][0], 300)
    import base64

    digits = json.dumps({"data": base64.b64encode(digit).decode()}).encode()
    return [("sentiment", "predictions", json.dumps([review] * 256).encode(), JSON),
            ("sentiment", "explanations", json.dumps([review] * 16).encode(), JSON),
            ("regression", "predictions", json.dumps([row()] * 1024).encode(), JSON),
            ("regression", "explanations", json.dumps([row()] * 16).encode(), JSON),
            ("mnist", "explanations", digits, JSON)]


@pytest.mark.parametrize("model, path, body, headers", largest_requests(),
                         ids=[f"{m}-{p}" for m, p, _, _ in largest_requests()])
def test_the_largest_accepted_request_gets_a_reply_under_max_response_size(server, model, path, body, headers):
    before = server.worker_pids(model)
    reply = send(server, model, body, headers, path)
    assert reply.status_code == 200, reply.text[:300]
    assert len(reply.content) <= MAX_RESPONSE
    assert server.worker_pids(model) == before


def test_an_explanation_request_over_the_limit_says_the_limit(server):
    reply = send(server, "sentiment", json.dumps(["好"] * 17).encode(), JSON, "explanations")
    assert reply.status_code == 413 and reply.json()["type"] == "TooManyExamples"
    assert "at most 16" in reply.json()["message"]


# --- control headers -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", [entry.name for entry in registry.served_models()])
def test_a_client_describe_header_is_answered_as_a_prediction(server, model):
    body, headers = good_request(model)
    before = server.worker_pids(model)
    (bad,), good, _ = with_good_requests(server, model,
                                         lambda: send(server, model, body, {**headers, "describe": "True"}))
    assert bad.status_code == 200 and "training" not in bad.json(), bad.text[:300]
    assert [reply.status_code for reply in good] == [200] * len(good)
    assert server.worker_pids(model) == before
    empty = server.inference("POST", f"/predictions/{model}", headers={"describe": "True"})  # no body at all
    assert empty.status_code == 400 and "training" not in empty.text, empty.text[:300]


def test_a_client_explain_header_on_predictions_gets_a_prediction(server):
    """The frontend sets ``explain`` itself (True on /explanations only), whatever the client sent."""
    asked = send(server, "sentiment", "很好".encode(), {**TEXT, "explain": "True"})
    assert asked.status_code == 200 and set(asked.json()) == {"label", "score", "truncated"}, asked.text[:300]
    refused = send(server, "sentiment", "很好".encode(), {**TEXT, "explain": "False"}, "explanations")
    assert refused.status_code == 200 and "tokens" in refused.json()


def test_every_worker_gives_back_the_memory_of_the_hostile_run(server, resident_at_start):
    """Last in this module: after every hostile request above, each worker holds at most RSS_SLACK more than after
    its first good request (a mask stage that kept its full-size buffers, or a cache keyed by client input, would
    not)."""
    for model, memory in resident_at_start.items():
        assert set(server.worker_pids(model)) == set(memory), f"{model}: a worker was replaced"
        for pid, start in memory.items():
            grown = resident_bytes(pid) - start
            assert grown <= RSS_SLACK, f"{model} worker {pid} holds {grown / 2**20:.0f} MiB more than at the start"
