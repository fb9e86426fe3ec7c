"""The Triton repository check (scripts/triton.py check_repository): every model file that ``./archive.sh --triton``
writes is loaded and run by the library that serves it, on inputs built from its config.pbtxt, and compared with
the eager model; a corrupted repository fails, naming the model."""

import re
import shutil
import subprocess
import sys

import pytest

import registry
from models import read_manifest
from scripts import triton
from scripts.server import ROOT
from train.export import TOLERANCE

pytestmark = pytest.mark.trained  # reads the trained artifacts

FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}
CHECKED = re.compile(r"^triton: checked (\S+) (\S+) \((\S+)\): ran at batch 1, 7 from config.pbtxt, max abs diff to "
                     r"eager (\S+)$", re.MULTILINE)


@pytest.fixture(scope="module", params=list(FILES))
def repository(request, tmp_path_factory):
    """(format, DIR, stdout) of the repository written by archive.sh (onnx) or python -m scripts.triton."""
    fmt, out = request.param, tmp_path_factory.mktemp(f"triton-{request.param}")
    command = (["./archive.sh", "--triton", str(out)] if fmt == "onnx"
               else [sys.executable, "-m", "scripts.triton", str(out), "--format", fmt])
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return fmt, out, result.stdout


def copy(repository, tmp_path):
    return shutil.copytree(repository[1], tmp_path / "repo")


def test_every_written_model_loads_runs_at_batch_1_and_7_and_matches_eager(repository):
    fmt, out, stdout = repository
    served = {(entry.name, version.version) for entry in triton.exportable(fmt)
              for version in registry.served_versions(entry)}
    assert {("mnist", "1.0"), ("mnist", "2.0"), ("sentiment", "1.0"), ("regression", "1.0"),
            ("fashion", "1.0")} <= served
    printed = {(model, version): float(diff) for model, version, _, diff in CHECKED.findall(stdout)}
    assert set(printed) == served, stdout  # the command itself checked every version
    assert all(file.endswith("/" + FILES[fmt]) for *_, file, _ in CHECKED.findall(stdout))
    results = triton.check_repository(out)
    assert {(model, version) for model, version, _ in results} == served
    assert all(diff <= TOLERANCE for *_, diff in results), results
    for entry in triton.exportable(fmt):
        assert triton.check_batches(triton.read_config(out / entry.name)) == [1, 7]


def test_token_ids_come_from_the_config_and_stay_within_the_vocab(repository):
    config = triton.read_config(repository[1] / "sentiment")
    vocab_size = read_manifest(ROOT / "artifacts/sentiment")["arch_kwargs"]["vocab_size"]
    (name, ids), = triton.config_inputs(config, 7, 7, vocab_size).items()
    assert name == config.input[0].name and ids.dtype.name == "int64" and ids.shape == (7, 17)
    assert 0 <= ids.min() and ids.max() < vocab_size


def test_a_version_holding_another_versions_model_file_fails(repository, tmp_path):
    file_name = FILES[repository[0]]
    repo = copy(repository, tmp_path)
    (repo / "mnist/1" / file_name).write_bytes((repository[1] / "mnist/2" / file_name).read_bytes())
    with pytest.raises(triton.RepositoryError) as failed:
        triton.check_repository(repo)
    message = str(failed.value)
    assert re.search(rf"mnist 1\.0 \(mnist/1/{file_name}, \S+\): output logits\S* differs from the eager model of "
                     r"artifacts/mnist by \S+ at batch 1 \(tolerance 0\.0001\)", message), message
    assert "mnist 2.0" not in message and "fashion" not in message  # only the corrupted version


@pytest.mark.parametrize("edit", ["dims", "labels"])
def test_a_config_dim_or_a_label_line_that_disagrees_with_the_model_fails(repository, tmp_path, edit):
    fmt = repository[0]
    repo = copy(repository, tmp_path)
    if edit == "dims":
        config = (repo / "mnist/config.pbtxt").read_text()
        assert "dims: [ 1, 28, 28 ]" in config
        (repo / "mnist/config.pbtxt").write_text(config.replace("dims: [ 1, 28, 28 ]", "dims: [ 3, 28, 28 ]"))
        expected = (r"mnist: 1: input images: dims \[3, 28, 28\], but the graph's are \[1, 28, 28\]" if fmt == "onnx"
                    else r"mnist 1\.0 \(mnist/1/model\.pt, pytorch_libtorch\): batch 1 fails on the config's inputs "
                         r"\{'images__0': \[1, 3, 28, 28\]\}")
    else:
        labels = (repo / "mnist/labels.txt").read_text().splitlines()
        (repo / "mnist/labels.txt").write_text("\n".join(labels[:-1]) + "\n")
        expected = rf"mnist 1\.0 \(mnist/1/{FILES[fmt]}, .*\): labels\.txt has 9 lines, output logits\S* has 10 classes"
    with pytest.raises(triton.RepositoryError, match=expected):
        triton.check_repository(repo)


def test_the_command_fails_loudly_when_a_model_holds_another_models_weights(tmp_path, monkeypatch, capsys):
    write = triton.write_model

    def swap_fashion_for_mnist(entry, out_dir, fmt):
        model_dir = write(entry, out_dir, fmt)
        if entry.name == "fashion":  # same input and output signature: only running it tells them apart
            shutil.copy(ROOT / "artifacts/mnist/model.onnx", model_dir / "1/model.onnx")
        return model_dir

    monkeypatch.setattr(triton, "write_model", swap_fashion_for_mnist)
    assert triton.main([str(tmp_path / "repo")]) == 1
    captured = capsys.readouterr()
    assert re.search(r"fashion 1\.0 \(fashion/1/model\.onnx, onnxruntime\): output logits differs from the eager "
                     r"model of artifacts/fashion by \S+ at batch 1", captured.err), captured.err
    assert "triton: checked mnist 1.0 (mnist/1/model.onnx)" in captured.out
    assert "triton: checked fashion" not in captured.out
