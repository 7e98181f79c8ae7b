"""The bundled demo model through `unipool-serve` with no --model, installed from a wheel (not
editable): the package finds its demo folder the way the image does, vLLM CPU equals the
reference, and the shipped `prose` profile switches code continuations to prose through real HTTP.

One server for the module, started from the wheel (the editable install's default folder is
checked without a server: it is the repository's models/unipool-demo).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import httpx
import pytest
from server_launcher import run_server

from unipool_serve.demo.eval import DEMO_MODEL_DIR, MAX_NEW_TOKENS, PROMPTS_CODE, greedy_continuations, kind_shares

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel_python(tmp_path_factory) -> Path:
    """A scratch venv holding the project as a wheel, over the project environment's packages."""
    venv = tmp_path_factory.mktemp("wheel") / "venv"
    uv = ROOT / ".tools" / "bin" / "uv"
    subprocess.run([str(uv), "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    source = venv.parent / "source"  # a copy: building in the repository would leave build/ there
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".tools", "build", "*.egg-info", "__pycache__", "tests", "docs", "benchmarks", "deploy"))
    # The environment's packages via a path entry: its .pth files (the editable install's finder)
    # are not processed from there, so `unipool_serve` resolves to the wheel only.
    (site / "project-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(uv), "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), "--no-deps",
                    "--no-build-isolation", str(source)], check=True, cwd=venv.parent)
    return venv / "bin" / "python"


@pytest.fixture(scope="module")
def served(wheel_python, tmp_path_factory):
    log = tmp_path_factory.mktemp("demo-server") / "server.log"
    with run_server(["--enforce-eager", "--max-num-seqs", "64"], log, env={"VLLM_CPU_KVCACHE_SPACE": "1"},
                    python=str(wheel_python), cwd="/") as server:
        yield server


def test_the_wheel_locates_the_demo_model_inside_the_package(wheel_python):
    code = "from unipool_serve.models import DEMO_MODEL; print(DEMO_MODEL); print((DEMO_MODEL / 'config.json').is_file())"
    out = subprocess.run([str(wheel_python), "-c", code], capture_output=True, text=True, check=True, cwd="/")
    location, exists = out.stdout.split()
    assert "site-packages" in location and str(ROOT) not in location and exists == "True"


def test_the_editable_install_defaults_to_the_repository_folder():
    from unipool_serve.models import DEMO_MODEL

    assert DEMO_MODEL == DEMO_MODEL_DIR == ROOT / "models" / "unipool-demo"


def _complete(server, prompts, steering=None) -> list[str]:
    body = {"model": "unipool-demo", "prompt": prompts, "max_tokens": MAX_NEW_TOKENS, "min_tokens": MAX_NEW_TOKENS,
            "temperature": 0}
    if steering:
        body["steering"] = steering
    resp = httpx.post(f"{server.url}/v1/completions", json=body, timeout=600)
    assert resp.status_code == 200, resp.text
    choices = sorted(resp.json()["choices"], key=lambda c: c["index"])
    return [c["text"] for c in choices]


def test_default_model_is_the_demo_with_its_profiles(served):
    assert [m["id"] for m in httpx.get(f"{served.url}/v1/models").json()["data"]] == ["unipool-demo"]
    assert httpx.get(f"{served.url}/ready").json()["steering_profiles"] == ["code", "prose"]
    assert "site-packages/unipool_serve/models/unipool-demo" in served.log.read_text()  # the wheel's folder


def test_served_greedy_continuations_equal_the_reference(served, demo):
    model, tokenizer = demo
    prompts = PROMPTS_CODE[:3] + ["The old river", "def area(width, height):"]
    assert _complete(served, prompts) == greedy_continuations(model, tokenizer, prompts)


def test_prose_profile_switches_code_prompts_through_the_server(served):
    # Reference model, fp32, all 40 prompts: code share 100% unsteered, 35% with `prose`
    # (docs/demo-model.md); the margins below leave room for vLLM's different summation order.
    plain = kind_shares(_complete(served, PROMPTS_CODE))
    steered = kind_shares(_complete(served, PROMPTS_CODE, steering="prose"))
    assert plain["code"] >= 0.9
    assert steered["code"] <= 0.6
    assert plain["code"] - steered["code"] >= 0.35


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_open_mode_steering_cannot_poison_the_prefix_cache(served, path):
    # No keys (the default): a client steers a long prompt first; another client's unsteered
    # request for the same prompt must equal one computed from scratch (a fresh cache salt).
    prompt = "The old river ran past the mill and the farm, " * 8 + path
    body = {"model": "unipool-demo", "max_tokens": 8, "temperature": 0}
    body |= {"prompt": prompt} if path == "/v1/completions" else {"messages": [{"role": "user", "content": prompt}]}
    attack = httpx.post(f"{served.url}{path}", json={**body, "steering": "prose"}, timeout=600)
    assert attack.status_code == 200, attack.text
    after_attack = httpx.post(f"{served.url}{path}", json=body, timeout=600).json()["choices"]
    fresh = httpx.post(f"{served.url}{path}", json={**body, "cache_salt": "fresh-compute"}, timeout=600).json()["choices"]
    assert after_attack == fresh
