"""A wheel install (not editable) finds the bundled demo model the way the editable install and
the image do, through the package: `unipool-serve` with no --model starts and serves it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import httpx
import pytest
from server_launcher import run_server

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


def test_the_wheel_locates_the_demo_model_inside_the_package(wheel_python):
    code = "from unipool_serve.models import DEMO_MODEL; print(DEMO_MODEL); print((DEMO_MODEL / 'config.json').is_file())"
    out = subprocess.run([str(wheel_python), "-c", code], capture_output=True, text=True, check=True, cwd="/")
    location, exists = out.stdout.split()
    assert "site-packages" in location and str(ROOT) not in location and exists == "True"


def test_unipool_serve_from_the_wheel_serves_the_demo(wheel_python, tmp_path):
    log = tmp_path / "server.log"
    with run_server(["--enforce-eager"], log, env={"VLLM_CPU_KVCACHE_SPACE": "1"}, python=str(wheel_python),
                    cwd="/") as server:
        assert [m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]] == ["unipool-demo"]
        assert httpx.get(f"{server.url}/ready").json()["steering_profiles"] == ["code", "prose"]
    assert "site-packages/unipool_serve/models/unipool-demo" in log.read_text()
