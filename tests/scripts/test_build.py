"""The build in a temporary copy of the repository: what make rebuilds, archive.sh failing loudly, adding a model.

The copy holds the tracked files plus the trained artifacts, archives and make stamps (timestamps kept), and links
the venv, so make starts from "everything up to date" exactly as in the checkout.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import registry
from scripts.server import ROOT
from tests.fixtures.servers import on_free_ports

pytestmark = pytest.mark.trained  # reads the built artifacts and archives



@pytest.fixture
def bundle(tmp_path):
    """A copy of the repository in which make has nothing to do."""
    copy = tmp_path / "bundle"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    for folder in ("artifacts", "model_store", ".make"):
        shutil.copytree(ROOT / folder, copy / folder, dirs_exist_ok=True)  # copy2: modification times kept
    (copy / ".venv").symlink_to(ROOT / ".venv")
    assert "Nothing to be done" in make(copy, "-n", "archive").stdout, "the checkout itself is not up to date"
    return copy


def make(folder, *args):
    return subprocess.run(["make", *args], cwd=folder, capture_output=True, text=True, timeout=600)


def archive_sh(folder, *args):
    return subprocess.run([str(folder / "archive.sh"), *args], cwd=folder, capture_output=True, text=True,
                          env=dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"))


def touch(path):
    os.utime(path)


def test_changing_a_model_module_retrains_its_model_only(bundle):
    touch(bundle / "models" / "mnist.py")
    dry_run = make(bundle, "-n", "archive").stdout
    assert "python -m train.mnist --out artifacts/mnist" in dry_run
    assert "python -m train.mnist --out artifacts/mnist-v2" in dry_run
    assert "train.sentiment" not in dry_run and "train.regression" not in dry_run


def test_changing_a_handler_rebuilds_archives_without_retraining(bundle):
    touch(bundle / "handlers" / "mnist.py")
    dry_run = make(bundle, "-n", "archive").stdout
    assert "./archive.sh mnist" in dry_run and "python -m train" not in dry_run


def test_changing_a_training_command_retrains_that_version(bundle):
    source = (bundle / "registry.py").read_text()
    old = '"python -m train.regression --out artifacts/regression --threads 1"'
    assert old in source
    (bundle / "registry.py").write_text(source.replace(old, old[:-1] + ' --epochs 61"'))
    dry_run = make(bundle, "-n", "archive").stdout
    assert "python -m train.regression --out artifacts/regression --threads 1 --epochs 61" in dry_run
    assert "train.mnist" not in dry_run and "train.sentiment" not in dry_run


def test_an_untrained_model_fails_the_build_naming_its_train_command(bundle):
    shutil.rmtree(bundle / "artifacts" / "regression")
    result = archive_sh(bundle, "regression")
    assert result.returncode == 1
    assert "artifacts/regression/manifest.json not found" in result.stderr
    assert "python -m train.regression --out artifacts/regression" in result.stderr
    assert archive_sh(bundle, "no-such-model").returncode == 2


@pytest.mark.slow  # runs the archiver
@pytest.mark.parametrize("break_it, message", [
    pytest.param(lambda b: (b / "artifacts" / "sentiment" / "vocab.json").unlink(), "names files that are not there",
                 id="artifact-file-missing"),
    pytest.param(lambda b: (b / "handlers" / "sentiment.yaml").write_text("batchSize: [unclosed"),
                 "model-config sentiment.yaml is not readable YAML", id="model-config-broken"),
    pytest.param(lambda b: (b / "handlers" / "sentiment.py").write_text("this is not python ("),
                 "handlers/sentiment.py does not compile", id="handler-syntax-error"),
])
def test_a_failed_build_exits_1_and_keeps_the_old_archive(bundle, break_it, message):
    archive = bundle / "model_store" / "sentiment.mar"
    before = archive.read_bytes()
    break_it(bundle)
    result = archive_sh(bundle, "sentiment")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "sentiment (sentiment 1.0)" in result.stderr and message in result.stderr, result.stderr
    assert archive.read_bytes() == before
    touch(bundle / "handlers" / "sentiment.py")
    assert make(bundle, "model_store/sentiment.mar").returncode != 0  # make stops too


@pytest.mark.slow
def test_make_serve_answers_with_the_built_models_while_it_trains_the_others(bundle, tmp_path):
    """`make serve` on a half-built checkout: the up-to-date archives are served first, then sentiment (stale) is
    re-archived and regression (removed) trained, each registered once built (while the next one trains). Ctrl-C while regression trains stops
    the training, not the server; `make serve` again restarts it with what is built and trains the rest. At the end
    every version is READY and the registry's first mnist version is still the default."""
    server = on_free_ports(bundle)
    shutil.rmtree(bundle / "artifacts" / "regression")
    (bundle / "model_store" / "regression.mar").unlink()
    touch(bundle / "handlers" / "sentiment.yaml")  # sentiment.mar is stale: rebuilt, not served stale
    (tmp_path / "tmp").mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("TS_CONFIG_FILE", "VIRTUAL_ENV")}
    env.update(TMPDIR=str(tmp_path / "tmp"), TEMP=str(tmp_path / "tmp"))  # `torchserve --stop` stops this one only
    digit = (bundle / "samples" / "digit_7.png").read_bytes()
    try:
        # SIGINT at its default, as in a terminal's foreground job: a suite started in the background (CI, nohup,
        # `cmd &`) inherits it ignored, and Python turns it into KeyboardInterrupt only where it is not.
        first = subprocess.Popen(["make", "serve"], cwd=bundle, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL, start_new_session=True,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        out, interrupted = "", False
        for line in first.stdout:
            out += line
            # Both light, sentiment and regression build side by side: Ctrl-C once sentiment is served and
            # regression is still training.
            ready = "==> [train] artifacts/regression" in out and "READY  sentiment 1.0" in out
            if ready and not interrupted:
                os.killpg(first.pid, signal.SIGINT)  # Ctrl-C in the terminal
                interrupted = True
        out += first.stdout.read()
        assert first.wait(60) != 0 and "make serve: stopped while building" in out, out[-3000:]
        first_block = out[:out.index("==> [serve] building")]
        assert "READY  mnist 1.0" in first_block and "Try these now" in first_block
        assert "READY  sentiment" not in first_block and "/predictions/regression" not in first_block
        assert first_block.count("/predictions/mnist") == 2  # the curl lines of the served versions' samples
        assert out.index("archive.sh: model_store/sentiment.mar") < out.index("READY  sentiment 1.0")
        assert "archive.sh: model_store/regression.mar" not in out  # stopped before regression was archived
        assert server.predict("mnist", digit).status_code == 200  # the server outlived the Ctrl-C

        again = subprocess.run(["make", "serve"], cwd=bundle, env=env, capture_output=True, text=True, timeout=600,
                               stdin=subprocess.DEVNULL)
        out = again.stdout
        assert again.returncode == 0, out[-3000:] + again.stderr[-3000:]
        first_block = out[:out.index("==> [serve] building")]
        assert "READY  sentiment 1.0" in first_block and "READY  regression" not in first_block
        assert out.index("==> [train] artifacts/regression") < out.index("READY  regression 1.0") < out.index(
            "Every model is READY")
        assert out.count("==> [train]") == 1
        assert sorted(server.ready_versions()) == sorted((m.name, v.version) for m, v in registry.served())
        assert server.management("GET", "/models/mnist").json()[0]["modelVersion"] == "1.0"
        row = json.loads((bundle / "samples" / "patient.json").read_text())
        assert server.predict("regression", json.dumps(row), headers={"Content-Type": "application/json"}
                              ).status_code == 200
        remote = server.management("POST", "/models", params={"url": "http://127.0.0.1:9/evil.mar"})
        assert 400 <= remote.status_code < 500, remote.text  # registration: the local model store only
        anonymous = server.management("POST", "/models", token=False, params={"url": "regression.mar"})
        assert anonymous.json()["type"] == "InvalidKeyException"  # TorchServe 0.12's 400 for a missing token
        stopped = subprocess.run(["make", "stop"], cwd=bundle, env=env, capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0 and "TorchServe has stopped." in stopped.stdout, stopped.stdout + stopped.stderr
        assert workers_with_sockets_in(tmp_path / "tmp") == []  # gone when make stop returns, not seconds later
    finally:
        subprocess.run(["make", "stop"], cwd=bundle, env=env, capture_output=True, timeout=120)


def workers_with_sockets_in(folder):
    """The pids of TorchServe workers whose socket is under ``folder`` (a server's TMPDIR), from /proc."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            words = cmdline.read_bytes().split(b"\0")
        except OSError:  # exited meanwhile
            continue
        if any(w.endswith(b"model_service_worker.py") for w in words) and str(folder).encode() in b" ".join(words):
            pids.append(int(cmdline.parent.name))
    return pids


def test_make_serve_builds_two_light_versions_side_by_side_and_the_others_alone(monkeypatch):
    """scripts.server.Builder's schedule, with the builds faked: in registry order, light versions (one torch thread
    each) two at a time, every other version alone."""
    from concurrent.futures import Future

    from scripts import server

    events, lock = [], threading.Lock()

    def fake_build(self, stem):
        with lock:
            events.append(("start", stem))
        time.sleep(0.2)
        with lock:
            events.append(("end", stem))

    monkeypatch.setattr(server.Builder, "build", fake_build)
    pending = [version.archive for _, version in registry.served()]
    server.Builder(pending, built=lambda stem: None, failed=[], starting=Future()).run()
    running, overlaps = set(), set()
    for kind, stem in events:
        if kind == "start":
            overlaps |= {frozenset((stem, other)) for other in running}
            running.add(stem)
        else:
            running.discard(stem)
    light = {stem for stem in pending if registry.archive(stem)[1].light}
    assert [stem for kind, stem in events if kind == "start"] == pending  # registry order
    assert overlaps and all(pair <= light for pair in overlaps), overlaps
    assert frozenset(pending[:2]) in overlaps  # the first two are light: they start together


def test_a_light_version_is_one_whose_training_command_runs_one_torch_thread():
    light = registry.Version("1.0", "x", "artifacts/x", "python -m train.x --threads 1 --out artifacts/x")
    heavy = registry.Version("1.0", "x", "artifacts/x", "python -m train.x --out artifacts/x --threads 2")
    assert light.light and not heavy.light
    assert not registry.Version("1.0", "x", "artifacts/x", "python -m train.x --threads").light


def test_make_serve_builds_nothing_more_once_torchserve_failed_to_start(monkeypatch):
    """A TorchServe that did not come up stops both build lanes after the builds in progress, and make serve says
    why instead of training every model first."""
    from concurrent.futures import Future

    from scripts import server

    started, starting = [], Future()

    def fake_build(self, stem):
        started.append(stem)
        starting.set_exception(TimeoutError("0/1 model versions READY after 300s"))  # while the first builds train

    monkeypatch.setattr(server.Builder, "build", fake_build)
    pending = [version.archive for _, version in registry.served()]
    server.Builder(pending, built=lambda stem: None, failed=[], starting=starting).run()
    assert 1 <= len(started) <= 2 and started == pending[:len(started)]
