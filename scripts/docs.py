"""Render the generated blocks of README.md and docs/**/*.md from the run records (`make docs`).

    python -m scripts.docs            # rewrite the files whose generated blocks are stale
    python -m scripts.docs --check    # list those files and exit 1 if there are any; writes nothing

A generated block is the text between ``<!-- generated: NAME -->`` and ``<!-- /generated -->`` (each marker on a
line of its own); NAME picks the renderer in ``BLOCKS``, or ``metrics-<model>`` for a model of registry.py. Every
figure that comes from a run sits in such a block, rendered from these records:

- ``docs/runs.json``: the ``metrics.json`` and ``manifest.json`` of each version's training run (``make train``):
  the held-out ("test") figures, the training time, the exports' parity with the eager model. ``make docs`` first
  copies them there from ``artifacts/`` (the versions trained in this checkout), so the docs show committed records
  only, and ``--check`` (a test) judges them the same on any machine, trained or not;
- ``docs/seeds.json`` (``python -m scripts.seeds``): the seeds each quality floor comes from;
- ``docs/benchmark.json`` (``make bench``) and ``docs/benchmark-levers.json`` (``python -m tests.load.levers``);
- ``docs/fresh-clone.json``: the times of a fresh clone's steps (setup, ``make serve``, ``make test``).

A missing record renders as "not measured yet (run ...)", so a fresh clone renders without failing. The table
between docs/benchmark.md's bench markers is not one of these blocks: ``make bench`` writes it itself.
"""

import argparse
import json
import re
import sys
import textwrap
from pathlib import Path

import registry
from scripts import seeds

ROOT = registry.ROOT
WIDTH = 118  # prose lines of a block; the docs' limit is 120
BLOCK = re.compile(r"^<!-- generated: (?P<name>[\w.-]+) -->\n(?P<body>.*?)^<!-- /generated -->$", re.M | re.S)

LABELS = {"accuracy": "accuracy", "r2": "R²", "rmse": "RMSE", "mae": "MAE",
          "box_map_50": "box AP@0.5", "box_map": "box AP@[.5:.95]", "box_map_75": "box AP@0.75",
          "mask_map_50": "mask AP@0.5", "mask_map": "mask AP@[.5:.95]", "mask_map_75": "mask AP@0.75",
          "class_preservation": "class kept", "int8_agreement": "int8 top-1 agreement with eager"}
MISSING_TRAINING = "not measured yet (run make train)"
MISSING_BENCH = "not measured yet (run make bench)"


# --- records ---------------------------------------------------------------------------------------------------------

def read_json(path: Path):
    """The JSON of ``path``, or None when the file does not exist."""
    return json.loads(path.read_text()) if path.is_file() else None


def versions() -> list[tuple[registry.Model, registry.Version]]:
    """Every version of registry.py, optional ones included (they render as not trained until they are)."""
    return [(entry, version) for entry in registry.MODELS for version in entry.versions]


RUNS = ROOT / "docs" / "runs.json"


def collect_runs(root: Path = ROOT) -> dict:
    """docs/runs.json's content with the training runs of ``root``'s artifacts/ in place of the recorded ones:
    {archive: {"metrics": metrics.json, "manifest": manifest.json}} (a version not trained here keeps its record)."""
    runs = read_json(root / "docs" / "runs.json") or {}
    for _, version in versions():
        metrics = read_json(root / version.artifacts / "metrics.json")
        if metrics is not None:
            runs[version.archive] = {"metrics": metrics,
                                     "manifest": read_json(root / version.artifacts / "manifest.json")}
    return runs


def load_records(root: Path = ROOT) -> dict:
    """Every record the blocks are rendered from (committed files only); a missing file is None."""
    runs = read_json(root / "docs" / "runs.json") or {}
    return {
        "metrics": {v.archive: runs.get(v.archive, {}).get("metrics") for _, v in versions()},
        "manifests": {v.archive: runs.get(v.archive, {}).get("manifest") for _, v in versions()},
        "seeds": read_json(root / "docs" / "seeds.json"),
        "benchmark": read_json(root / "docs" / "benchmark.json"),
        "levers": read_json(root / "docs" / "benchmark-levers.json"),
        "fresh_clone": read_json(root / "docs" / "fresh-clone.json"),
    }


# --- formatting ------------------------------------------------------------------------------------------------------

