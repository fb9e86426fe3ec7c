"""Train each default model version with several seeds and record its held-out figures: the spread its test floor
is set from (registry.py's ``Quality``), written to docs/seeds.json and rendered as the ``seeds`` block of the docs
(docs/testing.md) by scripts/docs.py.

    python -m scripts.seeds                      # every version with a Quality, 3 seeds each (~30 min on 2 cores)
    python -m scripts.seeds --archives fashion --seeds 5
    python -m scripts.seeds --render             # only rewrite the docs' seeds table from docs/seeds.json

Each version trains with its registry command and ``--seed S --out <temporary folder>`` appended (the last value
of a flag wins), for S = the command's own seed and the next ones. The seed also draws the held-out split where a
model has no official test set (mnist, sentiment, regression), so the spread includes the split's.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import registry
from scripts.cpu import cpu_name

ROOT = registry.ROOT
RECORD = ROOT / "docs" / "seeds.json"
INT8_AGREEMENT = "int8_agreement"
"""The int8 model's top-1 agreement with the eager one (train.export.quantize), which must reach
train.export.MIN_INT8_AGREEMENT for training to ship it: a floor too, so its spread over seeds is recorded."""


def machine() -> str:
    """The CPU (``cpu_name``) and core count, as the docs name a machine."""
    return f"{cpu_name()}, {os.cpu_count()} cores"


def own_seed(command: str) -> int:
    """The seed a training command trains with: its last --seed, else the scripts' default 0."""
    words = shlex.split(command)
    seeds = [int(words[i + 1]) for i, word in enumerate(words[:-1]) if word == "--seed"]
    return seeds[-1] if seeds else 0


def train(command: str, seed: int, log) -> dict:
    """metrics.json["test"] of one training run of ``command`` with ``seed``, in a temporary folder, with
    ``INT8_AGREEMENT`` for the classifiers training quantizes (their manifest's ``exports.onnx-int8``)."""
    with tempfile.TemporaryDirectory(prefix="seeds-") as folder:
        out = Path(folder) / "artifact"
        words = shlex.split(command) + ["--seed", str(seed), "--out", str(out)]
        started = time.monotonic()
        result = subprocess.run(words, cwd=ROOT, capture_output=True, text=True,
                                env=dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"))
        if result.returncode != 0:
            raise SystemExit(f"seeds: `{shlex.join(words)}` failed:\n{result.stderr[-3000:]}")
        test = json.loads((out / "metrics.json").read_text())["test"]
        int8 = json.loads((out / "manifest.json").read_text()).get("exports", {}).get("onnx-int8", {})
        if "top1_agreement" in int8:
            test = {**test, INT8_AGREEMENT: int8["top1_agreement"]}
        log(f"    seed {seed}: {test}  ({time.monotonic() - started:.0f} s)")
        return test


def recorded(version: registry.Version, test: dict) -> list[str]:
    """The figures of a run that docs/seeds.json keeps: the version's Quality metrics, and int8's agreement."""
    return [q.metric for q in version.quality] + [INT8_AGREEMENT] * (INT8_AGREEMENT in test)


def measure(archives: list[str], seeds: int) -> dict:
    """{archive: {"command", "seeds": {seed: {metric: value}}}} for the chosen versions."""
    measured = {}
    for _, version in registry.served():
        if version.archive not in archives or not version.quality:
            continue
        first = own_seed(version.train)
        print(f"==> [seeds] {version.archive}: {version.train}  (seeds {first}..{first + seeds - 1})", flush=True)
        runs = {str(seed): train(version.train, seed, lambda line: print(line, flush=True))
                for seed in range(first, first + seeds)}
        measured[version.archive] = {"command": version.train, "machine": machine(), "date": time.strftime("%Y-%m-%d"),
                                     "seeds": {s: {metric: test[metric] for metric in recorded(version, test)}
                                               for s, test in runs.items()}}
    return measured


def floor(quality: registry.Quality, values: list[float]) -> float:
    """The test floor: the worst seed less the margin, rounded down to 3 decimals."""
    return int((min(values) - quality.margin) * 1000) / 1000


def floors(record: dict) -> dict[tuple[str, str], float]:
    """{(archive, metric): floor} for every version with a Quality and recorded seeds."""
    result = {}
    for _, version in registry.served():
        for quality in version.quality:
            seeds = record["versions"].get(version.archive, {}).get("seeds", {})
            if seeds:
                result[version.archive, quality.metric] = floor(quality, [run[quality.metric] for run in seeds.values()])
    return result


def table(record: dict) -> str:
    """The docs' table (the ``seeds`` block): per version and metric, each seed's figure, the goal, and the floor
    with its margin; then int8's agreement where it was recorded, against the agreement training requires."""
    from scripts.docs import label, wrap
    from train.export import MIN_INT8_AGREEMENT

    rows = ["| version | held-out metric | seed: figure | spread | goal (met by) | test floor (worst − margin) |",
            "|---|---|---|---|---|---|"]

    limits, machines, int8 = floors(record), set(), []

    def figures(runs, metric):
        return ", ".join(f"{s}: {run[metric]:.4f}" for s, run in runs.items())

    for entry, version in registry.served():
        measured = record["versions"].get(version.archive)
        if not measured:
            continue
        machines.add(f"{measured['machine']} ({measured['date']})")
        name, runs = f"{entry.name} {version.version}", measured["seeds"]
        for quality in version.quality:
            values = [run[quality.metric] for run in runs.values()]
            met = sum(value >= quality.goal for value in values)
            rows.append(f"| {name} | {label(quality.metric)} | {figures(runs, quality.metric)} | "
                        f"{max(values) - min(values):.4f} | {quality.goal} ({met} of {len(values)}) | "
                        f"**{limits[version.archive, quality.metric]}** ({min(values):.4f} − {quality.margin}) |")
        if all(INT8_AGREEMENT in run for run in runs.values()):
            int8.append(f"{name} ({figures(runs, INT8_AGREEMENT)})")
    agreement = [] if not int8 else ["", wrap(
        f"{label(INT8_AGREEMENT)} (training ships the int8 model only at {MIN_INT8_AGREEMENT} or above), by seed: "
        f"{'; '.join(int8)}.")]
    return "\n".join([*rows, *agreement, "", f"Measured on {'; '.join(sorted(machines))}."])


def render(record: dict) -> None:
    """Rewrite every ``seeds`` block of README.md and docs/ from ``record`` (scripts/docs.py, that block only)."""
    from scripts import docs

    records = dict(docs.load_records(), seeds=record)
    paths = [path for path in docs.documents() if "<!-- generated: seeds -->" in path.read_text()]
    if not paths:
        raise SystemExit("seeds: no <!-- generated: seeds --> block in README.md or docs/ to write the table into")
    for path, text in docs.stale(paths, records, only={"seeds"}).items():
        path.write_text(text)
        print(f"wrote the seeds table into {path.relative_to(ROOT)}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archives", default=",".join(v.archive for _, v in registry.served() if v.quality),
                        help="comma-separated archive names (default: every version with a Quality)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per version (default %(default)s)")
    parser.add_argument("--render", action="store_true", help="only rewrite the docs' table from docs/seeds.json")
    args = parser.parse_args(argv)
    record = json.loads(RECORD.read_text()) if RECORD.exists() else {"versions": {}}
    if not args.render:
        record["versions"].update(measure(args.archives.split(","), args.seeds))
        RECORD.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {RECORD.relative_to(ROOT)}")
    render(record)


if __name__ == "__main__":
    main()
