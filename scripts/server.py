"""Start TorchServe with this bundle's config, serve each model as soon as it is built, and stop it again.

    python -m scripts.server start     # `make serve`: daemon from the repo root; trains and registers what is
                                       # missing, prints working curl lines once the first model is READY
    python -m scripts.server stop

Tests use ``TorchServe`` directly: it runs a private server in its own folder (own ports, pid file, logs and
key_file.json) from a copy of ``config.properties`` with chosen overrides, and always stops it.
"""

import argparse
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

import registry

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config.properties"
PORT_KEYS = {"inference": "inference_address", "management": "management_address", "metrics": "metrics_address"}


LISTENER_PORTS_FROM = 20000
"""``free_port`` draws from here up to the kernel's ephemeral range."""
_handed_out = set()


def first_ephemeral_port(path="/proc/sys/net/ipv4/ip_local_port_range"):
    """The lowest local port the kernel picks for outgoing connections and ``bind(0)``; None if unknown."""
    try:
        first, _ = map(int, Path(path).read_text().split())
    except (OSError, ValueError):
        return None
    return first


def free_port():
    """A loopback port for a server that binds it later, reserved against other processes' draws for a minute and
    never handed out twice in a process.

    Drawn below the kernel's ephemeral range: a port from ``bind(0)`` is an ephemeral one, which any outgoing
    connection (a load test's, a readiness poll's) may take as its local port before the server binds it. TorchServe
    binds its ports only once its models have loaded, seconds later, and exits when one is taken. Falls back to
    ``bind(0)`` where the range is unknown or leaves no room below it. Either way the port is left reserved
    (``reserve``), so another pytest process drawing at the same time passes it over.
    """
    ephemeral = first_ephemeral_port()
    port = None
    if ephemeral and ephemeral - LISTENER_PORTS_FROM >= 1000:
        for _ in range(100):
            candidate = random.randrange(LISTENER_PORTS_FROM, ephemeral)
            if candidate not in _handed_out and (port := reserve(candidate)):
                break
    port = port or reserve(0)
    _handed_out.add(port)
    return port


def reserve(port):
    """Bind ``port`` (0: the kernel picks) and leave it in TIME_WAIT; the port, or None if it is taken.

    The trick of Yelp's ephemeral-port-reserve: the server side of one loopback connection closes first, so the port
    stays in TIME_WAIT for a minute (Linux). Until then a bind without SO_REUSEADDR fails, as ``reserve``'s own does,
    while a server that sets SO_REUSEADDR binds it: TorchServe's Netty, uvicorn, Go's listeners (Prometheus) all do.
    """
    with socket.socket() as listener:
        try:
            listener.bind(("127.0.0.1", port))
        except OSError:
            return None
        # set after the bind, which must fail on a reservation; the TIME_WAIT inherits it, so servers bind through
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.listen(1)
        with socket.create_connection(listener.getsockname()):
            accepted, _ = listener.accept()
            accepted.close()
        return listener.getsockname()[1]


def read_properties(path):
    """config.properties as an ordered dict (comments dropped)."""
    properties = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            properties[key.strip()] = value.strip()
    return properties


def client_session():
    """A requests.Session for a TorchServe of this module: TLS not verified (TLS tests use a self-signed
    certificate) and the environment ignored (REQUESTS_CA_BUNDLE or proxies would override that)."""
    session = requests.Session()
    session.verify = False
    session.trust_env = False
    return session


