r"""`unipool-serve`: vLLM's OpenAI server with shared-pool models, steering and pool metrics.

    unipool-serve                                   # the bundled demo model, on CPU
    unipool-serve --model /models/my-unipool --steering-dir /steering \
        --api-key alice --api-key kids=safe-profile --admin-key root-secret \
        --tensor-parallel-size 2                    # any vLLM engine argument passes through

Our own flags are listed by --help; every other argument is vLLM's
(`unipool-serve --help-vllm` lists them).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from unipool_serve.model_executor.settings import ServerSettings
from unipool_serve.models import DEMO_MODEL
WORKER_CLS = "unipool_serve.model_executor.steering.worker.SteeringWorker"
PLUGINS = "unipool,unipool_api"
KV_CACHE_MIN, KV_CACHE_MAX = 1 << 29, 8 << 30  # bounds of the automatic CPU KV-cache size


def our_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unipool-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    parser.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    parser.add_argument("--help-vllm", action="store_true", help="list vLLM's engine and server arguments and exit")
    parser.add_argument("--model", help=f"model folder (default: the bundled demo model, {DEMO_MODEL})")
    parser.add_argument("--steering-dir", type=Path,
                        help="folder of <name>.safetensors steering profiles loaded at start; uploads are "
                             "written here (default: <model>/steering when it exists)")
    parser.add_argument("--probe-dir", type=Path,
                        help="folder of <name>.safetensors routing probes loaded at start; uploads are written here "
                             "(default: <model>/probes when it exists)")
    parser.add_argument("--api-key", action="append", default=[], metavar="KEY[=BINDING]",
                        help="accept this bearer key (repeatable); KEY=PROFILE binds a mandatory steering profile "
                             "that requests with this key cannot override, KEY=PROFILE@PROBE binds it to apply once "
                             "probe PROBE fires on the prompt, and +PROBE (repeatable, e.g. KEY=PROFILE+PROBE or "
                             "KEY=+PROBE) makes a probe score every request of the key. No key: open access.")
    parser.add_argument("--admin-key", help="bearer key allowed to upload and delete steering profiles, "
                                            "to see their content, and to use vLLM's admin routes")
    parser.add_argument("--public-profile-details", action="store_true",
                        help="show every key the content of the steering profiles (digest, per-layer rows); "
                             "by default only the admin key sees it")
    parser.add_argument("--no-console", action="store_true",
                        help="do not serve the steering console at /console (a browser page that runs prompts "
                             "unsteered and under profiles side by side through this API; docs/console.md)")
    parser.add_argument("--max-capture-bytes", type=int, default=64 << 20,
                        help="largest router-logits capture (return_router_logits) one request may ask for, in "
                             "bytes (default 64 MiB)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--grace-period", type=int, default=30,
                        help="seconds SIGTERM waits for running requests before exiting (default 30)")
    slow = parser.add_argument_group("slow clients (docs/reliability.md)")
    slow.add_argument("--header-timeout", type=float, default=30.0, metavar="S",
                      help="close a connection that has not sent a request's headers within S seconds (default 30)")
    slow.add_argument("--body-timeout", type=float, default=60.0, metavar="S",
                      help="answer 408 to a request whose body has not arrived S seconds after its headers (default 60)")
    slow.add_argument("--send-timeout", type=float, default=60.0, metavar="S",
                      help="close a connection whose client has not read a waiting response for S seconds, aborting "
                           "its request (default 60)")
    return parser


def _folder(given: Path | None, default: Path, flag: str) -> Path | None:
    """A readable folder: the one given, else `default` when it exists; ValueError naming the flag."""
    folder = given if given is not None else (default if default.is_dir() else None)
    if folder is not None and not folder.is_dir():
        raise ValueError(f"{flag} {folder} is not a folder")
    if folder is not None and not os.access(folder, os.R_OK | os.X_OK):
        raise ValueError(f"{flag} {folder} cannot be read")
    return folder


def server_settings(ours: argparse.Namespace, model: Path) -> ServerSettings:
    """Our flags as ServerSettings; ValueError (one line) for anything inconsistent."""
    from .policy import AccessPolicy

    steering_dir = _folder(ours.steering_dir, model / "steering", "--steering-dir")
    probe_dir = _folder(ours.probe_dir, model / "probes", "--probe-dir")
    if any("," in spec for spec in ours.api_key):
        raise ValueError("--api-key values must not contain ','")
    if ours.admin_key is not None and not ours.admin_key.strip():
        raise ValueError("--admin-key is empty")
    if ours.max_capture_bytes < 0:
        raise ValueError(f"--max-capture-bytes {ours.max_capture_bytes} must be >= 0")
    for flag in ("header_timeout", "body_timeout", "send_timeout"):
        if not getattr(ours, flag) > 0:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(ours, flag)} must be > 0 seconds")
    policy = AccessPolicy.parse(ours.api_key, ours.admin_key)
    for what, names, folder in (("steering profile", policy.bound_profiles(), steering_dir),
                                ("probe", policy.bound_probes(), probe_dir)):
        for name in sorted(names):
            if folder is None or not (folder / f"{name}.safetensors").is_file():
                flag = "--steering-dir" if what == "steering profile" else "--probe-dir"
                raise ValueError(f"--api-key binds {what} {name!r}, but {folder or f'no {flag}'} has no "
                                 f"{name}.safetensors")
    return ServerSettings(api_keys=list(ours.api_key), admin_key=ours.admin_key or "", steering_dir=steering_dir,
                          probe_dir=probe_dir,
                          public_profile_details=ours.public_profile_details, max_capture_bytes=ours.max_capture_bytes,
                          metrics_interval=ServerSettings.from_env().metrics_interval,
                          header_timeout=ours.header_timeout, body_timeout=ours.body_timeout,
                          send_timeout=ours.send_timeout, console=not ours.no_console)


def _configure_environment(settings: ServerSettings) -> None:
    os.environ["VLLM_PLUGINS"] = PLUGINS  # loads our model plugin and our endpoint plugin
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    # The V1 runner is the steering path verified on every build; V2 is supported by design
    # (steering/worker.py) and chosen only when asked for explicitly.
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    settings.export()


def _vllm_args(ours: argparse.Namespace, rest: list[str], model: str):
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="unipool-serve"))
    if ours.help_vllm:
        parser.print_help()
        sys.exit(0)
    defaults = ["--worker-cls", WORKER_CLS, "--shutdown-timeout", str(ours.grace_period),
                "--served-model-name", Path(model).name]
    if Path(model) == DEMO_MODEL:
        # vLLM would downcast the fp32 demo to bf16; its documented behaviour was measured in fp32.
        defaults += ["--dtype", "float32"]
    given = {arg.split("=")[0] for arg in rest}
    extra = [a for pair in zip(defaults[::2], defaults[1::2]) if pair[0] not in given for a in pair]
    args = parser.parse_args(["--model", model, "--host", ours.host, "--port", str(ours.port), *extra, *rest])
    validate_parsed_serve_args(args)
    # One API process and one engine: the profile store (names -> engine rows) lives in the
    # API process, and every engine must hold the same rows.
    for flag, value in (("--api-server-count", getattr(args, "api_server_count", 1)),
                        ("--data-parallel-size", getattr(args, "data_parallel_size", 1))):
        if value not in (None, 1):
            raise ValueError(f"{flag} {value} is not supported: steering profiles live in one API process "
                             "and one engine (scale out with more replicas instead)")
    if getattr(args, "enable_expert_parallel", False) and _model_type(model) == "unipool":
        from unipool_serve.model_executor.vllm_model import EXPERT_PARALLEL_REFUSED

        raise ValueError(EXPERT_PARALLEL_REFUSED)
    size_cpu_kv_cache(args)
    return args


def _model_type(model: str) -> str | None:
    import json

    try:
        return json.loads((Path(model) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def size_cpu_kv_cache(args) -> None:
    """On CPU with no KV-cache size given, take a quarter of the memory free now (0.5-8 GiB).

    vLLM's CPU default asks for 92% of the NUMA node's memory and refuses to start on a
    machine where anything else runs; a quarter of what is free leaves room for the
    weights and for the rest of the machine.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or args.kv_cache_memory_bytes is not None \
            or os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

    node = get_allowed_cpu_list()[0].numa_node
    available = get_memory_node_info(node).available_memory
    args.kv_cache_memory_bytes = int(min(max(available // 4, KV_CACHE_MIN), KV_CACHE_MAX))
    print(f"unipool-serve: KV cache {args.kv_cache_memory_bytes / 2**30:.1f} GiB (a quarter of the "
          f"{available / 2**30:.1f} GiB free on NUMA node {node}; set --kv-cache-memory-bytes or "
          "VLLM_CPU_KVCACHE_SPACE to choose)", flush=True)


def main(argv: list[str] | None = None) -> int:
    ours, rest = our_parser().parse_known_args(argv)
    if ours.help:
        our_parser().print_help()
        return 0
    model = Path(ours.model) if ours.model else DEMO_MODEL
    if not (model / "config.json").exists():
        what = "the bundled demo model" if ours.model is None else "model folder"
        print(f"unipool-serve: {what} {model} has no config.json (pass --model FOLDER)", file=sys.stderr)
        return 2
    try:
        settings = server_settings(ours, model)
        _configure_environment(settings)
        args = _vllm_args(ours, rest, str(model))
    except ValueError as exc:
        print(f"unipool-serve: {exc}", file=sys.stderr)
        return 2
    steering_dir = settings.steering_dir

    import uvloop

    from .launch import serve

    print(f"unipool-serve: model {model}; steering profiles from {steering_dir or '(none)'}; "
          f"probes from {settings.probe_dir or '(none)'}; "
          f"{len(ours.api_key)} API key(s); admin {'on' if ours.admin_key else 'off'}; "
          f"listening on http://{ours.host}:{ours.port} (/ready turns 200 when loaded)", flush=True)
    uvloop.run(serve(args))
    # Serving has ended and vLLM's shutdown is complete. Skip interpreter finalisation: there,
    # Triton's bindings print a report of objects still alive at exit, which reads like a failure.
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
