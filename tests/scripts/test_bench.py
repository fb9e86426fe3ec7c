"""tests/load/bench.py's paths and figures: every served model with the peers of its registry entry, ratios between
paths measured in one run, and targets judged only where measured."""

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

import registry
from tests.load import bench
from tests.worker import Request

MACHINE = {"cores": 2, "cpu": "x86_64", "memory_gib": 24, "python": "3.11", "torch": "2", "torchserve": "0.12.0"}


def step(rps, p99=20.0, failed=0, users=16):
    return {"users": users, "rps": rps, "p99_ms": p99, "failed": failed}


def results(in_process=None, **paths):
    return {"paths": {name.replace("_", "-"): {"steps": [step(*figures)]} for name, figures in paths.items()},
            "in_process": in_process or {}}


def test_every_served_model_is_a_path_with_its_registry_peers():
    paths = {path.name: path for entry in registry.served_models() for path in bench.paths_of(entry, {})}
    for entry in registry.served_models():
        assert paths[entry.name].served_as == entry.name
        assert paths[entry.name].check is registry.resolve(entry.load.check)
        for peer in entry.load.peers:
            path = paths[f"{entry.name}-{peer.name}"]
            assert path.peer is peer and path.served_as == f"{entry.name}_{peer.name.replace('-', '_')}"
            assert path.check is registry.resolve(peer.check or entry.load.check)
    assert not any(name.endswith("-baseline") for name in paths)


def test_ratios_per_model_against_the_targets_of_its_peers():
    peers = {peer.name: peer for peer in registry.model("mnist").load.peers}
    stock_target = peers["stock"].target
    out = bench.ratios(results({"fashion": {"rps": 1000.0}}, mnist=(900,), mnist_stock=(900 / stock_target / 2,),
                               mnist_baseline=(1000,), fashion=(800, 150.0, 2)))
    mnist, fashion = out["models"]["mnist"], out["models"]["fashion"]
    assert mnist["vs"] == {"stock": 2 * stock_target, "baseline": 0.9}
    assert mnist["targets_met"] == {f"÷ stock >= {stock_target}": True, "p99 <= 100 ms": True,
                                    "zero failed requests": True}
    assert fashion["vs"] == {"in-process": 0.8}
    target = registry.model("fashion").load.in_process_target
    assert fashion["targets_met"] == {f"÷ in-process >= {target}": 0.8 >= target, "p99 <= 100 ms": False,
                                      "zero failed requests": False}
    assert "sentiment" not in out["models"]  # not measured: nothing judged
    lines = bench.ratio_lines(out)
    assert any(line.startswith("- mnist at 16 users: ÷ stock **") for line in lines)


def test_a_photo_mix_is_sent_to_the_model_and_to_each_peer_of_its_weights_and_judged_apart():
    paths = {path.name: path for path in bench.paths_of(registry.model("mnist"), {})}
    assert {name for name, path in paths.items() if path.photos} == {"mnist-photos", "mnist-stock-photos"}
    assert paths["mnist-stock-photos"].peer is paths["mnist-stock"].peer  # the no-op ceilings have no weights
    assert not any(path.photos for path in bench.paths_of(registry.model("sentiment"), {}))
    out = bench.ratios(results(mnist=(900,), mnist_stock=(600,), mnist_photos=(300,), mnist_stock_photos=(30,)))
    assert out["models"]["mnist"]["vs"] == {"stock": 1.5, "stock (photos)": 10.0}


def test_a_baseline_is_named_by_model_and_its_archive_must_exist(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--paths", "sentiment-baseline"])
    assert "MODEL-baseline needs --baseline" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--baseline", f"sentiment={tmp_path / 'missing.mar'}"])
    assert "missing.mar: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--baseline", "nomodel=HEAD"])
    assert "MODEL a served model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--model-config", "batchSize=8"])
    assert "expected MODEL.KEY=VALUE" in capsys.readouterr().err


def test_a_baseline_archive_is_copied_into_its_own_store(tmp_path):
    archive = tmp_path / "old.mar"
    archive.write_bytes(b"an older sentiment archive")
    store = tmp_path / "store"
    store.mkdir()
    path = next(p for p in bench.paths_of(registry.model("sentiment"), {"sentiment": str(archive)})
                if p.name == "sentiment-baseline")
    name = bench.build_archive(path, store, tmp_path, {})
    assert (store / name).read_bytes() == b"an older sentiment archive" and name == "sentiment.mar"


def test_in_process_batches_hold_each_rendering_in_proportion():
    """runtimes.in_process and handler_cost time a batch of 16 of a model's payloads, which come grouped by
    rendering: a batch of the first 16 would be the smallest images only."""
    from tests.load.payloads import spread

    samples = [f"{size}px-{index}" for size in (28, 64, 128, 300) for index in range(39)]
    assert sorted(name.split("-")[0] for name in spread(samples, 16)) == sorted(["28px", "64px", "128px", "300px"] * 4)
    assert sorted(spread(["a", "b", "c"], 5)) == ["a", "a", "b", "b", "c"]


