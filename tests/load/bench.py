"""Serving benchmark (`make bench`): each served model's path against the peers its registry entry names.

    .venv/bin/python -m tests.load.bench                      # everything, ~30 min (2 cores); docs/benchmark.{json,png}
    .venv/bin/python -m tests.load.bench --paths mnist --users 16 --model-config mnist.batchSize=8 \\
        --out bench_results/b8

One run measures, on this machine, with the same load generator (tests/load/client.py: closed-loop users on
keep-alive connections) and the same samples per model (registry ``Load.payloads``: held-out items with known
answers), for every model that registry.py serves:

  MODEL            model_store/<archive>.mar of its default version: its handler with its model-config
  MODEL-PEER       each of the model's ``Load.peers`` in registry.py: another handler of the same weights
                   (TorchServe's stock handler, a per-request handler) or a no-op handler (TorchServe's own ceiling,
                   with the model's model-config or with TorchServe's defaults)
  MODEL-litserve,  for mnist and fashion, unless --no-peers: the same handler code and weights behind another
  MODEL-kserve,    server (LitServe, KServe's Python model server, Ray Serve), each with its own documented batching
  MODEL-rayserve   set from the model-config (tests/load/peers/; their packages in .venv-peers, else skipped)
  MODEL-photos,    for models with a photo mix (registry ``Load.photos``: phone-sized JPEGs), at 16 users: the
  MODEL-PEER-photos  model and each peer that serves its weights, on those photos (a ratio to a stock handler
                   depends on the images sent)
  MODEL-baseline   only with --baseline MODEL=REV|MAR: the model built with the handler code of git revision (or
                   folder) REV, or the archive MAR, measured next to it in the same run, so a change is judged side
                   by side rather than against figures from another run

Each model is also measured in-process (tests/worker.py: TorchServe's loader, the handler's entry point, no
server) at its batch size: the model and handler code's own ceiling on this machine.

Each path gets its own TorchServe (config.properties, token auth on, only that model loaded). A model's paths and
peer servers are all up at once and loaded in turn (``measure_side_by_side``): a short warm-up and a measurement
window at each concurrency, the others paused, then ROUNDS - 1 more rounds at 16 users, the median round
counting, so that the machine's drift reaches every server of a ratio alike. Every reply is checked (registry
``Load.check``, or the peer's ``check``); a wrong answer or non-200 counts as a failed request. Before the paths,
the client is measured against a fixed-reply server (its own ceiling), and every step reports the CPU used by the
client, by the TorchServe process group and by everything else on the machine. Ratios at 16 users (ours ÷ each
peer, ÷ in-process, ÷ the baseline) are judged against the targets in registry.py, with p99 ≤ 100 ms and no failed
request for every model; ours ÷ the fastest peer server against tests/load/peers.RATIO_TARGET.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

import registry
from scripts.cpu import cpu_name
from scripts.server import ROOT, TorchServe, free_port
from tests.load import checks, client, handler_cost, payloads

VENV_BIN = Path(sys.executable).parent
USERS = (1, 4, 16, 32)
RATIO_USERS = 16
ROUNDS = 3
"""Windows per server at RATIO_USERS (``measure_side_by_side``): the median counts."""
P99_TARGET_MS = 100.0
MARK_BEGIN, MARK_END = "<!-- bench:begin -->", "<!-- bench:end -->"


@dataclass
class BenchPath:
    name: str
    entry: registry.Model
    served_as: str  # the model name TorchServe serves it under
    check: object
    description: str
    peer: registry.Peer | None = None
    baseline: str | None = None  # a git revision, a folder of handler modules or an archive
    photos: bool = False  # sends the model's photo mix (registry Load.photos), at RATIO_USERS only


def paths_of(entry, baselines):
    """The benchmark paths of a registry entry: its own, its peers', and a baseline if asked for."""
    check = registry.resolve(entry.load.check)
    default = entry.versions[0]
    found = [BenchPath(entry.name, entry, entry.name, check,
                       f"{entry.handler} with {entry.configs['cpu']} (model_store/{default.archive}.mar)")]
    for peer in entry.load.peers:
        found.append(BenchPath(f"{entry.name}-{peer.name}", entry, f"{entry.name}_{peer.name.replace('-', '_')}",
                               registry.resolve(peer.check) if peer.check else check, peer.description, peer=peer))
    if entry.load.photos:  # ours and each peer that serves the model's weights, on phone photos too
        found += [dataclasses.replace(path, name=f"{path.name}-photos", photos=True,
                                      description=f"{path.description}; the photo mix ({entry.load.photos})")
                  for path in list(found) if path.peer is None or path.peer.weights]
    if entry.name in baselines:
        found.append(BenchPath(f"{entry.name}-baseline", entry, entry.name, check,
                               f"{entry.name} from {baselines[entry.name]}", baseline=baselines[entry.name]))
    return found


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
    """A folder holding the ``packages`` (default handlers/ and models/) and ``files`` (artifact files), as archive.sh
    stages them."""
    extra = Path(tempfile.mkdtemp(dir=staging))
    for package in packages:
        shutil.copytree(ROOT / package, extra / package, ignore=shutil.ignore_patterns("__pycache__", "*.yaml"))
    for file in files:
        shutil.copy(file, extra)
    return extra


