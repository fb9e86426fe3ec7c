"""The Open Inference Protocol (handlers/oip.py) in the shared handler layer: requests built and replies read by the
official tritonclient package, in-process and against a real TorchServe."""

import base64
import json
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

import registry
from handlers import oip
from tests.samples import heldout_digits, heldout_patients, heldout_reviews, render_digit
from tests.worker import Request

Client = triton.InferenceServerClient
FEATURES = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]
ROW = [50, 1, 26, 95, 188, 114, 50, 4, 4.6, 91]
HTTP = {"explain": "False"}
"""A header that TorchServe adds to every REST inference request: requests without any HTTP header are those of its
gRPC ModelInfer bridge (``oip.bridged``)."""


def tensor(name, datatype, array):
    item = triton.InferInput(name, list(array.shape), datatype)
    item.set_data_from_numpy(array)
    return item


def binary_request(inputs, json_outputs=()):
    """A request as tritonclient sends it by default (binary tensors); ``json_outputs`` asked for in JSON."""
    outputs = [triton.InferRequestedOutput(name, binary_data=False) for name in json_outputs] or None
    body, length = Client.generate_request_body(inputs, outputs=outputs)
    return Request(body, "", headers={oip.HEADER: str(length)} if length else {})


def raw_request(header, binary):
    """A binary-extension request written by hand (for the malformed ones tritonclient never sends)."""
    text = json.dumps(header).encode()
    return Request(text + binary, "", headers={oip.HEADER: str(len(text))})


def json_request(inputs, **fields):
    return rest_request(json.dumps({"inputs": inputs, **fields}), "application/json")


def rest_request(body, content_type=""):
    """A request with ``body`` as TorchServe's REST API hands it to the handler (``content_type`` "": none sent)."""
    return Request(body, content_type, headers={**HTTP, **({"Content-Type": content_type} if content_type else {})})


def bridged_request(model, inputs, request_id=""):
    """A request as TorchServe's gRPC ModelInfer hands it to the handler: its own JSON, BYTES elements in base64, no
    HTTP header."""
    return Request(json.dumps({"id": request_id, "model_name": model, "inputs": inputs}), "application/json")


def features(data, shape):
    return {"name": "features", "shape": shape, "datatype": "FP32", "data": data}


def digit_images(count):
    return [render_digit(image, 56) for image in heldout_digits(count=count)[0]]


def patient_rows(count):
    return np.array([[row[name] for name in FEATURES] for row in heldout_patients(count=count)[0]], dtype=np.float32)


# --- in-process: TorchServe's own worker code path -----------------------------------------------------------------

def test_mnist_protocol_requests_share_a_batch_with_plain_ones(worker):
    images = digit_images(5)
    binary = binary_request([tensor("data", "BYTES", np.array(images[:3], dtype=object))],
                            json_outputs=("label", "probabilities"))
    as_json = json_request([{"name": "data", "shape": [2], "datatype": "BYTES",
                             "data": [base64.b64encode(image).decode() for image in images[3:]]}])
    replies = worker("mnist").run(binary, Request(images[0], "image/png"), as_json)
    assert [reply.status for reply in replies] == [200, 200, 200]
    first, plain, second = (reply.body for reply in replies)
    assert (first["model_name"], first["model_version"]) == ("mnist", "1.0")
    outputs = {o["name"]: o for o in first["outputs"]}
    assert outputs["label"]["shape"] == [3] and outputs["label"]["datatype"] == "BYTES"
    assert outputs["probabilities"]["shape"] == [3, 10] and outputs["probabilities"]["datatype"] == "FP32"
    probabilities = np.array(outputs["probabilities"]["data"]).reshape(3, 10)
    assert np.allclose(probabilities.sum(1), 1, atol=1e-5)
    assert outputs["label"]["data"] == [str(i) for i in probabilities.argmax(1)]  # labels in label order
    assert outputs["label"]["data"][0] == plain["label"]
    labels = [o for o in second["outputs"] if o["name"] == "label"][0]
    served = [worker("mnist").run_one(Request(image, "image/png")).body["label"] for image in images[3:]]
    assert labels["data"] == served