class TorchServe:
    """One TorchServe process tree started from ``config`` with ``overrides``, living in ``workdir``."""

    def __init__(self, workdir, model_store=ROOT / "model_store", models="all", overrides=None, config=CONFIG,
                 scheme="http"):
        self.workdir = Path(workdir)
        self.model_store = Path(model_store).resolve()
        self.models = models
        self.scheme = scheme
        self.ports = {name: free_port() for name in PORT_KEYS}
        self.properties = read_properties(config)
        self.properties.update({key: f"{scheme}://127.0.0.1:{self.ports[name]}" for name, key in PORT_KEYS.items()})
        self.properties.update({"model_store": str(self.model_store), "metrics_config": str(ROOT / "metrics.yaml"),
                                # TorchServe always opens gRPC ports: private ones, so instances can run side by side
                                "grpc_inference_port": str(free_port()), "grpc_management_port": str(free_port())})
        self.properties.update(overrides or {})
        self.process = None
        self.session = client_session()

    # --- lifecycle -----------------------------------------------------------------------------------------------

    def start(self, timeout=180, expect_ready=None):
        """Start in the foreground of a new process group; wait for ``expect_ready`` versions (default: all)."""
        for sub in ("logs", "tmp"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.properties"
        config.write_text("".join(f"{key}={value}\n" for key, value in self.properties.items()))
        # TMPDIR: the launcher's pid file; TEMP: java.io.tmpdir, where worker sockets and unpacked models live.
        env = dict(os.environ, TMPDIR=str(self.workdir / "tmp"), TEMP=str(self.workdir / "tmp"),
                   LOG_LOCATION=str(self.workdir / "logs"),
                   METRICS_LOCATION=str(self.workdir / "logs"), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        env.pop("TS_CONFIG_FILE", None)  # the activated venv's (scripts/venv_hook.sh) would win over --ts-config
        command = ["torchserve", "--start", "--foreground", "--ncs", "--ts-config", str(config),
                   "--model-store", str(self.model_store), "--models", self.models]
        with open(self.workdir / "logs" / "console.log", "ab") as console:
            self.process = subprocess.Popen(command, cwd=self.workdir, env=env, stdout=console,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready(timeout, expect_ready)
        return self

    def stop(self, timeout=30):
        """Stop the whole process tree (frontend and workers); safe to call twice."""
        if self.process is None or self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # workers left behind in the group
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def wait_ready(self, timeout=180, expect_ready=None):
        """Block until ``expect_ready`` model versions (default: every .mar in the store) have all workers READY."""
        expected = expect_ready if expect_ready is not None else len(list(self.model_store.glob("*.mar")))
        deadline = time.monotonic() + timeout
        ready = 0
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"TorchServe exited with {self.process.returncode}:\n{self.log_tail()}\n"
                                   f"console.log (the frontend's exceptions):\n{self.log_tail('console.log', 20)}")
            try:
                ready = len(self.ready_versions())
                if ready >= expected:
                    return
            except (requests.ConnectionError, FileNotFoundError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{ready}/{expected} model versions READY after {timeout}s:\n{self.log_tail()}")

    def ready_versions(self):
        """(model, version) pairs whose workers are all READY."""
        ready = []
        for model in self.management("GET", "/models").json()["models"]:
            for version in self.management("GET", f"/models/{model['modelName']}/all").json():
                workers = version.get("workers", [])
                if workers and all(w["status"] == "READY" for w in workers):
                    ready.append((version["modelName"], version["modelVersion"]))
        return ready

    # --- HTTP ----------------------------------------------------------------------------------------------------

    def url(self, api, path=""):
        return f"{self.scheme}://127.0.0.1:{self.ports[api]}{path}"

    def token(self, api):
        """The current key for ``inference`` or ``management`` from this server's key_file.json."""
        keys = json.loads((self.workdir / "key_file.json").read_text())
        return keys[api]["key"]

    def request(self, api, method, path, token=True, session=None, **kwargs):
        """One HTTP request to an API of this server, with its token; ``session``: a client's own requests.Session
        (its own keep-alive connections) instead of this server's."""
        headers = kwargs.pop("headers", {})
        if token is True:
            headers["Authorization"] = f"Bearer {self.token(api)}"
        elif token:
            headers["Authorization"] = f"Bearer {token}"
        kwargs.setdefault("timeout", 60)
        return (session or self.session).request(method, self.url(api, path), headers=headers, **kwargs)

    def inference(self, method, path, **kwargs):
        return self.request("inference", method, path, **kwargs)

    def management(self, method, path, **kwargs):
        return self.request("management", method, path, **kwargs)

    def predict(self, model, body=None, version=None, **kwargs):
        path = f"/predictions/{model}" + (f"/{version}" if version else "")
        return self.inference("POST", path, data=body, **kwargs)

    def metrics(self):
        return self.request("metrics", "GET", "/metrics", token=False).text

    def worker_pids(self, model, version=None):
        """Worker pids of a model version, from the management API's describe."""
        described = self.management("GET", f"/models/{model}" + (f"/{version}" if version else "")).json()
        return sorted(w["pid"] for entry in described for w in entry["workers"])

    def log_tail(self, name="ts_log.log", lines=60):
        log = self.workdir / "logs" / name
        text = log.read_text(errors="replace") if log.exists() else ""
        console = self.workdir / "logs" / "console.log"
        if not text and console.exists():
            text = console.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def stale_archives() -> list[str]:
    """The served archives that make would (re)build, in registry order (`make -q` builds nothing)."""
    return [version.archive for _, version in registry.served()
            if subprocess.run(["make", "-q", f"model_store/{version.archive}.mar"], cwd=ROOT,
                              capture_output=True).returncode != 0]


def serve_config(properties: dict, loaded: list[str], registering: bool) -> Path:
    """logs/serve.properties: config.properties' ``properties`` with only the up-to-date archives to load, and
    while any archive is still to be trained, the model API on so that `make serve` can register it once built (by
    file name from the local model store only: allowed_urls=^$; management API on loopback, behind its token)."""
    served = {**properties, "load_models": ",".join(f"{stem}.mar" for stem in loaded)}
    if registering:
        served["enable_model_api"] = "true"
    path = ROOT / "logs" / "serve.properties"
    path.write_text("# Written by `make serve` (scripts/server.py) from config.properties.\n"
                    + "".join(f"{key}={value}\n" for key, value in served.items()))
    return path


def start_daemon(since: float):
    """`make serve`: TorchServe from the repo root as a daemon, serving each model as soon as its archive is built.

    The archives that are up to date are served at once; the others are trained and archived in registry order
    (``Builder``: two light versions at a time) and registered as each one is built, so the quick models answer
    while the slow ones train.
    Times are reported from ``since`` (seconds since the epoch: when `make serve` started, setup included)."""
    started = time.monotonic() - (time.time() - since)
    pending = stale_archives()
    loaded = [version.archive for _, version in registry.served() if version.archive not in pending]
    properties = read_properties(CONFIG)
    stop_torchserve()  # a running one, gone
    (ROOT / "logs").mkdir(exist_ok=True)
    config = serve_config(properties, loaded, registering=bool(pending))
    env = {key: value for key, value in os.environ.items() if key != "TS_CONFIG_FILE"}  # it would win over --ts-config
    with open(ROOT / "logs" / "console.log", "ab") as console:  # the daemon must not hold the caller's terminal/pipe
        # A session of its own: Ctrl-C on `make serve` while models train must not reach TorchServe.
        subprocess.run(["torchserve", "--start", "--ncs", "--ts-config", str(config)], cwd=ROOT, env=env,
                       check=True, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                       start_new_session=True)
    server = TorchServe(ROOT, model_store=ROOT / properties["model_store"])
    server.ports = {name: int(re.search(r":(\d+)$", properties[key]).group(1)) for name, key in PORT_KEYS.items()}
    print(f"==> [serve] TorchServe starting with {len(loaded)} built version(s) (logs/ts_log.log)", flush=True)
    registrar = Registrar(server, started, pending)
    try:
        # One thread registers, in order: first the wait for the server and the built versions, then each archive
        # as make finishes it; so each model's workers load while the next model trains. The built versions are
        # shown before any training starts; with none (a fresh clone), TorchServe starts while the first trains.
        with ThreadPoolExecutor(max_workers=1) as registering:
            starting = registering.submit(registrar.start, len(loaded))
            if loaded:
                starting.result()
            builder = Builder(pending, lambda stem: registering.submit(registrar.register, stem), registrar.failed,
                              starting)
            try:
                builder.run()
            except KeyboardInterrupt:
                builder.stop()
                raise
    except KeyboardInterrupt:
        sys.exit("\nmake serve: stopped while building; TorchServe goes on serving the READY models "
                 "(make stop stops it; make serve again builds the rest)")
    except (RuntimeError, TimeoutError) as error:  # from starting.result(): TorchServe did not come up
        sys.exit(f"make serve: TorchServe did not start: {error}")
    try:
        starting.result()
    except (RuntimeError, TimeoutError) as error:
        sys.exit(f"make serve: TorchServe did not start: {error}")
    if pending:
        report_ready(server, started, final=True)
    if registrar.failed:
        sys.exit(f"make serve: {', '.join(registrar.failed)} could not be built or served (above); the others are "
                 f"served")


class Builder:
    """Builds the pending archives with make in registry order: two light versions (registry ``Version.light``: one
    torch thread each) side by side, so that on 2 cores they, and their single-threaded stretches (start-up, data,
    export, archive), overlap; every other build alone, on every core. Each build's output lines are prefixed with
    its archive name; ``built(stem)`` is called as each one is built."""

    def __init__(self, pending: list[str], built, failed: list[str], starting):
        self.queue, self.built, self.failed, self.starting = list(pending), built, failed, starting
        self.condition = threading.Condition()
        self.running, self.stopping = {}, False  # running: {lane: light}
        self.lanes = [threading.Thread(target=self.lane, args=(i,), daemon=True) for i in range(2)]

    def run(self) -> None:
        for lane in self.lanes:
            lane.start()
        for lane in self.lanes:
            lane.join()

    def stop(self) -> None:
        """Ctrl-C: the builds in progress got the signal too; start no other one and wait for those to end."""
        with self.condition:
            self.stopping = True
            self.condition.notify_all()
        for lane in self.lanes:
            if lane.is_alive():
                lane.join()

    def lane(self, index: int) -> None:
        while True:
            with self.condition:
                while True:
                    # TorchServe did not start: build nothing more; start_daemon says why, not after the training
                    if self.stopping or not self.queue or self.starting.done() and self.starting.exception():
                        return
                    light = registry.archive(self.queue[0])[1].light
                    if not self.running or (light and all(self.running.values())):
                        break
                    self.condition.wait()
                stem = self.queue.pop(0)
                self.running[index] = light
            try:
                self.build(stem)
            finally:
                with self.condition:
                    del self.running[index]
                    self.condition.notify_all()

    def build(self, stem: str) -> None:
        """``make model_store/<stem>.mar``, training first where needed."""
        with self.condition:
            rest = ", ".join(self.queue)
        print(f"==> [serve] building {stem}.mar" + (f"; still to build: {rest}" if rest else ""), flush=True)
        process = subprocess.Popen(["make", "--no-print-directory", f"model_store/{stem}.mar"], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in process.stdout:
            print(f"[{stem}] {line}", end="", flush=True)
        code = process.wait()
        if code == -signal.SIGINT:  # make re-raises Ctrl-C: build nothing more (stop() is on its way)
            self.stopping = True
        elif code == 0:
            self.built(stem)
        elif not self.stopping:
            self.failed.append(stem)
            print(f"==> [serve] building {stem}.mar failed (above); going on with the others", flush=True)


class Registrar:
    """Registers each archive that `make serve` builds (by file name: the model-config's workers, waiting until they
    are READY); the curl lines are shown once the first version is READY, and again at the end."""

    def __init__(self, server: TorchServe, started: float, pending: list[str]):
        self.server, self.started = server, started
        self.unregistered = len(pending)
        self.failed: list[str] = []
        self.announced = False

    def start(self, loaded: int) -> None:
        """Wait for TorchServe and the ``loaded`` versions it loads at start; show them (unless there are none)."""
        self.server.wait_ready(timeout=300, expect_ready=loaded)
        if loaded:
            report_ready(self.server, self.started, final=not self.unregistered)
            self.announced = True

    def register(self, stem: str) -> None:
        self.unregistered -= 1
        try:
            reply = self.server.management("POST", "/models", params={"url": f"{stem}.mar", "synchronous": "true"},
                                           timeout=600)
        except requests.RequestException as error:
            reply = error
        if not isinstance(reply, requests.Response) or reply.status_code != 200:
            self.failed.append(stem)
            answer = f"{reply.status_code} {reply.text.strip()}" if isinstance(reply, requests.Response) else reply
            print(f"==> [serve] registering {stem}.mar failed: {answer} (logs/ts_log.log, logs/model_log.log)",
                  flush=True)
            return
        entry, version = registry.archive(stem)
        keep_default_version(self.server, entry, version)
        print(f"    READY  {entry.name} {version.version}  ({minutes(self.started)})", flush=True)
        if not self.announced and self.unregistered:  # the last one's READY is followed by the final report
            report_ready(self.server, self.started, final=False, list_versions=False)  # its READY line is above
            self.announced = True


def keep_default_version(server: TorchServe, entry: registry.Model, version: registry.Version) -> None:
    """After registering ``version`` of ``entry``: the registry's first version of the model stays the default."""
    default = entry.versions[0].version
    if version.version != default and (entry.name, default) in server.ready_versions():
        server.management("PUT", f"/models/{entry.name}/{default}/set-default").raise_for_status()


def minutes(started: float) -> str:
    seconds = int(time.monotonic() - started)
    return f"{seconds // 60} min {seconds % 60:02d} s after make serve started"


def report_ready(server: TorchServe, started: float, final: bool, list_versions: bool = True) -> None:
    """The READY versions (``list_versions``) and curl lines for them; ``final``: nothing is left to build."""
    ready = sorted(server.ready_versions())
    for model, version in ready if list_versions else ():
        print(f"    READY  {model} {version}")
    inference, management, metrics = (server.url(api) for api in ("inference", "management", "metrics"))
    examples = "\n".join(f"  {line}" for line in registry.curl_examples(inference, set(ready)))
    expected = len(registry.served())
    if final and len(ready) >= expected:
        headline = f"Every model is READY ({minutes(started)}). TorchServe is running (stop it with: make stop)."
    elif final:
        headline = (f"{len(ready)} of {expected} versions READY ({minutes(started)}). TorchServe is running "
                    f"(stop it with: make stop).")
    else:
        headline = (f"{len(ready)} version(s) READY ({minutes(started)}); the others are being trained and will be "
                    f"served as each one is built.\nTry these now, in another terminal (stop the server with: "
                    f"make stop).")
    print(f"""
{headline} Tokens are in key_file.json:

  TOKEN=$(python3 -c 'import json; print(json.load(open("key_file.json"))["inference"]["key"])')
  MGMT=$(python3 -c 'import json; print(json.load(open("key_file.json"))["management"]["key"])')
{examples}
  curl -H "Authorization: Bearer $MGMT" {management}/models
  curl {metrics}/metrics
""", flush=True)


def stop_torchserve() -> subprocess.CompletedProcess:
    """TorchServe's ``--stop``, waiting (its ``--foreground``, up to 60 s) until the frontend has exited: its workers
    exit before it, so nothing of the server is left when this returns (without the wait they lingered a few seconds,
    holding their sockets)."""
    return subprocess.run(["torchserve", "--stop", "--foreground"], cwd=ROOT, capture_output=True, text=True)


def stop() -> int:
    """`make stop`: ``stop_torchserve``, printing TorchServe's answer."""
    result = stop_torchserve()
    print(result.stdout.strip() or "TorchServe has stopped.")
    if result.stderr:
        print(result.stderr.strip(), file=sys.stderr)
    return result.returncode


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--since", type=float, default=time.time(),
                        help="start: report times from this moment, in seconds since the epoch (default: now)")
    args = parser.parse_args()
    if args.action == "start":
        start_daemon(args.since)
    else:
        sys.exit(stop())


if __name__ == "__main__":
    main()
