"""The README and docs/: a README that fits in one sitting, lines a terminal shows whole, relative links that
resolve, and the generated blocks of scripts/docs.py (`make docs`): rendered from run records, current."""

import json
import os
import re

import pytest

import registry
from scripts import docs

ROOT = registry.ROOT
MAX_README_LINES, MAX_WIDTH = 300, 120
BENCH = re.compile(r"^<!-- bench:begin -->$.*?^<!-- bench:end -->$", re.M | re.S)
"""The table `make bench` writes into docs/benchmark.md itself (tests/load/bench.py): its lines are its own."""


def documents():
    return [pytest.param(path, id=str(path.relative_to(ROOT))) for path in docs.documents()]


def no_records(**records):
    """The records of a fresh clone (nothing trained or measured), with ``records`` replacing some."""
    return {"metrics": {}, "manifests": {}, "seeds": None, "benchmark": None, "levers": None, "fresh_clone": None,
            **records}


# --- shape -----------------------------------------------------------------------------------------------------------

def test_the_readme_fits_in_one_sitting():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move depth to docs/"


@pytest.mark.parametrize("path", documents())
def test_no_line_is_wider_than_120_characters(path):
    text = BENCH.sub("", path.read_text())
    wide = [f"{number}: {len(line)} characters" for number, line in enumerate(text.splitlines(), 1)
            if len(line) > MAX_WIDTH]
    assert not wide, f"{path.relative_to(ROOT)}: lines over {MAX_WIDTH} characters: {wide}"


