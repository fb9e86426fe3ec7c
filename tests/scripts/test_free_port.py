"""``scripts.server.free_port``: ports for servers that bind them later, drawn below the kernel's ephemeral range (which
outgoing connections take their local ports from), never one in use, never the same twice, and reserved against other
processes' draws."""

import socket
import subprocess
import sys

import pytest

from scripts import server
from scripts.server import ROOT


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


def assert_reserved(port):
    """Another process's draw (a bind without SO_REUSEADDR) fails on ``port``; a server (with it) binds and listens."""
    with socket.socket() as draw, pytest.raises(OSError):
        draw.bind(("127.0.0.1", port))
    with socket.socket() as server_socket:
        server_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server_socket.bind(("127.0.0.1", port))
        server_socket.listen()


def test_a_drawn_port_is_reserved_for_a_server_that_binds_it_later():
    assert_reserved(server.free_port())


def test_without_a_known_range_the_kernel_picks_and_the_port_is_reserved(monkeypatch):
    monkeypatch.setattr(server, "first_ephemeral_port", lambda: None)
    assert_reserved(server.free_port())


def test_two_processes_drawing_one_after_the_other_get_disjoint_ports():
    """The xdist race that failed CI: each process's draws are unbound for seconds while its TorchServe loads. Without
    the reservation, 300 draws each from ~12,800 ports overlap with a probability of 0.999."""
    draw = [sys.executable, "-c", "from scripts.server import free_port; print(*(free_port() for _ in range(300)))"]
    first, second = (set(map(int, subprocess.run(draw, cwd=ROOT, capture_output=True, text=True, check=True)
                             .stdout.split())) for _ in range(2))
    assert len(first) == len(second) == 300
    assert not first & second


def test_the_ephemeral_range_start_is_read_from_proc(tmp_path):
    (tmp_path / "range").write_text("32768\t60999\n")
    assert server.first_ephemeral_port(tmp_path / "range") == 32768
    assert server.first_ephemeral_port(tmp_path / "missing") is None