def model_config(entry, overrides):
    """The model-config of ``entry`` (its "cpu" profile) with ``overrides`` ({key: value}; "handler.torch_threads"
    reaches into handler:)."""
    config = yaml.safe_load((ROOT / entry.configs["cpu"]).read_text())
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return config


def artifact_files(entry, staging):
    """The default version's artifact files but its weights, and an index_to_name.json of its labels (what
    TorchServe's stock handlers read)."""
    folder = ROOT / entry.versions[0].artifacts
    labels = json.loads((folder / "manifest.json").read_text()).get("labels") or []
    index_to_name = Path(tempfile.mkdtemp(dir=staging)) / "index_to_name.json"
    index_to_name.write_text(json.dumps({str(i): label for i, label in enumerate(labels)}))
    return [f for f in folder.iterdir() if f.is_file() and f.name != "model.pt"] + [index_to_name]


def build_ours(entry, store, staging, overrides, rev=None):
    """The default version's archive as archive.sh builds it, with its model-config changed by ``overrides``; with
    the handler code of git revision (or folder) ``rev`` if given, to measure a code change."""
    folder = ROOT / entry.versions[0].artifacts
    extra = staged_extra(staging, *(f for f in folder.iterdir() if f.is_file() and f.name != "model.pt"))
    handler = ROOT / entry.handler
    if rev and Path(rev).is_dir():  # a folder of handler modules (e.g. a snapshot between two commits)
        for module in Path(rev).glob("*.py"):
            shutil.copy(module, extra / "handlers")
        handler = extra / "handlers" / Path(entry.handler).name
    elif rev:
        names = subprocess.run(["git", "ls-tree", "--name-only", rev, "handlers/"], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout.split()
        for name in (n for n in names if n.endswith(".py")):
            shown = subprocess.run(["git", "show", f"{rev}:{name}"], cwd=ROOT, check=True, capture_output=True)
            (extra / "handlers" / Path(name).name).write_bytes(shown.stdout)
        handler = extra / "handlers" / Path(entry.handler).name
    config = Path(tempfile.mkdtemp(dir=staging)) / Path(entry.configs["cpu"]).name  # only the code differs
    config.write_text(yaml.safe_dump(model_config(entry, overrides)))
    return archiver(store, entry.name, handler, serialized=folder / "model.pt", extra=extra, config=config)


def build_archive(path, store, staging, overrides):
    """The .mar file name of ``path`` in ``store``, built or copied there."""
    entry, peer = path.entry, path.peer
    if peer is not None:
        config = None
        if peer.model_config:
            config = Path(tempfile.mkdtemp(dir=staging)) / f"{path.served_as}.yaml"
            config.write_text(yaml.safe_dump(model_config(entry, overrides)))
        weights = ROOT / entry.versions[0].artifacts / "model.pt" if peer.weights else None
        extra = staged_extra(staging, *artifact_files(entry, staging)) if peer.weights else None
        return archiver(store, path.served_as, ROOT / peer.handler, serialized=weights,
                        model_file=ROOT / peer.model_file if peer.model_file else None, extra=extra, config=config)
    if path.baseline and Path(path.baseline).suffix == ".mar":
        shutil.copy(path.baseline, Path(store) / f"{entry.name}.mar")
        return f"{entry.name}.mar"
    if path.baseline or overrides:  # archive.sh's recipe with other handler code or model-config
        return build_ours(entry, store, staging, overrides, path.baseline)
    stem = entry.versions[0].archive
    source = ROOT / "model_store" / f"{stem}.mar"
    if not source.exists():
        raise SystemExit(f"{source} not found: run `make archive` first")
    shutil.copy(source, Path(store) / f"{entry.name}.mar")
    return f"{entry.name}.mar"


# --- the machine ---------------------------------------------------------------------------------------------------

def loadavg():
    with open("/proc/loadavg") as f:
        return [float(v) for v in f.read().split()[:3]]


def machine():
    import torch
    import ts

    memory_kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return {"cores": os.cpu_count(), "cpu": cpu_name(), "memory_gib": round(memory_kb / 2**20, 1),
            "python": platform.python_version(), "torch": torch.__version__, "torchserve": ts.__version__,
            "torch_default_threads": torch.get_num_threads(), "kernel": platform.release()}


def served(server, path, overrides):
    """What TorchServe runs for ``path``: workers, batch size and delay, each worker's torch threads."""
    described = server.management("GET", f"/models/{path.served_as}").json()[0]
    threads = []
    for worker in described.get("workers", []):
        try:
            environ = Path(f"/proc/{worker['pid']}/environ").read_bytes().split(b"\0")
            omp = next((v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"OMP_NUM_THREADS=")), None)
        except OSError:
            omp = None
        threads.append(omp)
    with_config = path.peer is None or path.peer.model_config
    torch_threads = model_config(path.entry, overrides).get("handler", {}).get("torch_threads") if with_config \
        else None
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


