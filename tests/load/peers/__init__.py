"""Other model servers serving the same model as the bundle, for `make bench` (tests/load/bench.py): LitServe, KServe's
Python model server and Ray Serve.

Each peer is a small server module here (``litserve_server``, ``kserve_server``, ``rayserve_server``) that loads the
model's default version from its artifact folder with the bundle's own handler class and model-config
(``handler.Model``: the same weights, decoding, canonicalisation, runtime, torch threads and reply as TorchServe's
worker), and serves it with that framework's documented batching set from the model-config (batchSize,
maxBatchDelay; KServe has none in its Python server) and as many workers or replicas as the model-config's
minWorkers. The bench measures each with the same client, samples and reply checks as the TorchServe paths.

The peers' packages live in their own venv, never in the serving one (requirements-peers.txt), which `make bench`
builds with scripts/peers_venv.sh.

The .pth file puts .venv's site-packages on .venv-peers' path, so torch, torchvision, Pillow, numpy and TorchServe's
``ts`` (the handler imports its metric types) are the serving venv's own builds. Without .venv-peers, or without a
peer's package, or when a peer server does not start, the bench reports that peer as skipped, with the reason.
"""

import http.client
import os
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from registry import ROOT
from tests.load import client

PYTHON = ROOT / ".venv-peers" / "bin" / "python"
MODELS = ("mnist", "fashion")
"""The models the peers serve (their handlers' replies are what checks.check_mnist and check_fashion read)."""
RATIO_TARGET = 1.5
"""The least ratio ours ÷ the fastest peer server at the ratio concurrency (16 users) that the bench aims at."""
START_TIMEOUT_S = 180.0
TOKEN = "0" * 32
"""Sent as a bearer token, as the TorchServe paths send theirs (same request size); the peers ignore it."""


class Unavailable(Exception):
    """A peer that cannot be measured here: its venv or package is missing, or its server did not start."""


@dataclass(frozen=True)
class ServerPeer:
    name: str  # the path is MODEL-<name>
    title: str
    distribution: str  # its package on PyPI (requirements-peers.txt), whose version is reported
    module: str  # the import that must work in .venv-peers
    route: str  # the prediction route, {model} filled in
    ready: str  # a route that answers 200 once the model is served
    ready_text: str | None = None  # ...and whose body then holds this

    def describe(self, model, settings, version):
        workers, batch, delay_ms = settings["workers"], settings["batch_size"], settings["max_batch_delay_s"] * 1000
        how = {
            "litserve": f"LitAPI(max_batch_size={batch}, batch_timeout={delay_ms:g} ms), workers_per_device={workers}, "
                        "fast_queue",
            "kserve": f"kserve.Model behind ModelServer(workers={workers}), no batching (KServe batches in its Go "
                      "agent sidecar, not in the Python server)",
            "rayserve": f"@serve.batch(max_batch_size={batch}, batch_wait_timeout_s={delay_ms:g} ms), num_replicas="
                        f"{workers}, max_ongoing_requests={2 * batch}",
        }[self.name]
        return (f"{self.title} {version}: {how}; POST {self.route.format(model=model)}, our handler and weights "
                "(tests/load/peers/)")

    def served(self, settings, torch_threads):
        """The bench's "server" record of this peer (workers, batching, torch threads)."""
        batching = self.name != "kserve"
        delay = round(settings["max_batch_delay_s"] * 1000, 3) if batching else 0
        return {"workers": settings["workers"], "batch_size": settings["batch_size"] if batching else 1,
                "max_batch_delay_ms": delay if delay % 1 else int(delay), "torch_threads": torch_threads}


PEERS = (
    ServerPeer("litserve", "LitServe", "litserve", "litserve", "/predictions/{model}", "/health"),
    ServerPeer("kserve", "KServe", "kserve", "kserve", "/v1/models/{model}:predict", "/v1/models/{model}"),
    ServerPeer("rayserve", "Ray Serve", "ray", "ray.serve", "/predictions/{model}", "/predictions/{model}",
               ready_text="ready"),
)


def peer(name):
    return next(p for p in PEERS if p.name == name)


