"""Shared layer of the bundle's handlers: artifacts, typed 4xx errors, device and threads, batching, explanations.

Each model's handler subclasses ``BundleHandler`` and supplies four small methods:

- ``parse(payload, as_json)``: one request's payload (a decoded JSON value if ``as_json``, else bytes or text) ->
  model-ready examples (raise ``RequestError`` for bad input);
- ``collate(examples)``: examples of every good request in the batch -> one input tensor;
- ``format(example, output)``: one example and its row of model output -> a JSON-able dict;
- ``explanations(examples)``: captum attributions for each example -> JSON-able dicts.

``handle`` runs a TorchServe batch: each request is parsed on its own, so a bad request fails alone with its 4xx
while the others are answered from one forward pass, in request order.
"""

import json
import logging
import math
import os
import time

import torch
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
METRICS_FILE = "metrics.json"


class RequestError(Exception):
    """A client error: answered with its HTTP ``code`` and a JSON body; the worker keeps serving."""

    def __init__(self, message, code=400, kind="InvalidInput"):
        # Messages may quote client input: lone surrogates (valid in JSON) must not reach TorchServe's UTF-8 encoder.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.message = message
        self.code = code
        self.kind = kind

    def to_json(self):
        return {"code": self.code, "type": self.kind, "message": self.message}


def load_artifact(model_dir):
    """The artifact manifest written by ``train/`` next to the weights, checked for the files it names."""
    path = os.path.join(model_dir, MANIFEST_FILE)
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    missing = [name for name in manifest.get("files", []) if not os.path.isfile(os.path.join(model_dir, name))]
    if missing:
        raise FileNotFoundError(f"{path} names files that are not in the archive: {missing}")
    return manifest


