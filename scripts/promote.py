"""Gated promotion of a candidate model version on a running TorchServe.

    python -m scripts.promote MODEL --candidate VERSION [--data PATH] [--dry-run] [--report DIR] [--k8s]

Sends the same labelled held-out set to the default version and to the candidate (inference API, interleaved so
that both see the same load), compares them, and decides by the gates in ``GATES``. On a pass it makes the candidate
the default (management API ``set-default``) and checks that ``/predictions/MODEL`` now answers with it; on a refusal
it changes nothing. Either way it writes a JSON and a Markdown report and a plot into --report.

The held-out set: by default the examples that BOTH versions held out when they were trained (each version's
training record, from ``GET /models/MODEL/VERSION?customized=true``, names its split), so that neither was trained on
what it is judged by. ``--data`` reads a labelled file instead, with the model's own readers: mnist a torchvision MNIST
folder (its test set), sentiment a folder with neg.txt and pos.txt, regression a CSV with the training target column.
Both come from the model's registry entry (``Promotion``: a function of its training module).

Exit status: 0 promoted (--dry-run: the gates pass, nothing changed), 3 refused (nothing changed), 2 bad input
(unknown model or version, unreadable data, a server that does not answer or answers an error), 4 the gates passed
but the promotion failed (set-default refused, or the default does not answer as the candidate afterwards: the
message and the report say what the server did).

``--prometheus URL --window 5m`` reads live traffic instead (canary analysis, as Flagger or Argo Rollouts do): both
versions' error ratio and handler p99 over the window, from the queries of scripts/promql.py, by ``ModelVersion`` on
one TorchServe or, with ``--by variant``, by the cluster's A/B variant (a = default, b = candidate). Live traffic has
no ground truth, so the quality gate is skipped then, and the report says so.

Sources: ``HeldOutSource`` measures by sending requests, ``PrometheusSource`` reads live metrics; anything with
``observe(model, default, candidate) -> Measurements`` whose ``metrics`` carry the keys the gates read fits.
"""

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import requests
import yaml
from scipy import stats

import registry
from scripts.promql import BY_NAME
from scripts.server import CONFIG, PORT_KEYS, ROOT, read_properties

REFUSED, BAD_INPUT, PROMOTION_FAILED = 3, 2, 4
HTTPROUTE = ROOT / "k8s" / "40-httproute.yaml"
SPLIT_RULE = "weighted-split"
ROLLOUT_STEPS = ((90, 10), (50, 50), (0, 100))


class BadInput(Exception):
    """What the user asked for cannot be evaluated (exit 2); the message says why."""


class PromotionFailed(Exception):
    """The gates passed, but making the candidate the default did not work as checked (exit 4)."""


# --- the labelled examples -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Example:
    key: str  # identifies the example across two versions' held-out splits
    body: bytes
    content_type: str
    truth: object  # a label (classifiers) or a number (regression)


def promotion(model):
    """The registry's Promotion of ``model``: how its candidates are judged."""
    try:
        entry = registry.model(model)
    except KeyError as err:
        raise BadInput(err.args[0]) from None
    if entry.promotion is None:
        judged = ", ".join(e.name for e in registry.MODELS if e.promotion)
        raise BadInput(f"no promotion task for model {model!r} in registry.py (models with one: {judged})")
    return entry.promotion


def labelled_examples(task, record, path=None):
    """The Examples of ``task.requests`` for a training record (held out) or a labelled file."""
    return [Example(*request) for request in registry.resolve(task.requests)(record, path)]


def answer(task, reply):
    """What is compared with the truth: the reply's ``task.answer`` field (a number for regressions)."""
    value = reply[task.answer]
    return float(value) if task.kind == "regression" else value


# --- the server ----------------------------------------------------------------------------------------------------

def refused_token(reply, api):
    """TorchServe answers a missing or stale token with 400 InvalidKeyException (401 behind some proxies)."""
    if reply.status_code == 401 or (reply.status_code == 400 and "InvalidKeyException" in reply.text):
        raise BadInput(f"the {api} API refused the token: is --key-file the running server's key_file.json?")