def duration(seconds: float) -> str:
    """136 -> "2 min 16 s"; 38 -> "38 s"; 0.38 -> "0.4 s"."""
    if seconds < 9.95:
        return f"{seconds:.1f} s"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {seconds} s"


def number(value: float) -> str:
    """A count or a rate with thousands separators: 1794.2 -> "1,794"."""
    return f"{value:,.0f}"


def figure(value: float) -> str:
    """A held-out figure: 4 decimals under 10 (accuracy, R², AP), else 2 (an error in target units)."""
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def latency(ms: float) -> str:
    """A latency in ms: one decimal under 100 ms, else whole milliseconds."""
    return f"{ms:.1f}" if ms < 100 else f"{ms:,.0f}"


def wrap(text: str) -> str:
    return "\n".join(textwrap.wrap(text, WIDTH, break_on_hyphens=False))


def item(text: str) -> str:
    """A markdown list item wrapped to the width, continuation lines indented."""
    return "\n".join(textwrap.wrap(text, WIDTH, initial_indent="- ", subsequent_indent="  ", break_on_hyphens=False))


def met(value: float, goal: float) -> str:
    return f"≥ {goal} {'✔' if value >= goal else '✘'}"


def label(metric: str) -> str:
    return LABELS.get(metric, metric)


def missing(version: registry.Version) -> str:
    if version.optional:
        return f"not trained (optional: `{version.train}`)"
    return MISSING_TRAINING


# --- blocks from the training records --------------------------------------------------------------------------------

def training_cost(record: dict) -> str:
    """"30 epochs, 55 s" (and the processes and CPU time where the record has them)."""
    text = f"{record['epochs']} epoch{'s' if record['epochs'] != 1 else ''}, {duration(record['train_seconds'])}"
    if record.get("processes", 1) > 1:
        text += f" in {record['processes']} processes"
    if "train_cpu_seconds" in record:
        text += f" ({number(record['train_cpu_seconds'])} CPU-s)"
    return text


README_FIGURES = 2
"""Quality metrics per version in the README's table (registry order; the model's page shows them all)."""


def models_table(records: dict) -> str:
    """README: per version, its first quality figures on the held-out split, the goals, and what training took."""
    rows = ["| version | held-out figures | held out | goal (reported) | training |", "|---|---|---|---|---|"]
    for entry, version in recorded(records):
        record = records["metrics"][version.archive]
        test = record["test"]
        quality = version.quality[:README_FIGURES]
        shown = [q.metric for q in quality] or [key for key in test if "/" not in key][:1]
        figures = ", ".join(f"{label(metric)} **{figure(test[metric])}**" for metric in shown)
        held_out = record.get("dataset", {}).get("n_test")
        goals = ", ".join(f"{q.goal} {'✔' if test[q.metric] >= q.goal else '✘'}" for q in quality) or "–"
        processes = f" ({record['processes']} processes)" if record.get("processes", 1) > 1 else ""
        rows.append(f"| {entry.name} {version.version} | {figures} | {number(held_out) if held_out else '–'} | "
                    f"{goals} | {duration(record['train_seconds'])}{processes} |")
    return "\n".join(rows) if len(rows) > 2 else MISSING_TRAINING


def recorded(records: dict) -> list[tuple[registry.Model, registry.Version]]:
    """The versions with a training run in docs/runs.json, in registry order: a model added to registry.py joins
    the tables once `make docs` records its run, so adding one changes no generated file."""
    return [(entry, version) for entry, version in versions() if records["metrics"].get(version.archive)]


def model_metrics(name: str, records: dict) -> str:
    """A model page: every held-out figure of each of its versions, the data and the training run."""
    entry = registry.model(name)
    parts = []
    for version in entry.versions:
        record = records["metrics"].get(version.archive)
        title = f"**{entry.name} {version.version}** (`{version.artifacts}/metrics.json`)"
        if record is None:
            parts.append(wrap(f"{title}: {missing(version)}."))
            continue
        data = record.get("dataset", {})
        sizes = ", ".join(f"{number(data[key])} {what}" for key, what in
                          (("n_train", "training"), ("n_test", "held-out"), ("n_lexicon", "lexicon")) if key in data)
        parts.append(wrap(f"{title}: {data.get('name', 'data')}{f' ({sizes} examples)' if sizes else ''}; "
                          f"seed {record.get('seed', 0)}, {training_cost(record)} of training."))
        goals = {q.metric: q.goal for q in version.quality}
        rows = ["| held-out metric | value | goal (reported) |", "|---|---|---|"]
        for metric, value in record["test"].items():
            if "/" not in metric and metric != "final_train_loss":
                goal = met(value, goals[metric]) if metric in goals else ""
                rows.append(f"| {label(metric)} | {figure(value)} | {goal} |")
        parts.append("\n".join(rows))
    return "\n\n".join(parts)


