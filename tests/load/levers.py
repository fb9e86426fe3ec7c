"""One lever at a time: the mnist path (or the no-op ceiling) at a few concurrencies, with one setting changed.

    .venv/bin/python -m tests.load.levers                  # every variant below, ~6 min; bench_results/levers.json
    .venv/bin/python -m tests.load.levers batch-8 delay-1  # some of them
    .venv/bin/python -m tests.load.levers /path/to/handlers  # ours with the handler modules of that folder

Each variant is a tests.load.bench run of one path with one change against the shipped setup (HEAD's handlers,
handlers/mnist.yaml, config.properties): its own TorchServe, the same client, payloads and windows as `make bench`.
The results table is what docs/benchmark.md's "what each lever bought" section quotes.
"""

import json
import os
import sys
import tempfile
from pathlib import Path

from scripts.server import ROOT
from tests.load import bench

LEAN_LOG4J = f"-Dlog4j.configurationFile=file://{Path(__file__).resolve().parent / 'log4j2-lean.xml'}"
BEFORE = "2e5fdaf"  # handlers before the performance work (plain eager model, per-request post-processing)

VARIANTS = {  # name: (path, extra bench arguments, what changes, environment of TorchServe)
    "shipped": ("mnist", [], "handlers/mnist.py + handlers/mnist.yaml as shipped", {}),
    "handlers-before": ("mnist-baseline", ["--baseline", f"mnist={BEFORE}"],
                        f"handler code of {BEFORE}: eager NCHW model, per-item softmax, per-answer metric lines, "
                        "indent=2 JSON", {}),
    "delay-5": ("mnist", ["--model-config", "mnist.maxBatchDelay=5"], "maxBatchDelay 5 ms (before: 2)", {}),
    "delay-1": ("mnist", ["--model-config", "mnist.maxBatchDelay=1"], "maxBatchDelay 1 ms", {}),
    "batch-1": ("mnist", ["--model-config", "mnist.batchSize=1"], "no batching", {}),
    "batch-8": ("mnist", ["--model-config", "mnist.batchSize=8"], "batchSize 8", {}),
    "batch-32": ("mnist", ["--model-config", "mnist.batchSize=32"], "batchSize 32", {}),
    "workers-2": ("mnist", ["--model-config", "mnist.minWorkers=2"], "2 workers (1 torch thread each)", {}),
    "workers-2-batch-8": ("mnist", ["--model-config", "mnist.minWorkers=2", "--model-config", "mnist.batchSize=8"],
                          "2 workers, batchSize 8", {}),
    "threads-2": ("mnist", ["--model-config", "mnist.handler.torch_threads=2"], "2 torch threads in the one worker",
                  {}),
    "async-logging": ("mnist", ["--ts-config", "async_logging=true"], "config.properties async_logging=true", {}),
    "lean-log4j": ("mnist", ["--ts-config", f"vmargs={LEAN_LOG4J}"],
                   "tests/load/log4j2-lean.xml: every log record written once", {}),
    "ceiling": ("mnist-ceiling", [], "no-op handler, mnist's model-config", {}),
    "ceiling-batch-1": ("mnist-ceiling", ["--model-config", "mnist.batchSize=1"],
                        "no-op handler, no batching, 1 worker", {}),
    "ceiling-async-logging": ("mnist-ceiling", ["--ts-config", "async_logging=true"], "no-op handler, async_logging",
                              {}),
    "ceiling-lean-log4j": ("mnist-ceiling", ["--ts-config", f"vmargs={LEAN_LOG4J}"], "no-op handler, lean log4j2", {}),
    "stock": ("mnist-stock", [], "stock image_classifier handler, TorchServe defaults", {}),
    "stock-1-thread": ("mnist-stock", [], "stock handler with OMP_NUM_THREADS=1 (1 torch thread per worker)",
                       {"OMP_NUM_THREADS": "1"}),
}
USERS = "1,16,32"


def snapshot(folder):
    """A variant for a folder of handler modules (a state of handlers/ between commits): ours with that code."""
    return "mnist-baseline", ["--baseline", f"mnist={folder}"], f"handler code from {folder}", {}


def main(names):
    names = names or list(VARIANTS)
    results = {}
    with tempfile.TemporaryDirectory(prefix="levers-") as tmp:
        for name in names:
            path, extra, what, env = VARIANTS[name] if name in VARIANTS else snapshot(name)
            out = Path(tmp) / Path(name).name
            print(f"=== {name}: {what}", flush=True)
            saved = {key: os.environ.get(key) for key in env}
            os.environ.update(env)  # TorchServe inherits it
            try:
                bench.main(["--paths", path, "--users", USERS, "--no-client-ceiling", "--no-in-process",
                            "--no-runtimes", "--out", str(out), *extra])
            finally:
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
            data = json.loads((out / "benchmark.json").read_text())
            results[name] = {"what": what, "path": path, "args": extra, "env": env,
                             "server": data["paths"][path]["server"], "steps": data["paths"][path]["steps"],
                             "loadavg": [data["loadavg_before"], data["loadavg_after"]]}
    target = ROOT / "bench_results"
    target.mkdir(exist_ok=True)
    (target / "levers.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n| variant | users | req/s | p50 ms | p99 ms | server CPU µs/req | others CPU |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for name, result in results.items():
        for s in result["steps"]:
            print(f"| {name} | {s['users']} | {s['rps']:.0f} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | "
                  f"{s['server_cpu_us_per_req']:.0f} | {s['others_cpu_pct']:.0f}% |")
    print(f"\nwrote {target / 'levers.json'}")


if __name__ == "__main__":
    main(sys.argv[1:])