class Server:
    """The inference and management APIs of a running TorchServe, with the tokens of its key_file.json."""

    def __init__(self, inference, management, key_file):
        self.urls = {"inference": inference.rstrip("/"), "management": management.rstrip("/")}
        key_file = Path(key_file)
        self.keys = json.loads(key_file.read_text()) if key_file.is_file() else {}  # none: token auth is off
        self.session = requests.Session()
        self.session.trust_env = False

    def call(self, api, method, path, **kwargs):
        headers = kwargs.pop("headers", {})
        if api in self.keys:
            headers["Authorization"] = f"Bearer {self.keys[api]['key']}"
        try:
            return self.session.request(method, self.urls[api] + path, headers=headers, timeout=60, **kwargs)
        except requests.ConnectionError as err:
            raise BadInput(f"TorchServe's {api} API at {self.urls[api]} does not answer ({type(err).__name__}); "
                           "start it (make serve) or pass --inference/--management") from err

    def describe(self, model, version=None):
        path = f"/models/{model}" + (f"/{version}" if version else "") + "?customized=true"
        reply = self.call("management", "GET", path)
        refused_token(reply, "management")
        if reply.status_code == 404:
            raise BadInput(f"TorchServe serves no {model} {version or ''}".strip() + f": {reply.json()['message']}")
        if reply.status_code != 200:
            raise BadInput(f"TorchServe's management API answered GET {path} with {reply.status_code}: "
                           f"{reply.text[:200]}")
        return reply.json()[0]


# --- measuring -----------------------------------------------------------------------------------------------------

@dataclass
class Observations:
    """What one version answered: per example its answer (None on error) and latency, and the errors."""

    version: str
    answers: list = field(default_factory=list)
    latencies_ms: list = field(default_factory=list)
    errors: list = field(default_factory=list)  # "example #i: status message"


@dataclass
class Measurements:
    source: str
    metrics: dict  # flat: "<version role>.<metric>" and "pair.<metric>", what the gates read
    observations: dict = field(default_factory=dict)  # role -> Observations (sources that see single answers)


class HeldOutSource:
    """Sends each example to both versions, alternating which goes first, and measures latency on the client."""

    def __init__(self, server, task, examples):
        self.server, self.task, self.examples = server, task, examples

    def describe(self):
        return f"{len(self.examples)} labelled examples sent through the inference API"

    def observe(self, model, default, candidate):
        observed = {"default": Observations(default), "candidate": Observations(candidate)}
        for warm_up in self.examples[:5]:  # first requests pay for lazy initialisation
            for role in observed:
                self.send(model, observed[role].version, warm_up)
        for index, example in enumerate(self.examples):
            order = ("default", "candidate") if index % 2 == 0 else ("candidate", "default")
            for role in order:
                answer, latency, error = self.send(model, observed[role].version, example)
                observed[role].answers.append(answer)
                observed[role].latencies_ms.append(latency)
                if error:
                    observed[role].errors.append(f"example #{index}: {error}")
            if (index + 1) % 100 == 0:
                print(f"promote: {index + 1}/{len(self.examples)} examples sent to both versions", flush=True)
        truths = [example.truth for example in self.examples]
        return Measurements(self.describe(), compare(self.task.kind, truths, **observed), observed)

    def send(self, model, version, example):
        """(answer, latency ms, error message or None) of one request."""
        started = time.perf_counter()
        reply = self.server.call("inference", "POST", f"/predictions/{model}/{version}", data=example.body,
                                 headers={"Content-Type": example.content_type})
        latency = (time.perf_counter() - started) * 1000
        refused_token(reply, "inference")
        if reply.status_code != 200:
            return None, latency, f"{reply.status_code} {reply.text[:200]}"
        try:
            return answer(self.task, reply.json()), latency, None
        except (ValueError, KeyError, TypeError) as err:
            return None, latency, f"unreadable reply ({err}): {reply.text[:200]}"


