"""Faults against a real TorchServe: a killed worker, scaling under load, a restart, corrupt archives, timeouts.

Every test here runs its own TorchServe (``tests/fixtures/servers.PrivateTorchServe``, free ports, own sockets),
never the session ``server``: they kill workers, scale and restart. Loads are bounded (fixed request counts, a few
clients) and go to 127.0.0.1 only.
"""

import json
import os
import re
import signal
import threading
import time
from dataclasses import dataclass

import pytest

from scripts.server import client_session
from tests.fixtures.raising_handler import LOAD_ERROR
from tests.fixtures.servers import (FIXTURES, STORE, PrivateTorchServe, build_slow_archive, rezip, serialized_file,
                                    store_with)
from tests.samples import heldout_digits, heldout_patients, render_digit

pytestmark = pytest.mark.slow  # starts a real TorchServe

JSON = {"Content-Type": "application/json"}
HEALTHY = {"status": "Healthy"}


@dataclass
class Result:
    status: int  # 0: no HTTP answer (connection error)
    body: object
    sent: float
    done: float
    client: int  # the client thread that sent it, on keep-alive connections of its own


class Load:
    """A bounded load: ``clients`` threads call ``send(i, session)`` for i in range(total), each request once, until
    all were sent or ``stop()``; ``join()`` returns the result of every request sent, in order. Each thread has its
    own ``requests.Session``, so its requests follow one another on its own keep-alive connection, as one client's
    would."""

    def __init__(self, send, total, clients):
        self.send, self.total, self.clients = send, total, clients
        self.results = [None] * total
        self._next = 0
        self._done = 0
        self._stopped = False
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(client,), daemon=True)
                         for client in range(clients)]

    def _client(self, client):
        with client_session() as session:
            self._send_until_done(client, session)

    def _send_until_done(self, client, session):
        while True:
            with self._lock:
                if self._next >= self.total or self._stopped:
                    return
                i, self._next = self._next, self._next + 1
            sent = time.monotonic()
            try:
                reply = self.send(i, session)
                try:
                    body = reply.json()
                except ValueError:
                    body = reply.text
                result = Result(reply.status_code, body, sent, time.monotonic(), client)
            except Exception as err:  # noqa: BLE001 - a lost connection is a failed request, counted like one
                result = Result(0, repr(err), sent, time.monotonic(), client)
            with self._lock:
                self.results[i] = result
                self._done += 1

    @property
    def completed(self):
        return self._done

    def start(self):
        for thread in self._threads:
            thread.start()
        return self

    def wait_completed(self, count, timeout=60):
        deadline = time.monotonic() + timeout
        while self.completed < count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.completed >= count, f"only {self.completed}/{count} requests answered in {timeout}s"

    def stop(self):
        with self._lock:
            self._stopped = True

    def join(self, timeout=120):
        for thread in self._threads:
            thread.join(timeout)
        sent = self.results[: self._next]
        assert all(r is not None for r in sent), "the load did not finish"
        return sent


@pytest.fixture(scope="module")
def digits():
    """A few held-out digits as PNG bodies."""
    images, _ = heldout_digits(count=8)
    return [render_digit(image, 28) for image in images]


class Holder:
    """The module's current server (the restart test swaps in the restarted one)."""

    server = None


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    """A TorchServe for the fault tests: mnist 1.0 and 2.0 (real archives) and the test-only slow archive."""
    root = tmp_path_factory.mktemp("faults")
    store = store_with(root / "store", "mnist", "mnist_v2")
    build_slow_archive(store)
    holder = Holder()
    holder.server = PrivateTorchServe(root / "server", model_store=store)
    try:
        holder.server.start(timeout=240)
        yield holder
    finally:
        holder.server.stop()


def ping(server):
    reply = server.inference("GET", "/ping", timeout=10)
    return reply.status_code == 200 and reply.json() == HEALTHY


def labels_of(server, digits, version):
    return [server.predict("mnist", body, version=version).json()["label"] for body in digits]


