"""A model behind Ray Serve (`make bench` peer "rayserve"): POST /predictions/<model>; GET there is its readiness.

    .venv-peers/bin/python -m tests.load.peers.rayserve_server --model mnist --port 8092 [--model-config FILE]

A local Ray instance (``ray.init(num_cpus=minWorkers)``, no dashboard, usage stats off) and one deployment with
``num_replicas`` = the model-config's minWorkers, ``ray_actor_options={"num_cpus": 1}`` each, and Ray Serve's
documented batching: ``@serve.batch(max_batch_size=batchSize, batch_wait_timeout_s=maxBatchDelay)``.
``max_ongoing_requests`` (default 5, which would cap every batch at 5) is twice the batch size, as Ray's batching
guide advises (at least ``max_batch_size``): one batch runs while the next fills. Access log off, Serve log level
WARNING. The HTTP proxy listens on 127.0.0.1:PORT; a request's body (bytes) and Content-Type go to the batch,
which the bundle's handler answers (tests/load/peers/handler.py).
"""

import os
import signal

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports (nothing outside is reachable anyway)

import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve.config import HTTPOptions  # noqa: E402
from ray.serve.schema import LoggingConfig  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import Response  # noqa: E402

from tests.load.peers.handler import Model, server_settings  # noqa: E402


@serve.deployment
class Peer:
    def __init__(self, model, model_config, batch_size, batch_wait_s):
        self.model = Model(model, model_config)
        self.answer.set_max_batch_size(batch_size)
        self.answer.set_batch_wait_timeout_s(batch_wait_s)

    @serve.batch
    async def answer(self, requests):
        return self.model.answer(requests)

    async def __call__(self, request: Request):
        if request.method == "GET":  # the readiness route: answered once a replica runs
            return Response(b"ready", media_type="text/plain")
        status, body = await self.answer((await request.body(), request.headers.get("content-type", "")))
        return Response(body, status_code=status, media_type="application/json")


def main():
    args, config, settings = server_settings(__doc__.splitlines()[0])
    workers, batch_size = settings["workers"], settings["batch_size"]
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    quiet = LoggingConfig(log_level="WARNING", enable_access_log=False)
    serve.start(http_options=HTTPOptions(host="127.0.0.1", port=args.port), logging_config=quiet)
    app = Peer.options(num_replicas=workers, ray_actor_options={"num_cpus": 1},
                       max_ongoing_requests=2 * batch_size, logging_config=quiet).bind(
        args.model, config, batch_size, settings["max_batch_delay_s"])
    serve.run(app, name=args.model, route_prefix=f"/predictions/{args.model}", logging_config=quiet)
    stop = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # blocked only now: Ray's processes must not inherit the mask
    signal.sigwait(stop)
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
