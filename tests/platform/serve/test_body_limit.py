"""What the server reads of a body it refuses with 413 (an in-process server, raw sockets): the rest of the body,
so that a client that writes it whole before reading (urllib) gets the answer rather than a reset connection
(test_abuse.py shows that through `neoxray serve`, with and without Ray), but never more than its bounds: a
body declared longer than LINGER_BYTES, and one whose client waits for `100 Continue`, are not read at all, and
a client that stops sending gets its 413 after LINGER_S."""

from __future__ import annotations

import json
import socket

import pytest

from neoxray.platform.serve import body as api
from tests.support.serving import Server

LIMIT = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    from neoxray.model.hf import load_model_and_tokenizer
    from neoxray.platform.inference.engine import InferenceEngine

    engine = InferenceEngine(*load_model_and_tokenizer(tiny_model_dir)).start()
    srv = Server(engine)
    yield srv
    srv.close()
    engine.stop(timeout=60)


def answer_to(port: int, head: str, body: bytes = b"") -> tuple[int, dict, bytes]:
    """Send a request's head and `body` (maybe less than it declares), then read the answer: (status, headers,
    body). The socket's timeout is a failure guard only."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(head.encode() + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536) or _closed(data)
        top, rest = data.split(b"\r\n\r\n", 1)
        status_line, *lines = top.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        while len(rest) < int(headers["content-length"]):
            rest += s.recv(65536) or _closed(rest)
    return int(status_line.split()[1]), headers, rest


def _closed(data: bytes) -> bytes:
    raise AssertionError(f"the server closed the connection after {data[:200]!r}")


def head(length: int, *extra: str) -> str:
    lines = ["POST /v1/completions HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {length}", *extra]
    return "\r\n".join(lines) + "\r\n"


def assert_413(status: int, headers: dict, body: bytes) -> None:
    assert status == 413, (status, body[:300])
    assert json.loads(body)["error"]["code"] == "request_too_large"


def test_a_client_that_writes_its_whole_body_before_reading_gets_the_413(server):
    """As urllib does: `Connection: close`, the whole body written, then the answer read. Closing on the unread
    rest of the body resets the connection (ConnectionResetError here) instead."""
    body = b"x" * (LIMIT + 4 * 1024 * 1024)
    assert_413(*answer_to(server.port, head(len(body), "Connection: close"), body))


def test_a_body_declared_longer_than_the_bound_is_answered_at_once(server, monkeypatch):
    monkeypatch.setattr(api, "LINGER_S", 3600.0)  # were it read, the answer would wait for the body
    assert_413(*answer_to(server.port, head(10**10)))


def test_a_client_that_waits_for_100_continue_is_answered_without_it(server, monkeypatch):
    monkeypatch.setattr(api, "LINGER_S", 3600.0)
    status, headers, body = answer_to(server.port, head(LIMIT + 1, "Expect: 100-continue"))
    assert_413(status, headers, body)


def test_a_client_that_stops_sending_is_answered_after_linger_s(server, monkeypatch):
    monkeypatch.setattr(api, "LINGER_S", 0.5)
    assert_413(*answer_to(server.port, head(LIMIT + 1), b"x" * 1000))  # declared, never sent whole
