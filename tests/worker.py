"""A model archive loaded in-process the way a TorchServe worker loads it, for handler tests without a server.

The request path is TorchServe's own code: the worker's input decoding (``_retrieve_input_data``, fed the wire
frame the frontend sends), ``Service.retrieve_data_for_inference``, a real ``Context`` and the real metrics cache.
Only the socket and the Java frontend are left out.
"""

import importlib
import io
import json
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import ts
import yaml
from ts.context import Context
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.protocol.otf_message_handler import _retrieve_input_data
from ts.service import Service

from handlers.common import BundleHandler

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Request:
    body: bytes | str | None
    content_type: str = "application/octet-stream"
    headers: dict = field(default_factory=dict)
    name: str = "body"  # the parameter name: "body" for a raw body, the field name for multipart


@dataclass
class Reply:
    status: int
    body: object  # the JSON-able value the handler returned


class _Frame:
    """The bytes the frontend writes for one request parameter, readable by TorchServe's ``_retrieve_*``."""

    def __init__(self, request):
        body = request.body.encode("utf-8") if isinstance(request.body, str) else (request.body or b"")
        self.buffer = io.BytesIO(b"".join(struct.pack("!i", len(part)) + part for part in (
            request.name.encode(), request.content_type.encode(), body)))

    def recv(self, size):
        return self.buffer.read(size)


class Worker:
    """One archive's handler, initialised from the unpacked .mar with its model-config.yaml."""

    def __init__(self, mar_path, unpack_dir, batch_size=8):
        with zipfile.ZipFile(mar_path) as archive:
            archive.extractall(unpack_dir)
        manifest = json.loads((Path(unpack_dir) / "MAR-INF" / "MANIFEST.json").read_text())
        model = manifest["model"]
        model_config = yaml.safe_load((Path(unpack_dir) / model["configFile"]).read_text())
        self.metrics = MetricsCacheYamlImpl(config_file_path=str(ROOT / "metrics.yaml"))
        self.metrics.initialize_cache()
        self.context = Context(model["modelName"], str(unpack_dir), manifest, batch_size, None, ts.__version__,
                               True, self.metrics, model_config)
        module = importlib.import_module("handlers." + Path(model["handler"]).stem)
        handler_class = next(obj for obj in vars(module).values()
                             if isinstance(obj, type) and issubclass(obj, BundleHandler) and obj is not BundleHandler)
        self.handler = handler_class()
        self.handler.initialize(self.context)

    def run(self, *requests):
        """Send ``requests`` as one batch; replies in request order with their HTTP status."""
        batch = []
        for i, request in enumerate(requests):
            headers = [{"name": k.encode(), "value": v.encode()} for k, v in request.headers.items()]
            batch.append({"requestId": f"req-{i}".encode(), "parameters": [_retrieve_input_data(_Frame(request))],
                          "headers": headers})
        headers, inputs, request_ids = Service.retrieve_data_for_inference(batch)
        self.context.request_ids = request_ids
        self.context.request_processor = headers
        self.metrics.request_ids = request_ids
        bodies = self.handler.handle(inputs, self.context)
        assert len(bodies) == len(requests), "one reply per request"
        return [Reply(self.context.get_response_status(i)[0], body) for i, body in enumerate(bodies)]

    def run_one(self, request):
        return self.run(request)[0]
