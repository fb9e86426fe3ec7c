"""Every documented PromQL query (scripts/promql.py) against a real Prometheus scraping a test TorchServe.

The TorchServe serves the regression model as three versions; version 2.0 gets a share of bad requests (4xx).
Prometheus (Debian's package; `make test` installs it where apt-get can run) scrapes its metrics port every
second. Counts must match what the test sent exactly; quantiles must fall in the bucket that the server's own
bucket counters put them in; rates must agree with the counts over the traffic's duration. Last, canary analysis:
``scripts.promote --prometheus`` refuses the version with the higher error ratio and promotes an equal one.
"""

import json
import math
import re
import shutil
import subprocess
import time

import pytest
import requests

from handlers.common import LATENCY_BUCKETS
from scripts.promql import BY_NAME, QUERIES
from scripts.server import free_port
from tests.fixtures.servers import rezip, running, store_with
from tests.samples import heldout_patients

pytestmark = pytest.mark.slow
PROMETHEUS = shutil.which("prometheus")
JSON = {"Content-Type": "application/json"}
SENT = {"1.0": (40, 0), "2.0": (30, 10), "3.0": (40, 0)}  # version -> (good, bad) requests; 1.0 is the default


@pytest.fixture(scope="module")
def torchserve(tmp_path_factory):
    root = tmp_path_factory.mktemp("prometheus_ts")
    store = store_with(root / "store", "regression")
    for version in ("2.0", "3.0"):
        rezip(store / "regression.mar", store / f"regression_v{version[0]}.mar", "regression", version=version)
    with running(root / "server", model_store=store) as server:
        yield server


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, torchserve):
    if PROMETHEUS is None:
        pytest.skip("Prometheus is not installed (apt-get install prometheus; make test does it where it can)")
    folder = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    (folder / "prometheus.yml").write_text(json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "torchserve",
                            "static_configs": [{"targets": [f"127.0.0.1:{torchserve.ports['metrics']}"]}],
                            # the cluster's variant label, as the ServiceMonitor sets it: A serves 1.0, B 2.0
                            "metric_relabel_configs": [
                                {"source_labels": ["ModelVersion"], "regex": regex, "target_label": "variant",
                                 "replacement": variant} for regex, variant in ((r"1\.0", "a"), (r"2\.0", "b"))]}]}))
    with open(folder / "prometheus.log", "wb") as log:
        process = subprocess.Popen([PROMETHEUS, f"--config.file={folder / 'prometheus.yml'}",
                                    f"--storage.tsdb.path={folder / 'data'}",
                                    f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"Prometheus not ready: {(folder / 'prometheus.log').read_text()[-2000:]}")
        yield url
    finally:
        process.terminate()
        process.wait(30)


def query(prometheus, promql):
    """An instant query: {label value of the version label: float}."""
    reply = requests.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert reply["status"] == "success", (promql, reply)
    return {tuple(sorted(item["metric"].items())): float(item["value"][1]) for item in reply["data"]["result"]}


def by_version(result, extra=()):
    return {dict(labels).get("ModelVersion"): value for labels, value in result.items()
            if all(dict(labels).get(k) == v for k, v in extra)}


@pytest.fixture(scope="module")
def traffic(torchserve, prometheus):
    """Send SENT to the two versions, then wait until Prometheus has scraped all of it."""
    total = 'sum by (ModelVersion) (HandlerRequests{ModelName="regression"})'
    deadline = time.monotonic() + 60
    while by_version(query(prometheus, total)) != {version: 0.0 for version in SENT}:  # a scrape before any traffic
        assert time.monotonic() < deadline, "Prometheus never scraped the idle TorchServe"
        time.sleep(0.5)
    time.sleep(1.5)
    row = json.dumps(heldout_patients()[0][0])
    sent = [(version, i % ((good + bad) // bad) == 1 if bad else False)  # bad requests spread over the traffic
            for version, (good, bad) in SENT.items() for i in range(good + bad)]
    first = [sent.index(next(s for s in sent if s[0] == version)) for version in SENT]
    started = time.monotonic()
    for position in first:  # TorchServe's own counters exist only after a request: scraped once before the rest,
        send_one(torchserve, row, *sent[position])  # so that rate() over the window sees all of the traffic
    seen = "count by (model_version) (ts_inference_requests_total{model_name=\"regression\"})"
    while len(query(prometheus, seen)) < len(SENT) and time.monotonic() < started + 60:
        time.sleep(0.5)
    time.sleep(1.5)
    for position, (version, is_bad) in enumerate(sent):
        if position not in first:
            send_one(torchserve, row, version, is_bad)
    duration = time.monotonic() - started
    expected = {version: float(good + bad) for version, (good, bad) in SENT.items()}
    deadline = time.monotonic() + 60
    while by_version(query(prometheus, total)) != expected and time.monotonic() < deadline:
        time.sleep(1)
    time.sleep(2)  # one more scrape on the flat counters
    return duration


def send_one(torchserve, row, version, is_bad):
    reply = torchserve.predict("regression", b'{"age": "x"}' if is_bad else row, version=version, headers=JSON)
    assert reply.status_code == (400 if is_bad else 200), reply.text


def test_counts_are_exactly_what_was_sent(prometheus, traffic):
    requests_ = by_version(query(prometheus, 'sum by (ModelVersion) (HandlerRequests{ModelName="regression"})'))
    assert requests_ == {v: float(g + b) for v, (g, b) in SENT.items()}
    rejected = query(prometheus, 'sum by (ModelVersion, ErrorType) (RejectedRequests{ModelName="regression"})')
    assert by_version(rejected) == {"2.0": 10.0}
    assert by_version(rejected, [("ErrorType", "InvalidField")]) == {"2.0": 10.0}
    errors = by_version(query(prometheus, 'sum by (ModelVersion) (HandlerErrors{ModelName="regression"})'))
    assert errors == {"1.0": 0.0, "2.0": 10.0, "3.0": 0.0}
    histogram = query(prometheus, 'sum by (ModelVersion) (HandlerLatencySeconds_count{ModelName="regression"})')
    assert by_version(histogram) == requests_


def rendered(name, window="10m"):
    return BY_NAME[name].render(model="regression", window=window, by="ModelVersion")


def test_every_documented_query_runs_and_answers_per_version(prometheus, traffic):
    for entry in QUERIES:
        result = query(prometheus, entry.render(model="regression", window="10m", by="ModelVersion"))
        print(f"{entry.name}: {entry.render(model='regression', window='10m')}\n  -> {result}")  # pytest -s shows it
        assert result, f"{entry.name} returned nothing: {entry.render('regression', '10m')}"
        values = list(result.values())
        assert all(math.isfinite(v) and v >= 0 for v in values), (entry.name, result)
        if entry.name != "queue_latency_mean":  # TorchServe's own series: model_version, not ModelVersion
            assert set(by_version(result)) <= set(SENT) and "2.0" in by_version(result), (entry.name, result)


def test_error_ratio_is_the_share_of_bad_requests(prometheus, traffic):
    ratio = by_version(query(prometheus, rendered("error_ratio")))
    assert ratio["1.0"] == 0.0
    assert ratio["2.0"] == pytest.approx(10 / 40, abs=0.05)


def test_request_rate_times_the_window_is_the_count(prometheus, traffic):
    rate = by_version(query(prometheus, rendered("request_rate", "10m")))
    increase = by_version(query(prometheus, 'sum by (ModelVersion) (increase(HandlerRequests{ModelName="regression"}'
                                            "[10m]))"))
    for version, (good, bad) in SENT.items():
        assert increase[version] >= good + bad  # extrapolated to the window's edges: never below the count
        assert rate[version] * 600 == pytest.approx(increase[version], rel=0.01)  # queried a moment apart


def bucket_quantile(buckets, q):
    """The bucket (lower, upper] in which quantile ``q`` of cumulative ``buckets`` {upper: count} falls."""
    bounds = sorted(buckets)
    total = buckets[math.inf]
    lower = 0.0
    for upper in bounds:
        if buckets[upper] >= q * total:
            return lower, upper
        lower = upper
    return lower, math.inf


def test_latency_quantiles_fall_in_the_bucket_the_server_counted(prometheus, traffic, torchserve):
    text = torchserve.metrics()
    for version in SENT:
        buckets = {}
        for le, count in re.findall(r'HandlerLatencySeconds_bucket\{[^}]*ModelVersion="' + re.escape(version)
                                    + r'"[^}]*le="([^"]+)"[^}]*\} ([0-9.e+]+)', text):
            buckets[math.inf if le == "+Inf" else float(le)] = float(count)
        assert sorted(b for b in buckets if b != math.inf) == sorted(LATENCY_BUCKETS)
        assert buckets[math.inf] == sum(SENT[version])
        for name, q in (("latency_p50", 0.5), ("latency_p99", 0.99)):
            estimate = by_version(query(prometheus, rendered(name)))[version]
            lower, upper = bucket_quantile(buckets, q)
            assert lower <= estimate <= upper, (version, name, estimate, lower, upper)
    mean = by_version(query(prometheus, rendered("latency_mean")))
    assert all(0 < value < 1 for value in mean.values()), mean


def promote(torchserve, prometheus, candidate, tmp_path, *extra):
    from scripts import promote as promotion

    return promotion.main(["regression", "--candidate", candidate, "--prometheus", prometheus, "--window", "10m",
                           "--inference", torchserve.url("inference"), "--management", torchserve.url("management"),
                           "--key-file", str(torchserve.workdir / "key_file.json"), "--report", str(tmp_path),
                           *extra])


def default_version(torchserve):
    return torchserve.management("GET", "/models/regression").json()[0]["modelVersion"]


def test_canary_analysis_refuses_the_candidate_with_the_higher_error_ratio(torchserve, prometheus, traffic, tmp_path):
    assert promote(torchserve, prometheus, "2.0", tmp_path) == 3
    assert default_version(torchserve) == "1.0"
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    gates = {gate["gate"]: gate for gate in report["gates"]}
    assert gates["errors"]["passed"] is False and "error ratio 0.25" in gates["errors"]["found"]
    assert gates["quality"]["passed"] is None and "no ground truth" in gates["quality"]["found"]
    assert report["metrics"]["default.error_ratio"] == 0.0


def test_canary_analysis_by_the_clusters_variant_label(torchserve, prometheus, traffic, tmp_path):
    assert promote(torchserve, prometheus, "2.0", tmp_path, "--by", "variant", "--dry-run") == 3
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert (report["default"], report["metrics"]["candidate.error_ratio"]) == ("a", pytest.approx(0.25, abs=0.05))
    assert default_version(torchserve) == "1.0"


def test_canary_analysis_promotes_a_candidate_as_good_as_the_default(torchserve, prometheus, traffic, tmp_path):
    assert promote(torchserve, prometheus, "3.0", tmp_path) == 0
    assert default_version(torchserve) == "3.0"
