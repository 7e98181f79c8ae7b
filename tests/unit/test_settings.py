"""The settings registry: every UNIPOOL_* variable declared once, bad values named."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from unipool_serve.model_executor.settings import SETTINGS, ServerSettings, setting

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name,raw,message", [
    ("UNIPOOL_STEERING", "maybe", "expected 1/0"),
    ("UNIPOOL_MAX_STEERING_PROFILES", "-1", "integer >= 0"),
    ("UNIPOOL_MOE_BACKEND", "cutlass", "expected one of"),
    ("UNIPOOL_METRICS_INTERVAL", "0", "seconds > 0"),
])
def test_bad_values_are_named(monkeypatch, name, raw, message):
    monkeypatch.setenv(name, raw)
    with pytest.raises(ValueError, match=rf"{name}='{re.escape(raw)}': .*{message}"):
        setting(name)


def test_defaults_and_the_server_settings_round_trip(monkeypatch):
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert setting("UNIPOOL_STEERING") is True and setting("UNIPOOL_MAX_STEERING_PROFILES") == 16
    assert setting("UNIPOOL_MOE_BACKEND") is None
    settings = ServerSettings(api_keys=["a", "b=p"], admin_key="root", steering_dir=Path("/x"),
                              metrics_interval=2.5, public_profile_details=True)
    settings.export()
    assert ServerSettings.from_env() == settings


def test_no_module_reads_a_unipool_variable_outside_the_registry():
    code = subprocess.run(["git", "grep", "-n", "-E", r"environ(\.get)?\(?\[?.UNIPOOL_|getenv\(.UNIPOOL_",
                           "--", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout
    offenders = [line for line in code.splitlines() if not line.startswith(("model_executor/settings.py", "tests/"))]
    assert offenders == []
