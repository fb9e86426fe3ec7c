"""The handler contract: a TorchServe batch in, one reply per request out, and a bad request fails alone.

A model's handler module holds one class, a ``BundleHandler`` subclass; TorchServe creates it, calls
``initialize(context)`` when the worker loads the archive and ``handle(data, context)`` for every batch.
The subclass supplies three hooks:

- ``parse(payload, as_json) -> (examples, many)``: one request's body (decoded JSON if ``as_json``, else bytes or
  text) -> model-ready examples, ``many`` when the request held a list. Bad input raises ``RequestError``.
- ``collate(examples)``: examples -> whatever the model takes (a tensor, a list of tensors, ...).
- ``format(example, output)``: one example and its output row -> a JSON-able reply, or a ``BinaryReply`` (raw
  bytes with their media type, e.g. an image a client asked for with ``Accept: image/png``).

and may override ``parse_request(idx, row, name, payload, as_json)`` (default: ``parse`` of the body alone; ``row``
also holds the other form fields, ``idx`` reads the request's headers), ``predict(batch)`` (default: the model on
``self.device``, outputs back on the CPU, nested structures too), ``output_rows(outputs)`` (default: one item per
row) and ``explain(examples)`` (default ``None``: ``/explanations`` answers 404 ``ExplanationsNotSupported``).

Why not ``BaseHandler``: its ``preprocess``/``inference``/``postprocess`` see the whole batch, so one bad request
fails them all, and its ``initialize`` loads weights by file-name convention. Subclassing it and bypassing those
would leave overrides that silently do nothing. TorchServe's names are kept where they mean the same thing:
``initialize``, ``handle``, ``describe_handle``, ``context.metrics``.

``handler.runtime`` in model-config.yaml picks what ``predict`` runs (``handlers/runtimes.py``: eager, TorchScript,
ONNX Runtime in float or int8, AOTInductor). A request in the Open Inference Protocol (``handlers/oip.py``) is parsed
by the model's ``oip_examples`` hook, shares the batch's forward passes, and is answered by ``oip_outputs``.

Limits, from ``handler:`` in model-config.yaml (each with a default here): ``max_forward_examples`` examples per
forward pass (default: ``batchSize``), ``max_explain_examples`` items per explanation request, ``max_reply_bytes``
per reply (below config.properties' ``max_response_size``, which would otherwise kill the worker). ``amp``
(bf16, fp16 or off) is the autocast dtype of ``autocast()`` on CUDA.
"""

import codecs
import ctypes
import dataclasses
import functools
import http
import importlib
import json
import logging
import math
import os
import threading
import time

import numpy as np
import torch
from ts.metrics.metric_cache_errors import MetricsCacheKeyError
from ts.metrics.metric_type_enum import MetricTypes

from handlers import oip, runtimes
from handlers.messages import quote
from models import METRICS_FILE, available_cpus, load_model, read_manifest

logger = logging.getLogger(__name__)

DEFAULT_MAX_EXPLAIN_EXAMPLES = 16
DEFAULT_MAX_REPLY_BYTES = 2 * 1024 * 1024
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds in seconds of the HandlerLatencySeconds histogram: from a GPU forward pass (0.5 ms) to a CPU
explanation (10 s). TorchServe 0.12's own ``histogram`` metric type has the Prometheus client's fixed default
buckets (5 ms to 10 s), too coarse for GPU latencies, so the buckets are counters with an ``le`` label, which is
what ``histogram_quantile`` reads."""
COUNTER_WRITE_SECONDS = 1.0
"""How often, at most, the handler's counters are written while traffic lasts (see ``CounterBuffer``)."""


class RequestError(Exception):
    """A client error: its HTTP ``code``, a fixed reason phrase, and a JSON body naming the problem."""

    def __init__(self, message, code=400, kind="InvalidInput"):
        # Messages may quote client input: lone surrogates (valid in JSON) must not reach the UTF-8 encoder.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.message = message
        self.code = code
        self.kind = kind

    @property
    def reason(self):
        """The HTTP reason phrase: fixed per status code, never client text (TorchServe's frontend puts it on the
        status line, where a CR or LF kills the worker)."""
        return http.HTTPStatus(self.code).phrase

    def to_json(self):
        return {"code": self.code, "type": self.kind, "message": self.message}


