"""Runtime comparison of a model (part of `make bench`): eager, TorchScript, ONNX Runtime and AOTInductor behind the
same handler.

    .venv/bin/python -m tests.load.runtimes                      # the registry's first model, ~2 min
    .venv/bin/python -m tests.load.runtimes --model sentiment --users 1 --seconds 1 --warmup 1 --out bench_results/smoke

For each runtime the model's artifacts export (``aoti`` after `make compile`), the model's default archive is
copied with ``handler.runtime`` set in its model-config (the rest as it is), then measured twice:

- in-process (tests/worker.py, TorchServe's own worker code path, no socket): µs per item of a batch of 16 of its
  load-test samples, every rendering in proportion (``payloads.spread``), through ``handle`` (decode, canonicalise,
  predict, reply), and of the runtime call alone on the collated batch (``forward_us_per_item``); best of several
  rounds, runtimes alternating;
- over HTTP (a private TorchServe per runtime, all up at once, loaded in turn as `make bench` loads a model's
  paths: bench.measure_side_by_side, the same load generator and reply checks): req/s and p99 at each concurrency,
  at 16 users the median of bench.ROUNDS windows.

Every export was checked against the eager model when it was written (train/export.py: max abs diff ≤ 1e-4 at
batch 1 and 7), so each runtime here passes parity. tests/load/bench.py calls ``compare`` for every model with an
export and puts the results under ``runtimes`` in benchmark.json; ``report`` is the markdown for docs/benchmark.md,
with ``choice``: whether the model-config's ``handler.runtime`` is the fastest of the CANDIDATES.
"""

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

import registry
from handlers.common import parse_content_type, read_body
from handlers.runtimes import DEFAULT_RUNTIME, EXPORTS, RUNTIMES
from models import read_manifest
from scripts.server import ROOT
from tests.fixtures.servers import rezip
from tests.load import bench, payloads
from tests.worker import Request, Worker
from train.export import example as export_example

BATCH = 16
CANDIDATES = ("eager", "onnxruntime", "onnxruntime-int8")
"""The runtimes a model-config may default to: `make serve` builds their files (training writes the ONNX exports)
and none is deprecated. TorchScript is (torch.jit.load warns), and aoti needs `make compile` and a C++ compiler:
both are measured, neither is a default. ONNX Runtime is not one for a model whose ONNX export is optional
(``candidates``)."""
NOISE = 0.05
"""Req/s within this fraction of the fastest runtime's count as a tie (run-to-run spread on a quiet machine)."""


def with_runtime(entry, folder, runtime):
    """The model's default archive (as archive.sh built it) with ``handler.runtime`` set in its model-config."""
    config = bench.model_config(entry, {"handler.runtime": runtime})
    (folder / "store").mkdir(parents=True)
    stem = entry.versions[0].archive
    return rezip(ROOT / "model_store" / f"{stem}.mar", folder / "store" / f"{entry.name}.mar", entry.name,
                 replace={Path(entry.configs["cpu"]).name: yaml.safe_dump(config).encode()})


def parsed(handler, idx, request):
    """The first example of ``request`` (request ``idx`` of the handler's last batch), its body read as ``handle``
    reads it (``read_body``)."""
    payload, as_json = read_body(request.body, *parse_content_type(request.content_type))
    return handler.parse_request(idx, {}, "body", payload, as_json)[0][0]


