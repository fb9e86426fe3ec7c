"""The peer servers of `make bench` (tests/load/peers/): our handler outside TorchServe answers as it does inside,
ratios against the fastest peer, a peer that cannot run is skipped with the reason, and (slow, only where
.venv-peers has the package) each peer server serves the model's samples and leaves no process behind."""

import base64
import contextlib
import json

import pytest

import registry
from scripts.server import free_port
from tests.load import bench, checks, client, payloads, peers

TRAINED = all(registry.model(name).versions[0].trained for name in peers.MODELS)
needs_artifacts = pytest.mark.skipif(not TRAINED, reason="needs the trained artifacts of mnist and fashion")


def config_of(name):
    return bench.model_config(registry.model(name), {})


@pytest.fixture(scope="module")
def mnist():
    from tests.load.peers.handler import Model

    return Model("mnist", config_of("mnist"))


@needs_artifacts
def test_the_handler_outside_torchserve_answers_a_batch_request_by_request(mnist):
    image = (registry.ROOT / "samples/digit_7.png").read_bytes()
    as_json = json.dumps({"data": base64.b64encode(image).decode()}).encode()
    replies = mnist.answer([(image, "image/png"), (b"not an image", "image/png"), (as_json, "application/json"),
                            ({"data": base64.b64encode(image).decode()}, "application/json")])
    assert [status for status, _ in replies] == [200, 400, 200, 200]
    for status, body in replies:
        if status == 200:
            assert checks.check_mnist(body, "7") == "7"
    assert json.loads(replies[1][1])["type"] == "InvalidImage"  # its neighbours were answered


@needs_artifacts
def test_the_peers_use_the_model_config_for_batching_and_workers():
    for name in peers.MODELS:
        config = config_of(name)
        settings = peers.settings(config)
        assert settings == {"workers": config["minWorkers"], "batch_size": config["batchSize"],
                            "max_batch_delay_s": config["maxBatchDelay"] / 1000}
        for server_peer in peers.PEERS:
            served = server_peer.served(settings, 1)
            assert served["workers"] == config["minWorkers"]
            assert served["batch_size"] == (1 if server_peer.name == "kserve" else config["batchSize"])


def step(rps, users=16, p99=20.0):
    return {"users": users, "rps": rps, "p99_ms": p99, "failed": 0}


def test_ours_is_judged_against_the_fastest_peer_server():
    results = {"paths": {"mnist": {"steps": [step(900)]},
                         "mnist-litserve": {"steps": [step(450)], "peer_server": "litserve"},
                         "mnist-kserve": {"steps": [step(600)], "peer_server": "kserve"},
                         "mnist-rayserve": {"steps": [step(200)], "peer_server": "rayserve"},
                         "fashion": {"steps": [step(500)]}},
               "in_process": {}, "peers_skipped": {"fashion-rayserve": "ray.serve does not import in .venv-peers"}}
    results["ratios"] = bench.ratios(results)
    bench.server_peer_ratios(results)
    mnist = results["ratios"]["models"]["mnist"]
    assert mnist["vs"] == {"litserve": 2.0, "kserve": 1.5, "rayserve": 4.5}
    assert mnist["fastest_peer_server"] == "kserve"
    assert mnist["targets_met"][f"÷ kserve >= {peers.RATIO_TARGET}"] is True
    assert "fastest_peer_server" not in results["ratios"]["models"]["fashion"]  # no peer measured: nothing judged
    assert any(line.startswith("- mnist at 16 users: ÷ litserve **2.0**; ÷ kserve **1.5**")
               for line in bench.ratio_lines(results["ratios"]))
    lines = bench.server_peer_lines(results)
    assert "the fastest peer server at 16 users is kserve (600 req/s" in lines
    assert "- fashion-rayserve: skipped, ray.serve does not import in .venv-peers" in lines


def test_without_the_peers_venv_every_peer_is_skipped_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(peers, "PYTHON", tmp_path / "no-venv" / "bin" / "python")
    results = {"paths": {}}
    with contextlib.ExitStack() as stack:
        started = [bench.server_peers(stack, results, name, [], [1], {}, tmp_path, lambda message: None)
                   for name in ("mnist", "sentiment")]
    assert started == [[], []]
    assert set(results["peers_skipped"]) == {f"mnist-{p.name}" for p in peers.PEERS}  # sentiment has no peers
    assert all("no-venv/bin/python not found" in why for why in results["peers_skipped"].values())


def test_an_unknown_peer_server_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--paths", "mnist", "--peers", "litserve,triton"])
    assert "--peers: unknown peer servers ['triton']" in capsys.readouterr().err


def installed(server_peer):
    try:
        return peers.version(server_peer)
    except peers.Unavailable:
        return None


@pytest.mark.slow
@needs_artifacts
@pytest.mark.parametrize("server_peer", peers.PEERS, ids=[p.name for p in peers.PEERS])
def test_a_peer_server_serves_the_samples_and_leaves_nothing_behind(server_peer, tmp_path):
    if installed(server_peer) is None:
        pytest.skip(f"{server_peer.module} is not installed in .venv-peers (requirements-peers.txt)")
    image = (registry.ROOT / "samples/digit_7.png").read_bytes()
    samples = [payloads.Sample("digit-7", image, "image/png", "7"),
               payloads.Sample("digit-7-json", json.dumps({"data": base64.b64encode(image).decode()}).encode(),
                               "application/json", "7")]
    port = free_port()
    server = peers.PeerServer(server_peer, "mnist", config_of("mnist"), port, tmp_path, 1)
    try:
        server.start()
        requests = client.prepare("127.0.0.1", port, server_peer.route.format(model="mnist"), samples,
                                  checks.check_mnist, peers.TOKEN)
        with peers.counting_sessions():
            result = client.run("127.0.0.1", port, requests, 2, 1.0, warmup=0.5, server_pgid=server.pid)
        assert result.failed == 0, result.errors
        assert result.ok > 0 and result.server_cpu_s > 0
    finally:
        server.stop()
    assert peers.session_processes(server.pid) == []


def test_a_server_that_does_not_start_is_unavailable_with_its_last_words(tmp_path):
    import sys

    ghost = peers.ServerPeer("ghost", "Ghost", "ghost", "ghost", "/predictions/{model}", "/health")
    server = peers.PeerServer(ghost, "mnist", {}, free_port(), tmp_path, 1, python=sys.executable)
    with server, pytest.raises(peers.Unavailable, match="exited with 1: .*No module named tests.load.peers.ghost_"):
        server.start(timeout=60)
    assert peers.session_processes(server.pid) == []