HEAP_MMAP_THRESHOLD = 16 * 2**20
"""Allocations of this size or more get a mapping of their own, given back to the OS when freed. glibc's default
threshold rises to the largest buffer freed (up to 32 MB, and keeps up to twice that free on the heap), so a batch of
12-megapixel images left a worker ~100 MB larger for its lifetime, in some runs and not others. No batch of the
load tests allocates this much at once, so their buffers still come from the heap."""
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
"""``mallopt`` parameters (glibc's malloc.h)."""


def bound_heap():
    """Fix glibc's mmap and trim thresholds at HEAP_MMAP_THRESHOLD (a no-op elsewhere): buffers of a large request
    go back to the OS when freed, whichever request came before."""
    if libc() is not None:
        libc().mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)
        libc().mallopt(M_TRIM_THRESHOLD, HEAP_MMAP_THRESHOLD)


def trim_heap():
    """Give the heap's free memory back to the OS (glibc's ``malloc_trim``; a no-op elsewhere). A request for a
    large image leaves tens of MB of freed buffers that glibc would otherwise keep for the worker's lifetime."""
    if libc() is not None:
        libc().malloc_trim(0)


@functools.cache
def libc():
    """glibc, or None where there is none (malloc_trim is glibc's)."""
    try:
        library = ctypes.CDLL("libc.so.6")
        return library if hasattr(library, "malloc_trim") else None
    except OSError:
        return None


def internal_error(model, idx, stage, err):
    """A 500 for request ``idx`` alone, from an exception that is not a ``RequestError``: logged with its
    traceback, named in the reply by type only (its text may hold internals)."""
    logger.error("%s: internal error %s request %d", model, stage, idx, exc_info=err)
    return RequestError(f"internal error while {stage} this request ({type(err).__name__}); the model log has the "
                        "details, and the other requests of its batch were answered", code=500, kind="InternalError")


@dataclasses.dataclass(frozen=True)
class BinaryReply:
    """A reply sent as its raw bytes with ``content_type`` instead of as JSON (``max_reply_bytes`` still bounds it);
    ``label``: what PredictionsByLabel counts it under (None: not counted)."""

    body: bytes
    content_type: str
    label: str | None = None


# --- request bodies ----------------------------------------------------------------------------------------------

def request_payload(row):
    """(name, payload) of one request: the raw body, a multipart field, or the JSON TorchServe already decoded."""
    name = next((key for key in ("data", "body") if key in row), next(iter(row), None))
    payload = row.get(name)
    if payload is None or (isinstance(payload, (bytes, bytearray, str)) and len(payload) == 0):
        raise RequestError("the request body is empty (send the payload as the raw body, e.g. curl --data-binary @FILE "
                           "or curl -T FILE; TorchServe parses form-encoded bodies, as curl -d sends, into fields)",
                           kind="EmptyBody")
    return name, payload


CHARSETS = {codecs.lookup(name).name: name for name in (
    "utf-8", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be", "gb18030", "gbk", "gb2312",
    "big5", "big5hkscs", "us-ascii", "iso-8859-1", "windows-1252", "shift_jis", "euc-jp", "euc-kr")}
"""Charsets a text or JSON body may name (``Content-Type: text/plain; charset=gb18030``); any other is a 415.
TorchServe's own decoding reads every ``text/*`` body as UTF-8 whatever its charset, so the handler decodes bodies
itself (``initialize`` turns TorchServe's off)."""


def media_type(context, idx, name):
    """(media type in lower case, charset parameter or None) of request ``idx``'s parameter ``name``.

    TorchServe's frontend passes a raw body's media type without its parameters, so the charset of a raw body is
    read from the request's own Content-Type header (clients' headers reach the handler as sent)."""
    header = context.get_request_header(idx, name)
    kind, charset = parse_content_type(header.get("content-type", "") if isinstance(header, dict) else "")
    if charset is None and (kind.startswith("text/") or is_json_type(kind)):  # only bodies that are decoded
        headers = context.get_all_request_header(idx) or {}
        sent = next((value for key, value in headers.items() if key.lower() == "content-type"), "")
        sent_kind, sent_charset = parse_content_type(sent if isinstance(sent, str) else "")
        if sent_kind == kind:
            charset = sent_charset
    return kind, charset


