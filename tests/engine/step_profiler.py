"""Functions run inside an engine's worker through `LLM.collective_rpc` (the engine needs
VLLM_ALLOW_INSECURE_SERIALIZATION=1 to take a function): a torch profile of the steps run between
`start` and `stop`, and what the model and dynamo say about them."""

from __future__ import annotations

import torch

_PROFILE: dict[str, torch.profiler.profile] = {}
HOST_READS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero")


def start(worker) -> None:
    profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    profile.__enter__()
    _PROFILE["current"] = profile


def stop(worker) -> dict:
    """{"ops": {name: count}, "our_host_reads": host reads inside the compiled model's calls that no kernel of
    vLLM's (`_C::...`, e.g. its CPU GEMM) makes: the ones our routing, steering and MoE code would add}."""
    profile = _PROFILE.pop("current")
    profile.__exit__(None, None, None)
    ours = []
    for event in profile.events():
        if event.name not in HOST_READS:
            continue
        chain, parent = [], event.cpu_parent
        while parent is not None and "CompiledFxGraph" not in parent.name:
            chain.append(parent.name)
            parent = parent.cpu_parent
        if parent is not None and not any(name.startswith("_C::") for name in chain):
            ours.append(" <- ".join([event.name, *chain]))
    return {"ops": {e.key: e.count for e in profile.key_averages()}, "our_host_reads": ours}


def steps_each_way(worker) -> dict[str, int]:
    """How many steps ran the model (its seams: table reads, capture copies), its budgeted variant and its plain
    variant (warm-up included)."""
    return dict(worker.model_runner.get_model().idle_steps.steps)


def graph_breaks(worker) -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def take_captured_experts(worker, request_id: str) -> bytes:
    """The captured experts (.npy bytes) of the offline request `request_id` (vLLM suffixes LLM's ids)."""
    worker = getattr(worker, "worker", worker)
    held = [r for r in worker._steering_rows.captured._rows if r.rsplit("-", 1)[0] == request_id]
    return worker.unipool_take_capture(held)[held[0]]["experts"]
