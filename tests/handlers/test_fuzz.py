"""Property-based fuzzing of each handler's request path, in-process (``worker`` fixture: TorchServe's own input
decoding, a real Context, the archive's handler).

Allowed outcomes for every request: a valid prediction (200) or a clean client error (4xx, body exactly
{"code", "type", "message"} with code == status). Never an exception out of the handler, and never a reply that
TorchServe's worker cannot put on the wire: each batch's replies also go through ``create_predict_response``, the
function the worker uses to answer the frontend (it encodes the status phrase and the JSON body).

Inputs: random bytes under many content types, random JSON (NaN, infinities, huge integers, deep nesting), random
Unicode (lone surrogates, control characters) as raw text and inside JSON, model-shaped documents with hostile
values, and images: random modes, formats and sizes, corrupted files, tiny and huge images, decompression bombs.
A fuzzed request always shares its batch with a good one, whose answer must come back unharmed.
"""

import io
import json
import math
import os
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from ts.protocol.otf_message_handler import create_predict_response

import registry
from registry import ROOT
from tests.load.checks import WrongAnswer
from tests.samples import heldout_digits, heldout_patients, render_digit
from tests.worker import Request

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 40))  # e.g. FUZZ_EXAMPLES=1000 for a long hunt
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                            HealthCheck.data_too_large])
STEMS = [version.archive for _, version in registry.served()]
CONTENT_TYPES = ["application/octet-stream", "application/json", "application/json; charset=utf-8",
                 "application/vnd.api+json", "text/plain", "text/plain; charset=utf-8", "text/csv", "image/png",
                 "image/jpeg", "application/x-www-form-urlencoded", "", "*/*"]
JSON = "application/json"
TEXT = "text/plain; charset=utf-8"


# --- what a reply may be -----------------------------------------------------------------------------------------

def finite(value, low=-math.inf, high=math.inf):
    return isinstance(value, float) and math.isfinite(value) and low <= value <= high


