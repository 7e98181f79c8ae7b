"""`unipool-serve` command line (the HTTP server is not built yet)."""

from __future__ import annotations

import sys
from pathlib import Path

DEMO_MODEL = Path(__file__).resolve().parent.parent / "models" / "unipool-demo"


def main(argv: list[str] | None = None) -> int:
    missing = []
    if not (DEMO_MODEL / "config.json").exists():
        missing.append(f"the bundled demo model ({DEMO_MODEL} has no config.json)")
    missing.append("the HTTP server (unipool_serve.server.app)")
    print("unipool-serve: cannot serve yet; missing: " + "; ".join(missing), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
