"""The guarded HTTP protocol (server/http_protocol.py) against slow clients, on a real uvicorn server
in this process with a small ASGI app: a reader that stops reading, headers that never end, too
many header bytes, a connection that sends nothing. Deadlines are short here; every wait below is
a bound against a hang, not an expectation."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import uvicorn

from unipool_serve.server.http_protocol import MAX_HEADER_BYTES, guarded_protocol

HANG_GUARD_S = 60
CHUNK = b"x" * 65536


class App:
    """Streams CHUNK until the client goes away (GET /stream); answers "ok" otherwise."""

    def __init__(self):
        self.disconnected = threading.Event()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        if scope["path"] != "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})
            return

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            self.disconnected.set()

        watcher = asyncio.create_task(watch())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(4096):  # 256 MiB: far more than any socket buffer holds
            if self.disconnected.is_set():
                break
            await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
        watcher.cancel()


@pytest.fixture(scope="module")
def served():
    app = App()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", lifespan="off",
                            http=guarded_protocol(header_timeout=1.0, send_timeout=1.0))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=asyncio.run, args=(server.serve(sockets=[sock]),), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield app, sock.getsockname()
    server.should_exit = True
    thread.join(HANG_GUARD_S)


def _connect(address, rcvbuf: int | None = None) -> socket.socket:
    client = socket.socket()
    if rcvbuf:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    client.settimeout(HANG_GUARD_S)
    client.connect(address)
    return client


def _read_until_closed(client: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := client.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_a_client_that_stops_reading_is_disconnected_and_its_stream_ends(served):
    app, address = served
    client = _connect(address, rcvbuf=4096)
    client.sendall(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
    assert app.disconnected.wait(HANG_GUARD_S), "the stream never saw its client go"
    assert len(_read_until_closed(client)) < 64 * len(CHUNK)  # the server dropped what was not read


def test_headers_that_never_end_and_a_silent_connection_are_closed(served):
    _, address = served
    trickling = _connect(address)
    trickling.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n")  # ... and never the blank line
    silent = _connect(address)
    assert _read_until_closed(trickling) == b""
    assert _read_until_closed(silent) == b""
    healthy = _connect(address)
    healthy.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert _read_until_closed(healthy).endswith(b"ok")  # meanwhile others are served


def test_too_many_header_bytes_get_431(served):
    _, address = served
    client = _connect(address)
    client.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n" + b"x-pad: " + b"a" * (MAX_HEADER_BYTES + 1) + b"\r\n\r\n")
    answer = _read_until_closed(client)
    assert answer.startswith(b"HTTP/1.1 431") and b'"error"' in answer
