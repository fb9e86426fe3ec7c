"""registry.py's derived tables: what each model is retrained from (read from its modules' imports), and what each
A/B variant of k8s/ serves."""

import os
import subprocess
import sys

import registry


def test_a_models_sources_are_its_modules_and_everything_they_import_from_the_repository():
    detector = set(registry.model("detector").sources)
    assert {"models/detector.py", "train/detector.py", "train/common.py", "train/datasets.py", "train/export.py",
            "models/__init__.py"} <= detector
    assert not any(source.startswith(("handlers/", "scripts/", "tests/")) for source in detector)  # archive-only code
    assert "train/sentiment_eval.py" in registry.model("sentiment").sources


def test_relative_absolute_and_function_level_imports_are_followed(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "ROOT", tmp_path)
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    files = {"pkg/__init__.py": "", "pkg/a.py": "from . import b\nfrom .sub import c\n\ndef f():\n    import pkg.d\n",
             "pkg/b.py": "import os\nimport json.decoder\n", "pkg/sub/__init__.py": "", "pkg/sub/c.py": "from .. import e\n",
             "pkg/d.py": "", "pkg/e.py": "", "pkg/unused.py": ""}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    found = {path.relative_to(tmp_path).as_posix() for path in registry.repository_imports(tmp_path / "pkg" / "a.py")}
    assert found == set(files) - {"pkg/unused.py"}


def fake_torchserve(folder):
    """A `torchserve` on PATH that prints its arguments, one per line."""
    script = folder / "torchserve"
    script.write_text("#!/bin/sh\nprintf '%s\\n' \"$@\"\n")
    script.chmod(0o755)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def test_the_image_entrypoint_execs_torchserve_with_the_variants_models(tmp_path):
    """k8s runs `registry.py serve --variant b --ts-config FILE`: TorchServe in the foreground with B's models (each
    model's candidate, else its default); a variant registry.py does not know is refused, naming the variants."""
    env = fake_torchserve(tmp_path)
    served = subprocess.run([sys.executable, "registry.py", "serve", "--variant", "b", "--ts-config", "/c.properties"],
                            cwd=registry.ROOT, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert served[:4] == ["--foreground", "--ncs", "--ts-config", "/c.properties"]
    assert served[4] == "--models"
    models = dict(pair.split("=") for pair in served[5:])
    assert models["mnist"] == "mnist_v2.mar" and models["sentiment"] == "sentiment.mar"
    assert set(models) == {entry.name for entry in registry.MODELS if not entry.versions[0].optional}
    assert registry.variant_models("a")[0] == "mnist=mnist.mar"
    refused = subprocess.run([sys.executable, "registry.py", "serve", "--variant", "c"], cwd=registry.ROOT, env=env,
                             capture_output=True, text=True)
    assert (refused.returncode, refused.stdout) == (2, "")
    assert "no variant 'c' (variants: a, b)" in refused.stderr
