"""The Open Inference Protocol (KServe v2) over real HTTP and gRPC, against the session TorchServe that
config.properties starts (``ts_open_inference_protocol=true``, token auth on), and the request bodies that only a real
frontend shows: duplicate keys and extra nesting in protocol JSON, form-encoded bodies with a malformed %-escape.

What TorchServe 0.12 serves in this mode (docs/serving.md, Open Inference Protocol):

- REST: ``/v2/health/live``, ``/v2/health/ready`` and ``/v2``, behind the inference key; no route for a model's
  readiness or metadata, so tritonclient.http's ``is_model_ready`` is False and ``get_model_metadata`` fails (404);
- gRPC, on the inference gRPC port: the KServe v2 service under TorchServe's own name, which the stock
  tritonclient.grpc does not find; ``TorchServeBridge`` is what that client needs to talk to it.
"""

import base64
import collections
import importlib
import itertools
import json
import shlex
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import (
    InferenceServerException,
    deserialize_bytes_tensor,
    serialize_byte_tensor,
    triton_to_np_dtype,
)

import registry
from handlers.common import BundleHandler
from handlers.oip import HEADER
from models import read_manifest

ROOT = registry.ROOT
TRITON_SERVICE = "/inference.GRPCInferenceService/"
TORCHSERVE_SERVICE = "/org.pytorch.serve.grpc.openinference.GRPCInferenceService/"
CONTENTS = {"BYTES": "bytes_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "BOOL": "bool_contents", "UINT8": "uint_contents"}
"""Datatype -> the InferTensorContents field TorchServe reads (its bridge handles these and a few more)."""
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
REFUSED_WITHOUT_THE_KEY = {"type": "InvalidKeyException", "code": 400}


def protocol_input(entry):
    """(name, datatype) of the model's one protocol input: its handler's ``oip_input`` (None: it has none)."""
    module = importlib.import_module(entry.handler.removesuffix(".py").replace("/", "."))
    handler = next(value for value in vars(module).values() if isinstance(value, type)
                   and issubclass(value, BundleHandler) and value.__module__ == module.__name__)
    return handler.oip_input


SPEAKING = [entry for entry in registry.served_models() if protocol_input(entry)]
"""The served models whose handler has the protocol's hooks: all of the course's. One without them (a user's own
handler) answers 404 ProtocolNotSupported, as tests/handlers/test_oip.py checks in-process."""


def by_name(entries):
    return pytest.mark.parametrize("entry", entries, ids=[entry.name for entry in entries])


# --- clients ----------------------------------------------------------------------------------------------------------

class _CallDetails(collections.namedtuple("_CallDetails", "method timeout metadata credentials wait_for_ready "
                                                           "compression"), grpc.ClientCallDetails):
    pass


class TorchServeBridge(grpc.UnaryUnaryClientInterceptor):
    """What tritonclient.grpc needs to talk to TorchServe 0.12's KServe v2 gRPC service: TorchServe's service name
    (org.pytorch.serve.grpc.openinference, not inference), inputs as typed contents (TorchServe drops
    raw_input_contents, which tritonclient sends), and outputs, which TorchServe answers as typed contents (each
    BYTES element as JSON text), back as the raw contents that tritonclient reads."""

    def intercept_unary_unary(self, continuation, details, request):
        method = details.method.replace(TRITON_SERVICE, TORCHSERVE_SERVICE)
        details = _CallDetails(method, details.timeout, details.metadata, details.credentials,
                               details.wait_for_ready, details.compression)
        if not method.endswith("/ModelInfer"):
            return continuation(details, request)
        for tensor, raw in zip(request.inputs, request.raw_input_contents):
            values = (deserialize_bytes_tensor(raw).tolist() if tensor.datatype == "BYTES"
                      else np.frombuffer(raw, dtype=triton_to_np_dtype(tensor.datatype)).tolist())
            getattr(tensor.contents, CONTENTS[tensor.datatype]).extend(values)
        del request.raw_input_contents[:]
        outcome = continuation(details, request)
        if outcome.exception() is None:
            response = outcome.result()
            for output in response.outputs:
                values = getattr(output.contents, CONTENTS[output.datatype])
                response.raw_output_contents.append(
                    serialize_byte_tensor(np.array([json.loads(v).encode() for v in values], dtype=object)).item()
                    if output.datatype == "BYTES" else np.array(values, triton_to_np_dtype(output.datatype)).tobytes())
                output.ClearField("contents")
        return outcome


def grpc_client(server, bridged=True):
    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{server.properties['grpc_inference_port']}")
    if bridged:  # tritonclient takes no interceptor: its stub is rebuilt on an intercepted channel
        channel = grpc.intercept_channel(client._channel, TorchServeBridge())
        client._client_stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    return client


@pytest.fixture(scope="module")
def rpc(server):
    """tritonclient.grpc with ``TorchServeBridge``, on the session TorchServe's inference gRPC port."""
    with grpc_client(server) as client:
        yield client


@pytest.fixture(scope="module")
def http(server):
    """tritonclient.http on the session TorchServe's inference port."""
    with triton_http.InferenceServerClient(f"127.0.0.1:{server.ports['inference']}") as client:
        yield client


def key(server, api="inference", http=True):
    """The token header of ``api``'s key: "Authorization" over HTTP, "authorization" metadata over gRPC (lower case,
    as gRPC requires)."""
    return {"Authorization" if http else "authorization": f"Bearer {server.token(api)}"}


def refused(call):
    with pytest.raises(InferenceServerException) as error:
        call()
    return error.value.status()


# --- health, tokens ---------------------------------------------------------------------------------------------------

def test_health_over_http_needs_the_inference_key(server, http):
    assert http.is_server_live(headers=key(server)) and http.is_server_ready(headers=key(server))
    assert http.get_server_metadata(headers=key(server))["name"] == "Torchserve"
    for headers in ({}, key(server, "management")):  # refused with 400, which tritonclient reads as "not live"
        assert not http.is_server_live(headers=headers) and not http.is_server_ready(headers=headers)


@pytest.mark.parametrize("method, path", [("GET", "/v2/health/live"), ("GET", "/v2/health/ready"), ("GET", "/v2"),
                                          ("POST", f"/v2/models/{registry.served_models()[0].name}/infer")])
def test_v2_routes_refuse_no_key_and_the_management_key(server, method, path):
    for token in (False, server.token("management")):
        reply = server.inference(method, path, token=token, data=b'{"inputs": []}' if method == "POST" else None)
        assert {k: reply.json()[k] for k in REFUSED_WITHOUT_THE_KEY} == REFUSED_WITHOUT_THE_KEY, reply.text


def test_health_over_grpc_needs_the_inference_key(server, rpc):
    assert rpc.is_server_live(headers=key(server, http=False)) and rpc.is_server_ready(headers=key(server, http=False))
    for headers in (None, key(server, "management", http=False)):
        assert refused(lambda headers=headers: rpc.is_server_live(headers=headers)) == "StatusCode.PERMISSION_DENIED"
    assert refused(lambda: rpc.get_server_metadata(headers=key(server, http=False))) == "StatusCode.UNIMPLEMENTED"


def test_stock_tritonclient_grpc_does_not_find_torchserves_service(server):
    with grpc_client(server, bridged=False) as client:
        assert refused(lambda: client.is_server_live(headers=key(server, http=False))) == "StatusCode.UNIMPLEMENTED"


# --- model readiness and metadata -------------------------------------------------------------------------------------

@by_name(registry.served_models())
def test_model_readiness_and_metadata_are_no_http_routes_of_torchserve(server, http, entry):
    """TorchServe 0.12's REST side of the protocol knows /v2/health/* and /v2 only: every model's ready and
    metadata routes are 404 (its versioned routes 501), whatever the model."""
    assert http.is_model_ready(entry.name, headers=key(server)) is False
    assert refused(lambda: http.get_model_metadata(entry.name, headers=key(server))) == "404"
    for version in registry.served_versions(entry):
        reply = server.inference("GET", f"/v2/models/{entry.name}/versions/{version.version}/ready")
        assert reply.status_code == 501 and reply.json() == {"error": "Model versioning is not yet supported."}


@pytest.mark.parametrize("entry, version", registry.served(),
                         ids=[f"{entry.name}-{version.version}" for entry, version in registry.served()])
def test_model_readiness_and_metadata_over_grpc(server, rpc, entry, version):
    """Answered by the frontend from its model list: name and versions; no inputs or outputs (no handler hook)."""
    assert rpc.is_model_ready(entry.name, version.version, headers=key(server, http=False))
    metadata = rpc.get_model_metadata(entry.name, version.version, headers=key(server, http=False), as_json=True)
    assert metadata == {"name": entry.name, "versions": [v.version for v in registry.served_versions(entry)]}
    assert refused(lambda: rpc.is_model_ready(entry.name, version.version)) == "StatusCode.PERMISSION_DENIED"


# --- inference over gRPC ----------------------------------------------------------------------------------------------

def sample_tensor(entry, sample):
    """The registry sample as the model's protocol input: the body as one BYTES element, or a JSON object of named
    features as an FP32 row in the manifest's order."""
    body = (ROOT / sample.file).read_bytes()
    name, datatype = protocol_input(entry)
    if datatype == "BYTES":
        return name, datatype, np.array([body], dtype=object)
    version = next(v for v in entry.versions if v.version == (sample.version or entry.versions[0].version))
    row = json.loads(body)
    return name, datatype, np.array([[row[f] for f in read_manifest(ROOT / version.artifacts)["features"]]],
                                    dtype=triton_to_np_dtype(datatype))


def infer_over_http(server, entry, sample, inputs):
    """tritonclient.http's binary request to /predictions/<model>[/version] (its versioned /v2 route answers 501)."""
    body, length = triton_http.InferenceServerClient.generate_request_body(inputs)
    reply = server.predict(entry.name, body, sample.version, headers={HEADER: str(length)} if length else {})
    assert reply.status_code == 200, reply.text[:300]
    return triton_http.InferenceServerClient.parse_response_body(reply.content,
                                                                 header_length=reply.headers.get(HEADER))


@pytest.mark.parametrize("entry, sample", [pytest.param(entry, sample, id=Path(sample.file).name)
                                           for entry in SPEAKING for sample in entry.samples])
def test_grpc_infer_answers_as_the_http_protocol(server, rpc, entry, sample):
    name, datatype, array = sample_tensor(entry, sample)
    via_http = infer_over_http(server, entry, sample, [triton_http.InferInput(name, list(array.shape), datatype)
                                                       .set_data_from_numpy(array)])
    via_grpc = rpc.infer(entry.name, [triton_grpc.InferInput(name, list(array.shape), datatype).set_data_from_numpy(
        array)], model_version=sample.version or "", headers=key(server, http=False))
    response = via_grpc.get_response()
    assert (response.model_name, response.model_version) == (entry.name, sample.version or entry.versions[0].version)
    names = [output["name"] for output in via_http.get_response()["outputs"]]
    assert [output.name for output in response.outputs] == names
    for output in names:
        expected, got = via_http.as_numpy(output), via_grpc.as_numpy(output)
        assert got.shape == expected.shape and got.dtype == expected.dtype
        if got.dtype == object:
            assert got.tolist() == expected.tolist()
        else:
            np.testing.assert_allclose(got, expected, rtol=1e-6)
    if sample.label:
        assert via_grpc.as_numpy("label").tolist() == [sample.label.encode()]


def detector_plain_replies(server):
    """(encoded images, plain /predictions replies) of the detector's registry samples."""
    samples = registry.model("detector").samples
    images = [(ROOT / sample.file).read_bytes() for sample in samples]
    replies = [server.predict("detector", image, headers={"Content-Type": sample.content_type})
               for image, sample in zip(images, samples)]
    assert all(reply.status_code == 200 for reply in replies), [reply.text[:300] for reply in replies]
    return images, [reply.json() for reply in replies]


def images_body(images):
    """A protocol request in JSON form of encoded ``images`` (the detector's input)."""
    return {"inputs": [{"name": "data", "shape": [len(images)], "datatype": "BYTES",
                        "data": [base64.b64encode(image).decode() for image in images]}]}


def assert_detections(result, plain):
    """A tritonclient result of the detector (HTTP or gRPC) holds the ``plain`` replies of its images: each as the
    JSON document of ``detections``, and as the tensors padded to ``max_detections``."""
    k = plain[0]["max_detections"]
    assert [json.loads(document) for document in result.as_numpy("detections").tolist()] == plain
    assert result.as_numpy("count").dtype == np.int64
    assert result.as_numpy("count").tolist() == [len(reply["detections"]) for reply in plain]
    labels, scores, boxes = (result.as_numpy(name) for name in ("labels", "scores", "boxes"))
    assert labels.shape == scores.shape == (len(plain), k) and boxes.shape == (len(plain), k, 4)
    assert scores.dtype == boxes.dtype == np.float32
    for row, reply in enumerate(plain):
        found = len(reply["detections"])
        assert [label.decode() for label in labels[row]] == [d["label"] for d in reply["detections"]] + [""] * (
            k - found)
        np.testing.assert_allclose(boxes[row, :found], [d["box"] for d in reply["detections"]], rtol=1e-6)
        np.testing.assert_allclose(scores[row, :found], [d["score"] for d in reply["detections"]], rtol=1e-6)


def test_detector_answers_each_image_as_its_plain_reply_over_http_and_grpc(server, http, rpc):
    """The detector's registry samples in one request, by tritonclient.http (binary), in JSON form and by
    tritonclient.grpc through TorchServe's bridge: each image's detections are those of its plain reply."""
    images, plain = detector_plain_replies(server)
    assert all(reply["detections"] for reply in plain)
    array = np.array(images, dtype=object)
    result = http.infer("detector", [triton_http.InferInput("data", [len(images)], "BYTES").set_data_from_numpy(
        array)], headers=key(server))
    assert_detections(result, plain)
    reply = server.inference("POST", "/v2/models/detector/infer", json=images_body(images))
    assert reply.status_code == 200, reply.text[:300]
    outputs = {output["name"]: output for output in reply.json()["outputs"]}
    assert [json.loads(document) for document in outputs["detections"]["data"]] == plain
    assert (outputs["count"]["datatype"], outputs["count"]["data"]) == (
        "INT64", [len(reply["detections"]) for reply in plain])
    via_grpc = rpc.infer("detector", [triton_grpc.InferInput("data", [len(images)], "BYTES").set_data_from_numpy(
        array)], headers=key(server, http=False))
    assert_detections(via_grpc, plain)


def test_detector_bad_images_get_400_over_http_and_the_error_output_over_grpc(server, rpc):
    """A BYTES element that is not an image: 400 with the protocol's body over REST, the ``error`` output over gRPC;
    the worker stays and answers the next request."""
    pids = server.worker_pids("detector")
    images, plain = detector_plain_replies(server)
    reply = server.inference("POST", "/v2/models/detector/infer", json=images_body([images[0], b"not an image"]))
    assert reply.status_code == 400 and reply.json() == {
        "error": 'image 1 of input "data": the body is not an image in a format Pillow reads (PNG, JPEG, GIF, BMP, '
                 "TIFF, WebP, ...)"}
    result = rpc.infer("detector", [triton_grpc.InferInput("data", [2], "BYTES").set_data_from_numpy(
        np.array([images[0], b"GIF89a"], dtype=object))], headers=key(server, http=False))
    assert 'image 1 of input "data"' in result.as_numpy("error")[0].decode()
    good = server.inference("POST", "/v2/models/detector/infer", json=images_body(images[:1]))
    assert good.status_code == 200
    assert json.loads(good.json()["outputs"][0]["data"][0]) == plain[0]
    assert server.worker_pids("detector") == pids


@by_name(registry.served_models())
def test_grpc_protocol_errors_are_the_error_output_and_keep_the_worker(server, rpc, entry):
    """TorchServe's gRPC bridge reads every reply as a ModelInferResponse: an error is the "error" output."""
    pids = server.worker_pids(entry.name)
    result = rpc.infer(entry.name, [triton_grpc.InferInput("unknown", [1], "FP32").set_data_from_numpy(
        np.zeros(1, np.float32))], headers=key(server, http=False))
    expected = (f'takes one input named "{protocol_input(entry)[0]}"' if protocol_input(entry)
                else "does not speak the Open Inference Protocol")
    assert expected in result.as_numpy("error")[0].decode()
    assert server.worker_pids(entry.name) == pids


# --- duplicate keys and extra nesting, over HTTP ----------------------------------------------------------------------

def protocol_json(entry, shape="[1]", data="[0]", extra=""):
    """A protocol request for the model's input as JSON text (``shape``, ``data``: JSON; ``extra``: more fields)."""
    name, datatype = protocol_input(entry)
    return (f'{{"inputs": [{{"name": {json.dumps(name)}, "shape": {shape}, "datatype": {json.dumps(datatype)}, '
            f'"data": {data}{extra}}}]}}')


HOSTILE_JSON = [  # (name, body of entry, message)
    ("inputs-twice", lambda e: protocol_json(e)[:-1] + ', "inputs": []}', 'key "inputs" twice'),
    ("shape-twice", lambda e: protocol_json(e, extra=', "shape": [2]'), 'key "shape" twice'),
    ("data-twice", lambda e: protocol_json(e, extra=', "data": [0, 0]'), 'key "data" twice'),
    ("data-deeper", lambda e: protocol_json(e, data="[[0]]"), "data[0] is nested deeper than shape [1]"),
    ("data-ragged", lambda e: protocol_json(e, shape="[2, 2]", data="[[0, 0], [0]]"),
     "data[1] is a list of 1, but shape [2, 2] has 2 there"),
]


@pytest.mark.parametrize("name, body, message", HOSTILE_JSON, ids=[name for name, _, _ in HOSTILE_JSON])
@by_name(SPEAKING)
def test_duplicate_keys_and_extra_nesting_get_400_over_http(server, entry, name, body, message):
    pids = server.worker_pids(entry.name)
    for path, headers in ((f"/v2/models/{entry.name}/infer", {"Content-Type": "application/json"}),
                          (f"/v2/models/{entry.name}/infer", {}), (f"/predictions/{entry.name}", {})):
        reply = server.inference("POST", path, data=body(entry).encode(), headers=headers)
        assert reply.status_code == 400 and message in reply.json()["error"], (path, headers, reply.text)
    assert server.worker_pids(entry.name) == pids


# --- form-encoded bodies ----------------------------------------------------------------------------------------------

@by_name(registry.served_models())
def test_a_malformed_form_body_gets_500_from_the_frontend_and_keeps_the_worker(server, entry):
    """TorchServe's frontend decodes application/x-www-form-urlencoded bodies (what curl -d sends) into fields before
    any handler runs: a bad %-escape is its 500 ErrorDataDecoderException, quoting the body; a truncated UTF-8 escape
    decodes to no field at all, which the handler answers 400 EmptyBody. The worker is not touched."""
    pids = server.worker_pids(entry.name)
    for path in (f"/predictions/{entry.name}", f"/v2/models/{entry.name}/infer"):
        reply = server.inference("POST", path, data=b"a=%zz", headers=FORM)
        assert reply.status_code == 500 and reply.json() == {
            "code": 500, "type": "ErrorDataDecoderException",
            "message": "Invalid hex byte at index '0' in string: '%zz'"}
        reply = server.inference("POST", path, data=b"%E4%B8", headers=FORM)
        assert reply.status_code == 400 and reply.json()["type"] == "EmptyBody", reply.text
    assert server.worker_pids(entry.name) == pids


CURL_DATA = ("-d", "--data", "--data-ascii", "--data-raw", "--data-urlencode")


def posts_form(command):
    """Whether a curl command sends a form-encoded body: -d/--data (or kin) without --data-binary and without a
    Content-Type header other than application/x-www-form-urlencoded."""
    words = shlex.split(command, comments=True)
    data = any(word in CURL_DATA or word.startswith(("-d", *(f"{flag}=" for flag in CURL_DATA[1:])))
               for word in words[1:])
    typed = any(flag in ("-H", "--header") and value.lower().startswith("content-type:")
                and "x-www-form-urlencoded" not in value.lower() for flag, value in itertools.pairwise(words))
    return data and "--data-binary" not in words and not typed


def curl_commands(markdown):
    """The curl commands of a page's fenced code blocks: a "$ " prompt dropped, lines joined while they end with a
    backslash or a quote is open."""
    commands, fenced, current = [], False, None
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced, current = not fenced, None
            continue
        text = line.strip().removeprefix("$ ")
        if current is not None:
            current += " " + text.removesuffix("\\")
        elif fenced and text.startswith("curl "):
            current = text.removesuffix("\\")
        if current is not None and not text.endswith("\\") and complete(current):
            commands.append(current)
            current = None
    return commands


def complete(command):
    try:
        shlex.split(command, comments=True)
    except ValueError:  # a quote still open
        return False
    return True


def test_no_curl_line_of_the_readme_docs_or_make_serve_posts_a_form_body():
    assert posts_form("curl -d a=1 URL") and posts_form("curl --data @x -H 'Content-Type: application/x-www-form-"
                                                        "urlencoded' URL") and posts_form("curl --data-raw=@x URL")
    assert not posts_form("curl -H 'Content-Type: application/json' -d '{}' URL")
    assert not posts_form("curl --data-binary @x URL") and not posts_form("curl -T x.png URL")
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "k8s").rglob("*.md"))]
    commands = [(str(page.relative_to(ROOT)), command) for page in pages
                for command in curl_commands(page.read_text(encoding="utf-8"))]
    commands += [("make serve", command) for command in registry.curl_examples("http://127.0.0.1:8080")]
    assert sum("--data-binary" in command for _, command in commands) >= 3, "the pages' curl lines were not found"
    assert [(where, command) for where, command in commands if posts_form(command)] == []
