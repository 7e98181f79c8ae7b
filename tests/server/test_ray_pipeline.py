"""The demo model served across two Ray nodes on this machine: pipeline parallel 2, tensor parallel 2.

Opt-in (`pytest --ray`), skipped unless `ray` is importable; not in CI. Ray is not one of
the project's dependencies: run it from an environment holding the project's lock plus
Ray (docs/deploy.md, "Ray on one machine").

The module starts its own two Ray nodes with scripts/ray-two-nodes.sh (a head on
127.0.0.2, a worker on 127.0.0.3, one logical CPU each, free ports, a temp dir of its own)
and stops them at the end: every process of their process group, then any process left
whose command line names their temp dir.

Three servers, one after the other, with the same steering profiles (the demo's `code`
and `prose`, plus three written here for the demo's 4 layers x 16 experts, top-1):
  single  `unipool-serve` with one engine worker (the reference);
  pp2     `unipool-serve --distributed-executor-backend ray --pipeline-parallel-size 2`;
  tp2     `unipool-serve --distributed-executor-backend ray --tensor-parallel-size 2`.
Checked on pp2 and tp2: the two workers are Ray actors on the two different nodes;
greedy outputs, unsteered and steered, equal `single`'s, both alone and sent together
(a mixed batch); and steering takes effect in every layer, on both stages under PP:
`split` includes expert 6 in layers 0-1 (stage 0) and expert 5 in layers 2-3 (stage 1),
so every computed token is routed exactly twice to each; `only-e5` routes every token of
all 4 layers to expert 5; `no-e5` never routes to it. Nothing depends on what the model emits beyond
equality between runs, and nothing on timing (every wait polls up to a deadline).
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from server_launcher import run_server
from server_process import Server

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "ray-two-nodes.sh"
NODE_IPS = {"127.0.0.2", "127.0.0.3"}
LAYERS, EXPERTS = 4, 16  # the demo model; top-1
PROMPTS = ["def add(a, b):", "The old farmer", "import os\n"]
PROFILES = [None, "code", "prose", "only-e5", "split"]
MAX_TOKENS = 16
COMMON_ARGS = ["--enforce-eager", "--max-model-len", "256", "--no-enable-prefix-caching", "--grace-period", "20"]
NODES_TIMEOUT = 300


@pytest.fixture(scope="module", autouse=True)
def _opt_in(request):
    if not request.config.getoption("--ray"):
        pytest.skip("Ray tests run only with --ray")
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed in this environment (docs/deploy.md: 'Ray on one machine')")


def _write_profiles(steering_dir: Path) -> None:
    from unipool_serve.model_executor.config import UniPoolConfig
    from unipool_serve.model_executor.steering.profile import SteeringProfile
    from unipool_serve.models import DEMO_MODEL

    config = UniPoolConfig.from_pretrained(str(DEMO_MODEL))
    assert (config.num_hidden_layers, config.num_experts, config.num_experts_per_tok) == (LAYERS, EXPERTS, 1)
    steering_dir.mkdir()
    for name in ("code", "prose"):
        shutil.copy(DEMO_MODEL / "steering" / f"{name}.safetensors", steering_dir)
    every = range(LAYERS)
    for name, kwargs in (("only-e5", dict(include={l: [5] for l in every})),
                         ("no-e5", dict(exclude={l: [5] for l in every})),
                         ("split", dict(include={0: [6], 1: [6], 2: [5], 3: [5]}))):
        SteeringProfile.for_config(config, name=name, **kwargs).save(steering_dir / f"{name}.safetensors")


@pytest.fixture(scope="module")
def steering_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ray-profiles") / "steering"
    _write_profiles(path)
    return path


def _complete(server: Server, prompt: str, profile: str | None) -> tuple[str, int]:
    """(greedy completion, tokens computed: prompt + generated - 1)."""
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    if profile:
        body["steering"] = profile
    with server.http(key=None) as http:
        out = http.post("/v1/completions", json={"model": "unipool-demo", **body})
    out.raise_for_status()
    data = out.json()
    usage = data["usage"]
    assert usage["completion_tokens"] == MAX_TOKENS
    return data["choices"][0]["text"], usage["prompt_tokens"] + usage["completion_tokens"] - 1


CASES = [(p, s) for p in PROMPTS for s in PROFILES]


def _serve(steering_dir: Path, log: Path, extra: list[str], env: dict[str, str]):
    args = ["--steering-dir", str(steering_dir), *COMMON_ARGS, *extra]
    return run_server(args, log, env={"VLLM_CPU_KVCACHE_SPACE": "1", **env})


@pytest.fixture(scope="module")
def single_outputs(steering_dir, tmp_path_factory) -> dict:
    """Every case, alone, on a server with one engine worker (no Ray)."""
    log = tmp_path_factory.mktemp("ray-single") / "server.log"
    started = time.monotonic()
    with _serve(steering_dir, log, [], {}) as process:
        ready = time.monotonic() - started
        server = Server(process, steering_dir)
        outputs = {case: _complete(server, *case)[0] for case in CASES}
    print(f"\n[ray] single-worker server ready in {ready:.0f}s")
    return outputs


# ---- two Ray nodes on loopback addresses ------------------------------------------------


def _free_port_block(size: int) -> int:
    """A base port with `size` consecutive free ports (checked now; Ray binds them at once)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + size >= 65000:
            continue
        try:
            socks = []
            for port in range(base, base + size):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("0.0.0.0", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no block of free ports")


def _processes_naming(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def _kill_nodes(pgid: int, temp_dir: str) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 60
    while True:
        left = [pid for pid in _processes_naming(temp_dir) if pid != os.getpid()]
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"Ray processes still running after SIGKILL: {left}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def ray_nodes(single_outputs):
    """Starts the two nodes (after the single-worker reference ran); yields the head's address."""
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    head_port, base = _free_port_block(1), _free_port_block(8)
    env = {**os.environ, "RAY": str(Path(sys.executable).parent / "ray"), "RAY_TEMP_DIR": temp_dir,
           "RAY_HEAD_PORT": str(head_port), "RAY_PORT_BASE": str(base), "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    log = Path(temp_dir) / "ray-start.log"
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(SCRIPT), "start"], stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # the nodes' daemons keep this process group
    try:
        try:
            rc = proc.wait(timeout=NODES_TIMEOUT)
        except subprocess.TimeoutExpired:
            rc = None
        if rc != 0:
            raise RuntimeError(f"ray-two-nodes.sh start: {rc}\n{log.read_text(errors='replace')[-4000:]}")
        print(f"\n[ray] two nodes up in {time.monotonic() - started:.0f}s")
        yield f"127.0.0.2:{head_port}"
    finally:
        _kill_nodes(proc.pid, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


LAYOUTS = {"pp2": ["--pipeline-parallel-size", "2"], "tp2": ["--tensor-parallel-size", "2"]}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def ray_server(request, ray_nodes, steering_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp(f"ray-server-{request.param}") / "server.log"
    started = time.monotonic()
    extra = ["--distributed-executor-backend", "ray", *LAYOUTS[request.param]]
    with _serve(steering_dir, log, extra, {"RAY_ADDRESS": ray_nodes}) as process:
        print(f"\n[ray] {request.param} server on two Ray nodes ready in {time.monotonic() - started:.0f}s")
        yield ray_nodes, Server(process, steering_dir)


PLACEMENT = """
import json, sys, ray
from ray._private.state import actors
from ray.util import placement_group_table
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
print(json.dumps({
    "actors": [(a["ActorClassName"], ips.get(a["Address"]["NodeID"])) for a in actors().values()
               if a["State"] == "ALIVE"],
    "bundles": [sorted(ips[n] for n in pg["bundles_to_node_id"].values())
                for pg in placement_group_table().values() if pg["state"] == "CREATED"],
}))
"""


def test_two_workers_on_two_ray_nodes(ray_server):
    address, _ = ray_server
    out = subprocess.run([sys.executable, "-c", PLACEMENT, address], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert out.returncode == 0, out.stderr[-3000:]
    state = json.loads(out.stdout.strip().splitlines()[-1])
    workers = sorted(ip for cls, ip in state["actors"] if cls == "CpuRayWorkerProc")
    assert workers == sorted(NODE_IPS), state
    assert state["bundles"] == [sorted(NODE_IPS)], state


def test_greedy_outputs_equal_the_single_worker_server(ray_server, single_outputs):
    _, server = ray_server
    got = {case: _complete(server, *case)[0] for case in CASES}
    assert got == single_outputs


def test_mixed_batch_equals_solo_runs(ray_server, single_outputs):
    _, server = ray_server
    with concurrent.futures.ThreadPoolExecutor(len(CASES)) as pool:
        together = dict(zip(CASES, pool.map(lambda case: _complete(server, *case)[0], CASES)))
    assert together == single_outputs
    # steering changed the text of at least one prompt (equality above is not vacuous)
    assert any(single_outputs[(p, None)] != single_outputs[(p, s)] for p in PROMPTS for s in PROFILES[1:])


def test_steering_reaches_every_layer_and_stage(ray_server):
    _, server = ray_server
    prompt = PROMPTS[0]
    (_, computed), routing = server.routing_of(lambda: _complete(server, prompt, "split"))
    assert routing.get(6) == routing.get(5) == 2 * computed  # layers 0-1 on stage 0, layers 2-3 on stage 1
    assert sum(routing.values()) == LAYERS * computed
    (_, computed), routing = server.routing_of(lambda: _complete(server, prompt, "only-e5"))
    assert routing.get(5) == sum(routing.values()) == LAYERS * computed
    (_, computed), routing = server.routing_of(lambda: _complete(server, prompt, "no-e5"))
    assert routing.get(5, 0) == 0 and sum(routing.values()) == LAYERS * computed
