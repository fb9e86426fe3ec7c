"""The benchmark's load generator (tests/load/client.py) against a server that logs what it sees: users join one per
reply, and the measurement window holds only replies sent once every user had joined."""

import socketserver
import threading
import time

import pytest

from tests.load import client, payloads

REPLY_DELAY_S = 0.03
"""Each reply waits this long, one reply at a time, so replies reach the client in the order the server sent them."""


class LoggingServer(socketserver.ThreadingTCPServer):
    """Keep-alive HTTP on a free port, a thread per connection; replies are numbered in the order they are sent, the
    number is the body, and ``events`` logs ("accept",) and ("reply", number) in order."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Connection)
        self.events, self.lock, self.replies = [], threading.Lock(), 0


class Connection(socketserver.StreamRequestHandler):
    def handle(self):
        server = self.server
        server.events.append(("accept",))
        while True:
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                line = self.rfile.readline()
                if not line:
                    return
                head += line
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            self.rfile.read(length)
            with server.lock:
                time.sleep(REPLY_DELAY_S)
                number = server.replies
                server.replies += 1
                server.events.append(("reply", number))
                body = str(number).encode()
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


@pytest.fixture
def server():
    with LoggingServer() as logging_server:
        thread = threading.Thread(target=logging_server.serve_forever, daemon=True)
        thread.start()
        yield logging_server
        logging_server.shutdown()


def reply_number(body, expected):
    return int(body)


def test_users_join_one_per_reply_and_the_window_opens_once_all_have_joined(server):
    users = 5
    requests = client.prepare("127.0.0.1", server.server_address[1], "/predictions/any",
                              [payloads.Sample("any", b"{}", "application/json", None)], reply_number)
    result = client.run("127.0.0.1", server.server_address[1], requests, users, seconds=0.3, warmup=0.0,
                        keep_answers=True)

    assert result.failed == 0 and result.ok > 0
    accepts = [i for i, event in enumerate(server.events) if event[0] == "accept"]
    assert len(accepts) == users
    for joined, position in enumerate(accepts):  # a burst would accept every connection before the first reply
        replies_before = sum(1 for event in server.events[:position] if event[0] == "reply")
        assert replies_before >= joined, server.events[: accepts[-1] + 1]
    # The last user joined on the reply numbered users - 2; the window holds only later ones, although warmup=0.
    assert min(number for _, number in result.answers) >= users - 1, result.answers[:3]