def test_sentiment_and_regression_answer_the_contract(worker):
    texts, expected = heldout_reviews(count=4)
    reply = worker("sentiment").run_one(json_request([{"name": "text", "shape": [4], "datatype": "BYTES",
                                                      "data": texts}]))
    assert reply.status == 200
    outputs = {o["name"]: o for o in reply.body["outputs"]}
    assert [(o["name"], o["datatype"], o["shape"]) for o in reply.body["outputs"]] == [
        ("label", "BYTES", [4]), ("score", "FP32", [4])]
    plain = worker("sentiment").run_one(Request(json.dumps(texts), "application/json")).body
    assert outputs["label"]["data"] == [item["label"] for item in plain]
    rows = patient_rows(3)
    reply = worker("regression").run_one(binary_request([tensor("features", "FP32", rows)], ("prediction",)))
    assert reply.status == 200 and reply.body["outputs"][0]["datatype"] == "FP32"
    plain = worker("regression").run_one(Request(json.dumps(heldout_patients(count=3)[0]), "application/json")).body
    assert np.allclose(reply.body["outputs"][0]["data"], [item["prediction"] for item in plain], atol=1e-3)


BAD_REQUESTS = [
    ("mnist", json_request([{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["AA=="]}]),
     'this model takes one input named "data"'),
    ("mnist", json_request([{"name": "data", "shape": [1], "datatype": "FP32", "data": [1.0]}]),
     'input "data" must be BYTES, got FP32'),
    ("mnist", json_request([{"name": "data", "shape": [2], "datatype": "BYTES", "data": ["AA=="]}]),
     "1 data elements, but shape [2] holds 2"),
    ("mnist", json_request([{"name": "data", "shape": [1], "datatype": "BYTES", "data": ["not base64!"]}]),
     "not valid base64"),
    ("mnist", json_request([{"name": "data", "shape": [1], "datatype": "BYTES",
                             "data": [base64.b64encode(b"GIF89a").decode()]}]), "not an image"),
    ("mnist", Request(b'{"inputs": []}', "", headers={oip.HEADER: "9999"}), "header Inference-Header-Content-Length"),
    ("mnist", raw_request({"inputs": [{"name": "data", "shape": [1], "datatype": "BYTES",
                                       "parameters": {"binary_data_size": 6}}]}, b"\x09\x00\x00\x00ab"),
     "claims 9 bytes"),
    ("mnist", raw_request({"inputs": [{"name": "data", "shape": [1], "datatype": "BYTES",
                                       "parameters": {"binary_data_size": 5}}]}, b"\x01\x00\x00\x00a" + b"zz"),
     "2 bytes of binary data that no input claims"),
    ("sentiment", json_request([{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["   "]}]),
     "text 0 is empty"),
    ("regression", json_request([{"name": "features", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]),
     "must have shape [N, 10]"),
    ("regression", json_request([{"name": "features", "shape": [1, 10], "datatype": "FP32", "data": ["1"] * 10}]),
     "FP32 data must be JSON numbers"),
    ("regression", json_request([features([0] * 10, [1, 10])], outputs=[{"name": "y"}]), 'unknown output "y"'),
]


@pytest.mark.parametrize("stem, request_, message", BAD_REQUESTS)
def test_bad_protocol_requests_get_400_with_the_protocol_error_body(worker, stem, request_, message):
    good = {"mnist": Request(digit_images(1)[0], "image/png"), "sentiment": Request("很好".encode(), "text/plain"),
            "regression": Request(json.dumps(heldout_patients(count=1)[0][0]), "application/json")}[stem]
    bad, fine = worker(stem).run(request_, good)
    assert bad.status == 400 and set(bad.body) == {"error"} and message in bad.body["error"], bad.body
    assert fine.status == 200  # the rest of the batch is answered


def good_regression_request():
    return rest_request(json.dumps(heldout_patients(count=1)[0][0]), "application/json")


INPUT = json.dumps(features(ROW, [1, 10]))
DUPLICATE_KEYS = [  # (key, body): a protocol request with one key twice, which json.loads would read as the last
    ("inputs", f'{{"inputs": [{INPUT}], "inputs": []}}'),
    ("data", f'{{"inputs": [{INPUT[:-1]}, "data": {json.dumps([0] * 10)}}}]}}'),
    ("shape", f'{{"inputs": [{INPUT[:-1]}, "shape": [10, 1]}}]}}'),
    ("binary_data_output", (f'{{"inputs": [{INPUT}], "parameters": {{"binary_data_output": true, '
                            '"binary_data_output": false}}')),
]


@pytest.mark.parametrize("content_type", ["application/json", ""], ids=["json", "no-content-type"])
@pytest.mark.parametrize("key, body", DUPLICATE_KEYS, ids=[key for key, _ in DUPLICATE_KEYS])
def test_duplicate_json_keys_get_400_duplicate_key(worker, key, body, content_type):
    assert json.loads(body)  # valid JSON, which the last of each key would make a valid request
    with pytest.raises(oip.ProtocolError) as error:
        oip.parse({}, body.encode())
    assert error.value.kind == "DuplicateKey" and f'key "{key}" twice' in str(error.value)
    bad, fine = worker("regression").run(rest_request(body, content_type), good_regression_request())
    assert (bad.status, bad.body) == (400, {"error": str(error.value)})
    assert fine.status == 200


NESTING = [  # (shape, data, message): data neither flat nor nested as its shape says
    ([1, 10], [ROW[:5], ROW[5:]], "data is a list of 2, but shape [1, 10] has 1 there"),
    ([1, 10], [[[value] for value in ROW]], "data[0][0] is nested deeper than shape [1, 10]"),
    ([2, 10], [ROW, ROW[:9] + [[0]]], "data[1][9] is nested deeper than shape [2, 10]"),
    ([2, 10], [ROW, ROW[:9]], "data[1] is a list of 9, but shape [2, 10] has 10 there"),
    ([2, 10], [ROW, 7], "data[1] is a number, but shape [2, 10] has 10 there"),
    ([1, 10], 7, '"data" must be a JSON array, got a number'),
]


@pytest.mark.parametrize("shape, data, message", NESTING)
def test_data_nested_other_than_its_shape_gets_400_shape_mismatch(worker, shape, data, message):
    with pytest.raises(oip.ProtocolError) as error:
        oip.parse({}, {"inputs": [features(data, shape)]})
    assert error.value.kind == "ShapeMismatch" and f'input "features": {message}' in str(error.value)
    bad, fine = worker("regression").run(json_request([features(data, shape)]), good_regression_request())
    assert (bad.status, bad.body) == (400, {"error": str(error.value)})
    assert fine.status == 200


def test_data_flat_or_nested_as_its_shape_is_one_request(worker):
    rows = patient_rows(3)
    flat, nested = worker("regression").run(json_request([features(rows.ravel().tolist(), [3, 10])]),
                                            json_request([features(rows.tolist(), [3, 10])]))
    assert flat.status == nested.status == 200 and flat.body == nested.body


def output_data(reply, name):
    return next(output["data"] for output in reply.body["outputs"] if output["name"] == name)


def test_grpc_bridge_requests_are_answered_in_json_with_their_id(worker):
    """TorchServe's gRPC ModelInfer passes BYTES in base64 and reads every reply as a ModelInferResponse: id, JSON
    data (a reply without them restarts the worker)."""
    texts, _ = heldout_reviews(count=3)
    encoded = [base64.b64encode(text.encode()).decode() for text in texts]
    reply = worker("sentiment").run_one(bridged_request("sentiment", [{"name": "text", "shape": [3],
                                                                       "datatype": "BYTES", "data": encoded}]))
    plain = worker("sentiment").run_one(rest_request(json.dumps(texts), "application/json")).body
    assert reply.status == 200 and reply.body["id"] == "" and reply.body["model_version"] == "1.0"
    assert all("data" in output for output in reply.body["outputs"])
    assert output_data(reply, "label") == [item["label"] for item in plain]
    image = digit_images(1)[0]
    reply = worker("mnist").run_one(bridged_request("mnist", [{"name": "data", "shape": [1], "datatype": "BYTES",
                                                               "data": [base64.b64encode(image).decode()]}], "r7"))
    assert (reply.status, reply.body["id"]) == (200, "r7")
    plain = worker("mnist").run_one(Request(image, "image/png", headers=HTTP)).body
    assert output_data(reply, "label") == [plain["label"]]


def test_grpc_bridge_replies_are_json_even_when_binary_is_asked():
    headers = {"body": {"content-type": "application/json"}}
    request = oip.parse(headers, {"inputs": [features(ROW, [1, 10])], "parameters": {"binary_data_output": True}})
    reply = oip.encode(request, "m", "1.0", {"y": np.array([0.5], dtype=np.float32)})
    assert reply.header_length is None and json.loads(reply.body) == {
        "model_name": "m", "model_version": "1.0", "id": "", "outputs": [
            {"name": "y", "shape": [1], "datatype": "FP32", "data": [0.5]}]}


def test_errors_to_the_grpc_bridge_are_model_infer_responses():
    assert oip.error_body("bad", {"body": {"content-type": "application/json"}, **HTTP}, "m", "1.0") == {"error": "bad"}
    assert oip.error_body("bad") == {"error": "bad"}
    assert oip.error_body("bad", {"body": {"content-type": "application/json"}}, "m", "1.0") == {
        "id": "", "model_name": "m", "model_version": "1.0",
        "outputs": [{"name": "error", "shape": [1], "datatype": "BYTES", "data": ["bad"]}]}


BRIDGED_ERRORS = [  # (archive, inputs, message)
    ("regression", [features([], [1, 10])], "TorchServe's gRPC ModelInfer reads only the inputs' typed contents"),
    ("regression", [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["AA=="]}],
     'this model takes one input named "features"'),
    ("detector", [{"name": "data", "shape": [1], "datatype": "BYTES", "data": ["AA=="]}],
     'image 0 of input "data": the body is not an image'),
    ("fashion", [{"name": "data", "shape": [1], "datatype": "BYTES", "data": ["AA=="]}],
     "the body is not an image"),
]


