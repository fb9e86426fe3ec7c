"""A model behind KServe's Python model server (`make bench` peer "kserve"): its v1 protocol,
POST /v1/models/<model>:predict, readiness GET /v1/models/<model>.

    .venv-peers/bin/python -m tests.load.peers.kserve_server --model mnist --port 8091 [--model-config FILE]

A ``kserve.Model`` whose ``load`` loads the bundle's handler (tests/load/peers/handler.py) and whose ``predict``
answers one request through it, served by ``kserve.ModelServer`` with ``workers`` = the model-config's minWorkers
(uvicorn processes, each with its own copy of the model), gRPC off (the benchmark speaks HTTP), per-request latency
logging and the uvicorn access log off.

No batching: KServe's batching is the ``batcher`` of an InferenceService (``maxBatchSize``, ``maxLatency``), done
by the Go agent sidecar in front of the model server on Kubernetes; the Python ``ModelServer`` calls ``predict``
once per request, and a synchronous ``predict`` runs on the worker's event loop, one request at a time.

KServe's v1 data plane hands ``predict`` the raw body for a non-JSON content type (an image) and the decoded
document for JSON; a bytes reply is returned as it is (our handler's JSON), so the reply is byte for byte the
handler's. A handler error becomes KServe's own: 4xx as ``InvalidInput`` (400), 5xx as ``InferenceError`` (500).
"""

import json
import tempfile
from pathlib import Path

import kserve
import kserve.model_server
from kserve.errors import InferenceError, InvalidInput

from tests.load.peers.handler import Model, server_settings

QUIET_LOGGING = {
    "version": 1, "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(process)s %(name)s %(levelname)s %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
    "loggers": {name: {"handlers": ["stderr"], "level": "WARNING", "propagate": False}
                for name in ("kserve", "kserve.trace", "uvicorn", "uvicorn.error", "uvicorn.access")},
}
"""KServe's log configuration (its ``--log_config_file``) at WARNING: its default logs every request at INFO."""


class PeerModel(kserve.Model):
    def __init__(self, name, model_config):
        super().__init__(name)
        self.model_config = model_config
        self.load()

    def load(self):
        self.model = Model(self.name, self.model_config)
        self.ready = True
        return self.ready

    def predict(self, payload, headers=None):
        content_type = (headers or {}).get("content-type", "")
        status, body = self.model.answer([(payload, content_type)])[0]
        if status >= 500:
            raise InferenceError(body.decode("utf-8", "replace"))
        if status >= 400:
            raise InvalidInput(body.decode("utf-8", "replace"))
        return body

    # workers > 1: KServe spawns its uvicorn workers and pickles the model to each; each loads its own copy
    def __getstate__(self):
        return {key: value for key, value in self.__dict__.items() if key != "model"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.load()


def main():
    args, config, settings = server_settings(__doc__.splitlines()[0])
    log_config = Path(tempfile.mkdtemp(prefix="kserve-peer-")) / "logging.json"
    log_config.write_text(json.dumps(QUIET_LOGGING))
    # kserve read its options from the command line when imported (kserve.model_server.args), ignoring ours
    kserve.model_server.args.log_config_file = str(log_config)
    server = kserve.ModelServer(http_port=args.port, workers=settings["workers"], enable_grpc=False,
                                enable_docs_url=False, enable_latency_logging=False)
    server.start([PeerModel(args.model, config)])


if __name__ == "__main__":
    main()
