"""Print the hash of what the locks are resolved from (`make lock` stores it in locks/inputs.sha256).

The inputs are pyproject.toml's dependency tables and Python requirement, and the overrides
and tools files. tests/unit/test_lock.py recomputes it: a dependency changed without a
re-lock fails there with a message naming `make lock`.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def lock_inputs_hash(root: Path = ROOT) -> str:
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    inputs = {
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
        "overrides": (root / "locks" / "overrides.txt").read_text(),
        "tools": (root / "locks" / "tools.in").read_text(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


if __name__ == "__main__":
    sys.stdout.write(lock_inputs_hash() + "\n")
