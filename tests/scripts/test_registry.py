"""registry.py's derived tables: what each model is retrained from, read from its modules' imports."""

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