def detector_classes(records: dict) -> str:
    """The detector's AP@0.5 per class, boxes and masks."""
    record = records["metrics"].get("detector")
    if record is None:
        return MISSING_TRAINING
    test = record["test"]
    classes = [key.split("/", 1)[1] for key in test if key.startswith("box_ap_50/")]
    rows = ["| class | box AP@0.5 | mask AP@0.5 |", "|---|---|---|"]
    rows += [f"| {c} | {figure(test[f'box_ap_50/{c}'])} | "
             f"{figure(test[f'mask_ap_50/{c}']) if f'mask_ap_50/{c}' in test else '–'} |" for c in classes]
    return "\n".join(rows)


def exports_table(records: dict) -> str:
    """Each exported file's max abs difference from the eager model, as the export check measured it, and how often
    each int8 model gives the eager model's top class."""
    rows = ["| version | TorchScript | ONNX | AOTInductor | checked batch sizes |", "|---|---|---|---|---|"]
    int8 = []
    for entry, version in recorded(records):
        manifest = records["manifests"].get(version.archive) or {}
        cells, sizes = [], set()
        for fmt in ("torchscript", "onnx", "aoti"):
            export = manifest.get("exports", {}).get(fmt)
            if export is None:
                cells.append("not compiled (`make compile`)" if fmt == "aoti" else "not exported")
            elif "unsupported" in export:
                cells.append("unsupported (manifest: why)")
            else:
                opset = f", opset {export['opset']}" if "opset" in export else ""
                cells.append(f"`{export['file']}`: {export['max_abs_diff']:.3g}{opset}")
                sizes.update(export.get("checked_batch_sizes", []))
        rows.append(f"| {entry.name} {version.version} | {' | '.join(cells)} | "
                    f"{', '.join(map(str, sorted(sizes))) or '–'} |")
        quantized = manifest.get("exports", {}).get("onnx-int8")
        if quantized:
            int8.append(f"{entry.name} {version.version} " + (
                f"{quantized['top1_agreement']:.4f} of {quantized['checked_examples']:,}" if "file" in quantized
                else "unsupported (manifest: why)"))
    if len(rows) == 2:
        return MISSING_TRAINING
    if int8:
        rows += ["", wrap("int8 (`model.int8.onnx`, `handler.runtime: onnxruntime-int8`), the share of held-out "
                          f"inputs given the eager model's top class: {'; '.join(int8)}.")]
    return "\n".join(rows)


def seeds_table(records: dict) -> str:
    if records["seeds"] is None:
        return "not measured yet (run python -m scripts.seeds)"
    return seeds.table(records["seeds"])


# --- blocks from the fresh-clone and benchmark records ---------------------------------------------------------------

def fresh_clone(records: dict) -> str:
    record = records["fresh_clone"]
    if record is None:
        return "not measured yet (docs/fresh-clone.json is missing)"
    rows = ["| step | time |", "|---|---|"]
    rows += [f"| {step['step']} | {duration(step['seconds'])} |" for step in record["steps"]]
    return "\n".join([wrap(f"Measured on a fresh clone (commit {record['commit']}) on a {record['machine']}, "
                           f"{record['date']}:"), "", *rows])


def machine(bench: dict) -> str:
    m = bench["machine"]
    return (f"{m['cores']} cores ({m['cpu']}), torch {m['torch'].split('+')[0]}, TorchServe {m['torchserve']}, "
            f"{bench['started'][:10]}")


def step(bench: dict, path: str, users: int):
    return next((s for s in bench["paths"].get(path, {}).get("steps", []) if s["users"] == users), None)


def bench_headline(records: dict) -> str:
    """README: a few lines of what the last `make bench` served at 16 users, per model."""
    bench = records["benchmark"]
    if bench is None:
        return MISSING_BENCH
    ratios = bench["ratios"]
    users = ratios.get("users", 16)
    parts = []
    for model, figures in ratios["models"].items():
        s = step(bench, model, users)
        peers = [f"{value}× {name}" for name, value in figures["vs"].items() if name not in ("baseline",)]
        parts.append(f"{model} {number(s['rps'])} req/s (p99 {s['p99_ms']:.0f} ms"
                     + (f"; {', '.join(peers)}" if peers else "") + ")")
    failed = sum(s["failed"] for path in bench["paths"].values() for s in path["steps"])
    return wrap(f"`make bench` at {users} concurrent users on {machine(bench)}: {'; '.join(parts)}; {failed} failed "
                "requests in the whole run (ratios: this model's req/s ÷ the named path's, docs/benchmark.md).")