@pytest.mark.parametrize("stem, inputs, message", BRIDGED_ERRORS)
def test_grpc_bridge_errors_are_the_error_output(worker, stem, inputs, message):
    reply = worker(stem).run_one(bridged_request(stem, inputs))
    assert reply.status in (400, 404) and set(reply.body) == {"id", "model_name", "model_version", "outputs"}
    (output,) = reply.body["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("error", "BYTES", [1])
    assert message in output["data"][0]


def test_a_handler_without_protocol_hooks_answers_404_protocol_not_supported(worker, monkeypatch):
    """The base class's path for a model without ``oip_input`` (a scaffolded one may lack the hooks; every served
    model has them): 404 with the protocol's body over REST, the ``error`` output to the gRPC bridge; the batch's
    plain requests are answered."""
    monkeypatch.setattr(worker("regression").handler, "oip_input", None)
    request = json_request([features(ROW, [1, 10])])
    bad, fine = worker("regression").run(request, good_regression_request())
    message = "model regression does not speak the Open Inference Protocol"
    assert (bad.status, bad.body) == (404, {"error": message}) and fine.status == 200
    reply = worker("regression").run_one(bridged_request("regression", [features(ROW, [1, 10])]))
    assert reply.status == 404 and reply.body["outputs"][0]["data"] == [message]


# --- the detector: images in, one JSON document per image and padded tensors out ------------------------------------

DETECTOR_OUTPUTS = ("detections", "count", "boxes", "scores", "labels")


def detector_samples():
    """The encoded images of the detector's registry samples."""
    return [(registry.ROOT / sample.file).read_bytes() for sample in registry.model("detector").samples]


def plain_detector_requests():
    """The detector's registry samples as plain REST requests."""
    return [Request((registry.ROOT / sample.file).read_bytes(), sample.content_type, headers=HTTP)
            for sample in registry.model("detector").samples]


def image_input(images):
    return {"name": "data", "shape": [len(images)], "datatype": "BYTES",
            "data": [base64.b64encode(image).decode() for image in images]}


def outputs_of(reply):
    return {output["name"]: output for output in reply.body["outputs"]}


def assert_detector_outputs(outputs, plain):
    """The protocol outputs of a detector request answer as its images' ``plain`` replies: each ``detections``
    element is the plain reply's JSON, and the tensors hold its detections padded to ``max_detections``."""
    count, k = len(plain), plain[0]["max_detections"]
    assert [(name, outputs[name]["datatype"], outputs[name]["shape"]) for name in DETECTOR_OUTPUTS] == [
        ("detections", "BYTES", [count]), ("count", "INT64", [count]), ("boxes", "FP32", [count, k, 4]),
        ("scores", "FP32", [count, k]), ("labels", "BYTES", [count, k])]
    assert [json.loads(document) for document in outputs["detections"]["data"]] == plain
    assert outputs["count"]["data"] == [len(reply["detections"]) for reply in plain]
    boxes = np.array(outputs["boxes"]["data"], np.float32).reshape(count, k, 4)
    scores = np.array(outputs["scores"]["data"], np.float32).reshape(count, k)
    labels = np.array(outputs["labels"]["data"], dtype=object).reshape(count, k)
    for row, reply in enumerate(plain):
        found = len(reply["detections"])
        assert labels[row, :found].tolist() == [d["label"] for d in reply["detections"]]
        np.testing.assert_allclose(scores[row, :found], [d["score"] for d in reply["detections"]], rtol=1e-6)
        np.testing.assert_allclose(boxes[row, :found], [d["box"] for d in reply["detections"]], rtol=1e-6)
        assert set(labels[row, found:]) <= {""} and not scores[row, found:].any() and not boxes[row, found:].any()


def test_detector_protocol_replies_are_the_plain_replies_of_its_images(worker):
    """Binary and JSON protocol requests of the registry samples share a batch with plain ones, and each image is
    answered as a plain request for it is, with the labels of the objects its sample lists (samples/)."""
    images = detector_samples()
    binary = binary_request([tensor("data", "BYTES", np.array(images, dtype=object))], json_outputs=DETECTOR_OUTPUTS)
    replies = worker("detector").run(binary, *plain_detector_requests(), json_request([image_input(images[::-1])]))
    assert [reply.status for reply in replies] == [200] * 4, [reply.body for reply in replies]
    via_binary, *plain, via_json = replies
    plain = [reply.body for reply in plain]
    assert (via_binary.body["model_name"], via_binary.body["model_version"]) == ("detector", "1.0")
    assert_detector_outputs(outputs_of(via_binary), plain)
    assert_detector_outputs(outputs_of(via_json), plain[::-1])
    listed = json.loads((registry.ROOT / "samples" / "detector_composed.json").read_text())
    for sample, reply in zip(registry.model("detector").samples, plain):  # all but one of its objects, as labels
        objects = Counter(o["label"] for o in listed[Path(sample.file).name])
        found = Counter(d["label"] for d in reply["detections"])
        assert (objects & found).total() >= objects.total() - 1, (sample.file, found, objects)


def test_detector_tensors_alone_leave_the_masks_out_of_the_reply(worker):
    images = detector_samples()
    wanted = [{"name": name} for name in ("count", "boxes", "scores", "labels")]
    reply = worker("detector").run_one(json_request([image_input(images)], outputs=wanted))
    assert reply.status == 200 and [output["name"] for output in reply.body["outputs"]] == [
        output["name"] for output in wanted]
    assert "mask" not in json.dumps(reply.body) and min(outputs_of(reply)["count"]["data"]) > 0


def test_detector_grpc_bridge_requests_are_answered_in_json_with_their_id(worker):
    images = detector_samples()
    reply = worker("detector").run_one(bridged_request("detector", [image_input(images)], "d1"))
    plain = [reply.body for reply in worker("detector").run(*plain_detector_requests())]
    assert (reply.status, reply.body["id"]) == (200, "d1")
    assert all("data" in output for output in reply.body["outputs"])
    assert_detector_outputs(outputs_of(reply), plain)


def test_detector_bad_images_get_400_with_the_protocol_error_body_and_neighbours_answered(worker):
    images = detector_samples()
    garbage = json_request([image_input([images[0], b"not an image", images[1]])])
    bad, plain, good = worker("detector").run(garbage, plain_detector_requests()[0],
                                              json_request([image_input(images[:1])]))
    assert bad.status == 400 and bad.body == {"error": 'image 1 of input "data": the body is not an image in a format '
                                                       "Pillow reads (PNG, JPEG, GIF, BMP, TIFF, WebP, ...)"}
    assert plain.status == good.status == 200
    assert json.loads(outputs_of(good)["detections"]["data"][0]) == plain.body
    bridged = worker("detector").run_one(bridged_request("detector", [image_input([b"GIF89a"])]))
    assert bridged.status == 400 and 'image 0 of input "data"' in bridged.body["outputs"][0]["data"][0]


@pytest.mark.parametrize("inputs, status, message", [
    ([image_input([b"x"] * 17)], 413, "17 images in one request; at most 16"),
    ([{"name": "data", "shape": [1], "datatype": "FP32", "data": [1.0]}], 400, 'input "data" must be BYTES, got FP32'),
    ([{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["AA=="]}], 400,
     'this model takes one input named "data"'),
    ([{"name": "data", "shape": [1], "datatype": "BYTES", "data": ["not base64!"]}], 400, "not valid base64"),
], ids=["too-many-images", "not-bytes", "wrong-name", "bad-base64"])
def test_detector_malformed_requests_get_the_protocol_error_body(worker, inputs, status, message):
    bad, fine = worker("detector").run(json_request(inputs), plain_detector_requests()[0])
    assert bad.status == status and set(bad.body) == {"error"} and message in bad.body["error"], bad.body
    assert fine.status == 200


def test_detector_images_of_a_request_share_its_mask_budget(worker, monkeypatch):
    """``max_mask_pixels`` bounds masks x image pixels per request: the protocol's images share it, the default
    ``max_detections`` lowered to what fits them all; images that do not fit at one mask each are a 413."""
    handler, images = worker("detector").handler, detector_samples()
    pixels = sum(reply.body["image_size"]["width"] * reply.body["image_size"]["height"]
                 for reply in worker("detector").run(*plain_detector_requests()))
    monkeypatch.setattr(handler, "max_mask_pixels", 3 * pixels)
    reply = worker("detector").run_one(json_request([image_input(images)]))
    assert reply.status == 200
    assert outputs_of(reply)["scores"]["shape"] == [2, 3] and max(outputs_of(reply)["count"]["data"]) <= 3
    assert {json.loads(document)["max_detections"] for document in outputs_of(reply)["detections"]["data"]} == {3}
    monkeypatch.setattr(handler, "max_mask_pixels", pixels - 1)
    reply = worker("detector").run_one(json_request([image_input(images)]))
    assert reply.status == 413 and "mask pixels per request at one mask each" in reply.body["error"]


def test_binary_replies_decode_with_tritonclient():
    request = oip.parse({}, {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [0.5]}],
                             "parameters": {"binary_data_output": True}, "id": "r1"})
    reply = oip.encode(request, "m", "1.0", {"label": np.array(["七", "b"], dtype=object),
                                             "score": np.array([[0.25, 1.5]], dtype=np.float32)})
    result = Client.parse_response_body(reply.body, header_length=reply.header_length)
    assert result.as_numpy("label").tolist() == ["七".encode(), b"b"]
    assert result.as_numpy("score").tolist() == [[0.25, 1.5]]
    assert result.get_response()["id"] == "r1"