class PrometheusSource:
    """Both versions' live request rate, error ratio and handler p99 over ``window``, from Prometheus."""

    def __init__(self, url, window, by="ModelVersion"):
        self.url, self.window, self.by = url.rstrip("/"), window, by

    def describe(self):
        return f"live traffic of the last {self.window} in Prometheus at {self.url}, by {self.by}"

    def query(self, name, model):
        """{value of the ``by`` label: float} of query ``name`` of scripts/promql.py."""
        promql = BY_NAME[name].render(model, self.window, self.by)
        try:
            body = requests.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=30).json()
        except (requests.RequestException, ValueError) as err:
            raise BadInput(f"Prometheus at {self.url} does not answer: {err}") from err
        if body.get("status") != "success":
            raise BadInput(f"Prometheus refused {promql}: {body.get('error')}")
        return {item["metric"].get(self.by): float(item["value"][1]) for item in body["data"]["result"]}

    def observe(self, model, default, candidate):
        labels = {"default": default, "candidate": candidate} if self.by == "ModelVersion" else \
            {"default": "a", "candidate": "b"}
        values = {name: self.query(name, model) for name in ("request_rate", "error_ratio", "latency_p99")}
        metrics = {}
        for role, label in labels.items():
            if not values["request_rate"].get(label, 0) > 0:
                raise BadInput(f"Prometheus saw no traffic for {model} {self.by}={label} in the last {self.window}")
            p99 = values["latency_p99"].get(label)
            metrics[f"{role}.requests_per_s"] = values["request_rate"][label]
            metrics[f"{role}.error_ratio"] = values["error_ratio"].get(label)
            metrics[f"{role}.p99_ms"] = p99 * 1000 if p99 is not None and math.isfinite(p99) else None
        return Measurements(self.describe(), metrics)


def compare(kind, truths, default, candidate):
    """Per version: quality, latency, errors; for the pair: disagreement and the paired test."""
    truths = list(truths)
    metrics = {}
    for role, observed in (("default", default), ("candidate", candidate)):
        latencies = np.asarray(observed.latencies_ms)
        metrics[f"{role}.errors"] = len(observed.errors)
        metrics[f"{role}.p50_ms"] = float(np.percentile(latencies, 50)) if latencies.size else None
        metrics[f"{role}.p99_ms"] = float(np.percentile(latencies, 99)) if latencies.size else None
    both = [i for i, (a, b) in enumerate(zip(default.answers, candidate.answers)) if a is not None and b is not None]
    metrics["pair.n_compared"] = len(both)
    if not both:
        return metrics
    a = np.asarray([default.answers[i] for i in both], dtype=object)
    b = np.asarray([candidate.answers[i] for i in both], dtype=object)
    y = np.asarray([truths[i] for i in both], dtype=object)
    if kind == "classifier":
        right_a, right_b = a == y, b == y
        metrics["default.accuracy"], metrics["candidate.accuracy"] = float(right_a.mean()), float(right_b.mean())
        metrics["pair.disagreement"] = float((a != b).mean())
        only_default, only_candidate = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
        # McNemar's exact test: of the examples exactly one version gets right, is the split 50/50?
        discordant = only_default + only_candidate
        metrics["pair.mcnemar_only_default_right"] = only_default
        metrics["pair.mcnemar_only_candidate_right"] = only_candidate
        metrics["pair.mcnemar_p"] = float(stats.binomtest(only_candidate, discordant).pvalue) if discordant else 1.0
    else:
        a, b, y = a.astype(float), b.astype(float), y.astype(float)
        for role, predicted in (("default", a), ("candidate", b)):
            metrics[f"{role}.rmse"] = rmse(y, predicted)
            metrics[f"{role}.r2"] = float(1 - np.sum((y - predicted) ** 2) / np.sum((y - y.mean()) ** 2))
        metrics["pair.mean_abs_difference"] = float(np.mean(np.abs(a - b)))  # how far apart the answers are
        ci = stats.bootstrap((y, a, b), lambda y_, a_, b_: rmse(y_, b_) - rmse(y_, a_), paired=True,
                             vectorized=False, n_resamples=2000, confidence_level=0.95, method="percentile",
                             random_state=0).confidence_interval
        metrics["pair.rmse_increase"] = metrics["candidate.rmse"] - metrics["default.rmse"]
        metrics["pair.rmse_increase_ci95"] = [float(ci.low), float(ci.high)]
    return metrics