def all_finite(value):
    """Every number in a JSON-able value is finite (explanations: attributions, scores, predictions)."""
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(all_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def valid_prediction(stem, body):
    """A 200 reply of archive ``stem`` is a correct answer by its model's load-test check (registry.Load), strict
    JSON with finite numbers."""
    entry, _ = registry.archive(stem)
    try:
        registry.resolve(entry.load.check)(body)
    except WrongAnswer as error:
        raise AssertionError(f"{stem}: {error}: {str(body)[:300]}") from None
    assert all_finite(body), body


def check_batch(worker, stem, requests, explain=False):
    """Run ``requests`` as one batch; every reply must be a valid prediction or a clean 4xx; return the replies."""
    replies = worker.run(*requests)  # an exception here is a failed property: the worker would answer 503
    for reply in replies:
        json.dumps(reply.body, allow_nan=False)  # strict JSON: no NaN/Infinity a client could not parse
        if reply.status == 200:
            for item in reply.body if isinstance(reply.body, list) else [reply.body]:
                if explain:
                    assert isinstance(item, dict) and item and all_finite(item), item
                else:
                    valid_prediction(stem, item)
        else:
            assert 400 <= reply.status < 500, (reply.status, reply.body)
            assert isinstance(reply.body, dict) and set(reply.body) == {"code", "type", "message"}, reply.body
            assert reply.body["code"] == reply.status and isinstance(reply.body["type"], str)
            assert isinstance(reply.body["message"], str) and reply.body["message"]
    # The worker's last step: encode status phrases and bodies for the frontend. It must not raise either.
    create_predict_response([r.body for r in replies], worker.context.request_ids, "Prediction success", 200,
                            worker.context)
    return replies


def sample_request(stem):
    """The registry sample of archive ``stem``'s version (else its model's first sample) as a request."""
    entry, version = registry.archive(stem)
    default = version is entry.versions[0]
    sample = next((s for s in entry.samples if s.version == (None if default else version.version)),
                  entry.samples[0])
    return Request((ROOT / sample.file).read_bytes(), sample.content_type)


@pytest.fixture(scope="module")
def good():
    """One good request per archive: its registry sample (checked in every fuzzed batch)."""
    return {stem: sample_request(stem) for stem in STEMS}


def same_answer(got, expected):
    """Replies equal up to float noise (a batch of two may round differently from a batch of one)."""
    if isinstance(expected, dict):
        return isinstance(got, dict) and got.keys() == expected.keys() and all(
            same_answer(got[key], value) for key, value in expected.items())
    if isinstance(expected, list):
        return isinstance(got, list) and len(got) == len(expected) and all(map(same_answer, got, expected))
    if isinstance(expected, float):
        return got == pytest.approx(expected, abs=1e-3)
    return got == expected


@pytest.fixture(scope="module")
def fuzz(worker, good):
    """fuzz(stem, request): the request batched with that archive's good request; both must behave."""
    expected = {}
    for stem, request in good.items():
        reply = worker(stem).run_one(request)
        assert reply.status == 200, (stem, reply.body)
        expected[stem] = reply.body

    def run(stem, request):
        explain = request.headers.get("explain") == "True"
        if explain:  # TorchServe sets the header per request; the handler reads it per request too
            return check_batch(worker(stem), stem, [request], explain=True)[0]
        replies = check_batch(worker(stem), stem, [request, good[stem]])
        assert replies[1].status == 200, f"a fuzzed request broke its batch neighbour: {replies[1].body}"
        assert same_answer(replies[1].body, expected[stem]), (replies[1].body, expected[stem])
        return replies[0]

    return run


# --- strategies ------------------------------------------------------------------------------------------------------

CHARACTERS = st.one_of(st.characters(exclude_categories=()),  # any code point but surrogates
                       st.characters(categories=["Cs"]),  # lone surrogates
                       st.characters(categories=["Cc", "Cf", "Zl", "Zp"]),  # control and format characters
                       st.sampled_from("好差很不错服务失望，。！？\u3000\ufeff\u200b"))
TEXTS = st.text(CHARACTERS, max_size=60)
NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(),
                    st.integers(min_value=10 ** 300, max_value=10 ** 400), st.integers(max_value=-(10 ** 300)),
                    st.sampled_from([0, -0.0, 1e308, -1e308, 3.4e38, 3.5e38, 1e-320, 2 ** 63, 2 ** 64 + 1]))
JSON_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), NUMBERS, TEXTS),
                           lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                   st.dictionaries(TEXTS, inner, max_size=5)),
                           max_leaves=20)


def wire_json(value, ensure_ascii=True):
    """JSON text as a client could send it: NaN/Infinity tokens allowed, surrogates escaped or raw (invalid UTF-8)."""
    text = json.dumps(value, ensure_ascii=ensure_ascii, allow_nan=True)
    return text.encode("utf-8", "surrogatepass")


def wire_text(text):
    return text.encode("utf-8", "surrogatepass")  # lone surrogates become invalid UTF-8, as on the wire


@st.composite
def json_requests(draw, values=JSON_VALUES):
    value = draw(values)
    return Request(wire_json(value, draw(st.booleans())), draw(st.sampled_from([JSON, "application/vnd.api+json",
                                                                               "text/plain"])))


# --- images ------------------------------------------------------------------------------------------------------------

FORMATS = {"PNG": {"L", "RGB", "RGBA", "LA", "P", "1", "I;16"}, "JPEG": {"L", "RGB", "CMYK"},
           "GIF": {"L", "P", "1"}, "BMP": {"L", "RGB", "P", "1"}, "TIFF": {"L", "RGB", "RGBA", "1", "I", "F", "CMYK"},
           "WEBP": {"RGB", "RGBA"}, "ICO": {"RGBA", "RGB"}}


