"""The PromQL queries the bundle documents, one table: k8s/README.md shows them, the Grafana dashboard
(k8s/80-grafana-dashboard.yaml) is generated from them, tests/serving/test_prometheus.py runs each against a real Prometheus,
and ``scripts.promote --prometheus`` reads its gates through them.

Each query is a template: ``$model`` (the model name), ``$window`` (a range such as 5m) and ``$by`` (the label
that tells versions apart: ``ModelVersion`` on one TorchServe, ``variant`` (a/b) in the cluster, where the
ServiceMonitor copies the Deployment's label onto every series).

    python -m scripts.promql [--by variant] [--model mnist] [--window 5m]   print them
    python -m scripts.promql --dashboard k8s/80-grafana-dashboard.yaml      write the dashboard
"""

import argparse
import json
from dataclasses import dataclass
from string import Template


@dataclass(frozen=True)
class Query:
    name: str
    title: str
    unit: str  # Grafana's unit id
    promql: str

    def render(self, model="mnist", window="5m", by="ModelVersion"):
        return Template(self.promql).substitute(model=model, window=window, by=by)


def _rate(metric, extra=""):
    return f'sum by ($by{extra}) (rate({metric}{{ModelName="$model"}}[$window]))'


QUERIES = (
    Query("request_rate", "Requests per second", "reqps", _rate("HandlerRequests")),
    Query("error_ratio", "Share of requests the handler answered with an error (4xx or 500)", "percentunit",
          f"{_rate('HandlerErrors')} / {_rate('HandlerRequests')}"),
    Query("errors_by_type", "Rejected requests per second, by error type", "reqps",
          _rate("RejectedRequests", ", ErrorType")),
    Query("latency_p50", "Handler latency p50", "s",
          f"histogram_quantile(0.5, {_rate('HandlerLatencySeconds_bucket', ', le')})"),
    Query("latency_p99", "Handler latency p99", "s",
          f"histogram_quantile(0.99, {_rate('HandlerLatencySeconds_bucket', ', le')})"),
    Query("latency_mean", "Handler latency, mean", "s",
          f"{_rate('HandlerLatencySeconds_sum')} / {_rate('HandlerLatencySeconds_count')}"),
    Query("queue_latency_mean", "Time in TorchServe's queue per request, mean (all versions)", "µs",
          'sum(rate(ts_queue_latency_microseconds{model_name="$model"}[$window])) / '
          'sum(rate(ts_inference_requests_total{model_name="$model"}[$window]))'),
)
BY_NAME = {query.name: query for query in QUERIES}


MODEL_VARIABLE = {"name": "model", "type": "query", "datasource": "${datasource}", "refresh": 2,
                  "query": {"query": "label_values(HandlerRequests, ModelName)", "refId": "models"},
                  "definition": "label_values(HandlerRequests, ModelName)", "multi": True, "includeAll": True,
                  "current": {"text": "All", "value": "$__all"}, "sort": 1}
"""The dashboard's models: every ModelName Prometheus has seen, so that a model added to registry.py appears on
it without a new dashboard."""


def dashboard(by="variant"):
    """A Grafana dashboard: a row per model (a row repeated over the ``model`` variable), one time-series panel per
    query, one line per version."""
    panels = [{"type": "row", "title": "$model", "repeat": "model", "collapsed": False,
               "gridPos": {"h": 1, "w": 24, "x": 0, "y": 0}, "panels": []}]
    for i, query in enumerate(QUERIES):
        panels.append({
            "type": "timeseries", "title": f"$model: {query.title}", "datasource": "${datasource}",
            "gridPos": {"h": 8, "w": 6, "x": (i % 4) * 6, "y": 1 + (i // 4) * 8},
            "fieldConfig": {"defaults": {"unit": query.unit}, "overrides": []},
            "targets": [{"expr": query.render("$model", "$__rate_interval", by), "legendFormat": f"{{{{{by}}}}}",
                         "refId": "A"}]})
    for panel_id, panel in enumerate(panels, start=1):
        panel["id"] = panel_id
    return {"title": "TorchServe bundle: versions side by side", "uid": "torchserve-bundle", "schemaVersion": 39,
            "time": {"from": "now-1h", "to": "now"}, "refresh": "30s", "panels": panels,
            "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus"},
                                    MODEL_VARIABLE]}}


DASHBOARD_FILE = "torchserve-bundle.json"


def dashboard_configmap():
    """The dashboard as a ConfigMap that Grafana's dashboard sidecar imports (label grafana_dashboard), so that
    `kubectl apply -f k8s` installs it with the rest; its JSON is also what Grafana's "Import" takes."""
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "torchserve-grafana-dashboard", "namespace": "torchserve",
                         "labels": {"grafana_dashboard": "1", "app.kubernetes.io/name": "torchserve",
                                    "app.kubernetes.io/part-of": "torchserve-bundle"}},
            "data": {DASHBOARD_FILE: json.dumps(dashboard(), indent=1) + "\n"}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist")
    parser.add_argument("--window", default="5m")
    parser.add_argument("--by", default="ModelVersion", help="label that tells versions apart (cluster: variant)")
    parser.add_argument("--dashboard", metavar="FILE", help="write the Grafana dashboard (every model) to FILE")
    args = parser.parse_args(argv)
    if args.dashboard:
        import yaml

        with open(args.dashboard, "w", encoding="utf-8") as f:
            f.write("# Generated by `python -m scripts.promql --dashboard k8s/80-grafana-dashboard.yaml` from the query\n"
                    "# table in scripts/promql.py (tests/scripts/test_promql.py fails when they differ). Grafana's dashboard\n"
                    "# sidecar imports ConfigMaps labelled grafana_dashboard; or import the JSON by hand.\n")
            yaml.safe_dump(dashboard_configmap(), f, sort_keys=False)
        return
    for query in QUERIES:
        print(f"# {query.title}\n{query.render(args.model, args.window, args.by)}\n")


if __name__ == "__main__":
    main()