@pytest.mark.trained
@pytest.mark.parametrize("name", [entry.name for entry in registry.served_models() if entry.load_tested])
def test_the_runtime_comparison_reads_each_load_payload_as_handle_does(name, worker):
    """tests/load/runtimes.py collates a model's load payloads itself, to time the runtime alone: JSON bodies (the
    cyclegan's) are decoded first, as ``handle`` decodes them."""
    from tests.load import payloads, runtimes

    entry = registry.model(name)
    loaded = worker(entry.versions[0].archive)
    requests = [Request(sample.body, sample.content_type) for sample in payloads.of_model(entry)[:2]]
    assert {reply.status for reply in loaded.run(*requests)} == {200}
    batch = loaded.handler.collate([runtimes.parsed(loaded.handler, idx, r) for idx, r in enumerate(requests)])
    assert loaded.handler.predict(batch) is not None


def test_the_runtime_comparison_counts_the_median_of_its_alternating_rounds():
    from tests.load import runtimes

    rounds = [step(1200.0, 25.0), step(900.0, 40.0), step(1400.0, 20.0)]
    median = bench.median_round(rounds)
    assert median["rps"] == 1200.0 and median["p99_ms"] == 25.0 and median["rounds_rps"] == [1200.0, 900.0, 1400.0]
    compared = {"model": "fashion", "candidates": ["eager", "onnxruntime"],
                "eager": {"handle_us_per_item": 500.0, "forward_us_per_item": 230.0, "steps": [median]},
                "onnxruntime": {"handle_us_per_item": 390.0, "forward_us_per_item": 175.0,
                                "steps": [bench.median_round([step(1300.0), step(1500.0), step(1000.0)])]}}
    assert "| eager | 500.0 | 230.0 | 1200 (900-1400), 25.0 |" in runtimes.table(compared)
    assert runtimes.choice(compared, 16)["fastest_built"] == "onnxruntime"


def settled_states(processes, timeout=5.0):
    """The state letter of each process's /proc/PID/stat (S sleeping, T stopped) once none is running (R): a
    signal is delivered, and a process started, asynchronously."""
    deadline = time.monotonic() + timeout
    while True:
        states = []
        for process in processes:
            with open(f"/proc/{process.pid}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        if "R" not in states or time.monotonic() > deadline:
            return states
        time.sleep(0.01)


def test_servers_not_under_load_are_paused_while_another_is_measured(monkeypatch):
    servers = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
               for _ in range(2)]
    seen = []

    def measure_steps(label, port, requests, users, *args, **kwargs):
        seen.append((label, settled_states(servers)))
        return [step(1000.0, users=n) for n in users]

    monkeypatch.setattr(bench, "measure_steps", measure_steps)
    try:
        assert settled_states(servers) == ["S", "S"]
        running = [bench.Running(f"server {number}", 0, server.pid, [], [4, 16])
                   for number, server in enumerate(servers)]
        measured = bench.measure_side_by_side(running, 1.0, 0.0, lambda message: None, rounds=2)
        after = settled_states(servers)
    finally:
        for server in servers:
            server.kill()
            server.wait()
    assert seen == [("server 0", ["S", "T"]), ("server 1", ["T", "S"]),
                    ("server 0 round 2/2", ["S", "T"]), ("server 1 round 2/2", ["T", "S"])]
    assert after == ["S", "S"]
    assert [step["users"] for step in measured["server 0"]] == [4, 16]
    assert measured["server 1"][1]["rounds_rps"] == [1000.0, 1000.0]


def descendants(pid):
    """The pids of every living process below ``pid`` (children, grandchildren, ...), from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid):
    """Whether ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.trained  # benches model_store/regression.mar on a real TorchServe
def test_sigterm_stops_every_server_the_benchmark_started(tmp_path):
    run = subprocess.Popen([sys.executable, "-m", "tests.load.bench", "--paths", "regression", "--users", "1",
                            "--warmup", "120", "--no-client-ceiling", "--no-in-process", "--no-runtimes",
                            "--out", str(tmp_path)], cwd=registry.ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    servers = set()
    try:
        lines = []
        while not any("TorchServe ready" in line for line in lines):  # then in its 120 s warm-up
            line = run.stdout.readline()
            assert line, "".join(lines)[-3000:]
            lines.append(line)
        servers = descendants(run.pid)
        assert servers
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=90) == 128 + signal.SIGTERM, run.stdout.read()[-3000:]
        assert [pid for pid in servers if alive(pid)] == []
    finally:
        for pid in [pid for pid in servers if alive(pid)]:  # what a failed run left
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        run.kill()
        run.wait()
