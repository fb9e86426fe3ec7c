"""Serving benchmark (`make bench`): our mnist path against TorchServe's own ceiling and its stock handler.

    .venv/bin/python -m tests.load.bench                      # everything, ~4 min; writes docs/benchmark.{json,png}
    .venv/bin/python -m tests.load.bench --paths ours --users 16 --model-config batchSize=8 --out bench_results/b8

One run measures, on this machine, with the same load generator (tests/load/client.py: closed-loop users on
keep-alive connections) and the same weights:

  ceiling          a no-op handler (tests/load/noop_handler.py) with mnist's model-config: TorchServe's own cost
                   per request when the worker round trip is shared by a batch, as ours is
  ceiling-unbatched  the same no-op with TorchServe's defaults (batchSize 1, one worker per core): the server's
                   ceiling for one request at a time, the stock handler's own upper bound
  stock            the mnist weights behind TorchServe's stock image_classifier handler, default settings
                   (tests/load/stock_handler.py: batchSize 1, one worker per core, no model-config.yaml)
  ours             model_store/mnist.mar: handlers/mnist.py with handlers/mnist.yaml
  sentiment        model_store/sentiment.mar: handlers/sentiment.py with handlers/sentiment.yaml
  sentiment-naive  the same sentiment model behind a per-request handler, batching off (naive_sentiment.py)
  fashion          model_store/fashion.mar: handlers/vision.py with handlers/vision.yaml; the run also measures
                   the same archive in-process (tests/worker.py: TorchServe's loader, the handler's entry point, no
                   server) at its batch size, this model's own ceiling on this machine
  fashion-stock    the fashion weights behind TorchServe's stock image_classifier handler, default settings
                   (tests/load/stock_fashion_handler.py)
  detector         model_store/detector.mar: handlers/detector.py with handlers/detector.yaml; measured in-process
                   too, as fashion is
  baseline         only with --baseline-rev REV: ours built from the handler code of git revision REV (same weights,
                   same handlers/mnist.yaml), measured in the same run as ours, so a code change is judged side by
                   side rather than against figures from another run
  sentiment-baseline  only with --sentiment-baseline MAR: another sentiment archive (e.g. one an older revision
                   built, with its own model and handler code), measured next to sentiment; its replies are checked
                   for form only, since another model may label a review otherwise

Each path gets its own TorchServe (config.properties, token auth on, only that model loaded), a short warm-up,
then a measurement window at each concurrency. Digit paths send the same held-out PNGs (28 px white-on-black and
64 px dark-on-light); sentiment paths send held-out reviews; fashion paths send Fashion-MNIST test images as 28 px
grey PNGs and 128 px RGB PNGs; the detector path sends held-out composed images (128 px PNG, 320x240 JPEG). Every
reply is checked (tests/load/checks.py): our paths must give the known label (the detector: objects found, boxes
and masks in the image's frame); a wrong answer or non-200 counts as a failed request. Before the paths, the
client is measured against a fixed-reply server (its own ceiling), and every step reports the CPU used by the
client, by the TorchServe process group and by everything else on the machine.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from scripts.server import ROOT, TorchServe, free_port
from tests.load import checks, client, payloads

HERE = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
USERS = (1, 4, 16, 32)
DIGIT_RENDERINGS = ("digit-28px", "digit-64px-paper")
TARGETS = {"ours_vs_ceiling": 0.5, "ours_vs_stock": 2.5, "p99_ms": 100.0, "failed": 0}
MARK_BEGIN, MARK_END = "<!-- bench:begin -->", "<!-- bench:end -->"


@dataclass
class BenchPath:
    name: str
    model: str  # the model name it is served under
    samples: str  # the model whose load-test payloads it sends: "mnist" or "sentiment"
    check: object
    description: str


PATHS = {
    "ceiling": BenchPath("ceiling", "noop", "mnist", checks.check_noop,
                         "no-op handler, mnist's model-config: TorchServe's own cost per request"),
    "ceiling-unbatched": BenchPath("ceiling-unbatched", "noop_defaults", "mnist", checks.check_noop,
                                   "no-op handler, TorchServe defaults (batchSize 1, a worker per core)"),
    "stock": BenchPath("stock", "mnist_stock", "mnist", checks.check_stock_mnist,
                       "mnist weights, stock image_classifier handler, TorchServe defaults"),
    "ours": BenchPath("ours", "mnist", "mnist", checks.check_mnist,
                      "handlers/mnist.py with handlers/mnist.yaml (model_store/mnist.mar)"),
    "sentiment": BenchPath("sentiment", "sentiment", "sentiment", checks.check_sentiment,
                           "handlers/sentiment.py with handlers/sentiment.yaml (model_store/sentiment.mar)"),
    "sentiment-naive": BenchPath("sentiment-naive", "sentiment_naive", "sentiment", checks.check_sentiment,
                                 "same sentiment model, per-request handler, batching off, TorchServe defaults"),
    "fashion": BenchPath("fashion", "fashion", "fashion", checks.check_fashion,
                         "handlers/vision.py with handlers/vision.yaml (model_store/fashion.mar)"),
    "fashion-stock": BenchPath("fashion-stock", "fashion_stock", "fashion", checks.check_stock_fashion,
                               "fashion weights, stock image_classifier handler, TorchServe defaults"),
    "detector": BenchPath("detector", "detector", "detector", checks.check_detector,
                          "handlers/detector.py with handlers/detector.yaml (model_store/detector.mar)"),
    "baseline": BenchPath("baseline", "mnist", "mnist", checks.check_mnist,
                          "ours with the handler code of --baseline-rev, the working tree's handlers/mnist.yaml"),
    "sentiment-baseline": BenchPath("sentiment-baseline", "sentiment", "sentiment",
                                    lambda body, expected=None: checks.check_sentiment(body),
                                    "the sentiment archive given by --sentiment-baseline (replies checked for form)"),
}
BASELINES = {"baseline": ("ours", "baseline_rev", "--baseline-rev REV"),
             "sentiment-baseline": ("sentiment", "sentiment_baseline", "--sentiment-baseline MAR")}
"""Paths measured only when asked for: {path: (the path it is measured next to, its option's dest, the option)}."""
DEFAULT_PATHS = [name for name in PATHS if name not in BASELINES]
IN_PROCESS = {"fashion": "vision", "detector": "detector"}
"""Paths whose archive is also measured in-process ({path: its model-config in handlers/})."""
FASHION_TARGETS = {"vs_in_process": 0.7, "vs_stock": 5.0, "p99_ms": 100.0, "failed": 0}


# --- archives ------------------------------------------------------------------------------------------------------

def archiver(store, model, handler, *, version="1.0", serialized=None, model_file=None, extra=None, config=None):
    command = [str(VENV_BIN / "torch-model-archiver"), "--force", "--model-name", model, "--version", version,
               "--handler", str(handler), "--export-path", str(store)]
    for flag, value in (("--serialized-file", serialized), ("--model-file", model_file),
                        ("--extra-files", extra), ("--config-file", config)):
        if value:
            command += [flag, str(value)]
    subprocess.run(command, check=True, cwd=ROOT)
    return f"{model}.mar"


def staged_extra(staging, *files, packages=("handlers", "models")):
    """A folder holding the ``packages`` (default handlers/ and models/) and ``files`` (artifact files), as archive.sh stages
    them."""
    extra = Path(tempfile.mkdtemp(dir=staging))
    for package in packages:
        shutil.copytree(ROOT / package, extra / package, ignore=shutil.ignore_patterns("__pycache__", "*.yaml"))
    for file in files:
        shutil.copy(file, extra)
    return extra


def model_config(name, overrides):
    """handlers/<name>.yaml with ``overrides`` ({key: value}; "handler.torch_threads" reaches into handler:)."""
    config = yaml.safe_load((ROOT / "handlers" / f"{name}.yaml").read_text())
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return config


def build_mnist(store, staging, overrides, rev=None):
    """mnist.mar from handlers/ and artifacts/mnist as archive.sh builds it, with handlers/mnist.yaml changed by
    ``overrides``; with the handler code of git revision (or folder) ``rev`` if given, to measure a code change."""
    folder = ROOT / "artifacts/mnist"
    files = [f for f in folder.iterdir() if f.name != "model.pt"]
    extra = staged_extra(staging, *files)
    handler = ROOT / "handlers/mnist.py"
    if rev and Path(rev).is_dir():  # a folder of handler modules (e.g. a snapshot between two commits)
        for module in Path(rev).glob("*.py"):
            shutil.copy(module, extra / "handlers")
        handler = extra / "handlers" / "mnist.py"
    elif rev:
        names = subprocess.run(["git", "ls-tree", "--name-only", rev, "handlers/"], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout.split()
        for name in (n for n in names if n.endswith(".py")):
            shown = subprocess.run(["git", "show", f"{rev}:{name}"], cwd=ROOT, check=True, capture_output=True)
            (extra / "handlers" / Path(name).name).write_bytes(shown.stdout)
        handler = extra / "handlers" / "mnist.py"
    config = Path(staging) / "mnist.yaml"  # the working tree's model-config: only the code differs
    config.write_text(yaml.safe_dump(model_config("mnist", overrides)))
    return archiver(store, "mnist", handler, serialized=folder / "model.pt", extra=extra, config=config)


def build_archive(path, store, staging, mnist_overrides, ours_archive=None, ours_rev=None, baseline_rev=None,
                  sentiment_baseline=None):
    """The .mar file name of ``path`` in ``store``, built or copied there."""
    if path.name == "baseline":
        return build_mnist(store, staging, mnist_overrides, baseline_rev)
    if path.name == "sentiment-baseline":
        shutil.copy(sentiment_baseline, Path(store) / "sentiment.mar")
        return "sentiment.mar"
    if path.name == "ceiling":
        config = Path(staging) / "noop.yaml"
        config.write_text(yaml.safe_dump(model_config("mnist", mnist_overrides)))
        return archiver(store, "noop", HERE / "noop_handler.py", config=config)
    if path.name == "ceiling-unbatched":
        return archiver(store, "noop_defaults", HERE / "noop_handler.py")
    if path.name == "stock":
        return archiver(store, "mnist_stock", HERE / "stock_handler.py", serialized=ROOT / "artifacts/mnist/model.pt",
                        model_file=HERE / "stock_model.py", extra=staged_extra(staging))
    if path.name == "fashion-stock":
        folder = ROOT / payloads.FASHION_ARTIFACT
        labels = json.loads((folder / "manifest.json").read_text())["labels"]
        index_to_name = Path(staging) / "index_to_name.json"
        index_to_name.write_text(json.dumps({str(i): label for i, label in enumerate(labels)}))
        return archiver(store, "fashion_stock", HERE / "stock_fashion_handler.py", serialized=folder / "model.pt",
                        model_file=HERE / "stock_fashion_model.py",
                        extra=staged_extra(staging, folder / "manifest.json", index_to_name,
                                           packages=("handlers", "models")))
    if path.name == "sentiment-naive":
        folder = ROOT / "artifacts/sentiment"
        return archiver(store, "sentiment_naive", HERE / "naive_sentiment.py", serialized=folder / "model.pt",
                        extra=staged_extra(staging, folder / "manifest.json", folder / "vocab.json"))
    stem = path.model
    if path.name == "ours" and ours_archive:
        shutil.copy(ours_archive, Path(store) / "mnist.mar")
        return "mnist.mar"
    if path.name == "ours" and (mnist_overrides or ours_rev):  # a variant: archive.sh's recipe, other yaml/code
        return build_mnist(store, staging, mnist_overrides, ours_rev)
    source = ROOT / "model_store" / f"{stem}.mar"
    if not source.exists():
        raise SystemExit(f"{source} not found: run `make archive` first")
    shutil.copy(source, Path(store) / f"{stem}.mar")
    return f"{stem}.mar"


# --- the machine ---------------------------------------------------------------------------------------------------

def loadavg():
    with open("/proc/loadavg") as f:
        return [float(v) for v in f.read().split()[:3]]


def machine():
    import torch
    import ts

    cpu_model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                     platform.processor())
    memory_kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return {"cores": os.cpu_count(), "cpu": cpu_model, "memory_gib": round(memory_kb / 2**20, 1),
            "python": platform.python_version(), "torch": torch.__version__, "torchserve": ts.__version__,
            "torch_default_threads": torch.get_num_threads(), "kernel": platform.release()}


def served(server, path, mnist_overrides):
    """What TorchServe runs for ``path``: workers, batch size and delay, each worker's torch threads."""
    described = server.management("GET", f"/models/{path.model}").json()[0]
    threads = []
    for worker in described.get("workers", []):
        try:
            environ = Path(f"/proc/{worker['pid']}/environ").read_bytes().split(b"\0")
            omp = next((v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"OMP_NUM_THREADS=")), None)
        except OSError:
            omp = None
        threads.append(omp)
    if path.name in ("ours", "baseline", "ceiling"):
        torch_threads = model_config("mnist", mnist_overrides).get("handler", {}).get("torch_threads")
    elif path.name in ("sentiment", *IN_PROCESS):
        config = IN_PROCESS.get(path.name, path.name)
        torch_threads = model_config(config, {}).get("handler", {}).get("torch_threads")
    else:
        torch_threads = None
    if torch_threads is None:
        torch_threads = (f"OMP_NUM_THREADS={threads[0]}" if threads and threads[0]
                         else f"torch default ({os.cpu_count()} here)")
    return {"workers": len(described.get("workers", [])), "batch_size": described.get("batchSize"),
            "max_batch_delay_ms": described.get("maxBatchDelay"), "torch_threads": torch_threads}


# --- measuring -----------------------------------------------------------------------------------------------------

def measure_client(requests_for, users, seconds):
    """The client against a fixed-reply server (tests/load/client.py --dummy-server): its own ceiling."""
    port = free_port()
    dummy = subprocess.Popen([sys.executable, "-m", "tests.load.client", "--dummy-server", str(port)], cwd=ROOT,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                client.socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                time.sleep(0.1)
        requests = requests_for("127.0.0.1", port, "/predictions/noop", checks.check_noop, "0" * 32)
        return [client.run("127.0.0.1", port, requests, n, seconds, warmup=0.5, server_pgid=dummy.pid).summary()
                for n in users]
    finally:
        os.killpg(dummy.pid, 9)
        dummy.wait()


def measure_path(path, store, archive, workdir, samples, users, seconds, warmup, ts_overrides, mnist_overrides,
                 log):
    overrides = {"grpc_inference_port": free_port(), "grpc_management_port": free_port(),
                 # worker sockets are /tmp/.ts.sock.<port>: a base of its own, away from other TorchServes' 9000+
                 "initial_worker_port": free_port(), **ts_overrides}
    server = TorchServe(Path(workdir) / path.name, model_store=store, models=f"{path.model}={archive}",
                        overrides=overrides)
    try:
        started = time.monotonic()
        server.start(expect_ready=1)
        log(f"[{path.name}] TorchServe ready in {time.monotonic() - started:.1f} s")
        port = server.ports["inference"]
        requests = client.prepare("127.0.0.1", port, f"/predictions/{path.model}", samples, path.check,
                                  server.token("inference"))
        setup = served(server, path, mnist_overrides)
        warm = client.run("127.0.0.1", port, requests, max(users), warmup, warmup=0.0)  # JIT, caches; discarded
        if warm.failed:
            log(f"[{path.name}] warm-up failures: {warm.errors}")
        steps = []
        for n in users:
            result = client.run("127.0.0.1", port, requests, n, seconds, warmup=1.0, server_pgid=server.process.pid,
                                keep_answers=True)
            step = result.summary()
            if result.answers and path.check is not checks.check_noop:  # the no-op's reply has no label
                correct = sum(str(expected) == str(answer) for expected, answer in result.answers)
                step["label_accuracy"] = round(correct / len(result.answers), 4)
            step["loadavg"] = loadavg()[0]
            steps.append(step)
            log(f"[{path.name}] {n:>3} users: {step['rps']:>7.1f} req/s  p50 {step['p50_ms']:6.2f}  "
                f"p95 {step['p95_ms']:6.2f}  p99 {step['p99_ms']:6.2f} ms  failed {step['failed']}  "
                f"client {step['client_cpu_pct']}%  server {step['server_cpu_pct']}% (workers "
                f"{step['worker_cpu_pct']}%, {step['worker_cpu_us_per_req']:.0f} µs/req)  "
                f"others {step['others_cpu_pct']}%")
        description = path.description
        if path.name in ("ours", "ceiling") and mnist_overrides:
            description += f"; model-config changed: {mnist_overrides}"
        if ts_overrides:
            description += f"; config.properties changed: {ts_overrides}"
        return {"description": description, "server": setup, "steps": steps}
    finally:
        server.stop()
        if server.process is not None:  # workers left behind by a TorchServe that exited on its own
            try:
                os.killpg(server.process.pid, 9)
            except ProcessLookupError:
                pass


def measure_in_process(stem, samples, batch_size, seconds, log):
    """Requests per second of model_store/<stem>.mar in this process, batches of ``batch_size`` samples through
    what a worker runs per batch (tests/worker.py: TorchServe's input decoding, the handler, its reply encoding),
    with the archive's model-config (torch threads included): the model and handler code's own ceiling."""
    from tests.worker import Request, Worker

    with tempfile.TemporaryDirectory(prefix=f"inprocess-{stem}-") as unpack:
        worker = Worker(ROOT / "model_store" / f"{stem}.mar", unpack, batch_size)
        batches = [[Request(s.body, s.content_type) for s in samples[i : i + batch_size]]
                   for i in range(0, len(samples) - batch_size + 1, batch_size)]
        for batch in batches[:3]:  # warm-up: oneDNN picks its kernels
            worker.run(*batch)
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            replies = worker.run(*batches[done // batch_size % len(batches)])
            if any(reply.status != 200 for reply in replies):
                raise RuntimeError(f"in-process {stem}: {[r.body for r in replies if r.status != 200][:1]}")
            done += len(replies)
        elapsed = time.perf_counter() - started
        threads = worker.handler.threads
    step = {"batch_size": batch_size, "requests": done, "rps": round(done / elapsed, 1), "torch_threads": threads,
            "loadavg": loadavg()[0]}
    log(f"[{stem} in-process] batches of {batch_size}: {step['rps']:.1f} req/s with {threads} torch thread(s)")
    return step


def at(results, name, users):
    steps = results["paths"].get(name, {}).get("steps", [])
    return next((s for s in steps if s["users"] == users), None)


def ratio_targets_met(out, bounds):
    """{"<ratio> >= <bound>": met} for each ratio of ``bounds`` that was measured (both of its paths ran)."""
    return {f"{key} >= {bound}": out[key] >= bound for key, bound in bounds.items() if key in out}


def ratios(results, users=16):
    ours, ceiling, stock = (at(results, n, users) for n in ("ours", "ceiling", "stock"))
    sentiment, naive = at(results, "sentiment", users), at(results, "sentiment-naive", users)
    out = {"users": users}
    if ours and ceiling:
        out["ours_vs_ceiling"] = round(ours["rps"] / ceiling["rps"], 3)
    if ours and stock:
        out["ours_vs_stock"] = round(ours["rps"] / stock["rps"], 2)
    unbatched = at(results, "ceiling-unbatched", users)
    if ours and unbatched:
        out["ours_vs_ceiling_unbatched"] = round(ours["rps"] / unbatched["rps"], 3)
    if stock and ceiling:
        out["stock_vs_ceiling"] = round(stock["rps"] / ceiling["rps"], 3)
    if stock and unbatched:
        out["stock_vs_ceiling_unbatched"] = round(stock["rps"] / unbatched["rps"], 3)
    if sentiment and naive:
        out["sentiment_vs_naive"] = round(sentiment["rps"] / naive["rps"], 2)
    baseline = at(results, "baseline", users)
    if ours and baseline:
        out["ours_vs_baseline"] = round(ours["rps"] / baseline["rps"], 3)
    sentiment_baseline = at(results, "sentiment-baseline", users)
    if sentiment and sentiment_baseline:
        out["sentiment_vs_baseline"] = round(sentiment["rps"] / sentiment_baseline["rps"], 3)
    for name in IN_PROCESS:
        served_step, in_process = at(results, name, users), results.get("in_process", {}).get(name)
        if served_step and in_process:
            out[f"{name}_vs_in_process"] = round(served_step["rps"] / in_process["rps"], 3)
    fashion, fashion_stock = at(results, "fashion", users), at(results, "fashion-stock", users)
    if fashion and fashion_stock:
        out["fashion_vs_stock"] = round(fashion["rps"] / fashion_stock["rps"], 2)
    if fashion:
        out["fashion_p99_ms"], out["fashion_failed"] = fashion["p99_ms"], fashion["failed"]
        out["fashion_targets_met"] = {
            **ratio_targets_met(out, {"fashion_vs_in_process": FASHION_TARGETS["vs_in_process"],
                                      "fashion_vs_stock": FASHION_TARGETS["vs_stock"]}),
            "fashion p99 <= 100 ms": fashion["p99_ms"] <= FASHION_TARGETS["p99_ms"],
            "fashion: zero failed requests": fashion["failed"] == FASHION_TARGETS["failed"],
        }
    if ours:
        out["ours_p99_ms"] = ours["p99_ms"]
        out["ours_failed"] = ours["failed"]
        out["targets_met"] = {
            **ratio_targets_met(out, {key: TARGETS[key] for key in ("ours_vs_ceiling", "ours_vs_stock")}),
            "p99 <= 100 ms": ours["p99_ms"] <= TARGETS["p99_ms"],
            "zero failed requests": ours["failed"] == 0,
        }
    return out


# --- reports -------------------------------------------------------------------------------------------------------

def table(results):
    lines = ["| path | users | req/s | p50 ms | p95 ms | p99 ms | failed | client CPU | server CPU (workers) | "
             "worker µs/req | others CPU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, path in results["paths"].items():
        for s in path["steps"]:
            lines.append(f"| {name} | {s['users']} | {s['rps']:.0f} | {s['p50_ms']:.1f} | {s['p95_ms']:.1f} | "
                         f"{s['p99_ms']:.1f} | {s['failed']} | {s['client_cpu_pct']:.0f}% | "
                         f"{s['server_cpu_pct']:.0f}% ({s['worker_cpu_pct']:.0f}%) | {s['worker_cpu_us_per_req']:.0f} | "
                         f"{s['others_cpu_pct']:.0f}% |")
    r = results["ratios"]
    lines.append("")
    summary = [f"At {r['users']} users:"]
    for key, label in (("ours_vs_baseline", "ours ÷ baseline"),
                       ("ours_vs_ceiling", "ours ÷ ceiling"), ("ours_vs_ceiling_unbatched", "ours ÷ ceiling-unbatched"),
                       ("ours_vs_stock", "ours ÷ stock"), ("stock_vs_ceiling", "stock ÷ ceiling"),
                       ("stock_vs_ceiling_unbatched", "stock ÷ ceiling-unbatched"),
                       ("sentiment_vs_naive", "sentiment ÷ naive"),
                       ("sentiment_vs_baseline", "sentiment ÷ sentiment-baseline"),
                       ("fashion_vs_in_process", "fashion ÷ in-process"), ("fashion_vs_stock", "fashion ÷ stock"),
                       ("detector_vs_in_process", "detector ÷ in-process")):
        if key in r:
            summary.append(f"{label} **{r[key]}**;")
    if "ours_p99_ms" in r:
        summary.append(f"ours p99 {r['ours_p99_ms']} ms, {r['ours_failed']} failed requests.")
    if "fashion_p99_ms" in r:
        summary.append(f"fashion p99 {r['fashion_p99_ms']} ms, {r['fashion_failed']} failed requests.")
    lines.append(" ".join(summary))
    for key in ("targets_met", "fashion_targets_met"):
        if key in r:
            lines.append("Targets: " + ", ".join(f"{k} {'✔' if v else '✘'}" for k, v in r[key].items()) + ".")
    for stem, step in results.get("in_process", {}).items():
        lines.append(f"In-process {stem} (same archive and handler code, no server): {step['rps']:.0f} req/s in "
                     f"batches of {step['batch_size']}, {step['torch_threads']} torch thread(s).")
    m, c = results["machine"], results.get("client_ceiling") or []
    lines.append("")
    lines.append(f"Machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, Python {m['python']}, "
                 f"torch {m['torch']}, TorchServe {m['torchserve']}; load average {results['loadavg_before']} "
                 f"before, {results['loadavg_after']} after.")
    for name, path in results["paths"].items():
        s = path["server"]
        lines.append(f"- {name}: {s['workers']} worker(s), batchSize {s['batch_size']}, maxBatchDelay "
                     f"{s['max_batch_delay_ms']} ms, torch threads {s['torch_threads']} — {path['description']}")
    if c:
        best = max(c, key=lambda s: s["rps"])
        lines.append(f"- client: one thread, {best['client_cpu_us_per_req']:.0f} µs CPU per request; against a "
                     f"fixed-reply server it reached {best['rps']:.0f} req/s at {best['users']} users.")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, (name, data) in enumerate(results["paths"].items()):
        steps = data["steps"]
        colour = f"C{i}"
        rps = [s["rps"] for s in steps]
        ax.plot(rps, [s["p50_ms"] for s in steps], "o-", color=colour, label=f"{name} p50")
        ax.plot(rps, [s["p99_ms"] for s in steps], "s--", color=colour, alpha=0.6, label=f"{name} p99")
        for s in steps:
            ax.annotate(str(s["users"]), (s["rps"], s["p50_ms"]), textcoords="offset points", xytext=(4, -10),
                        fontsize=7, color=colour)
    ax.set_yscale("log")
    ax.set_xlabel("throughput (req/s)")
    ax.set_ylabel("latency (ms, log scale)")
    m = results["machine"]
    ax.set_title(f"Latency against throughput, closed-loop users (numbers: users)\n"
                 f"{m['cores']} cores, torch {m['torch']}, TorchServe {m['torchserve']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def update_doc(doc, text):
    """Replace the text between the bench markers of ``doc`` (docs/benchmark.md), if it has them."""
    if not doc.exists():
        return False
    content = doc.read_text()
    if MARK_BEGIN not in content or MARK_END not in content:
        return False
    head, rest = content.split(MARK_BEGIN, 1)
    _, tail = rest.split(MARK_END, 1)
    doc.write_text(f"{head}{MARK_BEGIN}\n{text}\n{MARK_END}{tail}")
    return True


def parse_assignments(items):
    """["batchSize=8", "handler.torch_threads=2"] -> {"batchSize": 8, ...} (values parsed as YAML scalars)."""
    out = {}
    for item in items or []:
        key, _, value = item.partition("=")
        out[key.strip()] = yaml.safe_load(value)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--paths", default=",".join(DEFAULT_PATHS),
                        help=f"comma-separated, of {', '.join(PATHS)} (default: all but baseline, which "
                             "--baseline-rev adds)")
    parser.add_argument("--users", default=",".join(map(str, USERS)), help="concurrencies (default 1,4,16,32)")
    parser.add_argument("--seconds", type=float, default=4.0, help="measurement window per concurrency")
    parser.add_argument("--warmup", type=float, default=10.0,
                        help="seconds of load before a path's first window (the JVM's JIT settles in ~20 s)")
    parser.add_argument("--model-config", action="append", metavar="KEY=VALUE",
                        help="override handlers/mnist.yaml for ours and the ceiling, e.g. batchSize=8")
    parser.add_argument("--ts-config", action="append", metavar="KEY=VALUE",
                        help="override config.properties for every path, e.g. async_logging=true")
    parser.add_argument("--ours-archive", help="serve this .mar as ours instead of model_store/mnist.mar")
    parser.add_argument("--ours-rev", help="build ours with the handler code of this git revision (e.g. 2e5fdaf) or "
                                           "folder of handler modules, and the working tree's handlers/mnist.yaml")
    parser.add_argument("--baseline-rev", help="also measure the baseline path: ours with the handler code of this "
                                               "git revision, next to ours in the same run")
    parser.add_argument("--sentiment-baseline", metavar="MAR",
                        help="also measure the sentiment-baseline path: this sentiment archive, next to sentiment")
    parser.add_argument("--out", default="docs", help="folder for benchmark.json and benchmark.png (default docs/)")
    parser.add_argument("--no-client-ceiling", action="store_true", help="skip measuring the client on its own")
    parser.add_argument("--no-runtimes", action="store_true",
                        help="skip mnist's runtime comparison (eager, TorchScript, ONNX Runtime; tests/load/runtimes.py)")
    args = parser.parse_args(argv)

    names = [n.strip() for n in args.paths.split(",") if n.strip()]
    for baseline, (next_to, dest, option) in BASELINES.items():
        if getattr(args, dest) and baseline not in names:
            names.insert(names.index(next_to) + 1 if next_to in names else len(names), baseline)
        if baseline in names and not getattr(args, dest):
            parser.error(f"the {baseline} path needs {option}")
    if args.sentiment_baseline and not Path(args.sentiment_baseline).is_file():
        parser.error(f"--sentiment-baseline {args.sentiment_baseline}: no such file")
    unknown = [n for n in names if n not in PATHS]
    if unknown:
        parser.error(f"unknown paths {unknown}; choose from {list(PATHS)}")
    users = [int(u) for u in args.users.split(",")]
    mnist_overrides = parse_assignments(args.model_config)
    ts_overrides = {k: str(v).lower() if isinstance(v, bool) else str(v)
                    for k, v in parse_assignments(args.ts_config).items()}
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)

    def log(message):
        print(message, flush=True)

    began = time.monotonic()
    before = loadavg()
    if before[0] > 0.5:
        log(f"warning: load average {before} - other work on this machine will show in the figures "
            "(see each step's 'others CPU')")
    builders = {"mnist": lambda: payloads.digits(DIGIT_RENDERINGS), "sentiment": payloads.reviews,
                "fashion": lambda: payloads.fashion(payloads.BENCH_FASHION_RENDERINGS), "detector": payloads.detector}
    needed = {PATHS[name].samples for name in names} | (set() if args.no_client_ceiling else {"mnist"})
    sample_sets = {kind: build() for kind, build in builders.items() if kind in needed}  # only what the paths send
    results = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), "loadavg_before": before,
               "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
               "settings": {"users": users, "seconds": args.seconds, "warmup": args.warmup,
                            "model_config_overrides": mnist_overrides, "ts_config_overrides": ts_overrides,
                            "ours_archive": args.ours_archive, "ours_rev": args.ours_rev,
                            "baseline_rev": args.baseline_rev, "sentiment_baseline": args.sentiment_baseline,
                            "digit_payloads": list(DIGIT_RENDERINGS),
                            "samples": {k: len(v) for k, v in sample_sets.items()}},
               "paths": {}}

    if not args.no_client_ceiling:
        def requests_for(host, port, url, check, token):
            return client.prepare(host, port, url, sample_sets["mnist"], check, token)

        results["client_ceiling"] = measure_client(requests_for, [16, 32], 2.0)
        for step in results["client_ceiling"]:
            log(f"[client] {step['users']:>3} users against a fixed-reply server: {step['rps']:.0f} req/s, "
                f"{step['client_cpu_us_per_req']:.0f} µs client CPU per request")

    results["in_process"] = {}
    for name in (n for n in names if n in IN_PROCESS):  # before any server, on the quietest machine this run will see
        batch_size = model_config(IN_PROCESS[name], {})["batchSize"]
        results["in_process"][name] = measure_in_process(PATHS[name].model, sample_sets[name], batch_size,
                                                         args.seconds, log)

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        staging = Path(tmp) / "staging"
        staging.mkdir()
        for name in names:
            path = PATHS[name]
            store = Path(tmp) / "store" / name  # a store per path: ours and baseline are both mnist.mar
            store.mkdir(parents=True)
            archive = build_archive(path, store, staging, mnist_overrides, args.ours_archive, args.ours_rev,
                                    args.baseline_rev, args.sentiment_baseline)
            results["paths"][name] = measure_path(path, store, archive, tmp, sample_sets[path.samples], users,
                                                  args.seconds, args.warmup, ts_overrides, mnist_overrides, log)
    if not args.no_runtimes:
        from tests.load import runtimes  # it builds on this module

        results["runtimes"] = runtimes.compare(users=(1, 16), seconds=args.seconds, warmup=min(args.warmup, 5.0),
                                               log=log)
    results["loadavg_after"] = loadavg()
    results["ratios"] = ratios(results)
    results["duration_s"] = round(time.monotonic() - began, 1)

    report = table(results)
    if "runtimes" in results:
        from tests.load import runtimes

        report += "\n\nmnist by runtime (`handler.runtime`, same handler code):\n\n" + runtimes.table(results["runtimes"])
    (out / "benchmark.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    plot(results, out / "benchmark.png")
    updated = update_doc(out / "benchmark.md", report)
    print("\n" + report + "\n")
    log(f"wrote {out / 'benchmark.json'}, {out / 'benchmark.png'}"
        + (f", table in {out / 'benchmark.md'}" if updated else "") + f" ({results['duration_s']} s)")


if __name__ == "__main__":
    main()
