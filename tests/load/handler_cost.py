"""Worker-side CPU cost of the mnist handler per request, in-process: the part of a request our code decides.

    .venv/bin/python -m tests.load.handler_cost                          # the working tree's handlers/
    .venv/bin/python -m tests.load.handler_cost 2e5fdaf HEAD some/folder # git revisions or folders of handler modules
    .venv/bin/python -m tests.load.handler_cost --profile                # where the time goes (cProfile), 50 batches

For each version of the handler code, a fresh process loads artifacts/mnist archived with that code (archive.sh's
recipe, the version's handlers/mnist.py as the entry point) and times batches of 16 held-out digit PNGs (each
rendering `make bench` sends, 28 to 300 px, in proportion) through what a TorchServe worker runs per batch:
TorchServe's own input decoding (tests/worker.py), the module's ``handle`` entry point, the metric log lines at INFO
(to /dev/null, as a worker writes them to the frontend) and TorchServe's reply encoding (``create_predict_response``).
Socket I/O and the Java frontend are left out, so the figures isolate handler changes from the run-to-run noise of a
whole server on a shared 2-core machine. Versions are run alternately, several rounds, and the best round is kept.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from scripts.server import ROOT

MODEL = "mnist"
"""The model whose handler this measures (its SETUP reads digits and imports handlers.mnist)."""

SETUP = r'''
import importlib, json, logging, sys, tempfile, time
from tests.load import payloads
digits = payloads.digits()  # every rendering `make bench` sends, read with the working tree's code, before the swap
for name in [n for n in sys.modules if n == "handlers" or n.startswith("handlers.")]:
    del sys.modules[name]
sys.path.insert(0, sys.argv[1])  # the handlers/ package under test comes first
logging.basicConfig(stream=open("/dev/null", "w"), format="%(message)s", level=logging.INFO)
from ts.protocol.otf_message_handler import create_predict_response
from ts.service import Service
from ts.protocol.otf_message_handler import _retrieve_input_data
from tests.worker import Worker, _Frame, Request
import handlers.mnist as module
assert module.__file__.startswith(sys.argv[1]), module.__file__
worker = Worker(sys.argv[2], tempfile.mkdtemp(), 16)
batch = payloads.spread(digits, 16)  # every rendering in proportion
context = worker.context

def run():
    frames = [{"requestId": f"req-{i}".encode(), "headers": [],
               "parameters": [_retrieve_input_data(_Frame(Request(s.body, s.content_type)))]}
              for i, s in enumerate(batch)]
    headers, inputs, ids = Service.retrieve_data_for_inference(frames)
    context.request_ids, context.request_processor, context.metrics.request_ids = ids, headers, ids
    replies = worker.service._entry_point(inputs, context)  # what TorchServe calls
    return create_predict_response(replies, ids, "Prediction success", 200, context=context)

for _ in range(20):
    run()
'''
TIMING = r'''
best = []
for _ in range(int(sys.argv[3])):
    start = time.perf_counter()
    for _ in range(25):
        run()
    best.append((time.perf_counter() - start) / 25 / len(batch) * 1e6)
print(json.dumps(best))
'''
PROFILE = r'''
import cProfile, os, pstats, re
BATCHES = 50
profile = cProfile.Profile()
profile.enable()
for _ in range(BATCHES):
    run()
profile.disable()
shown = re.compile(r"handlers/|models/|PIL/Image|otf_message|metric|ts/service|ts/context")
rows = []
for (path, line, function), (_, calls, own, cumulative, _) in pstats.Stats(profile).stats.items():
    if shown.search(path):
        where = re.sub(r"^.*?/((?:handlers|models|PIL|ts)/)", r"\1", path)
        rows.append({"function": f"{where}:{line}({function})", "calls_per_request": calls / BATCHES / len(batch),
                     "cumulative_us": cumulative / BATCHES / len(batch) * 1e6,
                     "own_us": own / BATCHES / len(batch) * 1e6})
rows.sort(key=lambda row: -row["cumulative_us"])
print(json.dumps(rows[:int(sys.argv[3])]))
'''


def source_folder(version, staging):
    """A folder holding a ``handlers`` package with the mnist code of ``version`` (a git revision or a folder)."""
    target = Path(tempfile.mkdtemp(dir=staging))
    package = target / "handlers"
    package.mkdir()
    if version is None:
        modules = {p.name: p.read_bytes() for p in (ROOT / "handlers").glob("*.py")}
    elif Path(version).is_dir():
        modules = {p.name: p.read_bytes() for p in Path(version).glob("*.py")}
    else:
        names = subprocess.run(["git", "ls-tree", "--name-only", version, "handlers/"], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout.split()
        modules = {Path(n).name: subprocess.run(["git", "show", f"{version}:{n}"], cwd=ROOT, check=True,
                                                capture_output=True).stdout for n in names if n.endswith(".py")}
    for name, content in modules.items():
        (package / name).write_bytes(content)
    (package / "__init__.py").touch()
    return target


def archive(version, staging):
    """mnist.mar as archive.sh builds it from artifacts/mnist, its handler entry point taken from ``version``."""
    import registry
    from tests.load.bench import build_ours

    store = Path(tempfile.mkdtemp(dir=staging))
    build_ours(registry.model(MODEL), store, staging, {}, version)
    return store / "mnist.mar"


def profile(top=25):
    """cProfile of 50 batches of 16 through the working tree's handler: the ``top`` functions of the handler, the
    models, Pillow and TorchServe's worker by cumulative time, each {"function", "calls_per_request",
    "cumulative_us", "own_us"} per request (`make bench` records them; docs/benchmark.md shows the table)."""
    with tempfile.TemporaryDirectory(prefix="handler-profile-") as staging:
        run = subprocess.run([sys.executable, "-c", SETUP + PROFILE, str(source_folder(None, staging)),
                              str(archive(None, staging)), str(top)], cwd=ROOT, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(run.stderr.strip()[-2000:])
    return json.loads(run.stdout.strip().splitlines()[-1])


def profile_table(rows):
    """Markdown of ``profile``'s rows."""
    lines = ["| function | calls per request | cumulative µs per request | own µs per request |", "|---|---|---|---|"]
    lines += [f"| `{row['function']}` | {row['calls_per_request']:.2f} | {row['cumulative_us']:.1f} | "
              f"{row['own_us']:.1f} |" for row in rows]
    return "\n".join(lines)


