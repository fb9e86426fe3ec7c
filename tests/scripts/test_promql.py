"""The query table of scripts/promql.py against what is generated from it or shows it: the dashboard, k8s/README.md."""

import json
import re

import yaml

import registry
from scripts.promql import DASHBOARD_FILE, QUERIES, dashboard
from scripts.server import ROOT


def test_the_committed_dashboard_is_the_generated_one():
    committed = yaml.safe_load((ROOT / "k8s" / "80-grafana-dashboard.yaml").read_text())
    assert committed["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(committed["data"][DASHBOARD_FILE]) == dashboard(), \
        "regenerate it: python -m scripts.promql --dashboard k8s/80-grafana-dashboard.yaml"


def test_every_query_has_a_panel_per_model_split_by_variant():
    """One row repeated over the ``model`` variable (every ModelName Prometheus has seen): no model is named, so a
    model added to registry.py needs no new dashboard."""
    board = dashboard()
    row, *panels = board["panels"]
    assert (row["type"], row["repeat"]) == ("row", "model")
    model = next(v for v in board["templating"]["list"] if v["name"] == "model")
    assert model["query"]["query"] == "label_values(HandlerRequests, ModelName)" and model["includeAll"]
    exprs = [target["expr"] for panel in panels for target in panel["targets"]]
    assert exprs == [query.render("$model", "$__rate_interval", "variant") for query in QUERIES]
    assert all("by (variant" in expr for expr in exprs if "ts_queue" not in expr)
    assert not any(entry.name in json.dumps(board) for entry in registry.MODELS)


def test_k8s_readme_shows_exactly_the_query_table_for_the_cluster():
    """tests/serving/test_prometheus.py runs these queries (by ModelVersion); the README must show no other PromQL."""
    readme = (ROOT / "k8s" / "README.md").read_text()
    shown = [block.strip() for block in re.findall(r"```promql\n(.*?)```", readme, flags=re.S)]
    assert shown == [query.render("mnist", "5m", "variant") for query in QUERIES]
