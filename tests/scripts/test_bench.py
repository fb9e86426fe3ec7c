"""tests/load/bench.py's figures: ratios between paths measured in one run, and targets only where measured."""

import pytest

from tests.load import bench


MACHINE = {"cores": 2, "cpu": "x86_64", "memory_gib": 24, "python": "3.11", "torch": "2", "torchserve": "0.12.0"}


def step(rps, p99=20.0, failed=0, users=16):
    return {"users": users, "rps": rps, "p99_ms": p99, "failed": failed}


def results(in_process=None, **paths):
    return {"paths": {name.replace("_", "-"): {"steps": [step(*figures)]} for name, figures in paths.items()},
            "in_process": in_process or {}}


def test_ours_is_compared_with_the_baseline_revision_and_served_with_in_process():
    out = bench.ratios(results({"fashion": {"rps": 1000.0}, "detector": {"rps": 20.0}}, ours=(900,), baseline=(1000,),
                               fashion=(800,), detector=(15,)))
    assert out["ours_vs_baseline"] == 0.9
    assert out["fashion_vs_in_process"] == 0.8 and out["detector_vs_in_process"] == 0.75


def test_sentiment_is_compared_with_another_sentiment_archive():
    out = bench.ratios(results(sentiment=(1100,), sentiment_baseline=(1000,)))
    assert out["sentiment_vs_baseline"] == 1.1
    assert "sentiment ÷ sentiment-baseline **1.1**" in bench.table({**results(), "ratios": out, "machine": MACHINE,
                                                                     "loadavg_before": [0], "loadavg_after": [0]})


def test_a_baseline_path_needs_its_option_and_the_archive_must_exist(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--paths", "sentiment-baseline"])
    assert "needs --sentiment-baseline MAR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--paths", "sentiment", "--sentiment-baseline", str(tmp_path / "missing.mar")])
    assert "missing.mar: no such file" in capsys.readouterr().err


def test_a_sentiment_baseline_is_copied_into_its_own_store(tmp_path):
    archive = tmp_path / "old.mar"
    archive.write_bytes(b"an older sentiment archive")
    store = tmp_path / "store"
    store.mkdir()
    name = bench.build_archive(bench.PATHS["sentiment-baseline"], store, tmp_path, {}, sentiment_baseline=archive)
    assert (store / name).read_bytes() == b"an older sentiment archive" and name == "sentiment.mar"
    assert bench.PATHS["sentiment-baseline"].check('{"label": "negative", "score": 0.7}', "positive") == "negative"


def test_a_ratio_target_is_judged_only_when_both_of_its_paths_ran():
    alone = bench.ratios(results(ours=(900,), fashion=(800, 150.0, 2)))
    assert alone["targets_met"] == {"p99 <= 100 ms": True, "zero failed requests": True}
    assert alone["fashion_targets_met"] == {"fashion p99 <= 100 ms": False, "fashion: zero failed requests": False}
    both = bench.ratios(results({"fashion": {"rps": 2000.0}}, ours=(900,), stock=(400,), fashion=(800,),
                                fashion_stock=(100,)))
    assert both["targets_met"]["ours_vs_stock >= 2.5"] is False  # 2.25
    assert both["fashion_targets_met"]["fashion_vs_stock >= 5.0"] is True  # 8
    assert both["fashion_targets_met"]["fashion_vs_in_process >= 0.7"] is False  # 0.4