@contextlib.contextmanager
def serving(path, store, archive, workdir, ts_overrides, log):
    """A private TorchServe of ``path`` (only ``archive`` loaded; its own ports), stopped with its workers on the
    way out."""
    properties = {"grpc_inference_port": free_port(), "grpc_management_port": free_port(),
                  # worker sockets are /tmp/.ts.sock.<port>: a base of its own, away from other TorchServes' 9000+
                  "initial_worker_port": free_port(), **ts_overrides}
    server = TorchServe(Path(workdir) / path.name, model_store=store, models=f"{path.served_as}={archive}",
                        overrides=properties)
    try:
        started = time.monotonic()
        server.start(expect_ready=1)
        log(f"[{path.name}] TorchServe ready in {time.monotonic() - started:.1f} s")
        yield server
    finally:
        server.stop()
        if server.process is not None:  # workers left behind by a TorchServe that exited on its own
            try:
                os.killpg(server.process.pid, 9)
            except ProcessLookupError:
                pass


def prepared(server, path, samples):
    """``samples`` as the client sends them to ``path`` on ``server``, with its reply check and token."""
    return client.prepare("127.0.0.1", server.ports["inference"], f"/predictions/{path.served_as}", samples,
                          path.check, server.token("inference"))


def path_record(server, path, overrides, ts_overrides):
    """What benchmark.json says of a TorchServe path besides its steps: its description and served settings."""
    description = path.description
    if overrides and (path.peer is None or path.peer.model_config):
        description += f"; model-config changed: {overrides}"
    if ts_overrides:
        description += f"; config.properties changed: {ts_overrides}"
    return {"description": description, "server": served(server, path, overrides)}


@dataclass
class Running:
    """A server that is up, as ``measure_side_by_side`` loads it: its port and prepared requests, its session (the
    leader's pid, which is TorchServe's process group id too), whose CPU counts (TorchServe: the process group; a
    peer server: the whole session, ``sessions``), and its concurrencies."""
    label: str
    port: int
    session: int
    requests: list
    users: list
    labelled: bool = True
    sessions: bool = False


