"""vLLM's own OpenAI server serves a tiny UniPool folder with no extra flags.

Only the entry point installed by this package makes vLLM know the architecture;
the server runs with its defaults (torch.compile on), so this also covers the
compiled path. `--dtype float32` only keeps the numbers comparable: by default
vLLM serves an fp32 checkpoint in bf16, and the tiny models' logit margins are
too small for a bf16 comparison. The completion must equal the reference model's
greedy tokens wherever the reference's top-1/top-2 margin exceeds LOGPROB_TOL.
"""

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from engine_checks import LOGPROB_TOL, reference_logprobs, reference_model

pytestmark = pytest.mark.engine

START_TIMEOUT_S = 1800
PROMPT = [5, 77, 190, 23, 8, 41, 260, 99, 13]
MAX_TOKENS = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_factory, tmp_path_factory):
    model_dir = tiny_model_factory("server_global_pool", seed=3, layers_per_router=2)
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
             "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ},
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after {START_TIMEOUT_S}s:\n{log.read_text()[-4000:]}")
            time.sleep(2)
        yield base, model_dir
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_completion_over_http(server):
    base, model_dir = server
    body = {"model": str(model_dir), "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True}
    resp = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    choice = data["choices"][0]
    assert data["usage"]["completion_tokens"] == MAX_TOKENS
    assert isinstance(choice["text"], str) and choice["text"]
    tokens = choice["token_ids"]
    assert len(tokens) == MAX_TOKENS
    ref_lp = reference_logprobs(reference_model(model_dir), PROMPT + tokens)  # teacher-forced
    clear = 0
    for j, token in enumerate(tokens):
        top2 = ref_lp[len(PROMPT) - 1 + j].topk(2)
        if (top2.values[0] - top2.values[1]).item() > LOGPROB_TOL:
            clear += 1
            assert token == int(top2.indices[0]), f"token {j}: server {token}, reference {int(top2.indices[0])}"
    assert clear >= MAX_TOKENS - 1, f"only {clear}/{MAX_TOKENS} positions had a clear margin"