def rmse(truth, predicted):
    return float(np.sqrt(np.mean((np.asarray(truth) - np.asarray(predicted)) ** 2)))


# --- the gates -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    margin: float  # classifiers: accuracy points the candidate may lose; regression: fraction of the default's RMSE
    p99_fraction: float  # how much slower the candidate's p99 may be, as a fraction of the default's
    p99_floor_ms: float  # ... or this many milliseconds, whichever is larger (client-side timing noise)
    alpha: float  # significance level of the paired test
    error_ratio_margin: float = 0.0  # live traffic: how much higher the candidate's error ratio may be


@dataclass(frozen=True)
class Gate:
    name: str
    reason: str
    check: Callable[[dict, Limits], tuple]  # (metrics, limits) -> (passed, what was found)


def not_worse(m, limits):
    if "candidate.accuracy" in m:
        drop = m["default.accuracy"] - m["candidate.accuracy"]
        p = m["pair.mcnemar_p"]
        found = (f"accuracy {m['candidate.accuracy']:.4f} vs {m['default.accuracy']:.4f} (drop {drop:+.4f}, "
                 f"margin {limits.margin}); McNemar exact p={p:.3g}")
        significantly_worse = p < limits.alpha and drop > 0
        return drop <= limits.margin and not significantly_worse, found + (
            f" < {limits.alpha}: significantly worse" if significantly_worse else "")
    if "pair.rmse_increase_ci95" in m:
        allowed = limits.margin * m["default.rmse"]
        low, high = m["pair.rmse_increase_ci95"]
        return high <= allowed, (f"RMSE {m['candidate.rmse']:.4f} vs {m['default.rmse']:.4f}; 95% bootstrap CI of "
                                 f"the increase [{low:.4f}, {high:.4f}], allowed up to {allowed:.4f}")
    if "candidate.error_ratio" in m:
        return None, "skipped: live traffic has no ground truth (run without --prometheus to compare on labelled data)"
    return False, "not measured (no example answered by both versions)"


def latency(m, limits):
    if m.get("candidate.p99_ms") is None or m.get("default.p99_ms") is None:
        return False, "not measured"
    allowed = max(m["default.p99_ms"] * (1 + limits.p99_fraction), m["default.p99_ms"] + limits.p99_floor_ms)
    return m["candidate.p99_ms"] <= allowed, (f"p99 {m['candidate.p99_ms']:.1f} ms vs {m['default.p99_ms']:.1f} ms, "
                                              f"allowed up to {allowed:.1f} ms")


def no_errors(m, limits):
    if "candidate.error_ratio" in m:  # live traffic: clients' bad requests count for both versions alike
        allowed = m["default.error_ratio"] + limits.error_ratio_margin
        return m["candidate.error_ratio"] <= allowed, (f"error ratio {m['candidate.error_ratio']:.4f} vs "
                                                       f"{m['default.error_ratio']:.4f}, allowed up to {allowed:.4f}")
    if "candidate.errors" not in m:
        return False, "not measured"
    return m["candidate.errors"] == 0, f"{m['candidate.errors']} errors"


GATES = (
    Gate("quality", "users must not get worse answers: the candidate's accuracy (R2/RMSE for regression) is not worse "
                    "than the default's beyond the margin, and the paired test finds no significant degradation",
         not_worse),
    Gate("latency", "a slower model eats the latency budget and needs more replicas: the candidate's p99 is not worse "
                    "than the default's by more than the stated fraction", latency),
    Gate("errors", "an error is a request lost: the candidate must answer every example (any non-200 or unreadable "
                   "reply counts); on live traffic, its error ratio must not exceed the default's", no_errors),
)


