"""The built CPU image, run the way a user runs it: its own ENTRYPOINT and CMD (no arguments, so the
bundled demo model), its own user, environment and health check.

No container engine is needed: `buildah run --isolation chroot` runs a process in a working container
made from the image. That isolation shares this machine's network and process table, so the server
listens on this machine's port (the image's 8000, or a free one when 8000 is taken) and `docker stop`
is reproduced by sending SIGTERM to the container's main process, whose exit status `buildah run`
passes on. Opt-in: `make image-test`, or as root `pytest tests/image --image REF`.

The tests run in file order against one server: configuration, start, completions, metrics, health
check, then SIGTERM (drain, exit 0), the health check failing afterwards, and what the run wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from deploy_checks import KUSTOMIZE, exported_metric_names, run, tool
from server_launcher import free_port, start_streams
from image_contract import CPU_OVERLAY, ImageConfig, arg_value, from_inspect, overlay_disagreements

BUILDAH = ["buildah", "--storage-driver", "vfs"]
START_TIMEOUT = 900  # torch.compile builds the CPU kernels at start; on 2 busy cores that takes minutes
STOP_TIMEOUT = 180
STREAMS, STREAM_TOKENS = 8, 400  # in flight when SIGTERM comes (the demo's context is 512 tokens)


def buildah(*args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*BUILDAH, *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"buildah {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}",
                    pytrace=False)
    return proc


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


@dataclass
class Server:
    url: str
    port: int
    proc: subprocess.Popen  # `buildah run`
    main: psutil.Process  # the container's main process (what ENTRYPOINT + CMD started)
    log: Path
    start_s: float

    def tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def container_main_process(buildah_pid: int, entrypoint: str, deadline: float) -> psutil.Process:
    """The process ENTRYPOINT started: the oldest process below `buildah run` running `entrypoint`, not one of
    buildah's own chroot stages above it (the engine's processes are its children)."""
    while time.monotonic() < deadline:
        found = []
        for p in psutil.Process(buildah_pid).children(recursive=True):
            try:
                argv = p.cmdline()
                # buildah's stages: buildah-chroot-runtime, then buildah-chroot-exec ARGV (which execs nothing)
                if argv and not Path(argv[0]).name.startswith("buildah") and not p.name().startswith("memfd:") \
                        and any(Path(arg).name == entrypoint for arg in argv[:2]):
                    found.append(p)
            except psutil.Error:
                continue
        if found:
            return min(found, key=lambda p: p.create_time())
        time.sleep(0.2)
    raise RuntimeError(f"no {entrypoint} process appeared below buildah run")


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image(request) -> tuple[str, dict]:
    ref = request.config.getoption("--image")
    if os.geteuid() != 0:
        pytest.fail("tests/image run as root (buildah's vfs store in /var/lib/containers)", pytrace=False)
    if shutil.which("buildah") is None:
        pytest.fail("buildah not found: `make image` installs it", pytrace=False)
    proc = buildah("inspect", "--type", "image", ref, check=False)
    if proc.returncode != 0:
        pytest.fail(f"no image {ref} in buildah's vfs store: `make image` builds it", pytrace=False)
    return ref, json.loads(proc.stdout)


@pytest.fixture(scope="module")
def config(image) -> ImageConfig:
    return from_inspect(image[1])


@pytest.fixture(scope="module")
def container(image, measured):
    """A working container made from the image (vfs: a full copy of its files); removed afterwards."""
    name = f"unipool-image-test-{os.getpid()}"
    started = time.monotonic()
    buildah("from", "--pull-never", "--name", name, image[0])
    measured["working container made (s)"] = round(time.monotonic() - started, 1)
    yield name
    buildah("rm", name, check=False)


@pytest.fixture(scope="module")
def port(config, measured) -> int:
    want = int(arg_value(config.cmd, "--port"))
    chosen = want if port_free(want) else free_port()
    measured["port"] = chosen if chosen == want else f"{chosen} ({want} is taken on this machine)"
    return chosen


def with_port(argv: list[str], want: str, port: int) -> list[str]:
    """The image's own command line, on `port` instead of the image's (the same when it is free)."""
    return [a.replace(f":{want}/", f":{port}/") if "://" in a else (str(port) if i and argv[i - 1] == "--port" else a)
            for i, a in enumerate(argv)]


@pytest.fixture(scope="module")
def marker(tmp_path_factory) -> Path:
    """A file whose mtime is the moment before the server starts (for the root filesystem check)."""
    path = tmp_path_factory.mktemp("image") / "before-start"
    path.touch()
    time.sleep(1.1)  # mtimes have a granularity; what the run writes is strictly newer
    return path


@pytest.fixture(scope="module")
def server(container, config, port, marker, tmp_path_factory, measured):
    want = arg_value(config.cmd, "--port")
    argv = [*config.entrypoint, *with_port(config.cmd, want, port)]
    log = tmp_path_factory.mktemp("image-server") / "server.log"
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen([*BUILDAH, "run", "--isolation", "chroot", container, "--", *argv],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = started + START_TIMEOUT
    server = None
    try:
        main = container_main_process(proc.pid, config.entrypoint[0], deadline)
        server = Server(f"http://127.0.0.1:{port}", port, proc, main, log, 0.0)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the image's server exited with {proc.returncode}:\n{server.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {START_TIMEOUT} s:\n{server.tail()}")
            try:
                if httpx.get(f"{server.url}/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        server.start_s = round(time.monotonic() - started, 1)
        measured["start to /ready 200 (s)"] = server.start_s
        yield server
    finally:
        if proc.poll() is None:
            # The container's processes first, so that `buildah run` exits on its own and removes its run
            # folder; buildah itself only when that does not do it.
            with contextlib.suppress(psutil.Error):
                for p in psutil.Process(proc.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        if not p.name().startswith("memfd:"):
                            p.kill()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def healthcheck(container: str, config: ImageConfig, port: int) -> tuple[int, float, str]:
    """The image's HEALTHCHECK command, run inside the container as the image runs it: (rc, seconds, output)."""
    argv = with_port(config.healthcheck, arg_value(config.cmd, "--port"), port)
    started = time.monotonic()
    proc = buildah("run", "--isolation", "chroot", container, "--", *argv, timeout=60, check=False)
    return proc.returncode, round(time.monotonic() - started, 2), proc.stdout + proc.stderr


