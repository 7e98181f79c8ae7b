"""The shared server fixture lives in server_process.py (importable by the tests too)."""

from server_process import server  # noqa: F401