def test_plain_requests_are_not_mistaken_for_protocol_ones():
    assert not oip.is_request({}, b"\x89PNG...")
    assert not oip.is_request({}, '{"inputs": [1]}')  # text (a review) is never a protocol request
    assert not oip.is_request({}, {"age": 50})
    assert oip.is_request({"inference-header-content-length": "12"}, b"anything")
    assert oip.is_request({}, b' {"inputs": []}')
    assert oip.is_request({}, b'{"inputs": [], "inputs": 1}')  # refused by parse(), as a protocol request
    assert not oip.is_request({}, b'{"text": "inputs", "text": "x"}')


# --- the real client against a real TorchServe ---------------------------------------------------------------------

@pytest.mark.slow
def test_tritonclient_with_default_settings_against_torchserve(server):
    client = Client(urlparse(server.url("inference")).netloc, concurrency=4)
    headers = {"Authorization": f"Bearer {server.token('inference')}"}
    images = digit_images(8)
    pending = [client.async_infer("mnist", [tensor("data", "BYTES", np.array(images[i : i + 2], dtype=object))],
                                  headers=headers) for i in range(0, 8, 2)]  # concurrent: the frontend batches them
    results = [request.get_result(timeout=60) for request in pending]
    labels = [label.decode() for result in results for label in result.as_numpy("label")]
    assert labels == [server.predict("mnist", image).json()["label"] for image in images]
    assert all(result.as_numpy("probabilities").shape == (2, 10) for result in results)

    texts, _ = heldout_reviews(count=3)
    result = client.infer("sentiment", [tensor("text", "BYTES", np.array([t.encode() for t in texts], dtype=object))],
                          headers=headers)
    assert [label.decode() for label in result.as_numpy("label")] == [
        server.predict("sentiment", t.encode(), headers={"Content-Type": "text/plain"}).json()["label"] for t in texts]
    assert result.as_numpy("score").dtype == np.float32

    result = client.infer("regression", [tensor("features", "FP32", patient_rows(4))], headers=headers)
    assert result.as_numpy("prediction").shape == (4,)

    with pytest.raises(InferenceServerException) as error:
        client.infer("regression", [tensor("features", "FP32", np.zeros((1, 9), np.float32))], headers=headers)
    assert error.value.status() == "400" and "must have shape [N, 10]" in error.value.message()