def complete(server: Server, prompt, **extra) -> httpx.Response:
    body = {"model": "unipool-demo", "prompt": prompt, "temperature": 0, **extra}
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=600)


# --- the image itself -------------------------------------------------------------------------------


def test_image_configuration_and_size(image, config, measured):
    ref, inspect = image
    layers = json.loads(inspect["Manifest"])["layers"]
    measured["image"] = ref
    measured["image size (uncompressed layers, bytes)"] = sum(layer["size"] for layer in layers)
    measured["image size (buildah images)"] = buildah("images", "--format", "{{.Size}}", ref).stdout.split("\n")[0]
    uid = config.user.split(":")[0]
    assert uid not in ("", "0", "root"), f"the image runs as {config.user!r}"
    assert config.entrypoint == ["unipool-serve"]
    assert arg_value(config.cmd, "--model") is None, "no --model: the bundled demo model"
    assert "/health" in " ".join(config.healthcheck), config.healthcheck
    assert arg_value(config.cmd, "--port") and int(arg_value(config.cmd, "--port")) in config.exposed_ports
    assert config.env.get("PATH", "").startswith("/opt/venv/bin:")


def test_cpu_demo_overlay_agrees_with_the_built_image(config):
    docs = [d for d in yaml.safe_load_all(run([tool("kubectl"), "kustomize", str(KUSTOMIZE / CPU_OVERLAY)])) if d]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (c,) = [c for c in pod["containers"] if c["name"] == "unipool-serve"]
    assert overlay_disagreements(config, pod, c) == []


# --- running it -------------------------------------------------------------------------------------


def test_starts_with_no_arguments_and_serves_the_demo(server, config):
    assert [m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]] == ["unipool-demo"]
    assert httpx.get(f"{server.url}/ready").json()["steering_profiles"] == ["code", "prose"]
    assert httpx.get(f"{server.url}/health").status_code == 200
    # The installed package's copy of the model (a wheel install, not the sources).
    assert "/opt/venv/lib/python3.11/site-packages/unipool_serve/models/unipool-demo" in server.log.read_text()
    uid, _, gid = config.user.partition(":")
    assert str(server.main.uids().real) == uid and (not gid or str(server.main.gids().real) == gid)
    assert "unipool-serve" in " ".join(server.main.cmdline())


def test_completion(server):
    resp = complete(server, "def area(width, height):", max_tokens=16, min_tokens=16)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["usage"]["completion_tokens"] == 16 and out["choices"][0]["text"].strip()


