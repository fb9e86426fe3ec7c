"""A model behind LitServe (`make bench` peer "litserve"): POST /predictions/<model>, GET /health.

    .venv-peers/bin/python -m tests.load.peers.litserve_server --model mnist --port 8090 [--model-config FILE]

One ``LitAPI`` with LitServe's own batching (``max_batch_size`` = the model-config's batchSize, ``batch_timeout`` =
its maxBatchDelay), ``workers_per_device`` = its minWorkers on the CPU, and one API server process per worker
(LitServe's default, ``num_api_servers=None``). ``fast_queue`` (ZeroMQ between the API server and the workers) is
on: LitServe documents it for more than 100 requests per second. Log level warning, no access log. Each batch
goes through the bundle's handler (tests/load/peers/handler.py).

The body reaches ``decode_request`` as FastAPI reads a ``Body()`` parameter: raw bytes (an image), or the decoded
document for a JSON content type (LitServe's default ``Request`` annotation would call ``request.json()`` on an
image).
"""

from typing import Annotated, Union

import litserve as ls
from fastapi import Body
from starlette.responses import Response

from tests.load.peers.handler import Model, server_settings


class PeerAPI(ls.LitAPI):
    def __init__(self, model, model_config, **options):
        super().__init__(**options)
        self.model_name, self.model_config = model, model_config

    def setup(self, device):
        self.model = Model(self.model_name, self.model_config)

    def decode_request(self, request: Annotated[Union[bytes, dict, list], Body()]):
        return request, "application/octet-stream" if isinstance(request, bytes) else "application/json"

    def batch(self, inputs):
        return list(inputs)

    def predict(self, x):
        return self.model.answer(x) if self.max_batch_size > 1 else self.model.answer([x])[0]

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        status, body = output
        return Response(body, status_code=status, media_type="application/json")


def main():
    args, config, settings = server_settings(__doc__.splitlines()[0])
    api = PeerAPI(args.model, config, max_batch_size=settings["batch_size"],
                  batch_timeout=settings["max_batch_delay_s"] if settings["batch_size"] > 1 else 0.0,
                  api_path=f"/predictions/{args.model}")
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=settings["workers"], timeout=60,
                          fast_queue=True)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False,
               access_log=False)


if __name__ == "__main__":
    main()
