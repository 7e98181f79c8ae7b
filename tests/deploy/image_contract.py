"""What the CPU image promises and what the Kubernetes `cpu-demo` overlay expects of it, compared.

The image side comes either from deploy/docker/Dockerfile.cpu (tests/deploy, every run) or from a
built image's own configuration (tests/image, `make image-test`); both are read into the same
shape, `ImageConfig`, and `overlay_disagreements` lists every place where the overlay's pod
would not match the image.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CPU_DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile.cpu"
BUILD_SCRIPT = ROOT / "scripts" / "build-image.sh"
CPU_OVERLAY = "overlays/cpu-demo"
# Environment the overlay and the image must agree on when both set it.
SHARED_ENV = ("HOME", "HF_HUB_OFFLINE", "VLLM_NO_USAGE_STATS", "VLLM_CPU_KVCACHE_SPACE")


@dataclass
class ImageConfig:
    user: str  # "UID[:GID]"
    env: dict[str, str]
    entrypoint: list[str]
    cmd: list[str]
    exposed_ports: set[int]
    healthcheck: list[str]  # the command, without Docker's leading "CMD"
    workdir: str


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def from_dockerfile(path: Path = CPU_DOCKERFILE) -> ImageConfig:
    """The final stage's runtime configuration, as a build would record it (ENV values unexpanded)."""
    env: dict[str, str] = {}
    cfg = {"USER": "root", "ENTRYPOINT": "[]", "CMD": "[]", "HEALTHCHECK": "", "WORKDIR": "/"}
    ports: set[int] = set()
    for word, rest in dockerfile_instructions(path):
        if word == "FROM":
            env, ports = {}, set()
        elif word == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
        elif word == "EXPOSE":
            ports |= {int(p.split("/")[0]) for p in rest.split()}
        elif word in cfg:
            cfg[word] = rest
    health = cfg["HEALTHCHECK"]
    health_cmd = json.loads(health[health.index("CMD") + 3:]) if "CMD" in health else []
    return ImageConfig(user=cfg["USER"], env=env, entrypoint=json.loads(cfg["ENTRYPOINT"]),
                       cmd=json.loads(cfg["CMD"]), exposed_ports=ports, healthcheck=health_cmd,
                       workdir=cfg["WORKDIR"])


def from_inspect(inspect: dict) -> ImageConfig:
    """From `buildah inspect --type image` (an image built with --format docker keeps the health check)."""
    config = inspect["Docker"]["config"]
    health = (config.get("Healthcheck") or {}).get("Test") or []
    return ImageConfig(
        user=config.get("User") or "root",
        env=dict(item.split("=", 1) for item in config.get("Env") or []),
        entrypoint=config.get("Entrypoint") or [],
        cmd=config.get("Cmd") or [],
        exposed_ports={int(p.split("/")[0]) for p in config.get("ExposedPorts") or {}},
        healthcheck=health[1:] if health[:1] == ["CMD"] else health,
        workdir=config.get("WorkingDir") or "/",
    )


def tags_the_build_gives() -> set[str]:
    """`name:tag` of the CPU image as the Dockerfile's own recipe and `make image` tag it."""
    recipe = re.findall(r"docker build -f deploy/docker/Dockerfile\.cpu -t (\S+) \.", CPU_DOCKERFILE.read_text())
    script = re.findall(r"^IMAGE=\$\{IMAGE:-(\S+)\}$", BUILD_SCRIPT.read_text(), re.M)
    assert recipe and script, "the CPU image's tag is no longer where this check looks"
    # buildah names a local image localhost/NAME:TAG; a container runtime resolves NAME:TAG to it.
    return set(recipe) | {t.removeprefix("localhost/") for t in script}


def arg_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag:
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def overlay_disagreements(image: ImageConfig, pod: dict, container: dict) -> list[str]:
    """Every way the overlay's pod (rendered Deployment pod spec, and its server container) misses the image."""
    bad = []

    def expect(ok: bool, what: str) -> None:
        if not ok:
            bad.append(what)

    # Name: the overlay pulls exactly what the build tags, and never from a registry.
    expect(container["image"] in tags_the_build_gives(),
           f"image {container['image']!r} is not a tag the build gives ({sorted(tags_the_build_gives())})")
    expect(container.get("imagePullPolicy") in ("IfNotPresent", "Never"),
           "a locally built image needs imagePullPolicy IfNotPresent or Never")
    # Command: the overlay passes args only, so the image's ENTRYPOINT runs them.
    expect("command" not in container, "the overlay replaces the image's ENTRYPOINT")
    expect(image.entrypoint == ["unipool-serve"], f"ENTRYPOINT is {image.entrypoint}")
    args = container.get("args", [])
    expect(arg_value(args, "--model") == arg_value(image.cmd, "--model"),
           "the overlay and the image's CMD disagree on --model (the demo needs none)")
    # Port: the container port, the server's --port, the image's EXPOSE, CMD and health check.
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    port = ports.get("http")
    expect(port is not None and str(port) == arg_value(args, "--port"), f"containerPort {port} vs --port")
    expect(port in image.exposed_ports, f"containerPort {port} not in EXPOSE {sorted(image.exposed_ports)}")
    expect(str(port) == arg_value(image.cmd, "--port"), f"containerPort {port} vs the image's --port")
    health_text = " ".join(image.healthcheck)
    # Probes: the same /health the image's HEALTHCHECK calls, /ready for readiness.
    for probe in ("startupProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        expect(get["path"] in health_text and f":{port}{get['path']}" in health_text,
               f"{probe} {get['path']} is not what the image's HEALTHCHECK calls ({health_text})")
        expect(get["port"] in (port, "http"), f"{probe} port {get['port']}")
    ready = container["readinessProbe"]["httpGet"]
    expect(ready["path"] == "/ready" and ready["port"] in (port, "http"), f"readinessProbe {ready}")
    # User: the pod runs as the image's user; its files are that user's.
    uid, _, gid = image.user.partition(":")
    sec = pod.get("securityContext", {})
    expect(str(sec.get("runAsUser")) == uid, f"runAsUser {sec.get('runAsUser')} vs the image's USER {image.user}")
    expect(not gid or str(sec.get("runAsGroup")) == gid, f"runAsGroup {sec.get('runAsGroup')} vs USER {image.user}")
    expect(sec.get("runAsNonRoot") is True and uid not in ("0", "root"), "runAsNonRoot with a non-root USER")
    # Environment: what both set, they set alike.
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    for name in SHARED_ENV:
        if name in env and name in image.env:
            expect(env[name] == image.env[name], f"env {name}: overlay {env[name]!r}, image {image.env[name]!r}")
    # A read-only root filesystem leaves $HOME (caches) and /tmp (torch.compile) to writable mounts.
    if container.get("securityContext", {}).get("readOnlyRootFilesystem"):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = {m["mountPath"]: volumes.get(m["name"], {}) for m in container.get("volumeMounts", [])}
        home = env.get("HOME") or image.env.get("HOME")
        for path in (home, "/tmp"):
            expect("emptyDir" in mounts.get(path, {}), f"{path} is not a writable emptyDir under a read-only root")
    return bad
