"""The lock is the environment: consistent with pyproject.toml, and exactly what is installed."""

from __future__ import annotations

import importlib.metadata
import re
import sys
import sysconfig
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from lock_inputs import lock_inputs_hash  # noqa: E402

RELOCK = "run `make lock` and commit locks/"
PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^ \\]+)", re.MULTILINE)


def pins(lock: str) -> dict[str, Version]:
    text = (ROOT / "locks" / lock).read_text()
    return {canonicalize_name(name): Version(version) for name, version in PIN.findall(text)}


def test_lock_was_made_from_the_current_dependency_specs():
    recorded = (ROOT / "locks" / "inputs.sha256").read_text().strip()
    assert recorded == lock_inputs_hash(ROOT), (
        f"pyproject.toml's dependencies or locks/overrides.txt changed since the lock was made: {RELOCK}")


def test_every_direct_requirement_is_pinned_within_its_spec():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    locked = pins("cpu.txt")
    for spec in project["dependencies"] + extras["cpu"] + extras["dev"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is not in locks/cpu.txt: {RELOCK}"
        assert req.specifier.contains(locked[name], prereleases=True), (
            f"locks/cpu.txt pins {req.name}=={locked[name]}, outside {spec!r}: {RELOCK}")


def test_image_lock_is_a_subset_of_the_development_lock():
    serve, dev = pins("cpu-serve.txt"), pins("cpu.txt")
    assert {name: version for name, version in serve.items() if dev.get(name) != version} == {}


def test_overridden_packages_are_never_locked():
    banned = {canonicalize_name(line.split(";")[0].strip())
              for line in (ROOT / "locks" / "overrides.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    assert banned == {"torchvision", "torchaudio", "torchcodec"}
    for lock in ("cpu.txt", "cpu-serve.txt"):
        assert not banned & set(pins(lock)), lock


def test_installed_environment_is_exactly_the_lock():
    locked = pins("cpu.txt")
    site = [sysconfig.get_paths()["purelib"]]  # not sys.path: setuptools adds its vendored copies there
    installed = {canonicalize_name(d.metadata["Name"]): Version(d.version)
                 for d in importlib.metadata.distributions(path=site)}
    installed.pop("unipool-serve")  # the project itself, installed editable on top of the lock
    assert {n: v for n, v in installed.items() if locked.get(n) != v} == {}, (
        "packages installed that the lock does not pin (or at other versions): re-run `make setup`")
    assert set(locked) - set(installed) == set(), "packages of the lock missing from .venv"
