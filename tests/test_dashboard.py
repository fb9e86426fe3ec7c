"""k8s/80-grafana-dashboard.yaml is generated from scripts/promql.py's query table, so the two cannot drift."""

import json

import yaml

import registry
from scripts.promql import DASHBOARD_FILE, QUERIES, dashboard
from scripts.server import ROOT


def test_the_committed_dashboard_is_the_generated_one():
    committed = yaml.safe_load((ROOT / "k8s" / "80-grafana-dashboard.yaml").read_text())
    assert committed["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(committed["data"][DASHBOARD_FILE]) == dashboard([entry.name for entry in registry.MODELS]), \
        "regenerate it: python -m scripts.promql --dashboard k8s/80-grafana-dashboard.yaml"


def test_every_query_has_a_panel_per_model_split_by_variant():
    exprs = [target["expr"] for panel in dashboard(["mnist"])["panels"] for target in panel.get("targets", [])]
    assert exprs == [query.render("mnist", "$__rate_interval", "variant") for query in QUERIES]
    assert all("by (variant" in expr for expr in exprs if "ts_queue" not in expr)