def test_sigkill_worker_under_load_loses_at_most_its_batch(faults, digits):
    """SIGKILL mnist 1.0's worker mid-load: only the requests in flight on it may fail, and at most one batch.

    The bound is read from the live model config (batchSize x killed workers), not assumed. Every other request of
    the load is answered 200 with the label of its own image (no reply mixed up between requests), a replacement
    worker comes up, /ping is Healthy again and later requests succeed.
    """
    server = faults.server
    expected = labels_of(server, digits, "1.0")  # per image, before the fault
    config = server.describe("mnist", "1.0")
    victims = [w["pid"] for w in config["workers"]]
    assert len(victims) == config["minWorkers"] == 1
    bound = config["batchSize"] * len(victims)

    load = Load(lambda i, session: server.predict("mnist", digits[i % len(digits)], version="1.0", session=session),
                total=300, clients=8)
    load.start().wait_completed(40)
    killed_at = time.monotonic()
    os.kill(victims[0], signal.SIGKILL)
    results = load.join()

    failed = [(i, r) for i, r in enumerate(results) if r.status != 200]
    print(f"\nworker kill: {len(failed)} of {len(results)} requests failed (bound {bound}): "
          f"{sorted({(r.status, str(r.body)[:80]) for _, r in failed})}")
    assert len(failed) <= bound
    for _, r in failed:  # the killed worker's batch, answered as such when its death is noticed - nothing else
        assert r.status in (500, 507) and r.body.get("message") == "Worker died.", r
        assert abs(r.done - killed_at) < 5, r
    for i, r in enumerate(results):
        if r.status == 200:
            assert r.body["label"] == expected[i % len(digits)] and r.body["version"] == "1.0", (i, r.body)
    assert sum(r.status == 200 and r.done > killed_at for r in results) > 0, "nothing was served after the kill"

    replaced = server.wait_for(lambda: [w["pid"] for w in server.describe("mnist", "1.0")["workers"]
                                        if w["status"] == "READY" and w["pid"] not in victims],
                               what="a READY replacement worker")
    assert not set(replaced) & set(victims)
    server.wait_for(lambda: ping(server), timeout=30, what="/ping Healthy")
    assert labels_of(server, digits, "1.0") == expected


def put_workers(server, model, version, workers, maximum=None):
    """The synchronous scaling request of one model version; returns the reply."""
    return server.management("PUT", f"/models/{model}/{version}?min_worker={workers}"
                                    f"&max_worker={maximum or workers}&synchronous=true", timeout=120)


def scale(server, model, version, workers, maximum=None):
    """Synchronous scaling of one model version; returns the seconds the management call took."""
    started = time.monotonic()
    reply = put_workers(server, model, version, workers, maximum)
    assert reply.status_code == 200, reply.text
    return time.monotonic() - started


def ready_workers(server, model, version):
    return [w["pid"] for w in server.describe(model, version)["workers"] if w["status"] == "READY"]


@pytest.fixture
def mnist_v2_scaling(faults):
    """Restores mnist 2.0's configured workers after a scaling test (best effort: see the scale-down test)."""
    server = faults.server
    config = server.describe("mnist", "2.0")
    assert config["maxWorkers"] >= 3, "model-config maxWorkers must allow a scale-up to 3"
    yield server
    scale(server, "mnist", "2.0", config["minWorkers"])
    try:
        server.wait_for(lambda: len(server.worker_pids("mnist", "2.0")) == config["minWorkers"], timeout=20)
    except TimeoutError:
        print(f"\nmnist 2.0 kept {server.worker_pids('mnist', '2.0')} after scaling to {config['minWorkers']}")
    scale(server, "mnist", "2.0", config["minWorkers"], config["maxWorkers"])


def scaling_load(server, digits):
    """A load on mnist 2.0 (at most 3000 requests, 4 clients; a request unanswered for 10 s counts as lost)."""
    return Load(lambda i, session: server.predict("mnist", digits[i % len(digits)], version="2.0", timeout=10,
                                                  session=session), total=3000, clients=4)


def mislabelled(results, expected):
    """(one_behind, mixed_up): (request index, expected label, reply) of every 200 reply with another image's label
    (request i sends image i % len(expected)). ``one_behind``: the label of the same client's previous request, i.e.
    that request was answered twice and the client's keep-alive connection read the second answer as the reply to
    its next request. ``mixed_up``: any other, a reply that went to the wrong request."""
    label = [expected[i % len(expected)] for i in range(len(results))]
    previous, one_behind, mixed_up = {}, [], []
    for i, result in sorted(enumerate(results), key=lambda item: item[1].sent):  # each client's requests in order
        before, previous[result.client] = previous.get(result.client), i
        answered = result.body.get("label") if isinstance(result.body, dict) else None
        if result.status == 200 and answered != label[i]:
            wrong = one_behind if before is not None and answered == label[before] else mixed_up
            wrong.append((i, label[i], result.body))
    return one_behind, mixed_up


