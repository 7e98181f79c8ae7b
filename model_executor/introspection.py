"""Read-only views of a loaded vLLM UniPool model, for `LLM.apply_model` / `collective_rpc`.

Functions here run inside vLLM's worker processes (they are pickled by reference,
so they live in the installed package) and return plain Python data.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def pool_report(model: nn.Module) -> dict[str, Any]:
    """Where every layer's pool and router live, and how many bytes the weights take."""
    inner = model.model
    layers = []
    for layer in inner.layers[inner.start_layer:inner.end_layer]:
        moe = layer.moe
        layers.append({
            "layer": moe.layer_idx,
            "pool": next(i for i, p in enumerate(inner.pools) if p is moe.pool),
            "router": next(i for i, r in enumerate(inner.routers) if r is moe.router),
            "gate_up_ptr": moe.pool.gate_up_proj.data_ptr(),
            "down_ptr": moe.pool.down_proj.data_ptr(),
            "router_ptr": moe.router.weight.data_ptr(),
        })
    pools = [
        {"gate_up_shape": tuple(p.gate_up_proj.shape), "down_shape": tuple(p.down_proj.shape),
         "padded_width": p.padded_width, "local_width": p.local_width, "packed_by": p.packed_by,
         "dtype": str(p.gate_up_proj.dtype)}
        for p in inner.pools if hasattr(p, "gate_up_proj")
    ]
    tensors: dict[tuple[int, int], int] = {}  # (data_ptr, nbytes) -> nbytes: shared storage counts once
    for _, param in model.named_parameters(remove_duplicate=False):
        nbytes = param.numel() * param.element_size()
        tensors[(param.data_ptr(), nbytes)] = nbytes
    steering = inner.steering
    return {
        "backend": type(inner.moe_backend).__name__,
        "layers": layers,
        "pools": pools,
        "param_names": [n for n, _ in model.named_parameters(remove_duplicate=False)],
        "param_bytes": sum(tensors.values()),
        "param_sizes": {n: (p.data_ptr(), p.numel() * p.element_size(), tuple(p.shape), str(p.dtype))
                        for n, p in model.named_parameters(remove_duplicate=False)},
        "steering": {
            name: {"shape": tuple(t.shape), "dtype": str(t.dtype), "ptr": t.data_ptr(),
                   "nonzero": int(t.count_nonzero())}
            for name, t in (("index", steering.index), ("bias_table", steering.bias),
                            ("mask_table", steering.mask))
        },
    }
