"""Measure what a new user sees: the README's commands on a fresh clone of this checkout's HEAD, timed from
`git clone` on, written to docs/fresh-clone.json (the README's table: `make docs` renders it).

    python3 -m scripts.fresh_clone              # clone, make serve (first prediction, each version READY), make serve
                                                # again, make stop, make test-fast (~20 min on 2 cores)
    python3 -m scripts.fresh_clone --make-test  # ... and make test after them (~10 min more)

The first prediction is the first 200 to the first registry sample's curl line, polled once a second while
`make serve` runs. Standard library only: it runs before any venv exists. The clone uses config.properties' ports
(8080-8082), as a user's would: stop anything on them first.
"""

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from scripts.cpu import cpu_name

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"^\s+READY\s+(\S+) (\S+)")


def machine() -> tuple[str, int]:
    """("2-core AMD EPYC (family 23 model 49; AVX2)", 2): the CPU (``cpu_name``) and the cores this process may use."""
    cores = len(os.sched_getaffinity(0))
    return f"{cores}-core {cpu_name()}", cores


def first_prediction(clone: Path, started: float, found: dict, stop: threading.Event) -> None:
    """Poll the first registry sample's curl line (token from the clone's key_file.json) until it gets a 200; put
    the seconds since ``started`` in ``found["seconds"]``."""
    sys.path.insert(0, str(clone))
    import registry  # the clone's: standard library only

    entry = registry.MODELS[0]
    sample = entry.samples[0]
    properties = dict(line.split("=", 1) for line in (clone / "config.properties").read_text().splitlines()
                      if "=" in line and not line.lstrip().startswith("#"))
    url = f"{properties['inference_address']}/predictions/{entry.name}"
    body = (clone / sample.file).read_bytes()
    while not stop.is_set():
        try:
            token = json.loads((clone / "key_file.json").read_text())["inference"]["key"]
            request = urllib.request.Request(url, body, {"Authorization": f"Bearer {token}",
                                                         "Content-Type": sample.content_type})
            with urllib.request.urlopen(request, timeout=10) as reply:
                if reply.status == 200:
                    found["seconds"] = time.monotonic() - started
                    return
        except (OSError, ValueError, KeyError, urllib.error.URLError):
            pass
        stop.wait(1.0)


def timed(command: list[str], clone: Path, log, on_line=None) -> tuple[float, int]:
    """Run ``command`` in ``clone``, echo and log its output (``on_line(line)`` per line); (seconds, exit code)."""
    began = time.monotonic()
    process = subprocess.Popen(command, cwd=clone, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               stdin=subprocess.DEVNULL, env={k: v for k, v in os.environ.items()
                                                               if k not in ("VIRTUAL_ENV", "TS_CONFIG_FILE")})
    for line in process.stdout:
        log.write(line)
        print(line, end="", flush=True)
        if on_line:
            on_line(line)
    return time.monotonic() - began, process.wait()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make-test", action="store_true", help="also time `make test` after make serve")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "fresh-clone.json")
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    folder = Path(tempfile.mkdtemp(prefix="fresh-clone-"))
    clone = folder / "bundle"
    log = open(folder / "log.txt", "w", encoding="utf-8")
    print(f"==> fresh clone of {commit} in {clone} (log: {folder / 'log.txt'})", flush=True)
    started = time.monotonic()
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    steps, marks = [], {}

    def on_serve_line(line):
        elapsed = time.monotonic() - started
        if "==> [train]" in line and "setup" not in marks:
            marks["setup"] = elapsed
        ready = READY.match(line)
        if ready:
            marks.setdefault(f"{ready.group(1)} {ready.group(2)}", elapsed)

    found, stop = {}, threading.Event()
    poller = threading.Thread(target=first_prediction, args=(clone, started, found, stop), daemon=True)
    poller.start()
    seconds, code = timed(["make", "serve"], clone, log, on_serve_line)
    stop.set()
    if code:
        print(f"fresh_clone: make serve exited {code}; nothing written", file=sys.stderr)
        return 1
    total = time.monotonic() - started
    steps.append({"step": "setup (venv, pip, Java)", "seconds": round(marks.get("setup", 0))})
    steps.append({"step": "make serve: first prediction", "seconds": round(found.get("seconds", total))})
    steps += [{"step": f"make serve: {version} READY", "seconds": round(at)}
              for version, at in marks.items() if version != "setup"]
    steps.append({"step": "make serve: every version READY (make serve returns)", "seconds": round(total)})
    again, code = timed(["make", "serve"], clone, log)
    steps.append({"step": "make serve again, nothing changed: every version READY", "seconds": round(again)})
    timed(["make", "stop"], clone, log)
    fast, code = timed(["make", "test-fast"], clone, log)
    steps.append({"step": "make test-fast" + ("" if code == 0 else f" (FAILED, exit {code})"), "seconds": round(fast)})
    if args.make_test:
        full, code = timed(["make", "test"], clone, log)
        steps.append({"step": "make test, after make serve" + ("" if code == 0 else f" (FAILED, exit {code})"),
                      "seconds": round(full)})
    description, cores = machine()
    record = {"machine": description, "cores": cores, "commit": commit,
              "date": datetime.date.today().isoformat(), "steps": steps}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}; the clone stays in {clone} (make stop there if a server is left)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
