"""tests/image runs a built CPU image like a user would; opt-in (`make image-test`, or `--image REF`).

Without `--image` every test here is skipped, so `make test` builds and runs no image.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# image_contract (the image/overlay comparison) lives beside the deploy checks.
sys.path.insert(0, str(HERE.parent / "deploy"))

MEASURED: dict[str, object] = {}


def pytest_collection_modifyitems(config, items):
    if config.getoption("--image"):
        return
    skip = pytest.mark.skip(reason="runs a built image: `make image-test` (or, as root: pytest tests/image --image REF)")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def measured():
    """What the image tests measured (size, start time, ...): printed at the end, and written to
    --image-report PATH as JSON when given."""
    return MEASURED


def pytest_terminal_summary(terminalreporter, config):
    if not MEASURED:
        return
    terminalreporter.section("image: measured")
    for key, value in MEASURED.items():
        terminalreporter.write_line(f"{key}: {value}")
    path = config.getoption("--image-report")
    if path:
        Path(path).write_text(json.dumps(MEASURED, indent=2) + "\n")