@pytest.mark.slow
def test_hostile_protocol_bodies_over_http_get_400_and_leave_the_worker(server):
    pids = {model: server.worker_pids(model, "1.0") for model in ("mnist", "regression")}
    header = json.dumps({"inputs": [{"name": "data", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": 8}}]}).encode()
    hostile = [("mnist", header + b"\xff\xff\xff\x7f1234", {oip.HEADER: str(len(header))}),  # element past the end
               ("mnist", header, {oip.HEADER: "-5"}),
               ("mnist", header, {oip.HEADER: str(len(header) + 10**6)}),
               ("regression", b'{"inputs": [{"name": "features", "shape": [1, 10], "datatype": "FP32", '
                              b'"data": [1e39, 0, 0, 0, 0, 0, 0, 0, 0, 0]}]}', {"Content-Type": "application/json"}),
               ("regression", b'{"inputs": [{"name": "features", "shape": [99999999999], "datatype": "FP32", '
                              b'"data": []}]}', {})]
    for model, body, headers in hostile:
        reply = server.inference("POST", f"/v2/models/{model}/infer", data=body, headers=headers)
        assert reply.status_code == 400 and set(reply.json()) == {"error"}, (model, reply.text)
    good = server.inference("POST", "/v2/models/regression/infer", headers={"Content-Type": "application/json"},
                            data=json.dumps({"inputs": [{"name": "features", "shape": [1, 10], "datatype": "FP32",
                                                         "data": [50, 1, 26, 95, 188, 114, 50, 4, 4.6, 91]}]}))
    assert good.status_code == 200 and good.json()["outputs"][0]["name"] == "prediction"
    assert {model: server.worker_pids(model, "1.0") for model in pids} == pids