def parse_content_type(content_type):
    """"text/plain; charset=GBK" -> ("text/plain", "GBK"); no charset: None."""
    kind, *parameters = content_type.split(";")
    charset = next((value.strip().strip('"') for key, _, value in (p.partition("=") for p in parameters)
                    if key.strip().lower() == "charset"), None)
    return kind.strip().lower(), charset


def is_json_type(kind):
    """Whether a media type is JSON (application/json or any +json type)."""
    return kind == "application/json" or kind.endswith("+json")


def decode_json(payload, charset=None):
    """JSON from bytes (in ``charset``, default UTF-8) or text."""
    text = decode_text(payload, charset)
    try:
        return json.loads(text)
    except ValueError as err:
        raise RequestError(f"the body is not valid JSON: {err}", kind="InvalidJSON") from None
    except RecursionError:
        raise RequestError("the JSON body is nested too deeply", kind="InvalidJSON") from None


def read_body(payload, kind, charset=None):
    """(payload, as_json) of a body of media type ``kind``: JSON decoded, ``text/*`` as str in its charset (default
    UTF-8), anything else (or JSON TorchServe already decoded) as it came."""
    as_json = is_json_type(kind)
    if as_json and isinstance(payload, (bytes, bytearray, str)):
        return decode_json(payload, charset), True
    if kind.startswith("text/"):
        return decode_text(payload, charset), as_json
    return payload, as_json


def decode_text(payload, charset=None):
    """Text from bytes in ``charset`` (default UTF-8; one of ``CHARSETS``, else a 415), or a str as is. Bytes that
    are not valid in the charset, or text holding NUL characters (UTF-16 or UTF-32 sent as UTF-8), are a 400."""
    if isinstance(payload, str):
        text = payload
    elif isinstance(payload, (bytes, bytearray)):
        codec = "utf-8" if charset is None else codec_of(charset)
        try:
            text = bytes(payload).decode(codec)
        except UnicodeDecodeError as err:
            raise RequestError(f"the body is not valid {CHARSETS[codecs.lookup(codec).name]} text ({err.reason} "
                               f"at byte {err.start}); name its charset in Content-Type", kind="InvalidEncoding") from None
    else:
        raise RequestError(f"expected text, got JSON {type(payload).__name__}", kind="InvalidInput")
    if "\x00" in text:
        raise RequestError("the text holds NUL characters: a UTF-16 or UTF-32 body sent as UTF-8? Name its charset "
                           "in Content-Type (e.g. text/plain; charset=utf-16)", kind="InvalidEncoding")
    return text


def codec_of(charset):
    """The Python codec of a charset that ``CHARSETS`` accepts; any other is a 415 naming the accepted ones."""
    try:
        codec = codecs.lookup(charset).name
    except LookupError:
        codec = None
    if codec not in CHARSETS:
        raise RequestError(f"unsupported charset {quote(charset)}; accepted: {', '.join(CHARSETS.values())}",
                           code=415, kind="UnsupportedCharset")
    return codec


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
        raise RequestError(f"field {quote(field)} must be a number, got {type(value).__name__}", kind="InvalidField")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise RequestError(f"field {quote(field)} must be a finite number, got {quote(str(value))}",
                           kind="InvalidField")
    return number


# --- device, threads, outputs --------------------------------------------------------------------------------------

def select_device(properties):
    """The GPU TorchServe assigned to this worker (``gpu_id``) when CUDA is available, else the CPU."""
    gpu_id = properties.get("gpu_id")
    if gpu_id is not None and torch.cuda.is_available():
        device = torch.device(f"cuda:{gpu_id}")
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


BATCH_RECEIVED_LINE = "Backend received inference at: %d"
"""The line TorchServe 0.12's worker logs for every batch (``ts/protocol/otf_message_handler.retrieve_msg``)."""


def drop_batch_received_line(record):
    """False for TorchServe's per-batch "Backend received inference at: <epoch seconds>" record, True otherwise."""
    return record.msg != BATCH_RECEIVED_LINE


