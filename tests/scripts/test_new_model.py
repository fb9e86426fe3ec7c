"""`python -m scripts.new_model`: a model of each task added to a copy of the repository touches only the files the
scaffold writes, and `make archive`, serving, the fuzz and hostile-HTTP tests and the k8s checks take it as it is."""

import hashlib
import subprocess
import sys

import pytest

import registry
from scripts import new_model
from tests.cli import run_module
from tests.scripts.test_build import bundle, make  # noqa: F401 (bundle: a fixture)

ADDED = {"my_images": "image-classification", "my_texts": "text-classification", "my_table": "tabular-regression",
         "my_shapes": "detection", "my_pictures": "image-to-image", "my_sequences": "seq2seq"}


def fingerprints(folder):
    """{path: sha256} of every file under ``folder`` but the venv link, git's and Python's caches."""
    return {path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in folder.rglob("*") if path.is_file() and not path.is_symlink()
            and not {".venv", "__pycache__", ".pytest_cache", ".hypothesis"} & set(path.relative_to(folder).parts)}


def run_in(folder, *args, timeout=900):
    return subprocess.run([sys.executable, *args], cwd=folder, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.trained
def test_a_model_of_each_task_is_served_and_tested_with_no_other_file_edited(bundle):  # noqa: F811
    before = fingerprints(bundle)
    for name, task in ADDED.items():
        added = run_in(bundle, "-m", "scripts.new_model", name, "--task", task, timeout=120)
        assert added.returncode == 0, added.stderr
    built = make(bundle, "archive")
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert sorted(line for line in built.stdout.splitlines() if line.startswith("==> [train]")) == sorted(
        f"==> [train] artifacts/{name}" for name in ADDED), built.stdout  # no other model retrains

    after = fingerprints(bundle)
    edited = {path for path in before if after.get(path) != before[path]}
    generated = ("artifacts/", "model_store/", ".make/")
    assert {path for path in edited if not path.startswith(generated)} == {"registry.py"}
    written = {path for name, task in ADDED.items() for path in new_model.planned_files(name, new_model.TASKS[task])}
    assert {path for path in set(after) - set(before) if not path.startswith(generated)} == written

    # The copy's own suites, on the added models: served over HTTP (each sample gets its answer), fuzzed in-process,
    # hostile requests over HTTP.
    selected = " or ".join(ADDED)
    tests = run_in(bundle, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-x", "-k", selected,
                   "tests/serving/test_serving.py", "tests/handlers/test_fuzz.py", "tests/serving/test_hostile_http.py")
    assert tests.returncode == 0, tests.stdout[-5000:] + tests.stderr[-2000:]
    counted = run_in(bundle, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--collect-only", "-k", selected,
                     "tests/serving/test_serving.py", "tests/handlers/test_fuzz.py", "tests/serving/test_hostile_http.py")
    for name in ADDED:  # every added model has its fuzz, hostile-HTTP and sample tests
        for suite in ("test_serving.py", "test_fuzz.py", "test_hostile_http.py"):
            assert any(suite in line and name in line for line in counted.stdout.splitlines()), (name, suite)
    # The fast tier of the k8s and scripts suites: the k8s checks (both variants serve them, their GPU profiles cover
    # the pods' GPUs) and every generated file still current (dashboard, docs): adding a model leaves nothing to
    # regenerate. (The rest of the fast tier tests shared code on models of its own, which adding one cannot change.)
    fast = run_in(bundle, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-m", "not slow and not trained",
                  "tests/k8s", "tests/scripts")
    assert fast.returncode == 0, fast.stdout[-5000:]
    variants = run_in(bundle, "registry.py", "variant-models", "b").stdout.split()
    assert {f"{name}={name}.mar" for name in ADDED} <= set(variants)


@pytest.mark.parametrize("args, message", [
    (["mnist", "--task", "detection"], "'mnist' is already a model or an archive in registry.py"),
    (["mnist_v2", "--task", "detection"], "'mnist_v2' is already a model or an archive in registry.py"),
    (["My-Model", "--task", "detection"], "name 'My-Model': lower-case letters, digits and underscores"),
])
def test_a_taken_or_malformed_name_is_refused_and_nothing_is_written(args, message):
    before = registry.ROOT.joinpath("registry.py").read_bytes()
    result = run_module("scripts.new_model", *args)
    assert (result.returncode, result.stdout) == (2, "")
    assert message in result.stderr
    assert registry.ROOT.joinpath("registry.py").read_bytes() == before


def test_an_existing_file_is_never_overwritten(tmp_path, monkeypatch):
    (tmp_path / "registry.py").write_text("MODELS = (\n)\n")
    (tmp_path / "handlers").mkdir()
    (tmp_path / "handlers" / "mine.py").write_text("# the user's own\n")
    with pytest.raises(new_model.Refused, match=r"handlers/mine.py already exist\(s\); nothing was written"):
        new_model.add_model("mine", "tabular-regression", root=tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "handlers/mine.py", "registry.py"]


def test_the_entry_is_appended_to_models_and_the_registry_still_loads(tmp_path):
    """On a copy of registry.py: the new entry is the last of MODELS, with its sample and both profiles."""
    (tmp_path / "registry.py").write_bytes(registry.ROOT.joinpath("registry.py").read_bytes())
    new_model.add_model("appended", "text-classification", root=tmp_path)  # a name no copy's registry takes
    loaded = run_in(tmp_path, "-c", "import registry; e = registry.MODELS[-1]; "
                    "print(e.name, e.configs['gpu'], e.samples[0].file, e.samples[0].label, e.versions[0].train)")
    assert loaded.stdout.split() == ["appended", "handlers/appended.gpu.yaml", "samples/appended.txt", "positive",
                                     "python", "-m", "train.appended", "--out", "artifacts/appended"], loaded.stderr


def test_the_end_to_end_test_adds_a_model_of_every_task():
    assert sorted(ADDED.values()) == sorted(new_model.TASKS)
