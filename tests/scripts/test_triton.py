"""The Triton model repository (scripts/triton.py, ./archive.sh --triton DIR), validated offline: Triton cannot run
here, so each config.pbtxt is parsed with Triton's ModelConfig schema and compared with the ONNX graph."""

import subprocess

import numpy as np
import onnxruntime
import pytest

import registry
from scripts import triton
from scripts.server import ROOT

pytestmark = pytest.mark.trained  # reads the built artifacts and archives


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton")
    result = subprocess.run(["./archive.sh", "--triton", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return out


def test_every_exportable_model_has_a_config_and_one_folder_per_served_version(repository):
    written = sorted(p.name for p in repository.iterdir())
    assert written == sorted(entry.name for entry in triton.exportable("onnx"))
    assert "detector" not in written and {"mnist", "sentiment", "regression", "fashion"} <= set(written)
    for entry in triton.exportable("onnx"):
        model_dir = repository / entry.name
        folders = sorted(p.name for p in model_dir.iterdir() if p.is_dir())
        served = registry.served_versions(entry)
        assert folders == [str(n) for n in range(1, len(served) + 1)]
        assert all((model_dir / folder / "model.onnx").is_file() for folder in folders)
        assert triton.validate(model_dir) == []


def test_config_follows_the_model_config_and_the_export(repository):
    config = triton.read_config(repository / "mnist")
    assert (config.name, config.backend, config.max_batch_size) == ("mnist", "onnxruntime", 16)
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [(t.name, list(t.dims)) for t in config.input] == [("images", [1, 28, 28])]
    assert [(t.name, list(t.dims), t.label_filename) for t in config.output] == [("logits", [10], "labels.txt")]
    assert (repository / "mnist" / "labels.txt").read_text().split() == [str(i) for i in range(10)]
    sentiment = triton.read_config(repository / "sentiment")
    assert [(t.name, list(t.dims)) for t in sentiment.input] == [("ids", [-1])]  # the token axis is dynamic
    regression = triton.read_config(repository / "regression")
    assert list(regression.output[0].dims) == [1] and list(regression.output[0].reshape.shape) == []


def test_validation_catches_a_config_that_disagrees_with_the_graph(repository, tmp_path):
    broken = tmp_path / "mnist"
    subprocess.run(["cp", "-r", str(repository / "mnist"), str(broken)], check=True)
    config = (broken / "config.pbtxt").read_text()
    (broken / "config.pbtxt").write_text(config.replace("dims: [ 1, 28, 28 ]", "dims: [ 3, 28, 28 ]")
                                         .replace('name: "logits"', 'name: "probs"'))
    problems = triton.validate(broken)
    assert any("dims [3, 28, 28], but the graph's are [1, 28, 28]" in p for p in problems)
    assert any("output names ['probs'] != ONNX ['logits']" in p for p in problems)


def test_the_repository_model_runs_batched_as_triton_would_feed_it(repository):
    session = onnxruntime.InferenceSession(str(repository / "sentiment" / "1" / "model.onnx"))
    logits = session.run(["logits"], {"ids": np.array([[5, 6, 7, 0], [8, 9, 0, 0], [3, 0, 0, 0]], dtype=np.int64)})[0]
    assert logits.shape == (3, 2)


def test_a_missing_export_is_reported_with_the_command_that_makes_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(triton, "read_manifest", lambda folder: {"exports": {}})
    assert triton.main([str(tmp_path / "repo")]) == 1
    assert "mnist 1.0: no onnx export: python -m train.export artifacts/mnist" in capsys.readouterr().err