def quiet_batch_log():
    """Stop the worker's per-batch "Backend received inference at" line, which holds nothing the frontend's own
    logs lack: at 2,000 requests a second in batches of 8 it is 250 lines a second in model_log.log, each parsed by
    the frontend's stdout reader (three regular expressions, a synchronous log write; docs/benchmark.md measures
    what dropping it saves). Every other line, errors and [METRICS] included, is kept."""
    for handler in logging.getLogger().handlers:
        if drop_batch_received_line not in handler.filters:
            handler.addFilter(drop_batch_received_line)


def declared_metric(metrics, name, unit, dimension_names, metric_type=MetricTypes.COUNTER):
    """The worker's metric ``name`` as metrics.yaml declares it (TorchServe's cache holds every declared metric from
    the start; adding one again replaces it and logs "Overriding existing key", a line per metric at every worker
    start), else added with this unit and these dimensions, as under a metrics config that does not declare it. A
    declaration with other dimensions is refused at load: every value the handler writes, in this order, would fail
    or be mislabelled."""
    try:
        metric = metrics.get_metric(name, metric_type)
    except MetricsCacheKeyError:
        return metrics.add_metric_to_cache(name, unit, dimension_names, metric_type=metric_type)
    if metric.dimension_names != dimension_names:
        raise ValueError(f"the metrics config declares {name} with dimensions {metric.dimension_names}; "
                         f"the handler writes {dimension_names}")
    return metric