def bench_paths(records: dict) -> str:
    """docs/benchmark.md: req/s and p50/p95/p99 per path and concurrency."""
    bench = records["benchmark"]
    if bench is None:
        return MISSING_BENCH
    users = bench["settings"]["users"]
    rows = ["| path | " + " | ".join(f"{u} user{'s' if u > 1 else ''}" for u in users) + " |",
            "|---|" + "---|" * len(users)]
    for name in bench["paths"]:
        cells = []
        for u in users:
            s = step(bench, name, u)
            cells.append(f"{number(s['rps'])} · {'/'.join(latency(s[k]) for k in ('p50_ms', 'p95_ms', 'p99_ms'))}"
                         if s else "–")
        rows.append(f"| {name} | {' | '.join(cells)} |")
    failed = sum(s["failed"] for path in bench["paths"].values() for s in path["steps"])
    head = wrap(f"`{bench['command']}` on {machine(bench)} ({duration(bench['duration_s'])}; "
                f"`docs/benchmark.json`). req/s · p50/p95/p99 ms (the detector: images per second); {failed} failed "
                "requests:")
    in_process = [f"{stem} {number(s['rps'])} per second in batches of {s['batch_size']}"
                  for stem, s in bench.get("in_process", {}).items()]
    tail = [wrap("In-process (the same archive and handler code through TorchServe's loader, no server; the model's "
                 f"own ceiling on this machine): {', '.join(in_process)}.")] if in_process else []
    return "\n".join([head, "", *rows, *([""] + tail if tail else [])])


def bench_ratios(records: dict) -> str:
    """docs/benchmark.md: each model's ratios at 16 users against the targets of registry.py."""
    bench = records["benchmark"]
    if bench is None:
        return MISSING_BENCH
    ratios = bench["ratios"]
    rows = [f"| at {ratios.get('users', 16)} users | this run | target |", "|---|---|---|"]
    for model, figures in ratios["models"].items():
        goals = {}
        for target, ok in figures["targets_met"].items():
            name, _, bound = target.partition(" >= ")
            if bound:
                goals[name.removeprefix("÷ ")] = f"≥ {bound} {'✔' if ok else '✘'}"
        rows += [f"| {model} ÷ {name} | **{value}** | {goals.get(name, '')} |" for name, value in figures["vs"].items()]
        ok = figures["p99_ms"] <= 100 and figures["failed"] == 0
        rows.append(f"| {model} p99 / failed requests | {figures['p99_ms']} ms / {figures['failed']} | ≤ 100 ms / 0 "
                    f"{'✔' if ok else '✘'} |")
    return "\n".join(rows)


def bench_runtimes(records: dict) -> str:
    """docs/exports.md: each model's req/s per runtime at 16 users, and whether its model-config's runtime is the
    fastest one `make serve` builds (tests/load/runtimes.py ``choice``)."""
    from tests.load import runtimes

    bench = records["benchmark"]
    if bench is None or not bench.get("runtimes"):
        return MISSING_BENCH
    users = bench["ratios"].get("users", 16)
    lines = []
    for model, results in bench["runtimes"].items():
        picked = runtimes.choice(results, users)
        rps = {runtime: next(s["rps"] for s in figures["steps"] if s["users"] == users)
               for runtime, figures in runtimes.measured(results).items()}
        shown = ", ".join(f"{runtime} {number(value)}" for runtime, value in rps.items())
        verdict = ("the fastest candidate ✔" if picked["default_is_fastest_built"]
                   else f"slower than {picked['fastest_built']} ✘")
        lines.append(item(f"{model}: {shown} req/s; default `{picked['default']}`, {verdict}"))
    return "\n".join([wrap(f"`make bench` on {machine(bench)}, at {users} users, the same handler code with each "
                            "runtime (docs/benchmark.md has in-process µs and p99):"), "", *lines])


