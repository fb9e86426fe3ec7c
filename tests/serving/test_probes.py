"""The pods' probes against a real TorchServe: scripts/readiness.py (exec readiness and startup probe) requires every
served version to have READY workers, while /ping reads Healthy; the liveness check keeps answering while a model is
broken. Only the version states the probes see are asserted, never how long anything takes."""

import subprocess
import sys
import textwrap

import pytest

from scripts import readiness
from scripts.server import free_port
from tests.fixtures.servers import STORE, rezip, running, serialized_file, store_with
from tests.k8s.test_k8s import LIVENESS_PATH

GATED_HANDLER = '''
"""regression's handler, whose workers stay loading until the test creates {gate}: a startup in slow motion."""
import os
import time

from handlers.regression import RegressionHandler


class GatedRegressionHandler(RegressionHandler):
    def initialize(self, context):
        while not os.path.exists({gate!r}):
            time.sleep(0.2)
        super().initialize(context)
'''


@pytest.fixture(scope="module")
def pod(tmp_path_factory):
    """A TorchServe like a B pod in trouble: mnist 1.0 (default) READY, mnist 2.0 whose weights are corrupt, and
    regression still loading until ``pod.gate`` exists."""
    folder = tmp_path_factory.mktemp("pod")
    store = store_with(folder / "store", "mnist")
    v2 = STORE / "mnist_v2.mar"
    rezip(v2, store / "mnist_v2.mar", "mnist", replace={serialized_file(v2): b"not a checkpoint \x00\xff" * 64})
    gate = folder / "gate"
    handler = textwrap.dedent(GATED_HANDLER.format(gate=str(gate)))
    source = STORE / "regression.mar"
    rezip(source, store / "regression_gated.mar", "regression", handler="gated.py", add={"gated.py": handler.encode()})
    with running(folder / "torchserve", model_store=store, expect_ready=1) as server:
        server.gate = gate
        server.store = store
        yield server


def probe(server, *models):
    """scripts/readiness.py as the pod runs it (a fresh python), against this server's management API."""
    command = [sys.executable, str(readiness.__file__), "--management", server.url("management"),
               "--model-store", str(server.store), "--key-file", str(server.workdir / "key_file.json"),
               "--models", *(models or ["all"])]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_startup_and_a_broken_version_are_not_ready_although_ping_is_healthy(pod):
    assert pod.ready_versions() == [("mnist", "1.0")]
    ping = pod.inference("GET", "/ping")
    assert ping.status_code == 200 and ping.json()["status"] == "Healthy"  # what a /ping probe would believe

    starting = probe(pod)
    assert starting.returncode == 1
    lines = starting.stdout.splitlines()
    assert any(line.startswith("not ready: mnist 2.0 (mnist_v2.mar): 0/1 workers READY") for line in lines), lines
    assert any(line.startswith("not ready: regression 1.0 (regression_gated.mar): 0/1 workers READY")
               for line in lines), lines
    assert not any("mnist 1.0" in line for line in lines)

    pod.gate.touch()  # regression finishes loading
    pod.wait_for(lambda: ("regression", "1.0") in pod.ready_versions(), what="regression READY")
    still_broken = probe(pod)
    assert still_broken.returncode == 1
    assert [line.split(":")[1].strip() for line in still_broken.stdout.splitlines()] == ["mnist 2.0 (mnist_v2.mar)"]

    healthy_part = probe(pod, "mnist=mnist.mar", "regression=regression_gated.mar")
    assert (healthy_part.returncode, healthy_part.stdout.strip()) == (0, "ready: mnist 1.0, regression 1.0")


@pytest.mark.slow
def test_an_archive_that_was_never_registered_is_not_ready(pod):
    (pod.store / "sentiment.mar").write_bytes((STORE / "sentiment.mar").read_bytes())  # in the store, not loaded
    result = probe(pod, "mnist=mnist.mar", "sentiment=sentiment.mar")
    assert result.returncode == 1
    assert result.stdout.strip() == ("not ready: sentiment 1.0 (sentiment.mar): "
                                     "not registered (its archive failed to load?)")
    missing = probe(pod, "mnist=mnist_v9.mar")
    assert missing.returncode == 1 and missing.stdout.startswith("not ready: FileNotFoundError")


@pytest.mark.slow
def test_liveness_answers_while_a_model_is_broken(pod):
    """The liveness path needs no model and no token: the frontend answers it as long as it serves HTTP."""
    reply = pod.session.get(pod.url("inference", LIVENESS_PATH), timeout=10)
    assert reply.status_code == 200 and reply.json()["openapi"].startswith("3.")
    assert probe(pod).returncode == 1  # at the same moment, the pod is not ready


@pytest.mark.slow
def test_the_probe_reads_the_archives_from_the_launcher_command_line(pod):
    assert readiness.launcher_models(pod.process.pid) == ["all"]


@pytest.mark.trained
def test_a_frontend_that_does_not_answer_is_not_ready(tmp_path):
    store = store_with(tmp_path / "store", "mnist")
    result = subprocess.run([sys.executable, readiness.__file__, "--management", f"http://127.0.0.1:{free_port()}",
                             "--model-store", str(store), "--models", "mnist=mnist.mar"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stdout.startswith("not ready: URLError")


@pytest.mark.trained
def test_expected_versions_come_from_the_archives(tmp_path):
    store = store_with(tmp_path / "store", "mnist", "mnist_v2")
    assert readiness.expected_versions(["mnist=mnist.mar", "mnist=mnist_v2.mar"], store) == [
        ("mnist", "1.0", "mnist.mar"), ("mnist", "2.0", "mnist_v2.mar")]
    assert readiness.expected_versions(["all"], store) == readiness.expected_versions(
        ["mnist.mar", "mnist_v2.mar"], store)