def configure_threads(model_config):
    """Set torch's intra-op threads so that this model's workers x threads fit the CPUs this process may use.

    ``handler.torch_threads`` in model-config.yaml wins; otherwise the CPUs are divided among ``minWorkers``.
    """
    configured = (model_config.get("handler") or {}).get("torch_threads")
    workers = max(1, int(model_config.get("minWorkers", 1)))
    threads = int(configured) if configured else max(1, available_cpus() // workers)
    torch.set_num_threads(threads)
    return threads


def compact_json(reply):
    """A reply as compact UTF-8 JSON bytes (TorchServe would json.dumps it with indent=2 and ASCII escapes).

    Non-ASCII text stays as UTF-8 (a third of the bytes of ``\\uXXXX`` escapes for Chinese); text holding lone
    surrogates, which UTF-8 cannot carry, falls back to ASCII escapes.
    """
    try:
        return json.dumps(reply, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(reply, separators=(",", ":")).encode("utf-8")


def integrated_gradients(forward, inputs, target, baselines, layer=None, steps=32):
    """Captum Integrated Gradients of ``forward`` for ``target`` (per example), on the inputs or on ``layer``."""
    from captum.attr import IntegratedGradients, LayerIntegratedGradients

    method = LayerIntegratedGradients(forward, layer) if layer is not None else IntegratedGradients(forward)
    with torch.enable_grad():
        return method.attribute(inputs, baselines=baselines, target=target, n_steps=steps).detach().cpu()


class CounterBuffer:
    """Counter increments summed in the worker and written as metric lines at most every ``interval`` seconds.

    Every metric line costs the worker a log write and the frontend a parse: a batch wrote about 25 of them (requests,
    labels, the latency histogram), 8-17 % of a busy worker's time. The first batch after a quiet ``interval`` is
    written at once; under load the sums wait until ``interval`` has passed since the last write, and a timer
    writes what a last batch left. Prometheus sees the same counts, at most ``interval`` later.
    """

    def __init__(self, interval=COUNTER_WRITE_SECONDS):
        self.interval = interval
        self.pending = {}  # (metric, dimension values) -> increment
        self.lock = threading.Lock()
        self.last_write = -math.inf
        self.timer = None

    def add(self, metric, amount, dims):
        with self.lock:
            key = (metric, tuple(dims))
            self.pending[key] = self.pending.get(key, 0) + amount

    def batch_done(self):
        """Write now when the last write is ``interval`` old, otherwise when it will be."""
        with self.lock:
            wait = self.last_write + self.interval - time.monotonic()
            if wait <= 0:
                self._write()
            elif self.timer is None:
                self.timer = threading.Timer(wait, self.write)
                self.timer.daemon = True
                self.timer.start()

    def write(self):
        with self.lock:
            self._write()

    def _write(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        pending, self.pending = self.pending, {}
        for (metric, dims), amount in pending.items():
            metric.add_or_update(amount, list(dims))
        self.last_write = time.monotonic()


# --- the handler ---------------------------------------------------------------------------------------------------

class BundleHandler:
    """Loads the archive's artifact, answers each request of a batch on its own, counts what it did."""

    explain = None
    """Optional hook: ``explain(examples)`` -> one JSON-able reply per example (captum attributions)."""
    large_batch = False
    """Set by a hook when the batch held a large input: the heap is trimmed after that batch (``trim_heap``). Not
    after every batch: the next batch would pay page faults for what glibc gave back (the detector's throughput
    fell by a quarter in `make bench` when it trimmed after each)."""

    def __init__(self):
        self.initialized = False

    def initialize(self, context):
        # Bodies reach the handler as bytes, decoded here (``media_type``, ``decode_text``): TorchServe's worker would
        # decode text/* as UTF-8 whatever its charset, and JSON keeping only the last of duplicate keys.
        os.environ["TS_DECODE_INPUT_REQUEST"] = "false"
        quiet_batch_log()
        bound_heap()
        properties = context.system_properties
        self.model_dir = properties["model_dir"]
        self.model_config = context.model_yaml_config or {}
        self.artifact = read_manifest(self.model_dir)
        self.device = select_device(properties)
        self.threads = configure_threads(self.model_config)
        self.model_name = context.manifest["model"]["modelName"]
        self.version = context.manifest["model"].get("modelVersion", "")
        limits = self.model_config.get("handler") or {}
        self.max_forward_examples = int(limits.get("max_forward_examples") or self.model_config.get("batchSize") or 1)
        self.max_explain_examples = int(limits.get("max_explain_examples", DEFAULT_MAX_EXPLAIN_EXAMPLES))
        self.max_reply_bytes = int(limits.get("max_reply_bytes", DEFAULT_MAX_REPLY_BYTES))
        self.amp = runtimes.amp_dtype(limits.get("amp"), self.device)
        try:
            self.model = self.load_model()
            self.runtime = runtimes.load(limits.get("runtime", runtimes.DEFAULT_RUNTIME), self.model_dir, self.artifact,
                                         self.device, self.eager_model, self.threads)
        except Exception as err:
            raise RuntimeError(f"{self.model_name} {self.version}: {err}") from err
        self.labels = self.artifact.get("labels")
        self.warm_up()
        self._init_metrics(context.metrics)
        logger.info("%s %s ready on %s with %d torch threads, runtime %s", self.model_name, self.version, self.device,
                    self.threads, self.runtime.name)
        self.initialized = True

    def load_model(self):
        """The manifest's architecture and weights on the device (kept for explanations, whatever the runtime)."""
        return load_model(self.model_dir, self.artifact, self.device)

    def warm_up(self):
        """One forward pass of the runtime at load, on the model module's export example at batch 1 (when it
        declares one), so that the first request does not pay for lazy set-up (AOTInductor's kernels, oneDNN's)."""
        module = importlib.import_module(self.artifact["model_module"])
        if hasattr(module, "export_example"):
            inputs = tuple(module.export_example(self.artifact, 1).get("inputs", {}).values())
            if inputs:
                self.runtime(inputs if len(inputs) > 1 else inputs[0])

    def eager_model(self):
        """The module that the ``eager`` runtime predicts with (override to add an inference copy)."""
        return self.model

    def top_k_reply(self, probabilities, classes, k):
        """A classifier's reply: the most probable label, and the ``k`` best labels with their probabilities
        (``probabilities`` and ``classes`` sorted best first, as ``topk`` gives them)."""
        return {"label": self.labels[classes[0]],
                "probabilities": {self.labels[i]: round(p, 4) for p, i in zip(probabilities[:k], classes[:k])},
                "model": self.model_name, "version": self.version}

    def autocast(self):
        """Mixed precision in the dtype ``handler.amp`` names (bf16 or fp16, CUDA only) for handlers whose
        ``predict`` runs under it; a no-op when it is off."""
        return runtimes.autocast(self.device, self.amp)

    def _init_metrics(self, metrics):
        dims = ["ModelName", "ModelVersion"]
        self.metric_requests = declared_metric(metrics, "HandlerRequests", "Count", dims)
        self.metric_predictions = declared_metric(metrics, "PredictionsByLabel", "Count", dims + ["Label"])
        self.metric_rejected = declared_metric(metrics, "RejectedRequests", "Count", dims + ["ErrorType"])
        self.metric_errors = declared_metric(metrics, "HandlerErrors", "Count", dims)
        self.metric_preprocess = declared_metric(metrics, "PreprocessMilliseconds", "ms", dims)
        self.metric_latency_buckets = declared_metric(metrics, "HandlerLatencySeconds_bucket", "Count", dims + ["le"])
        self.metric_latency_count = declared_metric(metrics, "HandlerLatencySeconds_count", "Count", dims)
        self.metric_latency_sum = declared_metric(metrics, "HandlerLatencySeconds_sum", "s", dims)
        self.counters = CounterBuffer()
        # Every counter of a rate() exists from the worker's start, at 0: Prometheus then extrapolates numerator
        # and denominator of a ratio (error share, quantiles, mean latency) over the same samples.
        for bound in (*map(str, LATENCY_BUCKETS), "+Inf"):
            self.metric_latency_buckets.add_or_update(0, self._dims(bound))
        for metric in (self.metric_requests, self.metric_errors, self.metric_preprocess, self.metric_latency_count,
                       self.metric_latency_sum):
            metric.add_or_update(0, self._dims())

    def _observe_latency(self, requests, seconds):
        """``requests`` requests answered after ``seconds`` in the handler, into the latency histogram."""
        for bound in (*(b for b in LATENCY_BUCKETS if seconds <= b), "+Inf"):
            self.counters.add(self.metric_latency_buckets, requests, self._dims(str(bound)))
        self.counters.add(self.metric_latency_count, requests, self._dims())
        self.counters.add(self.metric_latency_sum, requests * seconds, self._dims())

    # --- hooks -----------------------------------------------------------------------------------------------------

    def parse(self, payload, as_json):
        raise NotImplementedError

    def parse_request(self, idx, row, name, payload, as_json):
        """Request ``idx`` of the batch -> (examples, many). ``row`` holds its parameters: the body (``row[name]``,
        given here as ``payload``) and any other form fields; the default parses the body alone."""
        return self.parse(payload, as_json)

    def collate(self, examples):
        raise NotImplementedError

    def format(self, example, output):
        raise NotImplementedError

    def predict(self, batch):
        """The model's output for a collated batch, on the CPU, from the configured runtime (handlers/runtimes.py)."""
        return self.runtime(batch)

    def output_rows(self, outputs):
        """The model's batch output -> one item per example, handed to ``format``."""
        return list(outputs)

    def label_of(self, reply):
        """The label a reply is counted under in PredictionsByLabel (None: not counted)."""
        return reply.label if isinstance(reply, BinaryReply) else reply.get("label")

    def request_header(self, idx, name):
        """Request ``idx``'s header ``name`` (any case), or None: clients' headers reach the handler as sent."""
        headers = self.context.get_all_request_header(idx) or {}
        value = next((value for key, value in headers.items() if key.lower() == name.lower()), None)
        return value if isinstance(value, str) else None

    def request_options(self, idx, row, name, payload, as_json, options):
        """The ``options`` a request names, from its headers (``score_threshold`` as ``Score-Threshold``), its other
        form fields and the fields of its JSON body besides ``data`` (the later win): {option: value}. A field that
        is not an option is a 400 naming them."""
        fields = {key: value for key, value in row.items() if key != name}  # other form fields
        if as_json and isinstance(payload, dict):
            fields.update({key: value for key, value in payload.items() if key != "data"})
        unknown = sorted(set(fields) - set(options))
        if unknown:
            raise RequestError(f"unknown option {quote(unknown[0])}; options: {', '.join(options)}",
                               kind="InvalidField")
        from_headers = {option: self.request_header(idx, option.replace("_", "-")) for option in options}
        return {**{option: value for option, value in from_headers.items() if value is not None}, **fields}

    # --- Open Inference Protocol hooks (handlers/oip.py) ---------------------------------------------------------

    oip_input = None
    """(name, datatype) of the model's one protocol input; None: the model does not speak the protocol."""
    oip_output_names = ()
    """Keys of ``format``'s replies that the default ``oip_outputs`` returns, one column each."""

    def oip_examples(self, tensor):
        """The input ``oip.Tensor`` -> model-ready examples, one per item of its first axis."""
        raise NotImplementedError

    def oip_outputs(self, rows, replies):
        """One request's ``output_rows`` and ``format`` replies -> {output name: array with one row per example}."""
        columns = {name: np.array([reply[name] for reply in replies]) for name in self.oip_output_names}
        return {name: column.astype(np.float32) if column.dtype.kind == "f" else column
                for name, column in columns.items()}

    # --- a batch ---------------------------------------------------------------------------------------------------

    def handle(self, data, context):
        self.context = context
        if self.is_describe(data, context):
            return [compact_json(self.describe_handle())]
        try:
            return self._handle_batch(data, context)
        finally:  # the batch's counts, whether it was answered or raised
            self.counters.batch_done()
            if self.large_batch:
                self.large_batch = False
                trim_heap()

    def _handle_batch(self, data, context):
        started = time.perf_counter()
        self.oip_requests = {}
        replies = [None] * len(data)
        to_predict, to_explain = [], []
        for idx, row in enumerate(data):
            context.set_response_content_type(idx, "application/json")
            try:
                name, payload = request_payload(row)
                if oip.is_request(context.get_all_request_header(idx), payload):
                    to_predict.append((idx, self._oip_examples(idx, payload), True))
                    continue
                payload, as_json = read_body(payload, *media_type(context, idx, name))
                explaining = context.get_request_header(idx, "explain") == "True"
                if explaining and self.explain is None:
                    raise RequestError(f"model {self.model_name} has no explanations; use /predictions",
                                       code=404, kind="ExplanationsNotSupported")
                examples, many = self.parse_request(idx, row, name, payload, as_json)
                if explaining and len(examples) > self.max_explain_examples:
                    raise RequestError(f"{len(examples)} items in one explanation request; at most "
                                       f"{self.max_explain_examples}", code=413, kind="TooManyExamples")
            except Exception as err:  # a bad request, or a bug met by this request alone: its neighbours are answered
                replies[idx] = self.fail(idx, err, "reading")
                continue
            (to_explain if explaining else to_predict).append((idx, examples, many))
        self.counters.add(self.metric_requests, len(data), self._dims())
        self.counters.add(self.metric_preprocess, (time.perf_counter() - started) * 1000, self._dims())

        if to_predict:
            self._answer_predictions(to_predict, replies)
        for idx, examples, many in to_explain:  # after every prediction of the batch is ready
            try:
                answers = self.explain(examples)
            except Exception as err:
                replies[idx] = self.fail(idx, err, "explaining")
                continue
            replies[idx] = answers if many else answers[0]
        elapsed = time.perf_counter() - started
        context.metrics.add_time("HandlerTime", round(elapsed * 1000, 2), None, "ms")
        self._observe_latency(len(data), elapsed)
        return [self._bounded(idx, reply) for idx, reply in enumerate(replies)]

    def _answer_predictions(self, to_predict, replies):
        """Predict every example of the batch, ``max_forward_examples`` per forward pass, and fill in the replies.

        When a forward pass raises, each request is predicted on its own, so that only the requests it fails for
        get a 500; a request whose reply cannot be formatted gets its own 500."""
        examples = [example for _, request_examples, _ in to_predict for example in request_examples]
        try:
            outputs = []
            for start in range(0, len(examples), self.max_forward_examples):
                chunk = examples[start : start + self.max_forward_examples]
                outputs += self.output_rows(self.predict(self.collate(chunk)))
        except Exception as err:
            if len(to_predict) > 1:
                for request in to_predict:
                    self._answer_predictions([request], replies)
            else:
                replies[to_predict[0][0]] = self.fail(to_predict[0][0], err, "predicting")
            return
        position, labels = 0, {}
        for idx, request_examples, many in to_predict:
            rows = outputs[position : position + len(request_examples)]
            position += len(request_examples)
            try:
                answers = [self.format(example, row) for example, row in zip(request_examples, rows)]
                replies[idx] = self._oip_reply(idx, rows, answers) if idx in self.oip_requests else (
                    answers if many else answers[0])
            except Exception as err:
                replies[idx] = self.fail(idx, err, "formatting")
                continue
            for answer in answers:
                label = self.label_of(answer)
                if label is not None:
                    labels[label] = labels.get(label, 0) + 1
        for label, count in labels.items():
            self.counters.add(self.metric_predictions, count, self._dims(label))

    def _bounded(self, idx, reply):
        """``reply`` as JSON bytes, or a 413 in its place when it is larger than ``max_reply_bytes``."""
        try:
            body = reply.body if isinstance(reply, (oip.Response, BinaryReply)) else compact_json(reply)
        except Exception as err:  # e.g. a value JSON cannot carry
            body = compact_json(self.fail(idx, err, "encoding"))
        if len(body) > self.max_reply_bytes:
            err = RequestError(f"the reply would be {len(body)} bytes, over this model's limit of "
                               f"{self.max_reply_bytes}; send fewer or shorter items", code=413, kind="ReplyTooLarge")
            body = compact_json(self.reject(idx, err))
        elif isinstance(reply, BinaryReply):
            self.context.set_response_content_type(idx, reply.content_type)
        elif isinstance(reply, oip.Response) and reply.header_length is not None:
            self.context.set_response_header(idx, oip.HEADER, str(reply.header_length))
            self.context.set_response_content_type(idx, "application/octet-stream")
        return body

    def _oip_examples(self, idx, payload):
        """The examples of protocol request ``idx``; its errors get the protocol's ``{"error"}`` body."""
        self.oip_requests[idx] = None
        if self.context.get_request_header(idx, "explain") == "True":
            raise RequestError("explanations are not served over the Open Inference Protocol; use "
                               f"/explanations/{self.model_name}", code=404, kind="ExplanationsNotSupported")
        if self.oip_input is None:
            raise RequestError(f"model {self.model_name} does not speak the Open Inference Protocol", code=404,
                               kind="ProtocolNotSupported")
        try:
            request = oip.parse(self.context.get_all_request_header(idx), payload)
            examples = self.oip_examples(oip.input_tensor(request, *self.oip_input))
        except oip.ProtocolError as err:
            raise RequestError(str(err), kind=err.kind) from None
        self.oip_requests[idx] = request
        return examples

    def _oip_reply(self, idx, rows, answers):
        """The encoded protocol reply to request ``idx`` (a 400 when it asked for an output the model lacks)."""
        try:
            return oip.encode(self.oip_requests[idx], self.model_name, self.version, self.oip_outputs(rows, answers))
        except oip.ProtocolError as err:
            return self.reject(idx, RequestError(str(err), kind=err.kind))

    def fail(self, idx, err, stage):
        """``reject`` request ``idx`` with ``err`` if it is a ``RequestError``, else with a 500 naming ``stage``."""
        return self.reject(idx, err if isinstance(err, RequestError) else internal_error(self.model_name, idx, stage,
                                                                                          err))

    def reject(self, idx, err):
        """Mark request ``idx`` of the batch as failed with ``err``'s status; its JSON body names the problem."""
        self.context.set_response_status(err.code, err.reason, idx)
        self.counters.add(self.metric_rejected, 1, self._dims(err.kind))
        self.counters.add(self.metric_errors, 1, self._dims())
        logger.info("%s rejected request %d: %s %s", self.model_name, idx, err.code, err.message)
        if idx in self.oip_requests:
            return oip.error_body(err.message, self.context.get_all_request_header(idx), self.model_name, self.version)
        return err.to_json()

    @staticmethod
    def is_describe(data, context):
        """Whether this batch is the management API's describe call (``GET /models/<m>?customized=true``).

        The frontend sends it alone, with a ``describe`` header and no parameters. Client headers reach the handler
        as sent, so a client could add ``describe`` to a prediction: that request has a body parameter, or (an empty
        form) a content type, and is answered as a prediction.
        """
        if len(data) != 1 or data[0] or context.get_request_header(0, "describe") != "True":
            return False
        headers = context.get_all_request_header(0) or {}
        return not any(name.lower() == "content-type" for name in headers)

    def describe_handle(self):
        """The customized part of `GET /models/<name>/<version>?customized=true`: what was trained, how well."""
        with open(f"{self.model_dir}/{METRICS_FILE}", encoding="utf-8") as f:
            training = json.load(f)
        return {"architecture": self.artifact["architecture"], "labels": self.labels, "device": str(self.device),
                "torch_threads": self.threads, "runtime": self.runtime.name, "training": training}

    def _dims(self, *extra):
        return [self.model_name, self.version, *map(str, extra)]
