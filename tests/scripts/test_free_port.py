"""``scripts.server.free_port``: ports for servers that bind them later, drawn below the kernel's ephemeral range (which
outgoing connections take their local ports from), never one in use, never the same twice."""

import socket

from scripts import server


def test_ports_come_from_below_the_ephemeral_range_and_never_twice(monkeypatch):
    monkeypatch.setattr(server, "first_ephemeral_port", lambda: 32768)
    ports = [server.free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(server.LISTENER_PORTS_FROM <= port < 32768 for port in ports)


def test_a_port_something_listens_on_is_passed_over(monkeypatch):
    monkeypatch.setattr(server, "first_ephemeral_port", lambda: 32768)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            spare = closed.getsockname()[1]
        draws = iter([busy, busy, spare])
        monkeypatch.setattr(server.random, "randrange", lambda low, high: next(draws))
        monkeypatch.setattr(server, "_handed_out", set())
        assert server.free_port() == spare


def test_without_a_known_range_the_kernel_picks(monkeypatch):
    monkeypatch.setattr(server, "first_ephemeral_port", lambda: None)
    port = server.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free


def test_the_ephemeral_range_start_is_read_from_proc(tmp_path):
    (tmp_path / "range").write_text("32768\t60999\n")
    assert server.first_ephemeral_port(tmp_path / "range") == 32768
    assert server.first_ephemeral_port(tmp_path / "missing") is None
