"""The benchmark's load generator: N closed-loop users over keep-alive HTTP/1.1 connections, one event loop.

Every user owns one connection and sends its next request the moment the previous reply is complete (no think
time), so N users keep at most N requests in flight. All users share one thread driven by ``selectors`` (epoll):
the request bytes are prepared once per sample, a reply is parsed just far enough to find its status and body
(Content-Length framing), and the latency is taken when epoll reports the last byte. A single thread has no GIL
hand-offs between users, so a busy client does not add its own queueing to the latencies of threads waiting for
the interpreter, and it costs ~20-30 us of CPU per request (measured by ``client_ceiling`` and reported with each
run), against ~100 us for http.client on threads.

Every reply is checked with its sample's checker (tests/load/checks.py): a non-200 status or a wrong answer is a
failed request, kept apart from the successes' latencies and reported with its first error messages.

``python -m tests.load.client --dummy-server PORT`` runs a minimal HTTP server that answers every request with a
fixed body: the benchmark measures the client's own ceiling against it.
"""

import math
import os
import selectors
import socket
import time
from dataclasses import dataclass, field

import numpy as np

from tests.load.checks import WrongAnswer

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Request:
    """One prepared request: its wire bytes and how to check its reply."""

    wire: bytes
    check: object  # check(body, expected) -> raises WrongAnswer
    expected: object = None
    name: str = ""


def prepare(host, port, path, samples, check, token=None):
    """Wire bytes of POST ``path`` for each sample (tests/load/payloads.Sample), with its checker."""
    requests = []
    for sample in samples:
        head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Type: {sample.content_type}",
                f"Content-Length: {len(sample.body)}"]
        if token:
            head.append(f"Authorization: Bearer {token}")
        wire = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + sample.body
        requests.append(Request(wire, check, sample.expected, sample.name))
    return requests


@dataclass
class StepResult:
    users: int
    seconds: float  # the measurement window: replies completed in it are counted
    ok: int = 0
    failed: int = 0
    latencies_ms: list = field(default_factory=list)
    errors: dict = field(default_factory=dict)  # message -> count (first messages of their kind)
    answers: list = field(default_factory=list)  # (expected, what the checker read), for accuracy reports
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    worker_cpu_s: float = 0.0  # the part of server_cpu_s used by the Python workers (the rest: the Java frontend)
    machine_busy_s: float = 0.0  # CPU-seconds used by everything on the machine during the window
    cpu_seconds: float = 0.0  # wall time between the CPU snapshots (the window, give or take a loop turn)

    def summary(self):
        latencies = np.asarray(self.latencies_ms) if self.latencies_ms else np.asarray([np.nan])
        p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
        total = self.ok + self.failed
        cpu_window = self.cpu_seconds or self.seconds
        return {
            "users": self.users, "seconds": round(self.seconds, 3), "requests": total, "ok": self.ok,
            "failed": self.failed, "rps": round(self.ok / self.seconds, 1),
            "p50_ms": round(float(p50), 2), "p95_ms": round(float(p95), 2), "p99_ms": round(float(p99), 2),
            "mean_ms": round(float(np.mean(latencies)), 2), "max_ms": round(float(np.max(latencies)), 2),
            "client_cpu_pct": round(100 * self.client_cpu_s / cpu_window, 1),
            "client_cpu_us_per_req": round(1e6 * self.client_cpu_s / max(total, 1), 1),
            "server_cpu_pct": round(100 * self.server_cpu_s / cpu_window, 1),
            "server_cpu_us_per_req": round(1e6 * self.server_cpu_s / max(total, 1), 1),
            "worker_cpu_pct": round(100 * self.worker_cpu_s / cpu_window, 1),
            "worker_cpu_us_per_req": round(1e6 * self.worker_cpu_s / max(total, 1), 1),
            "machine_cpu_pct": round(100 * self.machine_busy_s / cpu_window, 1),
            "others_cpu_pct": round(100 * max(0.0, self.machine_busy_s - self.client_cpu_s - self.server_cpu_s)
                                    / cpu_window, 1),
            "errors": dict(list(self.errors.items())[:5]),
        }


def process_group_cpu(pgid):
    """CPU-seconds (user + system) used so far by the live processes of process group ``pgid``: (all of them, those
    that are not the Java frontend, i.e. TorchServe's Python workers)."""
    total = workers = 0
    if pgid is None:
        return 0.0, 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()  # after "pid (comm) "
        if int(fields[2]) == pgid:  # field 5 of stat: the process group
            used = int(fields[11]) + int(fields[12])  # utime, stime
            total += used
            if not stat.startswith(f"{entry.name} (java)".encode()):
                workers += used
    return total / CLOCK_TICKS, workers / CLOCK_TICKS


def machine_busy():
    """CPU-seconds all cores spent not idle since boot (from /proc/stat)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / CLOCK_TICKS


class _User:
    __slots__ = ("sock", "index", "sent_at", "buffer", "request")

    def __init__(self, sock, index):
        self.sock, self.index, self.sent_at, self.buffer, self.request = sock, index, 0.0, bytearray(), None


def _parse(buffer):
    """(status, body) once ``buffer`` holds a whole reply, else None. Only Content-Length framing is supported."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buffer[:end]).decode("latin-1")
    lines = head.split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
        elif name.strip().lower() == "transfer-encoding":
            raise WrongAnswer(f"unsupported Transfer-Encoding {value.strip()} (the client needs Content-Length)")
    if length is None:
        raise WrongAnswer("reply without Content-Length")
    if len(buffer) < end + 4 + length:
        return None
    return status, bytes(buffer[end + 4: end + 4 + length])


