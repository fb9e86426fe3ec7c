"""The bundle's own handler outside TorchServe, for the peer servers (LitServe, KServe, Ray Serve).

Every peer serves a model with the very class TorchServe runs (``handlers/<model>.py``, a ``BundleHandler``),
initialised from the same artifact folder (``artifacts/<name>/``: manifest.json and model.pt) and the same
model-config, and answers each batch with its ``handle``: the same decoding, canonicalisation, collation,
runtime (``handler.runtime``), torch threads (``handler.torch_threads``), top-k reply and per-request error
isolation as in TorchServe. Only TorchServe's ``Context`` is replaced, by ``Context`` below: what ``handle``
reads of it (request headers, the parameter's content type) and writes to it (each reply's status). Its metrics
are dropped (TorchServe's worker writes them as log lines, at most once a second; see handlers/common.py
``CounterBuffer``), which favours the peers slightly.

Each peer server module calls ``server_settings()`` for its command line, ``Model(name, model_config)`` once per
worker process, and ``Model.answer(requests)`` per batch.
"""

import argparse
import importlib
import inspect

import yaml
from ts.metrics.metric_cache_errors import MetricsCacheKeyError

import registry
from handlers.common import BundleHandler, parse_content_type


class _NullMetric:
    def add_or_update(self, *args, **kwargs):
        pass


class _NullMetrics:
    """TorchServe's metrics cache, as far as BundleHandler uses it, declaring nothing and writing nothing."""

    def get_metric(self, name, metric_type):
        raise MetricsCacheKeyError(f"{metric_type}:{name} is not declared")

    def add_metric_to_cache(self, *args, **kwargs):
        return _NullMetric()

    def add_time(self, *args, **kwargs):
        pass


class Context:
    """What BundleHandler reads of TorchServe's ``ts.context.Context``, for one batch at a time."""

    def __init__(self, model_dir, model_config, name, version):
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None}
        self.model_yaml_config = model_config
        self.manifest = {"model": {"modelName": name, "modelVersion": version}}
        self.metrics = _NullMetrics()
        self.headers, self.statuses = [], []

    def begin(self, headers):
        """A new batch: ``headers`` per request as TorchServe's worker passes them (the client's headers, and the
        body parameter's content type under "body")."""
        self.headers, self.statuses = headers, [200] * len(headers)

    def get_request_header(self, idx, key):
        return self.headers[idx].get(key)

    def get_all_request_header(self, idx):
        return self.headers[idx]

    def set_response_content_type(self, idx, value):
        pass  # every reply of these models is JSON

    def set_response_header(self, idx, key, value):
        pass

    def set_response_status(self, code=200, phrase="", idx=0):
        self.statuses[idx] = code


def handler_class(entry):
    """The BundleHandler subclass that ``entry.handler`` (handlers/<model>.py) defines."""
    module = importlib.import_module(entry.handler.removesuffix(".py").replace("/", "."))
    found = [value for value in vars(module).values() if inspect.isclass(value) and issubclass(value, BundleHandler)
             and value.__module__ == module.__name__]
    if len(found) != 1:
        raise RuntimeError(f"{entry.handler}: expected one BundleHandler subclass, found {found}")
    return found[0]


class Model:
    """Model ``name``'s default version behind its own handler, with ``model_config`` (its model-config.yaml)."""

    def __init__(self, name, model_config):
        entry = registry.model(name)
        version = entry.versions[0]
        self.context = Context(registry.ROOT / version.artifacts, model_config, name, version.version)
        self.handler = handler_class(entry)()
        self.handler.initialize(self.context)

    def answer(self, requests):
        """One batch: [(body, Content-Type)] -> [(HTTP status, JSON reply bytes)], through the handler's ``handle``.

        A body is bytes as received, or JSON that the peer's framework already decoded (the handler takes either).
        """
        headers = []
        for _, content_type in requests:
            kind, _ = parse_content_type(content_type or "")
            headers.append({"Content-Type": content_type or "", "body": {"content-type": kind}})
        self.context.begin(headers)
        bodies = self.handler.handle([{"body": body} for body, _ in requests], self.context)
        return list(zip(self.context.statuses, bodies))


def server_settings(description):
    """The peer servers' command line: --model NAME --port PORT --model-config FILE. Returns (args, model_config,
    settings) with the settings every peer takes from the model-config: ``workers`` (minWorkers), ``batch_size``
    (batchSize) and ``max_batch_delay_s`` (maxBatchDelay). Torch threads are the handler's own business
    (``handler.torch_threads``, handlers/common.configure_threads), as in TorchServe."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True, help="a model of registry.py")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-config", help="the model-config YAML (default: the model's cpu profile)")
    args = parser.parse_args()
    path = args.model_config or registry.ROOT / registry.model(args.model).configs["cpu"]
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    return args, config, settings_of(config)


def settings_of(config):
    """Workers, batch size and batch delay (s) of a model-config, with TorchServe's defaults where it names none."""
    return {"workers": max(1, int(config.get("minWorkers", 1))), "batch_size": max(1, int(config.get("batchSize", 1))),
            "max_batch_delay_s": float(config.get("maxBatchDelay", 100)) / 1000}