def test_steered_completion(server, measured):
    """The shipped `prose` profile turns code continuations into prose (docs/demo-model.md): the same
    margins as the source-tree test (tests/demo/test_demo_served.py), through the image."""
    from unipool_serve.demo.eval import MAX_NEW_TOKENS, PROMPTS_CODE, kind_shares

    def shares(**steering):
        resp = complete(server, PROMPTS_CODE, max_tokens=MAX_NEW_TOKENS, min_tokens=MAX_NEW_TOKENS, **steering)
        assert resp.status_code == 200, resp.text
        return kind_shares([c["text"] for c in sorted(resp.json()["choices"], key=lambda c: c["index"])])

    plain, steered = shares(), shares(steering="prose")
    measured["code share of 40 code prompts, plain / prose profile"] = f"{plain['code']:.2f} / {steered['code']:.2f}"
    assert plain["code"] >= 0.9
    assert steered["code"] <= 0.6
    assert plain["code"] - steered["code"] >= 0.35
    unknown = complete(server, "def ", max_tokens=2, steering="no-such-profile")
    assert unknown.status_code in (400, 404) and "no-such-profile" in unknown.text


def test_metrics(server):
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    declared = set(re.findall(r"^# TYPE (\S+)", text, re.M))
    samples = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    names = sorted(exported_metric_names())
    missing = [n for n in names if not any(e == n or n.startswith(e + "_") or e.startswith(n)
                                           for e in declared | samples)]
    assert not missing, missing
    prose = re.search(r'^unipool_steering_requests_total\{profile="prose"\} (\S+)$', text, re.M)
    assert prose and float(prose.group(1)) >= 1
    success = sum(float(v) for v in re.findall(r"^vllm:request_success_total\{[^}]*\} (\S+)$", text, re.M))
    assert success >= 3
    assert re.search(r"^unipool_expert_tokens_total\{[^}]*\} [1-9]", text, re.M)


def test_healthcheck_passes_while_serving(server, container, config, measured):
    rc, seconds, output = healthcheck(container, config, server.port)
    measured["health check while serving"] = f"exit {rc} in {seconds} s"
    assert rc == 0, output


def test_sigterm_drains_running_requests_and_exits_zero(server, measured):
    """`docker stop`: SIGTERM to the container's main process. /ready turns 503 at once, new requests get
    503, the running streams finish in full, and the process exits 0 (what `buildah run` passes on)."""
    body = {"model": "unipool-demo", "prompt": "The old river", "max_tokens": STREAM_TOKENS, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    started, results, threads = start_streams(server.url, STREAMS, body)
    for _ in range(STREAMS):
        assert started.acquire(timeout=300)  # every stream has its first chunk: running in the engine
    log_before = len(server.log.read_text(errors="replace"))
    signalled_at = time.monotonic()
    server.main.send_signal(signal.SIGTERM)
    ready, deadline = 200, time.monotonic() + 60
    while ready == 200 and time.monotonic() < deadline:
        ready = httpx.get(f"{server.url}/ready", timeout=10).status_code
    late = complete(server, "def ", max_tokens=2)
    for t in threads:
        t.join(300)
    code = server.proc.wait(timeout=STOP_TIMEOUT)
    measured["SIGTERM to exit (s)"] = round(time.monotonic() - signalled_at, 1)
    measured["exit status after SIGTERM"] = code
    shutdown_log = server.log.read_text(errors="replace")[log_before:]
    errors = [line for line in shutdown_log.splitlines() if re.search(r"\bERROR\b|Traceback", line)]
    assert ready == 503
    assert late.status_code == 503 and late.headers.get("retry-after")
    assert sorted(results) == [(200, STREAM_TOKENS)] * STREAMS, results
    assert code == 0, server.tail()
    assert errors == [], errors[:10]


def test_healthcheck_fails_once_stopped(server, container, config):
    assert server.proc.poll() is not None
    rc, _, output = healthcheck(container, config, server.port)
    assert rc != 0, output


def test_the_run_wrote_only_home_and_tmp(server, container, config, marker, measured):
    """What the Kubernetes overlay's readOnlyRootFilesystem needs: outside $HOME and /tmp (emptyDirs there)
    the server wrote nothing into the container's files."""
    assert server.proc.poll() is not None
    mnt = buildah("mount", container).stdout.strip()
    try:
        home = config.env["HOME"]
        found = subprocess.run(["find", mnt, "-xdev", "-newer", str(marker)], capture_output=True, text=True,
                               timeout=600).stdout.split()
        written = sorted("/" + os.path.relpath(p, mnt) for p in found)
        # Mount points and files buildah run itself provides inside the container.
        runtime = {"/", "/etc", "/etc/hosts", "/etc/resolv.conf", "/etc/hostname", "/dev", "/proc", "/sys", "/run",
                   "/run/.containerenv", "/.", "/run/secrets"}
        outside = [p for p in written if p not in runtime
                   and not any(p == d or p.startswith(d + "/") for d in (home, "/tmp", "/dev", "/proc", "/sys"))]
        measured["files written under $HOME and /tmp"] = sum(
            1 for p in written if any(p.startswith(d + "/") for d in (home, "/tmp")))
        assert outside == [], outside[:20]
    finally:
        buildah("umount", container, check=False)
