"""tests/load/bench.py's figures: ratios between paths measured in one run, and targets only where measured."""

from tests.load import bench


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


def test_a_ratio_target_is_judged_only_when_both_of_its_paths_ran():
    alone = bench.ratios(results(ours=(900,), fashion=(800, 150.0, 2)))
    assert alone["targets_met"] == {"p99 <= 100 ms": True, "zero failed requests": True}
    assert alone["fashion_targets_met"] == {"fashion p99 <= 100 ms": False, "fashion: zero failed requests": False}
    both = bench.ratios(results({"fashion": {"rps": 2000.0}}, ours=(900,), stock=(400,), fashion=(800,),
                                fashion_stock=(100,)))
    assert both["targets_met"]["ours_vs_stock >= 2.5"] is False  # 2.25
    assert both["fashion_targets_met"]["fashion_vs_stock >= 5.0"] is True  # 8
    assert both["fashion_targets_met"]["fashion_vs_in_process >= 0.7"] is False  # 0.4