def in_process(archives, samples, rounds=5, repeats=20):
    """{runtime: {"handle_us_per_item", "forward_us_per_item"}}: best round, runtimes alternating."""
    requests = [Request(sample.body, sample.content_type) for sample in payloads.spread(samples, BATCH)]
    workers = {runtime: Worker(archive, tempfile.mkdtemp(prefix=f"runtime-{runtime}-"), BATCH)
               for runtime, archive in archives.items()}
    for worker in workers.values():
        worker.run(*requests)  # warm-up: first-call allocations, ONNX Runtime's arena; the context's headers
    batches = {runtime: worker.handler.collate([parsed(worker.handler, idx, r) for idx, r in enumerate(requests)])
               for runtime, worker in workers.items()}
    best = {runtime: {"handle_us_per_item": np.inf, "forward_us_per_item": np.inf} for runtime in workers}
    for _ in range(rounds):
        for runtime, worker in workers.items():
            started = time.perf_counter()
            for _ in range(repeats):
                worker.run(*requests)
            handle = (time.perf_counter() - started) / repeats / BATCH * 1e6
            started = time.perf_counter()
            for _ in range(repeats):
                worker.handler.predict(batches[runtime])
            forward = (time.perf_counter() - started) / repeats / BATCH * 1e6
            best[runtime] = {"handle_us_per_item": min(best[runtime]["handle_us_per_item"], round(handle, 1)),
                             "forward_us_per_item": min(best[runtime]["forward_us_per_item"], round(forward, 1))}
    return best


def exports_of(entry):
    """The manifest exports of the model's default version."""
    return read_manifest(ROOT / entry.versions[0].artifacts).get("exports", {})


def exported(entry):
    """Whether the model has a runtime besides eager to compare (an export with a file)."""
    return any("file" in exports_of(entry).get(EXPORTS[runtime], {}) for runtime in RUNTIMES if runtime != "eager")


def default_runtime(entry):
    """``handler.runtime`` of the model's CPU model-config."""
    return (bench.model_config(entry, {}).get("handler") or {}).get("runtime", DEFAULT_RUNTIME)


def candidates(entry):
    """The CANDIDATES for the model's default: without onnxruntime where its ONNX export is optional (the
    detector's: a training run whose parity check fails records why instead of the file, and a default must load).
    ``compare`` records them with its figures, so a report needs no artifacts."""
    manifest = read_manifest(ROOT / entry.versions[0].artifacts)
    optional = export_example(manifest, 1).get("optional", ())
    return [runtime for runtime in CANDIDATES if runtime == "eager" or EXPORTS[runtime] not in optional]


def measured(results):
    """{runtime: figures} of a ``compare`` result."""
    return {runtime: figures for runtime, figures in results.items() if runtime in RUNTIMES}


def choice(results, users):
    """{"default", "fastest", "fastest_built", "default_is_fastest_built"} at ``users``: fastest_built is the
    fastest of the model's ``candidates``; a default within NOISE of it counts as the fastest."""
    rps = {runtime: next(s["rps"] for s in figures["steps"] if s["users"] == users)
           for runtime, figures in measured(results).items()}
    allowed = results["candidates"]
    built = {runtime: value for runtime, value in rps.items() if runtime in allowed}
    default = default_runtime(registry.model(results["model"]))
    fastest_built = max(built, key=built.get)
    return {"default": default, "fastest": max(rps, key=rps.get), "fastest_built": fastest_built,
            "default_is_fastest_built": rps.get(default, 0.0) >= (1 - NOISE) * built[fastest_built]}


def over_http(entry, archives, samples, users, seconds, warmup, workdir, log, rounds=bench.ROUNDS):
    """{runtime: steps}: a private TorchServe per runtime, all up at once, loaded in turn
    (``bench.measure_side_by_side``: ``rounds`` windows at 16 users, the median counting)."""
    with contextlib.ExitStack() as stack:
        running = []
        for runtime, archive in archives.items():
            path = bench.BenchPath(f"{entry.name}-{runtime}", entry, entry.name, registry.resolve(entry.load.check),
                                   f"{entry.handler}, handler.runtime: {runtime}")
            server = stack.enter_context(bench.serving(path, archive.parent, archive.name, workdir / runtime, {},
                                                       log))
            running.append(bench.Running(path.name, server.ports["inference"], server.process.pid,
                                         bench.prepared(server, path, samples), list(users)))
        measured = bench.measure_side_by_side(running, seconds, warmup, log, rounds)
    return {runtime: measured[f"{entry.name}-{runtime}"] for runtime in archives}


