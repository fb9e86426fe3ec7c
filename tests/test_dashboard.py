"""k8s/grafana-dashboard.json is generated from scripts/promql.py's query table, so the two cannot drift."""

import json

import registry
from scripts.promql import QUERIES, dashboard
from scripts.server import ROOT


def test_the_committed_dashboard_is_the_generated_one():
    committed = json.loads((ROOT / "k8s" / "grafana-dashboard.json").read_text())
    assert committed == dashboard([entry.name for entry in registry.MODELS]), \
        "regenerate it: python -m scripts.promql --dashboard k8s/grafana-dashboard.json"


def test_every_query_has_a_panel_per_model_split_by_variant():
    exprs = [target["expr"] for panel in dashboard(["mnist"])["panels"] for target in panel.get("targets", [])]
    assert exprs == [query.render("mnist", "$__rate_interval", "variant") for query in QUERIES]
    assert all("by (variant" in expr for expr in exprs if "ts_queue" not in expr)
