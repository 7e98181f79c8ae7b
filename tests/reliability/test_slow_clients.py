"""Slow clients on a real server: a body that trickles gets 408, headers that never end and a silent
connection are closed, a reader that lags far behind is served or cut off by the send deadline; the
others meanwhile get their answers, without an error, and the API's memory stays put.

The shared server (conftest.py) runs with a 5 s header and body deadline and a 20 s send deadline.
What happens at the protocol level, with a reader that stops for good, is tests/unit/test_http_protocol.py.
Every wait here is a bound against a hang, not an expectation.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import psutil
import pytest

from server_process import API_KEY, PROMPT

pytestmark = pytest.mark.server
HANG_GUARD_S = 300


def _connect(url: str, rcvbuf: int | None = None) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    client = socket.socket()
    if rcvbuf:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    client.settimeout(HANG_GUARD_S)
    client.connect((host, int(port)))
    return client


def _request(path: str, body: bytes, declared: int | None = None) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {API_KEY}\r\n"
            f"content-type: application/json\r\ncontent-length: {declared or len(body)}\r\n\r\n").encode() + body


def _read_until_closed(client: socket.socket, pace: float = 0.0, size: int = 65536) -> bytes:
    data = b""
    try:
        while chunk := client.recv(size):
            data += chunk
            if pace:
                time.sleep(pace)  # the slow reader's pace, not a wait for the server
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def _others(server, count: int, results: list) -> list[threading.Thread]:
    """`count` ordinary streaming completions, each result (status, completion tokens) into `results`."""
    def run():
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 16, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        tokens = 0
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300) as http:
            with http.stream("POST", "/v1/completions", json=body) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: {"):
                        tokens = (json.loads(line[6:]).get("usage") or {}).get("completion_tokens", tokens)
                results.append((resp.status_code, tokens))

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


def test_slow_clients_cost_the_others_nothing(server, report):
    api = psutil.Process(server.proc.pid)
    rss_before = api.memory_info().rss
    body = json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True,
                       "logprobs": 20, "n": 8}).encode()
    laggard = _connect(server.url, rcvbuf=4096)  # reads 1 KiB a second: far behind the stream
    laggard.sendall(_request("/v1/completions", body))
    trickle = _connect(server.url)  # sends 5 bytes of its body, then nothing
    trickle.sendall(_request("/v1/completions", b'{"mod', declared=100))
    loris = _connect(server.url)  # never finishes its headers
    loris.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")
    silent = _connect(server.url)  # sends nothing at all
    others: list = []
    threads = _others(server, 8, others)
    slow_reader = threading.Thread(target=lambda: others.append(("laggard", len(_read_until_closed(laggard, 1.0, 1024)))))
    slow_reader.start()

    timed_out = _read_until_closed(trickle)
    closed_loris, closed_silent = _read_until_closed(loris), _read_until_closed(silent)
    for thread in threads:
        thread.join(HANG_GUARD_S)
    rss_after = api.memory_info().rss
    laggard.shutdown(socket.SHUT_RDWR)  # the test's patience ends here; the server's deadline may have come first
    slow_reader.join(HANG_GUARD_S)
    for client in (laggard, trickle, loris, silent):
        client.close()
    running = _running_after_aborts(server)
    ordinary = [r for r in others if r[0] != "laggard"]
    report(others=len(ordinary), others_ok=sum(r == (200, 16) for r in ordinary),
           trickled_body=timed_out.split(b"\r\n", 1)[0].decode(), loris_answer=len(closed_loris),
           silent_answer=len(closed_silent), api_rss_growth_mib=round((rss_after - rss_before) / 2**20, 1),
           running_after=running)
    assert timed_out.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in timed_out
    assert closed_loris == b"" and closed_silent == b""  # closed without an answer: there was no request
    assert ordinary == [(200, 16)] * 8
    assert rss_after - rss_before < 256 << 20, "the API process grew by a quarter of a GiB with four slow clients"
    assert running == 0  # the laggard's request ended (served, or aborted with its connection)


def _running_after_aborts(server) -> float:
    """vllm:num_requests_running once it settles (an abort lands asynchronously; the deadline guards a hang)."""
    deadline = time.monotonic() + HANG_GUARD_S
    while True:
        text = httpx.get(f"{server.url}/metrics", timeout=60).text
        running = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if line.startswith("vllm:num_requests_running"))
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.5)
