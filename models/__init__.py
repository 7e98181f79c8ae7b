"""Model folders shipped with the package (installed as unipool_serve.models)."""

from pathlib import Path

DEMO_MODEL = Path(__file__).resolve().parent / "unipool-demo"
