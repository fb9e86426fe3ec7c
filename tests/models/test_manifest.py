"""models/: architectures named by the manifest, manifest checks, and the CPU budget (no TorchServe)."""

import pytest
import torch

from models import architecture, available_cpus, build, load_model, read_manifest


def test_architecture_names_a_constructor_of_its_model_module():
    spec = architecture("models.mnist", "DigitCNN", width=8)
    assert spec == {"model_module": "models.mnist", "architecture": "DigitCNN", "arch_kwargs": {"width": 8}}
    assert type(build(spec)).__name__ == "DigitCNN"


@pytest.mark.parametrize("module, name, message", [
    ("models.mnist", "ResNet", "models.mnist.ARCHITECTURES has no 'ResNet'; it lists: DigitCNN"),
    ("os", "system", "model_module 'os' is not a module of the models package"),
])
def test_unknown_architectures_fail_when_training_names_them(module, name, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        architecture(module, name)


def test_weights_file_is_whatever_the_manifest_names(tmp_path):
    spec = architecture("models.regression", "TabularRegressor", n_features=3, hidden=[])
    model = build(spec)
    torch.save(model.state_dict(), tmp_path / "weights-v7.bin")
    manifest = {**spec, "weights": "weights-v7.bin", "files": ["weights-v7.bin"]}
    loaded = load_model(tmp_path, manifest)
    assert torch.equal(loaded.net[0].weight, model.net[0].weight) and not loaded.training
    (tmp_path / "manifest.json").write_text('{"files": ["manifest.json", "vocab.json"]}')
    with pytest.raises(FileNotFoundError, match=r"names files that are not there: \['vocab.json'\]"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("cpu_max, expected", [("max 100000", 2), ("150000 100000", 1), ("50000 100000", 1),
                                               ("400000 100000", 2)])
def test_available_cpus_is_the_affinity_capped_by_the_cgroup_quota(tmp_path, monkeypatch, cpu_max, expected):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})  # a container pinned to 2 of the node's cores
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    assert available_cpus(tmp_path / "cpu.max") == expected
    assert available_cpus(tmp_path / "absent") == 2