def median_round(rounds):
    """The step of the round with the median req/s, with every round's req/s under "rounds_rps"."""
    ordered = sorted(rounds, key=lambda step: step["rps"])
    return {**ordered[len(ordered) // 2], "rounds_rps": [step["rps"] for step in rounds]}


def stop_servers_on_sigterm():
    """Make SIGTERM (``kill``, ``timeout``, a cancelled CI job) unwind like Ctrl-C, so that the ``with`` blocks stop
    every server this process started; Python's default ends the process at once and leaves them running, the
    paused ones stopped."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


@contextlib.contextmanager
def paused(sessions):
    """Every process of each of ``sessions`` stopped (SIGSTOP) within it and continued (SIGCONT) after, so that an
    idle server takes no CPU from the one under load: an idle LitServe's workers poll their queues at ~70 % of a
    core, Ray's actors at ~10 %."""
    from tests.load.peers import session_processes

    def signal_all(signal_number):
        for session in sessions:
            for pid in session_processes(session):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal_number)

    signal_all(signal.SIGSTOP)
    try:
        yield
    finally:
        signal_all(signal.SIGCONT)


def measure_side_by_side(running, seconds, warmup, log, rounds=ROUNDS):
    """{label: steps} of servers that are all up (``Running``): each in turn gets its warm-up and a window at each
    of its concurrencies, the others paused (``paused``), then ``rounds`` - 1 more rounds of windows at
    RATIO_USERS, where the ratios are taken, the servers in turn again, so that the machine's drift reaches every
    one alike. A concurrency measured in several rounds is its median round (``median_round``)."""
    from tests.load.peers import counting_sessions

    windows = {run.label: {} for run in running}
    for number in range(rounds):
        for run in running:
            users = run.users if number == 0 else [n for n in run.users if n == RATIO_USERS]
            label = run.label if number == 0 else f"{run.label} round {number + 1}/{rounds}"
            with paused([other.session for other in running if other is not run]), \
                    counting_sessions() if run.sessions else contextlib.nullcontext():
                steps = measure_steps(label, run.port, run.requests, users, seconds, warmup if number == 0 else 0,
                                      run.session, log, labelled=run.labelled, workers=not run.sessions)
            for step in steps:
                windows[run.label].setdefault(step["users"], []).append(step)
    return {label: [median_round(found) if len(found) > 1 else found[0] for found in by_users.values()]
            for label, by_users in windows.items()}


def measure_steps(label, port, requests, users, seconds, warmup, server_pgid, log, labelled=True, workers=False):
    """A warm-up of ``warmup`` seconds (JIT, caches; discarded; none at 0), then a window of ``seconds`` at each of
    ``users`` against the server on ``port``: one summary per concurrency, with the share of right labels when
    ``labelled`` and, for a TorchServe (``workers``), its workers' CPU in the log line."""
    if warmup > 0:
        warm = client.run("127.0.0.1", port, requests, max(users), warmup, warmup=0.0)
        if warm.failed:
            log(f"[{label}] warm-up failures: {warm.errors}")
    steps = []
    for n in users:
        result = client.run("127.0.0.1", port, requests, n, seconds, warmup=1.0, server_pgid=server_pgid,
                            keep_answers=True)
        step = result.summary()
        if result.answers and labelled:
            correct = sum(str(expected) == str(answer) for expected, answer in result.answers)
            step["label_accuracy"] = round(correct / len(result.answers), 4)
        step["loadavg"] = loadavg()[0]
        steps.append(step)
        cpu = (f"(workers {step['worker_cpu_pct']}%, {step['worker_cpu_us_per_req']:.0f} µs/req)" if workers
               else f"({step['server_cpu_us_per_req']:.0f} µs/req)")
        log(f"[{label}] {n:>3} users: {step['rps']:>7.1f} req/s  p50 {step['p50_ms']:6.2f}  "
            f"p95 {step['p95_ms']:6.2f}  p99 {step['p99_ms']:6.2f} ms  failed {step['failed']}  "
            f"client {step['client_cpu_pct']}%  server {step['server_cpu_pct']}% {cpu}  "
            f"others {step['others_cpu_pct']}%")
    return steps


def measure_in_process(stem, samples, batch_size, seconds, log):
    """Requests per second of model_store/<stem>.mar in this process, batches of ``batch_size`` samples through
    what a worker runs per batch (tests/worker.py: TorchServe's input decoding, the handler, its reply encoding),
    with the archive's model-config (torch threads included): the model and handler code's own ceiling."""
    from tests.worker import Request, Worker

    with tempfile.TemporaryDirectory(prefix=f"inprocess-{stem}-") as unpack:
        worker = Worker(ROOT / "model_store" / f"{stem}.mar", unpack, batch_size)
        items = samples * (batch_size // len(samples) + 1)  # at least one full batch
        batches = [[Request(s.body, s.content_type) for s in items[i : i + batch_size]]
                   for i in range(0, len(items) - batch_size + 1, batch_size)]
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


def server_peers(stack, results, name, samples, users, overrides, workdir, log, only=None):
    """The peer servers of tests/load/peers/ (LitServe, KServe, Ray Serve; ``only``: those named) that serve model
    ``name``, started in ``stack``: the model's own handler and weights behind another framework, with the model's
    model-config (``overrides`` included), to be measured like a TorchServe path (same client, samples, reply checks
    and concurrencies; the CPU of the server's whole session). [(Running, what benchmark.json says of it)]; a peer
    that cannot run here (no .venv-peers, a package missing, a server that did not start) goes into
    ``results["peers_skipped"]`` with the reason."""
    from models import available_cpus
    from tests.load import peers

    results.setdefault("peers_skipped", {})
    if name not in peers.MODELS:
        return []
    entry = registry.model(name)
    config = model_config(entry, overrides.get(name, {}))
    settings = peers.settings(config)
    threads = (config.get("handler") or {}).get("torch_threads") or max(1, available_cpus() // settings["workers"])
    started = []
    for peer in [p for p in peers.PEERS if only is None or p.name in only]:
        label = f"{name}-{peer.name}"
        try:
            version = peers.version(peer)
            port = free_port()
            server = stack.enter_context(peers.PeerServer(peer, name, config, port, Path(workdir) / label, threads))
            began = time.monotonic()
            server.start()
        except peers.Unavailable as why:
            results["peers_skipped"][label] = str(why)
            log(f"[{label}] skipped: {why}")
            continue
        log(f"[{label}] {peer.title} ready in {time.monotonic() - began:.1f} s")
        description = peer.describe(name, settings, version)
        if overrides.get(name):
            description += f"; model-config changed: {overrides[name]}"
        requests = client.prepare("127.0.0.1", port, peer.route.format(model=name), samples,
                                  registry.resolve(entry.load.check), peers.TOKEN)
        started.append((Running(label, port, server.pid, requests, users, sessions=True),
                        {"description": description, "server": peer.served(settings, threads),
                         "peer_server": peer.name, "version": version}))
    return started


def peer_selection(parser, args):
    """The peer servers that --peers names (None: every one); an unknown name is a usage error."""
    if not args.peers:
        return None
    from tests.load.peers import PEERS

    names = [name.strip() for name in args.peers.split(",") if name.strip()]
    unknown = sorted(set(names) - {peer.name for peer in PEERS})
    if unknown:
        parser.error(f"--peers: unknown peer servers {unknown}; choose from {[peer.name for peer in PEERS]}")
    return names


def at(results, name, users):
    steps = results["paths"].get(name, {}).get("steps", [])
    return next((s for s in steps if s["users"] == users), None)


def ratios(results, users=RATIO_USERS):
    """Per model, at ``users``: ours ÷ each peer, ÷ the baseline and ÷ in-process where both were measured, its p99
    and failed requests, and each target of registry.py judged where its figures exist."""
    out = {"users": users, "models": {}}
    for entry in registry.served_models():
        ours = at(results, entry.name, users)
        if ours is None:
            continue
        vs, targets = {}, {}
        for peer in entry.load.peers:
            other = at(results, f"{entry.name}-{peer.name}", users)
            if other:
                vs[peer.name] = round(ours["rps"] / other["rps"], 3)
                if peer.target is not None:
                    targets[f"÷ {peer.name} >= {peer.target}"] = vs[peer.name] >= peer.target
        photos = at(results, f"{entry.name}-photos", users)
        for peer in entry.load.peers if photos else ():
            other = at(results, f"{entry.name}-{peer.name}-photos", users)
            if other:
                vs[f"{peer.name} (photos)"] = round(photos["rps"] / other["rps"], 3)
        baseline = at(results, f"{entry.name}-baseline", users)
        if baseline:
            vs["baseline"] = round(ours["rps"] / baseline["rps"], 3)
        in_process = results.get("in_process", {}).get(entry.name)
        if in_process:
            vs["in-process"] = round(ours["rps"] / in_process["rps"], 3)
            if entry.load.in_process_target is not None:
                targets[f"÷ in-process >= {entry.load.in_process_target}"] = (vs["in-process"]
                                                                              >= entry.load.in_process_target)
        targets[f"p99 <= {P99_TARGET_MS:g} ms"] = ours["p99_ms"] <= P99_TARGET_MS
        targets["zero failed requests"] = ours["failed"] == 0
        out["models"][entry.name] = {"vs": vs, "p99_ms": ours["p99_ms"], "failed": ours["failed"],
                                     "targets_met": targets}
    return out


def server_peer_ratios(results, users=RATIO_USERS):
    """Add to ``results["ratios"]`` ours ÷ each peer server measured at ``users``, and the target ours ÷ the fastest
    of them >= tests/load/peers.RATIO_TARGET (named after that peer, as registry peers' targets are)."""
    from tests.load.peers import RATIO_TARGET

    for model, figures in results["ratios"]["models"].items():
        ours = at(results, model, users)
        measured = {path["peer_server"]: at(results, name, users) for name, path in results["paths"].items()
                    if name.startswith(f"{model}-") and path.get("peer_server")}
        measured = {peer: step for peer, step in measured.items() if step and step["rps"] > 0}
        if not ours or not measured:
            continue
        for peer, step in measured.items():
            figures["vs"][peer] = round(ours["rps"] / step["rps"], 3)
        fastest = max(measured, key=lambda peer: measured[peer]["rps"])
        figures["fastest_peer_server"] = fastest
        figures["targets_met"][f"÷ {fastest} >= {RATIO_TARGET}"] = figures["vs"][fastest] >= RATIO_TARGET


# --- reports -------------------------------------------------------------------------------------------------------

def table(results):
    lines = ["| path | users | req/s | p50 ms | p95 ms | p99 ms | failed | client CPU | server CPU (workers) | "
             "worker µs/req | others CPU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, path in results["paths"].items():
        for s in path["steps"]:
            lines.append(f"| {name} | {s['users']} | {s['rps']:.0f} | {s['p50_ms']:.1f} | {s['p95_ms']:.1f} | "
                         f"{s['p99_ms']:.1f} | {s['failed']} | {s['client_cpu_pct']:.0f}% | "
                         f"{s['server_cpu_pct']:.0f}% ({s['worker_cpu_pct']:.0f}%) | "
                         f"{s['worker_cpu_us_per_req']:.0f} | "
                         f"{s['others_cpu_pct']:.0f}% |")
    lines.append("")
    lines += ratio_lines(results["ratios"])
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


def ratio_lines(ratios):
    """A line per model: its ratios at the ratio concurrency, p99, failures, and its targets met or not."""
    lines = []
    for model, figures in ratios["models"].items():
        vs = "; ".join(f"÷ {name} **{value}**" for name, value in figures["vs"].items())
        met = ", ".join(f"{target} {'✔' if ok else '✘'}" for target, ok in figures["targets_met"].items())
        lines.append(f"- {model} at {ratios['users']} users: {vs + '; ' if vs else ''}p99 {figures['p99_ms']} ms, "
                     f"{figures['failed']} failed. Targets: {met}.")
    return lines


def server_peer_lines(results):
    """The report's lines on the peer servers: which was fastest per model, and those skipped with the reason."""
    from tests.load.peers import RATIO_TARGET

    lines = []
    for model, figures in results["ratios"]["models"].items():
        fastest = figures.get("fastest_peer_server")
        if fastest:
            step = at(results, f"{model}-{fastest}", results["ratios"]["users"])
            lines.append(f"- {model}: the fastest peer server at {results['ratios']['users']} users is {fastest} "
                         f"({step['rps']:.0f} req/s, p99 {step['p99_ms']:.1f} ms); ours ÷ it "
                         f"**{figures['vs'][fastest]}** (target {RATIO_TARGET}).")
    for path, why in results.get("peers_skipped", {}).items():
        lines.append(f"- {path}: skipped, {why}")
    if not lines:
        return ""
    return "Peer servers (tests/load/peers/: our handler and weights behind LitServe, KServe, Ray Serve):\n\n" + \
        "\n".join(lines)


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


def by_model(items, parser, option):
    """["mnist.batchSize=8", ...] -> {"mnist": {"batchSize": 8}}; the model must be a served one."""
    out, served = {}, {entry.name for entry in registry.served_models()}
    for key, value in parse_assignments(items).items():
        model, _, setting = key.partition(".")
        if model not in served or not setting:
            parser.error(f"{option} {key}=...: expected MODEL.KEY=VALUE with MODEL one of {sorted(served)}")
        out.setdefault(model, {})[setting] = value
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--paths", help="comma-separated path names (default: every served model and its peers; "
                                        "MODEL-baseline needs --baseline)")
    parser.add_argument("--users", default=",".join(map(str, USERS)), help="concurrencies (default 1,4,16,32)")
    parser.add_argument("--seconds", type=float, default=4.0, help="measurement window per concurrency")
    parser.add_argument("--warmup", type=float, default=10.0,
                        help="seconds of load before a path's first window (the JVM's JIT settles in ~20 s)")
    parser.add_argument("--model-config", action="append", metavar="MODEL.KEY=VALUE",
                        help="override a model's model-config for its path and the peers that use it, "
                             "e.g. mnist.batchSize=8 or mnist.handler.torch_threads=2")
    parser.add_argument("--ts-config", action="append", metavar="KEY=VALUE",
                        help="override config.properties for every path, e.g. async_logging=true")
    parser.add_argument("--baseline", action="append", metavar="MODEL=REV|MAR",
                        help="also measure MODEL-baseline: the model with the handler code of git revision (or "
                             "folder of handler modules) REV, or the archive MAR, next to MODEL in the same run")
    parser.add_argument("--out", default="docs", help="folder for benchmark.json and benchmark.png (default docs/)")
    parser.add_argument("--no-client-ceiling", action="store_true", help="skip measuring the client on its own")
    parser.add_argument("--no-in-process", action="store_true", help="skip measuring each model in-process")
    parser.add_argument("--no-peers", action="store_true",
                        help="skip the peer servers (LitServe, KServe, Ray Serve in .venv-peers; tests/load/peers/)")
    parser.add_argument("--peers", help="comma-separated peer servers to measure (default: litserve,kserve,rayserve)")
    parser.add_argument("--no-runtimes", action="store_true",
                        help="skip the runtime comparison of each model with exports (tests/load/runtimes.py)")
    args = parser.parse_args(argv)
    selected_peers = peer_selection(parser, args)
    stop_servers_on_sigterm()

    baselines = {}
    for item in args.baseline or []:
        model, _, source = item.partition("=")
        if model not in {entry.name for entry in registry.served_models()} or not source:
            parser.error(f"--baseline {item}: expected MODEL=REV|MAR with MODEL a served model")
        if source.endswith(".mar") and not Path(source).is_file():
            parser.error(f"--baseline {item}: {source}: no such file")
        baselines[model] = source
    every = {path.name: path for entry in registry.served_models() for path in paths_of(entry, baselines)}
    names = ([n.strip() for n in args.paths.split(",") if n.strip()] if args.paths
             else [name for name in every if not name.endswith("-baseline")] + [f"{m}-baseline" for m in baselines])
    unknown = [n for n in names if n not in every]
    if unknown:
        hint = " (MODEL-baseline needs --baseline MODEL=...)" if any(n.endswith("-baseline") for n in unknown) else ""
        parser.error(f"unknown paths {unknown}; choose from {list(every)}{hint}")
    paths = [every[name] for name in names]
    users = [int(u) for u in args.users.split(",")]
    overrides = by_model(args.model_config, parser, "--model-config")
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
    models = list(dict.fromkeys(path.entry.name for path in paths))
    sample_sets = {name: payloads.of_model(registry.model(name)) for name in models}  # only what the paths send
    photo_sets = {path.entry.name: registry.resolve(path.entry.load.photos)() for path in paths if path.photos}
    results = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), "loadavg_before": before,
               "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
               "settings": {"users": users, "seconds": args.seconds, "warmup": args.warmup,
                            "model_config_overrides": overrides, "ts_config_overrides": ts_overrides,
                            "baselines": baselines, "samples": {k: len(v) for k, v in sample_sets.items()},
                            "photo_samples": {k: {"count": len(v), "mean_bytes": round(sum(len(s.body) for s in v)
                                                                                       / max(1, len(v)))}
                                              for k, v in photo_sets.items()}},
               "paths": {}}

    if not args.no_client_ceiling:
        first = models[0]

        def requests_for(host, port, url, check, token):
            return client.prepare(host, port, url, sample_sets[first], check, token)

        results["client_ceiling"] = measure_client(requests_for, [16, 32], 2.0)
        for step in results["client_ceiling"]:
            log(f"[client] {step['users']:>3} users against a fixed-reply server: {step['rps']:.0f} req/s, "
                f"{step['client_cpu_us_per_req']:.0f} µs client CPU per request")

    results["in_process"] = {}
    for name in ([] if args.no_in_process else [n for n in models if n in names]):  # on the quietest machine
        entry = registry.model(name)
        batch_size = model_config(entry, overrides.get(name, {}))["batchSize"]
        results["in_process"][name] = measure_in_process(entry.versions[0].archive, sample_sets[name], batch_size,
                                                         args.seconds, log)

    if not args.no_in_process and handler_cost.MODEL in models:
        log(f"[profile] cProfile of {handler_cost.MODEL} batches of 16 through handle, in-process")
        results["profile"] = handler_cost.profile()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        staging = Path(tmp) / "staging"
        staging.mkdir()
        for model in models:  # a model's paths and peer servers all up at once, loaded in turn
            model_overrides = overrides.get(model, {})
            with contextlib.ExitStack() as stack:
                running, records = [], {}
                for path in [p for p in paths if p.entry.name == model]:
                    store = Path(tmp) / "store" / path.name  # a store per path: a model and its baseline share a name
                    store.mkdir(parents=True)
                    archive = build_archive(path, store, staging, model_overrides)
                    server = stack.enter_context(serving(path, store, archive, tmp, ts_overrides, log))
                    samples = (photo_sets if path.photos else sample_sets)[model]
                    running.append(Running(path.name, server.ports["inference"], server.process.pid,
                                           prepared(server, path, samples), [RATIO_USERS] if path.photos else users,
                                           labelled=path.check is not checks.check_noop))  # the no-op has no label
                    records[path.name] = path_record(server, path, model_overrides, ts_overrides)
                if not args.no_peers and model in names:
                    for run, record in server_peers(stack, results, model, sample_sets[model], users, overrides,
                                                    Path(tmp) / "peers", log, only=selected_peers):
                        running.append(run)
                        records[run.label] = record
                for label, steps in measure_side_by_side(running, args.seconds, args.warmup, log).items():
                    results["paths"][label] = {**records[label], "steps": steps}
    if not args.no_runtimes:
        from tests.load import runtimes  # it builds on this module

        results["runtimes"] = {name: runtimes.compare(registry.model(name), users=(1, RATIO_USERS),
                                                      seconds=args.seconds, warmup=min(args.warmup, 5.0), log=log)
                               for name in models if runtimes.exported(registry.model(name))}
    results["loadavg_after"] = loadavg()
    results["ratios"] = ratios(results)
    server_peer_ratios(results)
    results["duration_s"] = round(time.monotonic() - began, 1)

    report = table(results)
    if server_peer_lines(results):
        report += "\n\n" + server_peer_lines(results)
    if results.get("runtimes"):
        from tests.load import runtimes

        report += "\n\n" + runtimes.report(results["runtimes"])
    (out / "benchmark.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    plot(results, out / "benchmark.png")
    updated = update_doc(out / "benchmark.md", report)
    print("\n" + report + "\n")
    log(f"wrote {out / 'benchmark.json'}, {out / 'benchmark.png'}"
        + (f", table in {out / 'benchmark.md'}" if updated else "") + f" ({results['duration_s']} s)")


if __name__ == "__main__":
    main()
