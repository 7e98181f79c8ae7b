"""Every `UNIPOOL_*` environment variable, declared once: name, parser, default, meaning.

Read a value with `setting(NAME)`: parsed and validated, and a bad value raises ValueError
naming the variable and what it accepts. The server's own settings travel from
`unipool-serve`'s flags to the endpoint plugin (which also runs under plain `vllm serve`)
as environment variables, written by `ServerSettings.export` and read by
`ServerSettings.from_env`, nowhere else. Pure Python. kernels/ reads none of these: its
callers configure it (the MoE backend passes UNIPOOL_MOE_CONFIG_DIR on).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Setting:
    name: str
    parse: Callable[[str], Any]
    default: str
    doc: str


def _flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value not in ("0", "1", "false", "true", "off", "on"):
        raise ValueError("expected 1/0 (true/false, on/off)")
    return value in ("1", "true", "on")


def _choice(*values: str) -> Callable[[str], str | None]:
    def parse(raw: str) -> str | None:
        value = raw.strip().lower()
        if value and value not in values:
            raise ValueError(f"expected one of {list(values)}")
        return value or None
    return parse


def _count(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("expected an integer >= 0")
    return value


def _seconds(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("expected a number of seconds > 0")
    return value


def _folder(raw: str) -> Path | None:
    return Path(raw) if raw.strip() else None


def _words(raw: str) -> list[str]:
    return [w.strip() for w in raw.split(",") if w.strip()]


SETTINGS: dict[str, Setting] = {s.name: s for s in [
    # the model (read in every engine worker when the model is built)
    Setting("UNIPOOL_MOE_BACKEND", _choice("triton", "vllm-triton", "cpu", "torch"), "",
            "routing and pool-MoE backend; empty: triton on CUDA, cpu on CPU (docs/vllm-plugin.md)"),
    Setting("UNIPOOL_STEERING", _flag, "1",
            "0 builds routers that never read the steering tables (engines that never steer)"),
    Setting("UNIPOOL_MAX_STEERING_PROFILES", _count, "16", "rows of the engine's steering tables"),
    Setting("UNIPOOL_MAX_PROBES", _count, "16", "rows of the engine's probe table (routing probes loaded at once)"),
    Setting("UNIPOOL_ROUTING_STATS", _flag, "1", "0 turns off the per-layer, per-expert routing counts"),
    Setting("UNIPOOL_ROUTING_CAPTURE", _flag, "1",
            "0 builds models without the per-request routing capture buffers (capture requests are refused)"),
    Setting("UNIPOOL_MOE_CONFIG_DIR", _folder, "", "extra folder of tuned fused-MoE launch configs"),
    # the server (written by unipool-serve, read by the endpoint plugin)
    Setting("UNIPOOL_API_KEYS", _words, "", "comma-separated KEY or KEY=PROFILE (binds a mandatory profile)"),
    Setting("UNIPOOL_ADMIN_KEY", str.strip, "", "key allowed to upload and delete profiles, and admin routes"),
    Setting("UNIPOOL_STEERING_DIR", _folder, "", "folder of <name>.safetensors profiles loaded at start"),
    Setting("UNIPOOL_PROBE_DIR", _folder, "", "folder of <name>.safetensors routing probes loaded at start"),
    Setting("UNIPOOL_METRICS_INTERVAL", _seconds, "5", "seconds between the per-interval routing gauges"),
    Setting("UNIPOOL_METRICS_MAX_EXPERT_SERIES", _count, "2048",
            "largest pools x experts for which unipool_expert_tokens_total is exported (per-layer gauges always are)"),
    Setting("UNIPOOL_PUBLIC_PROFILE_DETAILS", _flag, "0",
            "1 shows every key a profile's digest and rows; by default only the admin key sees them"),
    Setting("UNIPOOL_CONSOLE", _flag, "1", "0 leaves the steering console (/console, docs/console.md) unmounted"),
    Setting("UNIPOOL_MAX_CAPTURE_BYTES", _count, str(64 << 20),
            "largest router-logits capture one request may ask for (bytes)"),
    Setting("UNIPOOL_HEADER_TIMEOUT", _seconds, "30",
            "seconds a connection has to send a request's headers (slow clients: server/http_protocol.py)"),
    Setting("UNIPOOL_BODY_TIMEOUT", _seconds, "60", "seconds a request has to send its body, once its headers came"),
    Setting("UNIPOOL_SEND_TIMEOUT", _seconds, "60",
            "seconds a response may wait for its client to read before the connection is closed"),
]}


# The settings that change what a model's compiled graphs hold (seams built in or off, their sizes, the MoE
# kernels): vLLM keys the graphs it saves by its own config, so they go into it (steering/idle_steps.py).
GRAPH_SETTINGS = ("UNIPOOL_MOE_BACKEND", "UNIPOOL_STEERING", "UNIPOOL_MAX_STEERING_PROFILES", "UNIPOOL_MAX_PROBES",
                  "UNIPOOL_ROUTING_STATS", "UNIPOOL_ROUTING_CAPTURE", "UNIPOOL_MOE_CONFIG_DIR")
GRAPH_SETTINGS_KEY = "unipool_graph_settings"  # their key in vLLM's additional_config


def graph_settings() -> dict[str, str]:
    """GRAPH_SETTINGS' parsed values, as text."""
    return {name: repr(setting(name)) for name in GRAPH_SETTINGS}


def _to_env(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, list):
        return ",".join(value)
    return "" if value is None else str(value)


def setting(name: str) -> Any:
    """The parsed value of a declared variable (its default when unset)."""
    return parse_setting(name, os.environ.get(name, SETTINGS[name].default))


def parse_setting(name: str, raw: str) -> Any:
    """`raw` parsed as variable `name` would be; ValueError naming the variable and what it accepts."""
    declared = SETTINGS[name]
    try:
        return declared.parse(raw)
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r}: {exc} ({declared.doc})") from None


@dataclass(frozen=True)
class ServerSettings:
    """What the API process needs beyond vLLM's own arguments."""

    api_keys: list[str] = field(default_factory=list)
    admin_key: str = ""
    steering_dir: Path | None = None
    probe_dir: Path | None = None
    metrics_interval: float = 5.0
    public_profile_details: bool = False
    max_capture_bytes: int = 64 << 20
    header_timeout: float = 30.0
    body_timeout: float = 60.0
    send_timeout: float = 60.0
    console: bool = True  # the steering console at /console

    _ENV = {"api_keys": "UNIPOOL_API_KEYS", "admin_key": "UNIPOOL_ADMIN_KEY", "steering_dir": "UNIPOOL_STEERING_DIR",
            "probe_dir": "UNIPOOL_PROBE_DIR",
            "metrics_interval": "UNIPOOL_METRICS_INTERVAL", "public_profile_details": "UNIPOOL_PUBLIC_PROFILE_DETAILS",
            "max_capture_bytes": "UNIPOOL_MAX_CAPTURE_BYTES", "header_timeout": "UNIPOOL_HEADER_TIMEOUT",
            "body_timeout": "UNIPOOL_BODY_TIMEOUT", "send_timeout": "UNIPOOL_SEND_TIMEOUT", "console": "UNIPOOL_CONSOLE"}

    def export(self) -> None:
        """Write these settings into this process's environment (inherited by what it starts)."""
        for attr, name in self._ENV.items():
            os.environ[name] = _to_env(getattr(self, attr))

    @classmethod
    def from_env(cls) -> ServerSettings:
        return cls(**{attr: setting(name) for attr, name in cls._ENV.items()})