def bench_profile(records: dict) -> str:
    """docs/benchmark.md: where mnist's handler time goes (tests/load/handler_cost.py ``profile``)."""
    from tests.load.handler_cost import profile_table

    bench = records["benchmark"]
    if bench is None or not bench.get("profile"):
        return "not measured yet (`make bench` records it)"
    return "\n".join([wrap(f"`make bench` on {machine(bench)}: cProfile of 50 batches of 16 mnist digits through "
                            "`handle` in-process, TorchServe's decoding and reply encoding included; cProfile's own "
                            "overhead inflates every figure, so read the shares, not the µs:"), "",
                      profile_table(bench["profile"])])


def lever_name(key: str) -> str:
    """The record's key, or for the handler-code steps (a folder of handler code) the step's folder name."""
    return f"handler step {Path(key).parent.name}" if key.startswith("/") else key


def levers(records: dict) -> str:
    """docs/benchmark.md: one lever at a time, mnist at 1/16/32 users."""
    record = records["levers"]
    if record is None:
        return "not measured yet (run python -m tests.load.levers)"
    shipped = next((s["rps"] for s in record.get("shipped", {}).get("steps", []) if s["users"] == 16), None)
    rows = ["| variant | req/s at 1 / 16 / 32 users | p99 at 16 users | ÷ shipped at 16 users |", "|---|---|---|---|"]
    notes = []
    for key, lever in record.items():
        by_users = {s["users"]: s for s in lever["steps"]}
        rates = " / ".join(number(by_users[u]["rps"]) if u in by_users else "–" for u in (1, 16, 32))
        p99 = f"{by_users[16]['p99_ms']:.0f} ms" if 16 in by_users else "–"
        versus = f"{by_users[16]['rps'] / shipped:.2f}" if shipped and 16 in by_users else "–"
        rows.append(f"| {lever_name(key)} | {rates} | {p99} | {versus} |")
        if not key.startswith("/"):
            notes.append(item(f"{lever_name(key)}: {lever['what']}"))
    return "\n".join([*rows, "", *notes])


BLOCKS = {
    "models": models_table,
    "seeds": seeds_table,
    "exports": exports_table,
    "detector-classes": detector_classes,
    "fresh-clone": fresh_clone,
    "bench-headline": bench_headline,
    "bench-paths": bench_paths,
    "bench-ratios": bench_ratios,
    "bench-runtimes": bench_runtimes,
    "bench-profile": bench_profile,
    "levers": levers,
}


def block(name: str, records: dict) -> str:
    """The rendered body of block ``name`` (without its markers)."""
    if name in BLOCKS:
        return BLOCKS[name](records)
    if name.startswith("metrics-") and name[len("metrics-"):] in {entry.name for entry in registry.MODELS}:
        return model_metrics(name[len("metrics-"):], records)
    raise KeyError(f"no generated block {name!r} (known: {', '.join(BLOCKS)}, metrics-<model>)")


# --- files -----------------------------------------------------------------------------------------------------------

def documents(root: Path = ROOT) -> list[Path]:
    """README.md and every markdown file under docs/."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def render(text: str, records: dict, only: set[str] | None = None) -> str:
    """``text`` with each generated block (of a name in ``only``, if given) rendered afresh."""
    def replace(match):
        name = match["name"]
        if only is not None and name not in only:
            return match[0]
        return f"<!-- generated: {name} -->\n{block(name, records)}\n<!-- /generated -->"
    return BLOCK.sub(replace, text)


def stale(paths: list[Path], records: dict, only: set[str] | None = None) -> dict[Path, str]:
    """{path: its text rendered afresh} for each file whose generated blocks are not current."""
    result = {}
    for path in paths:
        text = path.read_text()
        fresh = render(text, records, only)
        if fresh != text:
            result[path] = fresh
    return result


def main(argv=None, paths: list[Path] | None = None, records: dict | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="list the stale files and exit 1; write nothing")
    args = parser.parse_args(argv)
    paths = documents() if paths is None else paths
    if records is None and not args.check:
        runs = json.dumps(collect_runs(), indent=1, sort_keys=True) + "\n"
        if read_json(RUNS) != json.loads(runs):
            RUNS.write_text(runs)
            print(f"wrote {RUNS.relative_to(ROOT)} (the training runs of artifacts/)")
    changed = stale(paths, load_records() if records is None else records)
    for path, text in changed.items():
        shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        if args.check:
            print(f"stale: {shown}")
        else:
            path.write_text(text)
            print(f"wrote {shown}")
    if args.check and changed:
        print("run `make docs` (python -m scripts.docs) to render them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