def encode_image(mode, width, height, fmt, seed, pattern):
    rng = np.random.default_rng(seed)
    image = Image.new(mode, (width, height))
    if pattern == "noise":
        image = Image.frombytes(mode, (width, height), rng.integers(0, 256, len(image.tobytes()), np.uint8).tobytes())
    elif pattern == "digit":
        digit = Image.open(io.BytesIO(render_digit(heldout_digits()[0][seed % 8], 28))).convert("L")
        image = digit.resize((width, height)).convert(mode) if mode not in ("I;16", "PA") else image
    if mode == "F" and pattern == "noise":
        pixels = np.frombuffer(image.tobytes(), np.float32).copy()
        pixels[rng.integers(0, pixels.size, max(1, pixels.size // 7))] = rng.choice([np.nan, np.inf, -np.inf, 1e38])
        image = Image.frombytes("F", (width, height), pixels.tobytes())
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@st.composite
def images(draw, max_side=64):
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(sorted(FORMATS[fmt])))
    width, height = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    if fmt == "ICO":
        width = height = min(max(width, 16), 256)
    return encode_image(mode, width, height, fmt, draw(st.integers(0, 2 ** 16)),
                        draw(st.sampled_from(["noise", "digit", "blank"])))


@st.composite
def corrupted(draw, source=images()):
    """A valid image file, truncated, with bytes overwritten, or both."""
    data = bytearray(draw(source))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    for _ in range(draw(st.integers(0, 8))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


def png_header_only(width, height, bit_depth=8, color_type=0):
    """A PNG that declares width x height and holds no pixel data: a decompression bomb's header."""
    def chunk(kind, data):
        return struct.pack("!I", len(data)) + kind + data + struct.pack("!I", zlib.crc32(kind + data))

    ihdr = struct.pack("!IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def uniform_png(width, height):
    """A real width x height PNG of one grey: tiny on the wire, width*height bytes once decoded."""
    buffer = io.BytesIO()
    Image.new("L", (width, height), 128).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


# --- properties ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stem", STEMS)
@FUZZ
@given(body=st.binary(max_size=2048), content_type=st.sampled_from(CONTENT_TYPES))
def test_random_bytes(fuzz, stem, body, content_type):
    fuzz(stem, Request(body, content_type))


@pytest.mark.parametrize("stem", STEMS)
@FUZZ
@given(request=json_requests())
@example(request=Request(b'{"data": NaN, "text": Infinity, "age": -Infinity}', JSON))
@example(request=Request(b"1" * 5000, JSON))  # more digits than int() accepts
@example(request=Request(b'{"\\ud800": 1}', JSON))  # a lone surrogate as a JSON escape, in a key
@example(request=Request(b'{"text": "\\udfff", "data": "\\udfff"}', JSON))  # ... in a value
def test_random_json(fuzz, stem, request):
    fuzz(stem, request)


@pytest.mark.parametrize("stem", STEMS)
@FUZZ
@given(text=TEXTS, content_type=st.sampled_from([TEXT, "text/plain", "application/octet-stream", JSON]),
       as_json=st.booleans())
@example(text="\ud800", content_type=TEXT, as_json=False)
@example(text="\udfff好", content_type=JSON, as_json=True)
@example(text="\x00\x1b[2J\r\n\u202e", content_type=TEXT, as_json=False)
def test_random_unicode(fuzz, stem, text, content_type, as_json):
    fuzz(stem, Request(wire_json(text) if as_json else wire_text(text), content_type))


@FUZZ
@given(text=st.one_of(TEXTS, JSON_VALUES), wrap=st.sampled_from(["object", "list", "raw"]))
def test_sentiment_documents(fuzz, text, wrap):
    document = {"object": {"text": text}, "list": [text, "很好"], "raw": text}[wrap]
    fuzz("sentiment", Request(wire_json(document, ensure_ascii=False), JSON))


@st.composite
def regression_rows(draw, features):
    row = {name: draw(st.one_of(NUMBERS, st.floats(-1e3, 1e3), JSON_VALUES)) for name in features}
    if draw(st.booleans()) and row:
        del row[draw(st.sampled_from(sorted(row)))]
    if draw(st.booleans()):
        row[draw(TEXTS)] = draw(NUMBERS)
    return row


@pytest.fixture(scope="module")
def features(worker):
    return worker("regression").handler.features


@FUZZ
@given(data=st.data())
def test_regression_rows_with_hostile_numbers(fuzz, features, data):
    rows = data.draw(st.lists(regression_rows(features), min_size=1, max_size=4))
    document = rows if data.draw(st.booleans()) else rows[0]
    fuzz("regression", Request(wire_json(document, ensure_ascii=data.draw(st.booleans())), JSON))


def regression_row(**values):
    row = dict(heldout_patients()[0][0])
    first = next(iter(row))
    return json.dumps({**row, **{first if k == "first" else k: v for k, v in values.items()}})


HOSTILE = [  # (stem, body, content type), deterministic; the fuzzers above wander around these
    *[pytest.param(stem, b"[" * 5000 + b"]" * 5000, JSON, id=f"{stem}-nested-5000")
      for stem in STEMS],
    *[pytest.param(stem, b'{"a":' * 3000 + b"1" + b"}" * 3000, JSON, id=f"{stem}-nested-objects") for stem in STEMS],
    *[pytest.param(stem, b"[" * 500 + b"]" * 500, JSON, id=f"{stem}-nested-500") for stem in STEMS],
    pytest.param("regression", b'{"\\ud800": 1}', JSON, id="regression-surrogate-key"),
    pytest.param("regression", '{"\ud800": 1}'.encode("utf-8", "surrogatepass"), JSON,
                 id="regression-raw-surrogate-key"),
    pytest.param("sentiment", b'{"\\ud800": "x"}', JSON, id="sentiment-surrogate-key"),
    pytest.param("sentiment", b'{"text": "\\ud800\\udc00\\udfff"}', JSON, id="sentiment-surrogate-text"),
    pytest.param("mnist", b'{"data": "\\ud800"}', JSON, id="mnist-surrogate-data"),
    pytest.param("mnist", '{"data": "iVBORw0KGgo\u00e9"}'.encode(), JSON, id="mnist-non-ascii-base64"),
    *[pytest.param("regression", regression_row(first=value), JSON, id=f"regression-{label}")
      for label, value in [("1e300", 1e300), ("-1e308", -1e308), ("3.5e38", 3.5e38), ("1e39", 1e39)]],
    *[pytest.param("regression", regression_row(first=value), JSON, id=f"regression-int-{label}")
      for label, value in [("1e309", 10 ** 309), ("-1e400", -(10 ** 400)), ("2^1024", 2 ** 1024)]],
    pytest.param("regression", regression_row(first=10 ** 308), JSON, id="regression-int-1e308"),
    pytest.param("regression", regression_row(first=1e-320), JSON, id="regression-subnormal"),
    pytest.param("regression", b'{"age": 1e400}', JSON, id="regression-1e400-is-inf"),
    pytest.param("regression", json.dumps([json.loads(regression_row())] * 1025).encode(), JSON,
                 id="regression-too-many-rows"),
    pytest.param("sentiment", json.dumps(["好"] * 257).encode(), JSON, id="sentiment-too-many-texts"),
    pytest.param("sentiment", ("好" * 1_000_000).encode(), TEXT, id="sentiment-3MB-text"),
    pytest.param("sentiment", b"\x00" * 10_000, TEXT, id="sentiment-nul-bytes"),
]


@pytest.mark.parametrize("stem, body, content_type", HOSTILE)
def test_hostile_documents(fuzz, stem, body, content_type):
    fuzz(stem, Request(body, content_type))


@pytest.mark.parametrize("stem", STEMS)
@settings(FUZZ, max_examples=max(5, EXAMPLES // 4))
@given(payload=st.one_of(st.none(), st.binary(max_size=256), st.builds(wire_json, JSON_VALUES)),
       flips=st.lists(st.tuples(st.integers(0, 2 ** 20), st.integers(0, 255)), max_size=4),
       content_type=st.sampled_from([None, JSON, TEXT, "application/octet-stream"]))
@example(payload=b'{"\\ud800": 1}', flips=[], content_type=JSON)
def test_explanations_of_fuzzed_inputs(fuzz, good, stem, payload, flips, content_type):
    """The explanations path (captum) gets the same treatment: the good input with bytes flipped, or garbage."""
    if payload is None:
        body = good[stem].body
        payload = bytearray(body.encode() if isinstance(body, str) else body)
        for position, value in flips:
            payload[position % len(payload)] = value
        payload = bytes(payload)
    fuzz(stem, Request(payload, content_type or good[stem].content_type, headers={"explain": "True"}))