def select_device(properties):
    """The GPU TorchServe assigned to this worker (``gpu_id``) when CUDA is available, else the CPU."""
    gpu_id = properties.get("gpu_id")
    if gpu_id is not None and torch.cuda.is_available():
        device = torch.device(f"cuda:{gpu_id}")
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def configure_threads(model_config):
    """Set torch's intra-op threads so that this model's workers x threads fit the machine's cores.

    ``handler.torch_threads`` in model-config.yaml wins; otherwise cores are divided among ``minWorkers``.
    """
    configured = (model_config.get("handler") or {}).get("torch_threads")
    workers = max(1, int(model_config.get("minWorkers", 1)))
    threads = int(configured) if configured else max(1, (os.cpu_count() or 1) // workers)
    torch.set_num_threads(threads)
    return threads


def request_payload(row):
    """(name, payload) of one request: the raw body, a multipart field, or the JSON TorchServe already decoded."""
    name = next((key for key in ("data", "body") if key in row), next(iter(row), None))
    payload = row.get(name)
    if payload is None or (isinstance(payload, (bytes, bytearray, str)) and len(payload) == 0):
        raise RequestError("the request body is empty (send the payload as the raw body, e.g. curl --data-binary @FILE "
                           "or curl -T FILE; TorchServe parses form-encoded bodies, as curl -d sends, into fields)",
                           kind="EmptyBody")
    return name, payload


def is_json(context, idx, name):
    """Whether request ``idx``'s parameter ``name`` was sent as JSON (any application/json or +json type)."""
    header = context.get_request_header(idx, name)
    content_type = header.get("content-type", "") if isinstance(header, dict) else ""
    media_type = content_type.split(";")[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


def decode_json(payload):
    """JSON from bytes or text that TorchServe left undecoded."""
    text = decode_text(payload)
    try:
        return json.loads(text)
    except ValueError as err:
        raise RequestError(f"the body is not valid JSON: {err}", kind="InvalidJSON") from None
    except RecursionError:
        raise RequestError("the JSON body is nested too deeply", kind="InvalidJSON") from None


def decode_text(payload):
    """UTF-8 text from bytes (or a str as is); other encodings are a client error."""
    if isinstance(payload, str):
        return payload
    if isinstance(payload, (bytes, bytearray)):
        try:
            return bytes(payload).decode("utf-8")
        except UnicodeDecodeError as err:
            raise RequestError(f"the body is not valid UTF-8 text ({err.reason} at byte {err.start})",
                               kind="InvalidEncoding") from None
    raise RequestError(f"expected text, got JSON {type(payload).__name__}", kind="InvalidInput")


def bounded_list(items, limit, what):
    """A JSON list of 1..``limit`` ``what`` (e.g. "texts"); an empty one is a 400, a longer one a 413."""
    if not items:
        raise RequestError(f"the JSON list of {what} is empty", kind="InvalidInput")
    if len(items) > limit:
        raise RequestError(f"{len(items)} {what} in one request; at most {limit} (split them into several requests)",
                           code=413, kind=f"TooMany{what.title()}")
    return items


def finite_number(value, field):
    """A JSON number as float; strings, booleans, NaN and infinities are rejected naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"field '{field}' must be a number, got {type(value).__name__}", kind="InvalidField")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise RequestError(f"field '{field}' must be a finite number, got {value}", kind="InvalidField")
    return number


class BundleHandler(BaseHandler):
    """BaseHandler with artifact loading, per-request errors in a batch, custom metrics and explanations."""

    model_class = None  # the nn.Module class named in the artifact manifest

    def initialize(self, context):
        properties = context.system_properties
        self.model_dir = properties["model_dir"]
        self.model_config = context.model_yaml_config or {}
        self.artifact = load_artifact(self.model_dir)
        self.device = select_device(properties)
        self.threads = configure_threads(self.model_config)
        self.model_name = context.manifest["model"]["modelName"]
        self.version = context.manifest["model"].get("modelVersion", "")
        self.model = self.load_model()
        self.labels = self.artifact.get("labels")
        self._init_metrics(context.metrics)
        logger.info("%s %s ready on %s with %d torch threads", self.model_name, self.version, self.device, self.threads)
        self.initialized = True

    def load_model(self):
        """Build ``model_class`` from the manifest's arch_kwargs and load the plain state_dict onto the device."""
        expected = self.artifact["architecture"]
        if self.model_class is None or self.model_class.__name__ != expected:
            raise RuntimeError(f"manifest architecture {expected!r} does not match handler's {self.model_class!r}")
        model = self.model_class(**self.artifact.get("arch_kwargs", {}))
        weights = os.path.join(self.model_dir, self.artifact["weights"])
        try:
            model.load_state_dict(torch.load(weights, map_location=self.device, weights_only=True))
        except Exception as err:
            raise RuntimeError(f"{self.model_name} {self.version}: cannot load weights {self.artifact['weights']}: "
                               f"{type(err).__name__}: {err}") from err
        return model.to(self.device).eval()

    def _init_metrics(self, metrics):
        dims = ["ModelName", "ModelVersion"]
        self.metric_predictions = metrics.add_metric_to_cache("PredictionsByLabel", "Count", dims + ["Label"])
        self.metric_rejected = metrics.add_metric_to_cache("RejectedRequests", "Count", dims + ["ErrorType"])
        self.metric_preprocess = metrics.add_metric_to_cache(
            "PreprocessTime", "ms", dims, metric_type=MetricTypes.GAUGE)

    # --- the four methods a model's handler supplies -------------------------------------------------------------

    def parse(self, payload, as_json):
        """One request's payload -> (examples, many): many=True when the request held a list of inputs."""
        raise NotImplementedError

    def collate(self, examples):
        raise NotImplementedError

    def output_rows(self, outputs):
        """The model's batch output -> one item per example, handed to ``format`` (default: the tensor's rows)."""
        return outputs

    def format(self, example, output):
        raise NotImplementedError

    def explanations(self, examples):
        raise NotImplementedError

    def label_of(self, reply):
        """The label a reply is counted under in PredictionsByLabel (None: not counted)."""
        return reply.get("label")

    # --- batch handling --------------------------------------------------------------------------------------------

    def handle(self, data, context):
        self.context = context
        if context.get_request_header(0, "describe") == "True":
            return [self.describe_handle()]
        started = time.perf_counter()
        replies = [None] * len(data)
        to_predict, to_explain = [], []
        for idx, row in enumerate(data):
            context.set_response_content_type(idx, "application/json")
            try:
                name, payload = request_payload(row)
                as_json = is_json(context, idx, name)
                if as_json and isinstance(payload, (bytes, bytearray)):
                    payload = decode_json(payload)  # TorchServe decodes plain "application/json" only
                examples, many = self.parse(payload, as_json)
            except RequestError as err:
                replies[idx] = self.reject(idx, err)
                continue
            wants_explanation = context.get_request_header(idx, "explain") == "True"
            (to_explain if wants_explanation else to_predict).append((idx, examples, many))
        self.metric_preprocess.add_or_update((time.perf_counter() - started) * 1000, self._dims())

        if to_predict:
            examples = [example for _, request_examples, _ in to_predict for example in request_examples]
            outputs = self.output_rows(self.predict(self.collate(examples)))
            position = 0
            labels = {}
            for idx, request_examples, many in to_predict:
                answers = [self.format(example, outputs[position + i]) for i, example in enumerate(request_examples)]
                position += len(request_examples)
                for answer in answers:
                    label = self.label_of(answer)
                    if label is not None:
                        labels[label] = labels.get(label, 0) + 1
                replies[idx] = answers if many else answers[0]
            self._count_labels(labels)
        for idx, request_examples, many in to_explain:
            answers = self.explanations(request_examples)
            replies[idx] = answers if many else answers[0]
        context.metrics.add_time("HandlerTime", round((time.perf_counter() - started) * 1000, 2), None, "ms")
        return replies

    def predict(self, batch):
        with torch.inference_mode():
            return self.model(batch.to(self.device)).cpu()

    def reject(self, idx, err):
        """Mark request ``idx`` of the batch as failed with ``err``'s status; its JSON body names the problem."""
        self.context.set_response_status(err.code, err.message, idx)
        self.metric_rejected.add_or_update(1, self._dims(err.kind))
        logger.info("%s rejected request %d: %s %s", self.model_name, idx, err.code, err.message)
        return err.to_json()

    def describe_handle(self):
        """The customized part of `GET /models/<name>/<version>?customized=true`: what was trained, how well."""
        with open(os.path.join(self.model_dir, METRICS_FILE), encoding="utf-8") as f:
            training = json.load(f)
        return {"architecture": self.artifact["architecture"], "labels": self.labels, "device": str(self.device),
                "torch_threads": self.threads, "training": training}

    def _count_labels(self, counts):
        """Add a batch's {label: predictions} to PredictionsByLabel: one metric line per label, not per answer
        (each line is a log record the frontend parses; the counter's totals are the same)."""
        for label, count in counts.items():
            self.metric_predictions.add_or_update(count, self._dims(label))

    def _dims(self, *extra):
        return [self.model_name, self.version, *map(str, extra)]


def integrated_gradients(forward, inputs, target, baselines, layer=None, steps=32):
    """Captum Integrated Gradients of ``forward`` for ``target`` (per example), on the inputs or on ``layer``."""
    from captum.attr import IntegratedGradients, LayerIntegratedGradients

    method = LayerIntegratedGradients(forward, layer) if layer is not None else IntegratedGradients(forward)
    with torch.enable_grad():
        return method.attribute(inputs, baselines=baselines, target=target, n_steps=steps).detach().cpu()


def entry_point(handler_class):
    """The module-level ``handle`` function TorchServe calls for a handler module.

    A handler module here also defines its model class, and TorchServe only accepts a module with exactly one class
    unless it has a ``handle`` function. TorchServe calls it once with ``data=None`` when the worker loads the model
    (so a broken archive fails at load, not at the first request), then once per batch.
    """
    handler = handler_class()

    def handle(data, context):
        if not handler.initialized:
            handler.initialize(context)
        if data is None:
            return None
        replies = handler.handle(data, context)
        if context.get_request_header(0, "describe") == "True":
            return replies  # the management API parses the customized description itself
        return [compact_json(reply) for reply in replies]

    handle.handler = handler
    return handle


def compact_json(reply):
    """A dict or list reply as compact JSON bytes (TorchServe would json.dumps it with indent=2 in pure Python).

    Same JSON as TorchServe sends, without the indentation: several times faster to encode (the C encoder) and a
    fraction of the bytes for explanations, which are long lists of numbers. Bytes and text pass through.
    """
    if isinstance(reply, (dict, list)):
        return json.dumps(reply, separators=(",", ":")).encode("utf-8")
    return reply
