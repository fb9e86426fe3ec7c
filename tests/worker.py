"""A model archive loaded in-process the way a TorchServe worker loads it, for handler tests without a server.

The code path is TorchServe's own: ``ts.model_loader`` resolves the archive's handler entry point and initialises
it with a real ``Context`` and metrics cache, the frontend's wire frame goes through the worker's input decoding
(``_retrieve_input_data``) and ``Service.retrieve_data_for_inference``, and each reply is encoded with
``create_predict_response``, as the worker answers the frontend. Only the socket and the Java frontend are left out.
"""

import http
import io
import json
import struct
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.model_loader import ModelLoaderFactory
from ts.protocol.otf_message_handler import _retrieve_input_data, create_predict_response
from ts.service import Service

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Request:
    body: bytes | str | None
    content_type: str = "application/octet-stream"
    headers: dict = field(default_factory=dict)
    name: str = "body"  # the parameter name: "body" for a raw body, the field name for multipart; None: no parameter


@dataclass
class Reply:
    status: int
    body: object  # the decoded JSON reply; the raw bytes of an image or octet-stream reply
    reason: str = ""
    content_type: str = "application/json"


class _Frame:
    """The bytes the frontend writes for one request parameter, readable by TorchServe's ``_retrieve_*``."""

    def __init__(self, request):
        body = request.body.encode("utf-8") if isinstance(request.body, str) else (request.body or b"")
        self.buffer = io.BytesIO(b"".join(struct.pack("!i", len(part)) + part for part in (
            request.name.encode(), request.content_type.encode(), body)))

    def recv(self, size):
        return self.buffer.read(size)


def metrics_cache(config=ROOT / "metrics.yaml"):
    """TorchServe's metrics cache as a worker builds it at start, from ``config`` (the bundle's metrics.yaml)."""
    metrics = MetricsCacheYamlImpl(config_file_path=str(config))
    metrics.initialize_cache()
    return metrics


class Worker:
    """One archive, unpacked and loaded by TorchServe's model loader with its model-config.yaml."""

    def __init__(self, mar_path, unpack_dir, batch_size=8):
        with zipfile.ZipFile(mar_path) as archive:
            archive.extractall(unpack_dir)
        model = json.loads((Path(unpack_dir) / "MAR-INF" / "MANIFEST.json").read_text())["model"]
        metrics = metrics_cache()
        sys.path.append(str(unpack_dir))  # as the worker process has the model folder on its path
        try:
            self.service = ModelLoaderFactory.get_model_loader().load(
                model["modelName"], str(unpack_dir), model["handler"], None, batch_size, metrics_cache=metrics)
        finally:
            sys.path.remove(str(unpack_dir))
        self.context = self.service.context
        # the handler instance TorchServe created (None for a module-level entry function, as older handlers had)
        self.handler = getattr(self.service._entry_point, "__self__", None)

    def run(self, *requests):
        """Send ``requests`` as one batch; replies in request order with their HTTP status and reason phrase."""
        batch = []
        for i, request in enumerate(requests):
            headers = [{"name": k.encode(), "value": v.encode()} for k, v in request.headers.items()]
            parameters = [] if request.name is None else [_retrieve_input_data(_Frame(request))]
            batch.append({"requestId": f"req-{i}".encode(), "parameters": parameters, "headers": headers})
        headers, inputs, request_ids = Service.retrieve_data_for_inference(batch)
        self.context.request_ids = request_ids
        self.context.request_processor = headers
        self.context.metrics.request_ids = request_ids
        bodies = self.service._entry_point(inputs, self.context)  # what Service.predict calls
        assert isinstance(bodies, list) and len(bodies) == len(requests), "one reply per request"
        create_predict_response(bodies, request_ids, "Prediction success", 200, self.context)  # must encode
        replies = []
        for i, body in enumerate(bodies):
            status, reason = self.context.get_response_status(i)
            assert body is not None, f"request {i} got no reply"
            content_type = self.context.get_response_content_type(i) or "application/json"
            binary = content_type.startswith("image/") or content_type == "application/octet-stream"
            decoded = bytes(body) if binary else json.loads(body)
            replies.append(Reply(status, decoded, reason or "", content_type))
        return replies

    def run_one(self, request):
        return self.run(request)[0]


def valid_reason(reply):
    """A reason phrase the frontend can put on a status line: the fixed phrase of its status code."""
    return reply.reason in ("", http.HTTPStatus(reply.status).phrase)