def main(versions, rounds=3, per_round=3):
    versions = versions or [None]
    results = {str(v): [] for v in versions}
    with tempfile.TemporaryDirectory(prefix="handler-cost-") as staging:
        folders = {str(v): (source_folder(v, staging), archive(v, staging)) for v in versions}
        for _ in range(rounds):
            for version, (folder, mar) in folders.items():
                run = subprocess.run([sys.executable, "-c", SETUP + TIMING, str(folder), str(mar), str(per_round)], cwd=ROOT,
                                     capture_output=True, text=True)
                if run.returncode:
                    raise SystemExit(f"handler code {version}: {run.stderr.strip()[-2000:]}")
                results[version] += json.loads(run.stdout.strip().splitlines()[-1])
    for version, times in results.items():
        print(f"{min(times):7.1f} µs/request   {version if version != 'None' else 'working tree'}")
    return {version: round(min(times), 1) for version, times in results.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.load.handler_cost", description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="*", metavar="REV|FOLDER",
                        help="git revisions or folders of handler modules, timed alternately (default: the working "
                        "tree's handlers/)")
    parser.add_argument("--profile", action="store_true",
                        help="instead, cProfile 50 batches through the working tree's handlers (the top table)")
    args = parser.parse_args()
    print(profile_table(profile())) if args.profile else main(args.versions)