def test_a_reply_one_request_late_is_told_from_a_mixed_up_one():
    def reply(label, sent, client):
        return Result(200, {"label": label}, sent, sent, client)

    expected = ["a", "b", "c"]  # request i sends image i % 3
    results = [reply("a", 0, 0), reply("a", 2, 0), reply("b", 1, 1)]  # client 0 sends 0 then 1, client 1 sends 2
    assert mislabelled(results, expected) == ([(1, "b", {"label": "a"})], [(2, "c", {"label": "b"})])
    assert mislabelled([reply("a", 0, 0), reply("b", 1, 0), reply("c", 2, 1)], expected) == ([], [])


def test_scaling_up_under_load_fails_no_request(mnist_v2_scaling, digits):
    """Scale mnist 2.0 from 1 to 3 workers through the management API while a load runs: every request succeeds."""
    server = mnist_v2_scaling
    expected = labels_of(server, digits, "2.0")
    load = scaling_load(server, digits).start()
    try:
        load.wait_completed(20)
        seconds = scale(server, "mnist", "2.0", 3)
        # TorchServe answers the synchronous call once the workers are started; one may turn READY a moment later
        # (seen once in a clean-clone CI run: 2 READY right after the 200)
        server.wait_for(lambda: len(ready_workers(server, "mnist", "2.0")) == 3, timeout=30, what="3 READY workers")
        load.wait_completed(load.completed + 40)
    finally:
        load.stop()
        results = load.join()
    failed = [(i, r.status, r.body) for i, r in enumerate(results) if r.status != 200]
    print(f"\nscale-up 1->3 under load: {seconds:.1f}s, {len(results)} requests, {len(failed)} failed")
    assert not failed, failed
    assert mislabelled(results, expected) == ([], [])


def test_scaling_down_under_load_loses_at_most_the_removed_workers_batches(mnist_v2_scaling, digits):
    """Scale mnist 2.0 from 3 workers to 1 while a load runs: no request should fail (a failure is an XFAIL naming
    TorchServe's race), and none may fail beyond the removed workers' batches in flight (a FAIL).

    TorchServe 0.12's scale-down is not graceful, and racy under load (measured here, 2-core machine, 4 clients:
    most scale-downs hit at least one of these): a batch in flight on a removed worker is answered 500 "Worker
    died."; sometimes a request is dropped with no answer at all (the client waits until its own timeout; the
    frontend logs "Unexpected job in sendError()"); rarely a request is answered twice, and its client's keep-alive
    connection then reads each reply one request late (every wrong label seen was that of the same client's
    previous request); sometimes a removed worker stays READY although max_worker=1; sometimes the scaling call
    itself is answered 500 ConcurrentModificationException, and is sent again (docs/security.md).
    That is upstream, outside what the bundle can fix, so when it happens this test is marked XFAIL with what
    was seen. What TorchServe does guarantee is asserted: only requests in flight on the removed workers are
    affected (at most batchSize x removed workers, all "Worker died." or unanswered), and no request gets another
    client's answer. docs/security.md: scale down when idle, and clients retry idempotent predictions.
    """
    server = mnist_v2_scaling
    expected = labels_of(server, digits, "2.0")
    batch = server.describe("mnist", "2.0")["batchSize"]
    scale(server, "mnist", "2.0", 3)
    load = scaling_load(server, digits).start()
    try:
        load.wait_completed(40)
        started, refused = time.monotonic(), 0
        reply = put_workers(server, "mnist", "2.0", 1)
        while reply.status_code == 500 and reply.json().get("type") == "ConcurrentModificationException" \
                and refused < 3:  # the frontend's worker list changed while the call walked it: send it again
            refused += 1
            reply = put_workers(server, "mnist", "2.0", 1)
        assert reply.status_code == 200, reply.text
        seconds = time.monotonic() - started
        load.wait_completed(load.completed + 40)
    finally:
        load.stop()
        results = load.join()
    try:
        server.wait_for(lambda: len(ready_workers(server, "mnist", "2.0")) == 1, timeout=10)
        extra = []
    except TimeoutError:
        extra = ready_workers(server, "mnist", "2.0")[1:]
    lost = [i for i, r in enumerate(results) if r.status == 0 and "ReadTimeout" in str(r.body)]
    died = [i for i, r in enumerate(results) if r.status in (500, 507) and r.body.get("message") == "Worker died."]
    other = [(i, r.status, r.body) for i, r in enumerate(results) if r.status != 200 and i not in lost + died]
    one_behind, mixed_up = mislabelled(results, expected)
    seen = (f"{len(results)} requests, {len(died)} answered 'Worker died.', {len(lost)} never answered, "
            f"{len(one_behind)} answered with the previous request's reply, {len(extra)} removed worker(s) still "
            f"READY, the scaling call refused {refused} time(s)")
    print(f"\nscale-down 3->1 under load ({seconds:.1f}s): {seen}")
    assert not other, other
    assert len(died) + len(lost) <= batch * 2, (died, lost)
    assert not mixed_up, mixed_up
    if died or lost or one_behind or extra or refused:
        pytest.xfail(f"TorchServe 0.12 scale-down under load is not graceful: {seen}")