def decide(metrics, limits):
    """(pass, per-gate results): every gate passes or is skipped (``passed`` None: its source cannot measure it)."""
    results = []
    for gate in GATES:
        passed, found = gate.check(metrics, limits)
        results.append({"gate": gate.name, "passed": None if passed is None else bool(passed), "found": found,
                        "reason": gate.reason})
    return all(r["passed"] is not False for r in results) and any(r["passed"] for r in results), results


# --- promotion, reports, Kubernetes --------------------------------------------------------------------------------

def set_default(server, model, candidate, example):
    """Make ``candidate`` the default and check that /predictions/MODEL answers with it; returns what was checked."""
    reply = server.call("management", "PUT", f"/models/{model}/{candidate}/set-default")
    if reply.status_code != 200:
        raise PromotionFailed(f"set-default answered {reply.status_code}: {reply.text}")
    now = server.describe(model)["modelVersion"]
    if now != candidate:
        raise PromotionFailed(f"set-default answered 200, but the default is {now}")
    plain = server.call("inference", "POST", f"/predictions/{model}", data=example.body,
                        headers={"Content-Type": example.content_type})
    pinned = server.call("inference", "POST", f"/predictions/{model}/{candidate}", data=example.body,
                         headers={"Content-Type": example.content_type})
    if plain.status_code != 200 or plain.json() != pinned.json():
        raise PromotionFailed(f"/predictions/{model} answers {plain.status_code} {plain.text[:200]}, "
                           f"the candidate {pinned.text[:200]}")
    answered = plain.json().get("version") if isinstance(plain.json(), dict) else None
    if answered not in (None, candidate):
        raise PromotionFailed(f"/predictions/{model} answers as version {answered}, not {candidate}")
    return f"default is {now}; /predictions/{model} answers like /predictions/{model}/{candidate}" + (
        f" (\"version\": \"{answered}\")" if answered else "")


def kubectl_steps(route_file=HTTPROUTE):
    """{step name: kubectl patch command} for the rollout's weight steps and the rollback, on the route's split rule."""
    route = next(d for d in yaml.safe_load_all(route_file.read_text()) if d and d["kind"] == "HTTPRoute")
    index, rule = next((i, r) for i, r in enumerate(route["spec"]["rules"]) if r.get("name") == SPLIT_RULE)
    position = {backend["name"]: n for n, backend in enumerate(rule["backendRefs"])}
    meta = route["metadata"]

    def patch(weight_a, weight_b):
        ops = [{"op": "test", "path": f"/spec/rules/{index}/name", "value": SPLIT_RULE}]  # fails if the rule moved
        ops += [{"op": "replace", "path": f"/spec/rules/{index}/backendRefs/{position[name]}/weight", "value": weight}
                for name, weight in (("torchserve-a", weight_a), ("torchserve-b", weight_b))]
        return (f"kubectl -n {meta['namespace']} patch httproute {meta['name']} --type=json "
                f"-p {shlex.quote(json.dumps(ops, separators=(',', ':')))}")

    steps = {f"A {a} / B {b}": patch(a, b) for a, b in ROLLOUT_STEPS}
    steps["rollback: A 100 / B 0"] = patch(100, 0)
    return steps


