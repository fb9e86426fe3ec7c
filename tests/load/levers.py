"""One lever at a time: the mnist path (or the no-op ceiling) at a few concurrencies, with one setting changed.

    .venv/bin/python -m tests.load.levers                  # every variant below, ~6 min; bench_results/levers.json
    .venv/bin/python -m tests.load.levers batch-8 delay-1  # some of them

Each variant is a tests.load.bench run of one path with one change against the shipped setup (HEAD's handlers,
handlers/mnist.yaml, config.properties): its own TorchServe, the same client, payloads and windows as `make bench`.
The results table is what docs/benchmark.md's "what each lever bought" section quotes.
"""

import json
import sys
import tempfile
from pathlib import Path

from scripts.server import ROOT
from tests.load import bench

LEAN_LOG4J = f"-Dlog4j.configurationFile=file://{Path(__file__).resolve().parent / 'log4j2-lean.xml'}"
BEFORE = "2e5fdaf"  # handlers before the performance work (plain eager model, per-request post-processing)

VARIANTS = {  # name: (path, extra bench arguments, what changes)
    "shipped": ("ours", [], "handlers/mnist.py + handlers/mnist.yaml as shipped"),
    "handlers-before": ("ours", ["--ours-rev", BEFORE], f"handlers of {BEFORE}: eager NCHW model, per-item softmax, "
                                                        "per-answer metric lines, indent=2 JSON"),
    "batch-1": ("ours", ["--model-config", "batchSize=1"], "no batching"),
    "batch-8": ("ours", ["--model-config", "batchSize=8"], "batchSize 8"),
    "batch-32": ("ours", ["--model-config", "batchSize=32"], "batchSize 32"),
    "delay-1": ("ours", ["--model-config", "maxBatchDelay=1"], "maxBatchDelay 1 ms"),
    "delay-20": ("ours", ["--model-config", "maxBatchDelay=20"], "maxBatchDelay 20 ms"),
    "workers-2": ("ours", ["--model-config", "minWorkers=2"], "2 workers (1 torch thread each)"),
    "threads-2": ("ours", ["--model-config", "handler.torch_threads=2"], "2 torch threads in the one worker"),
    "async-logging": ("ours", ["--ts-config", "async_logging=true"], "config.properties async_logging=true"),
    "lean-log4j": ("ours", ["--ts-config", f"vmargs={LEAN_LOG4J}"],
                   "tests/load/log4j2-lean.xml: every log record written once"),
    "ceiling": ("ceiling", [], "no-op handler, mnist's model-config"),
    "ceiling-batch-1": ("ceiling", ["--model-config", "batchSize=1"], "no-op handler, no batching"),
    "ceiling-lean-log4j": ("ceiling", ["--ts-config", f"vmargs={LEAN_LOG4J}"], "no-op handler, lean log4j2"),
}
USERS = "1,16,32"


def main(names):
    names = names or list(VARIANTS)
    results = {}
    with tempfile.TemporaryDirectory(prefix="levers-") as tmp:
        for name in names:
            path, extra, what = VARIANTS[name]
            out = Path(tmp) / name
            print(f"=== {name}: {what}", flush=True)
            bench.main(["--paths", path, "--users", USERS, "--no-client-ceiling",
                        "--out", str(out), *extra])
            data = json.loads((out / "benchmark.json").read_text())
            results[name] = {"what": what, "path": path, "args": extra,
                             "server": data["paths"][path]["server"], "steps": data["paths"][path]["steps"],
                             "loadavg": [data["loadavg_before"], data["loadavg_after"]]}
    target = ROOT / "bench_results"
    target.mkdir(exist_ok=True)
    (target / "levers.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n| variant | users | req/s | p50 ms | p99 ms | server CPU µs/req | others CPU |\n|---|---:|---:|---:|---:|---:|---:|")
    for name, result in results.items():
        for s in result["steps"]:
            print(f"| {name} | {s['users']} | {s['rps']:.0f} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | "
                  f"{s['server_cpu_us_per_req']:.0f} | {s['others_cpu_pct']:.0f}% |")
    print(f"\nwrote {target / 'levers.json'}")


if __name__ == "__main__":
    main(sys.argv[1:])