def test_response_timeout_gives_an_error_and_the_worker_recovers(faults, digits):
    """A request past the model's responseTimeout is answered with a JSON 5xx right after the timeout (not when the
    handler finishes); the log says why; a new worker replaces the stuck one and serves; other models are unaffected.

    TorchServe 0.12 answers a response timeout with 500 {"type": "InternalServerException", "message": "Worker
    died."} - the same answer as a crashed worker; the frontend log names the cause ("did not respond in given
    time"). docs/security.md tells clients to treat it as retryable.
    """
    server = faults.server
    config = server.describe("slow", "1.0")
    timeout = config["responseTimeout"]
    sleep = timeout + 8
    stuck = server.worker_pids("slow", "1.0")
    answer = {}

    def slow_request():
        started = time.monotonic()
        reply = server.predict("slow", json.dumps({"sleep": sleep}), headers=JSON, timeout=sleep + 30)
        answer.update(status=reply.status_code, body=reply.json(), seconds=time.monotonic() - started)

    thread = threading.Thread(target=slow_request)
    thread.start()
    time.sleep(0.5)
    other = server.predict("mnist", digits[0], version="1.0")  # another model while slow's worker is stuck
    assert other.status_code == 200
    thread.join(sleep + 40)

    assert 500 <= answer["status"] < 600 and set(answer["body"]) == {"code", "type", "message"}, answer
    assert timeout <= answer["seconds"] < sleep, answer  # answered at the timeout, not when the sleep ended
    print(f"\nresponse timeout ({timeout}s, handler sleeping {sleep}s): {answer}")
    lines = server.log_lines("ts_log.log")
    assert any("did not respond in given time" in line for line in lines)
    assert any("W-" in line and "slow_1.0" in line and "ERROR" in line for line in lines)

    fresh = server.wait_for(lambda: [pid for pid in server.worker_pids("slow", "1.0") if pid not in stuck]
                            and server.describe("slow", "1.0")["workers"][0]["status"] == "READY",
                            what="slow's replacement worker READY")
    assert fresh
    reply = server.predict("slow", json.dumps({"sleep": 0}), headers=JSON)
    assert reply.status_code == 200 and reply.json()["pid"] not in stuck
    server.wait_for(lambda: ping(server), timeout=30, what="/ping Healthy")