def write_report(folder, report):
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"promote-{report['model']}-{report['default']}-vs-{report['candidate']}"
    (folder / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    m = report["metrics"]
    if "default.error_ratio" in m:  # live traffic
        quality = ["error_ratio", "requests_per_s"]
    else:
        quality = ["accuracy"] if "default.accuracy" in m else ["r2", "rmse"]
    lines = [f"# Promotion of {report['model']} {report['candidate']} over {report['default']}: "
             f"**{report['decision']}**", "", f"Measured on {report['source']}.", "",
             f"| | default {report['default']} | candidate {report['candidate']} |", "|---|---|---|"]
    for name in quality + [name for name in ("p50_ms", "p99_ms", "errors") if f"default.{name}" in m]:
        lines.append(f"| {name} | {fmt(m.get(f'default.{name}'))} | {fmt(m.get(f'candidate.{name}'))} |")
    lines += ["", "| pair | value |", "|---|---|"]
    lines += [f"| {key[5:]} | {fmt(value)} |" for key, value in m.items() if key.startswith("pair.")]
    lines += ["", "| gate | passed | found | why |", "|---|---|---|---|"]
    verdicts = {True: "yes", False: "**no**", None: "skipped"}
    lines += [f"| {g['gate']} | {verdicts[g['passed']]} | {g['found']} | {g['reason']} |" for g in report["gates"]]
    lines += ["", f"Action: {report['action']}", ""]
    (folder / f"{stem}.md").write_text("\n".join(lines))
    plot(folder / f"{stem}.png", report, quality[0])
    return folder / stem


def fmt(value):
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def plot(path, report, quality):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = report["metrics"]
    labels = [f"default {report['default']}", f"candidate {report['candidate']}"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2))
    left.bar(labels, [m.get(f"default.{quality}") or 0, m.get(f"candidate.{quality}") or 0], color=["grey", "C0"])
    left.set_title(quality)
    for offset, name in ((-0.2, "p50_ms"), (0.2, "p99_ms")):
        right.bar(np.arange(2) + offset, [m.get(f"default.{name}") or 0, m.get(f"candidate.{name}") or 0], 0.4,
                  label=name[:3])
    right.set_xticks(range(2), labels)
    right.set_title("latency (ms, " + ("handler, live" if "default.error_ratio" in m else "client side") + ")")
    right.legend()
    figure.suptitle(f"{report['model']}: {report['decision']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# --- the command ---------------------------------------------------------------------------------------------------

def examples_for(task, server, model, versions, data):
    """The labelled set: --data, or the examples every version's training run held out."""
    records = [server.describe(model, v).get("customizedMetadata", {}).get("training") for v in versions]
    if any(not isinstance(r, dict) or "args" not in r for r in records):
        raise BadInput(f"{model}: a version has no training record in its describe (customizedMetadata.training)")
    try:
        if data:
            examples = labelled_examples(task, records[0], data)
        else:
            per_version = [labelled_examples(task, record) for record in records]
            common = set.intersection(*({e.key for e in examples} for examples in per_version))
            examples = [e for e in per_version[0] if e.key in common]
    except (OSError, ValueError, KeyError) as err:
        raise BadInput(f"cannot read the labelled set{f' {data}' if data else ''}: {err}") from err
    if not examples:
        raise BadInput("no example was held out by both versions: pass a labelled set with --data")
    return examples


def parse_args(argv):
    local = read_properties(CONFIG)
    parser = argparse.ArgumentParser(prog="python -m scripts.promote", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("model", help=f"model name ({', '.join(e.name for e in registry.MODELS if e.promotion)})")
    parser.add_argument("--candidate", required=True, help="the version to promote (served by the same TorchServe)")
    parser.add_argument("--data", help="a labelled file or folder the model's readers take (default: held-out split)")
    parser.add_argument("--limit", type=int, help="use at most this many examples")
    parser.add_argument("--dry-run", action="store_true", help="measure and decide, change nothing")
    parser.add_argument("--report", type=Path, default=ROOT / "logs" / "promote", help="report folder (%(default)s)")
    parser.add_argument("--k8s", action="store_true", help="after a pass, print the HTTPRoute rollout commands")
    parser.add_argument("--inference", default=local[PORT_KEYS["inference"]], help="inference API (%(default)s)")
    parser.add_argument("--management", default=local[PORT_KEYS["management"]], help="management API (%(default)s)")
    parser.add_argument("--key-file", default="key_file.json", help="TorchServe's tokens (%(default)s)")
    parser.add_argument("--margin", type=float, default=0.01,
                        help="accuracy points (regression: fraction of the default's RMSE) the candidate may lose "
                             "(%(default)s)")
    parser.add_argument("--max-p99-increase", type=float, default=0.25,
                        help="fraction by which the candidate's p99 may exceed the default's (%(default)s)")
    parser.add_argument("--p99-floor-ms", type=float, default=5.0,
                        help="milliseconds of p99 increase always allowed: client-side timing noise (%(default)s)")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level of the paired test")
    parser.add_argument("--prometheus", metavar="URL", help="judge live traffic from this Prometheus instead")
    parser.add_argument("--window", default="5m", help="--prometheus: the range of live traffic (%(default)s)")
    parser.add_argument("--by", choices=("ModelVersion", "variant"), default="ModelVersion",
                        help="--prometheus: the label telling the versions apart (variant: the cluster's a/b)")
    parser.add_argument("--max-error-ratio-increase", type=float, default=0.0,
                        help="--prometheus: how much higher the candidate's error ratio may be (%(default)s)")
    return parser.parse_args(argv)


def run(args):
    task = promotion(args.model)
    if args.by == "variant":  # the cluster: A and B are two Deployments, and the HTTPRoute's weights promote B
        if not (args.prometheus and args.dry_run):
            raise BadInput("--by variant judges the cluster's variants from Prometheus: add --prometheus URL and "
                           "--dry-run (the HTTPRoute weights, which --k8s prints, are what promotes B)")
        default = "a"
    else:
        server = Server(args.inference, args.management, args.key_file)
        default = server.describe(args.model)["modelVersion"]
        server.describe(args.model, args.candidate)  # 404 -> BadInput
        if args.candidate == default:
            raise BadInput(f"{args.model} {args.candidate} is already the default version")
        examples = examples_for(task, server, args.model, (default, args.candidate), args.data)[:args.limit]
    source = PrometheusSource(args.prometheus, args.window, args.by) if args.prometheus else \
        HeldOutSource(server, task, examples)
    print(f"promote: {args.model} {args.candidate} (candidate) against {default} (default) on "
          f"{source.describe()}", flush=True)
    measured = source.observe(args.model, default, args.candidate)
    limits = Limits(args.margin, args.max_p99_increase, args.p99_floor_ms, args.alpha, args.max_error_ratio_increase)
    passed, gates = decide(measured.metrics, limits)
    failed = False
    if not passed:
        action = f"refused: nothing changed, the default stays {default}"
    elif args.dry_run:
        action = f"dry run: the gates pass, the default stays {default}"
    else:
        try:
            action = "promoted: " + set_default(server, args.model, args.candidate, examples[0])
        except PromotionFailed as err:
            failed, action = True, f"promotion FAILED after the gates passed: {err}"
    report = {"model": args.model, "default": default, "candidate": args.candidate,
              "decision": "pass" if passed else "refused", "action": action, "source": measured.source,
              "limits": asdict(limits), "metrics": measured.metrics, "gates": gates,
              "errors": {role: o.errors[:20] for role, o in measured.observations.items()}}
    rollout = passed and args.k8s and not failed
    if rollout:
        report["kubectl"] = kubectl_steps()
    stem = write_report(args.report, report)
    for gate in gates:
        verdict = {True: "pass", False: "FAIL", None: "skip"}[gate["passed"]]
        print(f"promote: gate {gate['gate']:8} {verdict}  {gate['found']}")
    print(f"promote: {action}\npromote: report {stem}.md (.json, .png)")
    if rollout:
        print("\nRollout in the cluster (B must serve the candidate, see k8s/README.md). After each step compare the "
              "variants, then write the same weights into k8s/40-httproute.yaml, or the next apply undoes them:")
        for step, command in report["kubectl"].items():
            print(f"  # {step}\n  {command}")
    return PROMOTION_FAILED if failed else 0 if passed else REFUSED


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except BadInput as err:
        print(f"promote: {err}", file=sys.stderr)
        return BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