# --- links -----------------------------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def anchors(path):
    """GitHub's anchors of a markdown file's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#{1,6} (.+)$", FENCE.sub("", path.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def relative_links(path):
    """(target, fragment) of every link of ``path`` that is neither a URL nor inside a code block."""
    for target in LINK.findall(FENCE.sub("", path.read_text())):
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target):
            file, _, fragment = target.partition("#")
            yield file, fragment


@pytest.mark.parametrize("path", documents())
def test_every_relative_link_resolves(path):
    broken = []
    for file, fragment in relative_links(path):
        target = (path.parent / file).resolve() if file else path
        if not target.is_file():
            broken.append(f"{file}: no such file")
        elif fragment and target.suffix == ".md" and fragment not in anchors(target):
            broken.append(f"{file}#{fragment}: no such heading")
    assert not broken, f"{path.relative_to(ROOT)}: {broken}"


def test_the_link_check_sees_a_broken_link_and_a_missing_heading(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A title\n\n[ok](page.md#a-title) [gone](gone.md) [no](page.md#nowhere) "
                    "[web](https://example.com/x.md)\n\n```\n[in code](ignored.md)\n```\n")
    assert list(relative_links(page)) == [("page.md", "a-title"), ("gone.md", ""), ("page.md", "nowhere")]
    assert anchors(page) == {"a-title"}


# --- generated blocks ------------------------------------------------------------------------------------------------

def test_every_block_in_the_docs_has_a_renderer_and_renders_without_records():
    """A fresh clone has no artifacts: every block renders, and says what to run."""
    for path in docs.documents():
        rendered = docs.render(path.read_text(), no_records())
        for match in docs.BLOCK.finditer(rendered):
            assert match["body"].strip(), f"{path.relative_to(ROOT)}: block {match['name']} renders empty"
    assert "not measured yet (run make train)" in docs.block("models", no_records())
    assert "not measured yet (run make bench)" in docs.block("bench-paths", no_records())


def test_a_training_record_renders_as_the_models_row_and_the_model_page():
    mnist = registry.model("mnist").versions[0]
    record = {"model": "mnist", "dataset": {"name": "sklearn-digits", "n_train": 1437, "n_test": 360}, "seed": 0,
              "epochs": 30, "train_seconds": 55.4, "test": {"accuracy": 0.997222}}
    records = no_records(metrics={mnist.archive: record})
    goal = mnist.quality[0].goal
    row = f"| mnist 1.0 | accuracy **0.9972** | 360 | {goal} ✔ | 55 s |"
    assert row in docs.block("models", records).splitlines()
    page = docs.block("metrics-mnist", records)
    assert ("sklearn-digits (1,437 training, 360 held-out examples); seed 0, 30 epochs, 55 s of training"
            in " ".join(page.splitlines()))
    assert f"| accuracy | 0.9972 | ≥ {goal} ✔ |" in page.splitlines()
    assert "mnist 2.0" in page and docs.MISSING_TRAINING in page  # the second version is not in the records


def test_a_benchmark_record_renders_its_table_and_the_headline():
    step = {"users": 16, "rps": 1794.2, "p50_ms": 8.6, "p95_ms": 12.0, "p99_ms": 16.79, "failed": 0}
    bench = {"started": "2026-12-02T04:41:19+0000", "command": "bench.py", "duration_s": 422.2,
             "machine": {"cores": 2, "cpu": "AMD EPYC", "torch": "2.14.1+cu130", "torchserve": "0.12.0"},
             "settings": {"users": [16]}, "paths": {"mnist": {"steps": [step]}},
             "ratios": {"users": 16, "models": {"mnist": {
                 "vs": {"stock": 2.85}, "p99_ms": 16.79, "failed": 0,
                 "targets_met": {"÷ stock >= 2.5": True, "p99 <= 100 ms": True, "zero failed requests": True}}}}}
    records = no_records(benchmark=bench)
    assert "| mnist | 1,794 · 8.6/12.0/16.8 |" in docs.block("bench-paths", records).splitlines()
    ratios = docs.block("bench-ratios", records).splitlines()
    assert "| mnist ÷ stock | **2.85** | ≥ 2.5 ✔ |" in ratios
    assert "| mnist p99 / failed requests | 16.79 ms / 0 | ≤ 100 ms / 0 ✔ |" in ratios
    headline = " ".join(docs.block("bench-headline", records).splitlines())
    assert "on 2 cores (AMD EPYC), torch 2.14.1, TorchServe 0.12.0, 2026-12-02: mnist 1,794 req/s" in headline
    assert "(p99 17 ms; 2.85× stock)" in headline


def test_the_fresh_clone_record_renders_each_step():
    record = {"machine": "2-core AMD EPYC VM (AVX-512)", "cores": 2, "commit": "abc1234", "date": "2026-12-03",
              "steps": [{"step": "setup (venv, pip, Java)", "seconds": 136},
                        {"step": "make serve: first prediction", "seconds": 178}, {"step": "make test-fast",
                                                                                 "seconds": 38}]}
    rendered = docs.block("fresh-clone", no_records(fresh_clone=record))
    assert rendered.splitlines() == [
        "Measured on a fresh clone (commit abc1234) on a 2-core AMD EPYC VM (AVX-512), 2026-12-03:", "",
        "| step | time |", "|---|---|", "| setup (venv, pip, Java) | 2 min 16 s |",
        "| make serve: first prediction | 2 min 58 s |", "| make test-fast | 38 s |"]


def test_the_committed_fresh_clone_record_has_the_schema():
    record = json.loads((ROOT / "docs" / "fresh-clone.json").read_text())
    assert {"machine", "cores", "commit", "date", "steps"} <= set(record)
    assert all(set(step) == {"step", "seconds"} for step in record["steps"])


def test_check_finds_a_stale_block_writes_nothing_and_a_render_makes_it_current(tmp_path, capsys):
    page = tmp_path / "page.md"
    stale = "# Page\n\n<!-- generated: bench-paths -->\nan old table\n<!-- /generated -->\n\nprose stays\n"
    page.write_text(stale)
    assert docs.main(["--check"], paths=[page], records=no_records()) == 1
    assert page.read_text() == stale and f"stale: {page}" in capsys.readouterr().out
    assert docs.main([], paths=[page], records=no_records()) == 0
    assert page.read_text() == stale.replace("an old table", docs.MISSING_BENCH)
    assert docs.main(["--check"], paths=[page], records=no_records()) == 0


def test_an_unknown_block_name_is_an_error():
    with pytest.raises(KeyError, match="no generated block 'nonsense'"):
        docs.render("<!-- generated: nonsense -->\n<!-- /generated -->\n", no_records())


def test_the_committed_blocks_are_the_ones_rendered_from_the_committed_records():
    """Rendered from docs/*.json only (docs/runs.json holds the training runs), so any checkout judges them alike,
    trained or not, on any machine."""
    stale = docs.stale(docs.documents(), docs.load_records())
    assert not stale, f"run `make docs`: stale {', '.join(str(path.relative_to(ROOT)) for path in stale)}"


def test_make_docs_records_this_checkouts_training_runs_and_keeps_the_others(tmp_path):
    _, version = registry.served()[0]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "runs.json").write_text(json.dumps({"kept": {"metrics": {"test": {}}, "manifest": None}}))
    (tmp_path / version.artifacts).mkdir(parents=True)
    (tmp_path / version.artifacts / "metrics.json").write_text('{"test": {"accuracy": 0.5}}')
    runs = docs.collect_runs(tmp_path)
    assert runs == {"kept": {"metrics": {"test": {}}, "manifest": None},
                    version.archive: {"metrics": {"test": {"accuracy": 0.5}}, "manifest": None}}


def test_make_docs_renders_them():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^\.PHONY:.*\bdocs\b", makefile, re.M)
    assert re.search(r"^docs: \$\(READY\)\n\t@\$\(PY\) -m scripts\.docs$", makefile, re.M)


def test_documents_are_the_readme_and_every_page_under_docs():
    found = {os.path.relpath(path, ROOT) for path in docs.documents()}
    assert "README.md" in found and "docs/serving.md" in found and "docs/models/mnist.md" in found


def error_types_raised():
    """Every error type a handler can answer: each literal ``kind="..."`` under handlers/, and the ``TooMany<What>``
    of each ``bounded_list(..., "<what>")``."""
    source = "".join(path.read_text(encoding="utf-8") for path in (ROOT / "handlers").glob("*.py"))
    kinds = set(re.findall(r'kind="(\w+)"', source))
    return kinds | {f"TooMany{what.title()}" for what in re.findall(r'bounded_list\([^()]*"(\w+)"\)', source)}


def test_every_error_type_a_handler_answers_is_in_the_error_table():
    table = (ROOT / "docs" / "serving.md").read_text(encoding="utf-8").split("## Errors", 1)[1].split("\n## ", 1)[0]
    raised = error_types_raised()
    assert {"InvalidImage", "DuplicateKey", "TooManyTexts", "TooManyRows", "TooManyImages"} <= raised  # the scan works
    assert sorted(kind for kind in raised if f"`{kind}`" not in table) == []


def test_every_test_file_is_described_in_the_testing_page():
    page = (ROOT / "docs" / "testing.md").read_text(encoding="utf-8")
    files = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "tests").glob("*/test_*.py"))
    assert "tests/serving/test_serving.py" in files
    assert [name for name in files if f"`{name}`" not in page] == []