def test_restart_brings_back_the_same_models_and_versions(faults, digits):
    """Stop and start the server: the same model versions come back, from config.properties + load_models=all.

    The bundle runs TorchServe with --ncs (no config snapshots): the archives in the model store and the
    model-config.yaml inside each are the single source of truth, so a restart cannot resurrect a runtime change
    (a scale-up, a set-default, a model registered by hand) that is in no file under version control, nor keep a
    stale snapshot after an archive was rebuilt. Checked here: no snapshot is written, a runtime scale-up does not
    survive the restart, and the restart mints new tokens (the old ones stop working).
    """
    server = faults.server
    before = sorted(server.ready_versions())
    assert ("mnist", "1.0") in before and ("mnist", "2.0") in before
    default_before = server.predict("mnist", digits[0]).json()["version"]
    labels_before = labels_of(server, digits, "2.0")
    workers = server.describe("mnist", "1.0")["minWorkers"]
    scaled = server.management("PUT", f"/models/mnist/1.0?min_worker={workers + 1}&synchronous=true", timeout=120)
    assert scaled.status_code == 200, scaled.text
    old_token = server.token("management")

    server.stop()
    assert not (server.workdir / "logs" / "config").exists(), "a config snapshot was written despite --ncs"
    faults.server = restarted = PrivateTorchServe(server.workdir, model_store=server.model_store)
    started = time.monotonic()
    restarted.start(timeout=240)
    print(f"\nrestart: READY again {time.monotonic() - started:.1f}s after start, {sorted(restarted.ready_versions())}")
    assert sorted(restarted.ready_versions()) == before
    assert len(restarted.worker_pids("mnist", "1.0")) == workers  # the runtime scale-up is gone
    assert restarted.predict("mnist", digits[0]).json()["version"] == default_before
    assert labels_of(restarted, digits, "2.0") == labels_before
    assert restarted.management("GET", "/models", token=old_token).status_code == 400  # tokens minted anew
    assert restarted.management("GET", "/models").status_code == 200


@pytest.fixture(scope="module")
def broken_store(tmp_path_factory):
    """A store with one good archive and two broken copies of mnist.mar, each under its own model name."""
    store = store_with(tmp_path_factory.mktemp("broken") / "store", "regression")
    source = STORE / "mnist.mar"
    rezip(source, store / "mnist_corrupt.mar", "mnist_corrupt",
          replace={serialized_file(source): b"this is not a torch checkpoint \x00\xff" * 64})
    rezip(source, store / "mnist_raising.mar", "mnist_raising", handler="raising_handler.py",
          add={"raising_handler.py": (FIXTURES / "raising_handler.py").read_bytes()})
    return store


@pytest.fixture(scope="module")
def broken(broken_store, tmp_path_factory):
    """A TorchServe on the broken store: only the good archive can become READY."""
    server = PrivateTorchServe(tmp_path_factory.mktemp("broken_server"), model_store=broken_store)
    try:
        yield server.start(timeout=240, expect_ready=1)
    finally:
        server.stop()


def load_errors(server, model):
    """The exception lines (``SomeError: message``) logged by ``model``'s workers."""
    return [line for line in server.log_lines("model_log.log")
            if f"-{model}_1.0-" in line and re.search(r"MODEL_LOG - [\w.]*(Error|Exception)\b.*: ", line)]


def test_broken_archives_fail_alone_and_the_good_one_serves(broken):
    """Both broken archives are registered, never READY, and the good model answers as usual."""
    assert broken.ready_versions() == [("regression", "1.0")]
    registered = {m["modelName"] for m in broken.management("GET", "/models").json()["models"]}
    assert registered == {"regression", "mnist_corrupt", "mnist_raising"}
    broken.wait_for(lambda: load_errors(broken, "mnist_corrupt") and load_errors(broken, "mnist_raising"),
                    timeout=90, what="a load error from each broken archive")
    for model in ("mnist_corrupt", "mnist_raising"):
        workers = broken.describe(model, "1.0")["workers"]
        assert all(w["status"] != "READY" for w in workers), (model, workers)
    reply = broken.predict("regression", json.dumps(heldout_patients()[0][0]), headers=JSON)
    assert reply.status_code == 200 and isinstance(reply.json()["prediction"], float), reply.text


def test_handler_that_raises_on_load_is_logged_with_model_and_reason(broken):
    lines = broken.wait_for(lambda: [line for line in load_errors(broken, "mnist_raising") if LOAD_ERROR in line],
                            timeout=90, what="mnist_raising's load error in the log")
    print("\n" + lines[-1])


def test_corrupt_weights_are_logged_with_model_and_reason(broken):
    """The last exception line of mnist_corrupt's failed load names the weights file it could not load."""
    weights = serialized_file(STORE / "mnist.mar")
    broken.wait_for(lambda: load_errors(broken, "mnist_corrupt"), timeout=90, what="mnist_corrupt's load error")
    errors = load_errors(broken, "mnist_corrupt")
    print("\n" + errors[-1])
    assert any(weights in line for line in errors), errors[-3:]