def compare(entry, users=(1, 16), seconds=4.0, warmup=5.0, runtimes=RUNTIMES, log=print, rounds=bench.ROUNDS):
    """Every runtime of registry ``entry`` in process and over HTTP: {"model": its name, runtime: {in-process
    figures, "steps": [...]}}."""
    results = {"model": entry.name, "candidates": candidates(entry)}
    samples = payloads.of_model(entry)
    exports = exports_of(entry)
    for runtime in [r for r in runtimes if r != "eager" and "file" not in exports.get(EXPORTS[r], {})]:
        log(f"[runtime {runtime}] skipped: artifacts have no {EXPORTS[runtime]} export"
            + (" (make compile)" if runtime == "aoti" else ""))
        runtimes = [r for r in runtimes if r != runtime]
    with tempfile.TemporaryDirectory(prefix="bench-runtimes-") as tmp:
        archives = {runtime: with_runtime(entry, Path(tmp) / runtime, runtime) for runtime in runtimes}
        for runtime, figures in in_process(archives, samples).items():
            results[runtime] = dict(figures)
            log(f"[runtime {runtime}] in-process: {figures['handle_us_per_item']:.1f} µs per item through handle, "
                f"{figures['forward_us_per_item']:.1f} µs per item in the runtime (batches of {BATCH})")
        for runtime, steps in over_http(entry, archives, samples, users, seconds, warmup, Path(tmp), log,
                                          rounds).items():
            results[runtime]["steps"] = steps
    return results


def spread(step):
    """" (low-high)": the range of a step's rounds in req/s ("" for a single window)."""
    rounds = step.get("rounds_rps", [])
    return f" ({min(rounds):.0f}-{max(rounds):.0f})" if len(rounds) > 1 else ""


def table(results):
    """Markdown: one row per runtime, in-process µs and, per concurrency, req/s (the median round, and the range of
    the rounds) and p99."""
    by_runtime = measured(results)
    users = [step["users"] for step in next(iter(by_runtime.values()))["steps"]]
    header = ["runtime", "µs/item handle", "µs/item runtime"] + [f"{n} users req/s, p99 ms" for n in users]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for runtime, figures in by_runtime.items():
        cells = [runtime, f"{figures['handle_us_per_item']:.1f}", f"{figures['forward_us_per_item']:.1f}"]
        cells += [f"{step['rps']:.0f}{spread(step)}, {step['p99_ms']:.1f}" for step in figures["steps"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(by_model, users=bench.RATIO_USERS):
    """Markdown for every compared model: its table, and its model-config's runtime against the fastest."""
    parts = []
    for name, results in by_model.items():
        picked = choice(results, users)
        verdict = ("✔ the fastest default candidate" if picked["default_is_fastest_built"] else
                   f"✘ {picked['fastest_built']} is faster: set `handler.runtime: {picked['fastest_built']}`")
        parts.append(f"{name} by runtime (`handler.runtime`, same handler code); model-config default "
                     f"`{picked['default']}` {verdict}; fastest at {users} users: {picked['fastest']}"
                     + (" (not a default candidate)" if picked["fastest"] not in results["candidates"]
                        else "")
                     + ":\n\n" + table(results))
    return "\n\n".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=registry.served_models()[0].name, help="a served model (default: the "
                        "registry's first)")
    parser.add_argument("--users", default="1,16", help="concurrencies (default 1,16)")
    parser.add_argument("--seconds", type=float, default=4.0, help="measurement window per concurrency")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before the first window")
    parser.add_argument("--rounds", type=int, default=bench.ROUNDS, help="windows per runtime at 16 users, the "
                        "runtimes in turn; the median counts (default %(default)s)")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help=f"comma-separated, of {', '.join(RUNTIMES)}")
    parser.add_argument("--out", default="bench_results/runtimes", help="folder for runtimes.json")
    args = parser.parse_args(argv)
    bench.stop_servers_on_sigterm()
    results = compare(registry.model(args.model), [int(n) for n in args.users.split(",")], args.seconds, args.warmup,
                      [name for name in args.runtimes.split(",") if name], rounds=args.rounds)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "runtimes.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + report({results["model"]: results}, users=max(int(n) for n in args.users.split(",")))
          + f"\n\nwrote {out / 'runtimes.json'}")


if __name__ == "__main__":
    main()