def version(server_peer, python=None):
    """The installed version of ``server_peer``'s package in .venv-peers (or the venv of ``python``); ``Unavailable``
    with the reason if it cannot be imported there."""
    python = python or PYTHON
    if not Path(python).exists():
        raise Unavailable(f"{Path(python).relative_to(ROOT) if Path(python).is_relative_to(ROOT) else python} not "
                          "found (set it up as docs/benchmark.md \"Peer servers\" says)")
    found = subprocess.run([str(python), "-c", f"import importlib.metadata as m, {server_peer.module}; "
                                               f"print(m.version({server_peer.distribution!r}))"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    if found.returncode != 0:
        last = (found.stderr.strip().splitlines() or ["no output"])[-1]
        raise Unavailable(f"{server_peer.module} does not import in .venv-peers: {last}")
    return found.stdout.strip()


def settings(model_config):
    from tests.load.peers.handler import settings_of

    return settings_of(model_config)


def session_processes(sid):
    """The pids of the live processes (zombies left out) of session ``sid``."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp, session, ...
            if int(fields[3]) == sid and fields[0] != b"Z":
                found.append(int(entry.name))
    return found


def session_cpu(sid):
    """CPU-seconds used so far by the live processes of session ``sid``, as (all, all): ``client.process_group_cpu``'s
    shape (a peer has no Java frontend, so all of it is "workers")."""
    total = 0
    for pid in session_processes(sid):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        total += int(fields[11]) + int(fields[12])
    return total / client.CLOCK_TICKS, total / client.CLOCK_TICKS


@contextmanager
def counting_sessions():
    """Within it, ``client.run(server_pgid=ID)`` counts the CPU of the whole session ID rather than process group ID:
    Ray runs its actors (the Serve controller, the HTTP proxy, each replica) in process groups of their own, all in
    the session the peer server was started in."""
    saved = client.process_group_cpu
    client.process_group_cpu = session_cpu
    try:
        yield
    finally:
        client.process_group_cpu = saved


class PeerServer:
    """A peer server of ``model`` in a session of its own on ``port``: ``start`` waits for its readiness route,
    ``stop`` ends every process of the session (SIGTERM, then SIGKILL after ``grace`` seconds)."""

    def __init__(self, server_peer, model, model_config, port, workdir, torch_threads, python=None, grace=15.0):
        self.peer, self.model, self.port, self.python, self.grace = server_peer, model, port, python or PYTHON, grace
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_file = self.workdir / "model-config.yaml"
        self.config_file.write_text(yaml.safe_dump(model_config))
        self.log_file = self.workdir / "server.log"
        self.torch_threads = torch_threads
        self.process = self.ray_tmp = None

    @property
    def pid(self):
        return self.process.pid

    def start(self, timeout=START_TIMEOUT_S):
        # Ray's session folder (logs, sockets) in a short temp path of its own: a socket path has at most 107 bytes
        self.ray_tmp = tempfile.mkdtemp(prefix="peer-ray-")
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": str(self.torch_threads),
               "RAY_TMPDIR": self.ray_tmp}
        env.pop("VIRTUAL_ENV", None)
        with open(self.log_file, "wb") as log:
            self.process = subprocess.Popen(
                [str(self.python), "-m", f"tests.load.peers.{self.peer.name}_server", "--model", self.model, "--port",
                 str(self.port), "--model-config", str(self.config_file)],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        path = self.peer.ready.format(model=self.model)
        wanted = self.peer.ready_text.format(model=self.model).encode() if self.peer.ready_text else None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise Unavailable(f"the server exited with {self.process.returncode}: {self.log_tail()}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                connection.request("GET", path)
                reply = connection.getresponse()
                body = reply.read()
                connection.close()
                if reply.status == 200 and (wanted is None or wanted in body):
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        raise Unavailable(f"not ready on GET {path} within {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, lines=3):
        try:
            text = self.log_file.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return " | ".join(line.strip()[:200] for line in text[-lines:]) or "empty log"

    def stop(self):
        """SIGTERM to the server's process group, then SIGKILL to whatever of its session is left after ``grace``
        seconds (Ray's actors run in process groups of their own)."""
        if self.process is None:
            return
        try:
            os.killpg(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=self.grace)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 10
        while (left := session_processes(self.pid)) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