def run(host, port, requests, users, seconds, warmup=1.0, server_pgid=None, timeout=30.0, keep_answers=False):
    """Drive ``users`` closed-loop users; measure the replies completed in a window of ``seconds`` that opens once
    every user has joined and ``warmup`` seconds have passed since the first did.

    User i sends requests i, i + users, i + 2 * users, ... of ``requests`` (cycling), so every sample is sent and
    concurrent requests differ. Users join one per reply: user i + 1 connects when a reply has come since user i
    joined. Connected in one burst, every connection could be taken by one process of a server whose processes share
    a listening socket (KServe's and LitServe's uvicorn processes: asyncio accepts all the pending connections at
    once), leaving the others idle: KServe's two processes served fashion on one core in 3 of 8 windows that way.
    """
    selector = selectors.DefaultSelector()
    result = StepResult(users, seconds)
    count = len(requests)

    def connect(index):
        sock = socket.create_connection((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        user = _User(sock, index)
        selector.register(sock, selectors.EVENT_READ, user)
        return user

    def send(user, now):
        user.request = requests[user.index % count]
        user.index += users
        user.buffer.clear()
        user.sent_at = now
        user.sock.sendall(user.request.wire)

    def fail(message):
        result.failed += 1
        key = message[:160]
        result.errors[key] = result.errors.get(key, 0) + 1

    started = time.perf_counter()
    send(connect(0), started)
    joined = in_flight = 1
    window_start = window_end = math.inf  # set once every user has joined
    in_window = False
    snapshot = None

    def close_window(now):
        result.cpu_seconds = now - snapshot[3]
        result.client_cpu_s = time.process_time() - snapshot[0]
        server, workers = process_group_cpu(server_pgid)
        result.server_cpu_s, result.worker_cpu_s = server - snapshot[1][0], workers - snapshot[1][1]
        result.machine_busy_s = machine_busy() - snapshot[2]

    while in_flight:
        now = time.perf_counter()
        if joined == users and window_start == math.inf:
            window_start = max(now, started + warmup)
            window_end = window_start + seconds
        if not in_window and snapshot is None and now >= window_start:
            in_window = True
            snapshot = (time.process_time(), process_group_cpu(server_pgid), machine_busy(), now)
        if in_window and now >= window_end:
            in_window = False
            close_window(now)
        if now > (window_end if joined == users else started + warmup + seconds) + timeout:
            fail(f"{in_flight} requests unanswered {timeout:.0f} s after the end of the run"
                 + ("" if joined == users else f" ({joined} of {users} users joined)"))
            break
        for key, _ in selector.select(timeout=0.05):
            user = key.data
            try:
                chunk = user.sock.recv(262144)
            except OSError as err:
                chunk, error = b"", err
            else:
                error = None
            done = time.perf_counter()
            counted = window_start <= done < window_end
            if not chunk:
                if counted:
                    fail(f"connection closed by the server ({error or 'EOF'})")
                selector.unregister(user.sock)
                user.sock.close()
                user = connect(user.index)
            else:
                user.buffer += chunk
                try:
                    reply = _parse(user.buffer)
                except WrongAnswer as wrong:
                    reply = (0, str(wrong).encode())
                if reply is None:
                    continue  # more bytes to come
                status, body = reply
                if counted:
                    if status != 200:
                        fail(f"HTTP {status}: {body[:120].decode('utf-8', errors='replace')}")
                    else:
                        try:
                            answer = user.request.check(body, user.request.expected)
                        except WrongAnswer as wrong:
                            fail(f"wrong answer ({user.request.name}): {wrong}")
                        else:
                            result.ok += 1
                            result.latencies_ms.append((done - user.sent_at) * 1000)
                            if keep_answers:
                                result.answers.append((user.request.expected, answer))
                if joined < users:  # the next user joins
                    send(connect(joined), time.perf_counter())
                    joined += 1
                    in_flight += 1
            if done < window_end:
                send(user, time.perf_counter())
            else:
                in_flight -= 1
                selector.unregister(user.sock)
                user.sock.close()
    if snapshot is None:
        raise RuntimeError("the run ended before its measurement window began")
    if in_window:
        close_window(min(time.perf_counter(), window_end))
    selector.close()
    return result


# --- a fixed-reply HTTP server, to measure the client itself ---------------------------------------------------------

def serve_fixed_reply(port, body):
    """Answer every HTTP/1.1 request on 127.0.0.1:``port`` with 200 and ``body`` (keep-alive), until killed."""
    import asyncio

    reply = (f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
             "connection: keep-alive\r\n\r\n").encode() + body

    class Protocol(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport, self.buffer = transport, bytearray()

        def data_received(self, data):
            self.buffer += data
            while True:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                length = 0
                for line in bytes(self.buffer[:end]).split(b"\r\n")[1:]:
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if len(self.buffer) < end + 4 + length:
                    return
                del self.buffer[: end + 4 + length]
                self.transport.write(reply)

    async def main():
        server = await asyncio.get_running_loop().create_server(Protocol, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


if __name__ == "__main__":
    import argparse

    from tests.load.checks import NOOP_REPLY

    parser = argparse.ArgumentParser(description="A fixed-reply HTTP server for measuring the benchmark client.")
    parser.add_argument("--dummy-server", type=int, required=True, metavar="PORT")
    serve_fixed_reply(parser.parse_args().dummy_server, NOOP_REPLY)
