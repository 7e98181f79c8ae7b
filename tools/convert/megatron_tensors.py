"""Megatron's tensors, un-split and renamed into this project's layout.

Split rules (megatron-core 0.16; each checked against its sharded_state_dict and forward in
tests/unit/test_convert_megatron.py). T = tensor-parallel size, rank t holds slice t:

  embedding.word_embeddings.weight, output_layer.weight   [V/T, H]   rows (vocab), in rank order
  self_attention.linear_qkv.weight   [G * (Q/G + 2) * D / T, H]  rows; the full tensor holds, per query
                                      group, its Q/G query heads, then its key head, then its value head
                                      (with G < T a group spans ranks; Megatron all-gathers it)
  self_attention.linear_proj.weight  [H, Q*D/T]                 columns
  linear_fc1 of an expert / shared expert  [2F/T, H]   rank t holds [gate_t; up_t]: the gate is
                                      gate_0..gate_{T-1}, the up projection up_0..up_{T-1}
  linear_fc2                           [H, F/T]                 columns
  router, norm_scale, norms            replicated on every rank

Expert layouts: SequentialMLP `experts.local_experts.{j}.linear_fc{1,2}.weight`, Transformer
Engine grouped GEMM `experts.linear_fc{1,2}.weight{j}` (the same per-expert shapes), legacy
GroupedMLP `experts.weight1` [H, El*2F/T] read as [El, H, 2F/T] and `experts.weight2`
[El*F/T, H] read as [El, F/T, H] (transposed per expert). With expert parallelism rank e
holds experts e*El .. (e+1)*El - 1, El = E / EP.

Shape legend: V vocab, H hidden, Q query heads, G query groups (KV heads), D head dim,
E experts per pool, F expert width, S shared-expert width, L layers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from unipool_serve.kernels.routing_spec import router_kind

from .errors import ConversionError
from .megatron_files import RankGrid

EXTRA_STATE = "._extra_state"


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its name, full shape, and the pieces whose bytes, in order, make it."""

    name: str
    shape: tuple[int, ...]
    is_router: bool
    pieces: Callable[[], Iterator[torch.Tensor]]


def detect_layout(state: dict) -> tuple[str, bool]:
    """(expert layout, whether the input norm is fused into linear_qkv as in Transformer Engine specs)."""
    keys = list(state)
    if any(".mlp.experts.local_experts." in k for k in keys):
        experts = "sequential"
    elif any(re.search(r"\.mlp\.experts\.linear_fc1\.weight\d+$", k) for k in keys):
        experts = "te_grouped"
    elif any(k.endswith(".mlp.experts.weight1") for k in keys):
        experts = "legacy_grouped"
    else:
        raise ConversionError("no expert tensors found (looked for experts.local_experts.{j}.linear_fc1.weight, "
                              "experts.linear_fc1.weight{j} and experts.weight1): not an MoE GPT checkpoint")
    te_norms = any(k.endswith("self_attention.linear_qkv.layer_norm_weight") for k in keys)
    return experts, te_norms


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.storage_offset() == b.storage_offset()
            and a.shape == b.shape and a.stride() == b.stride())


class MegatronTensors:
    """Reads merged tensors out of the (memory-mapped) model state dicts of every rank file."""

    def __init__(self, config: dict, layout: tuple[str, bool], grid: RankGrid, states: dict[tuple[int, int], dict]):
        self.cfg, (self.experts_layout, self.te_norms), self.grid, self.states = config, layout, grid, states
        self.T, self.EP = grid.tp_size, grid.ep_size
        c = config
        self.H, self.L, self.E, self.F = c["hidden_size"], c["num_hidden_layers"], c["num_experts"], c["expert_intermediate_size"]
        self.Q, self.G, self.D = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        self.S, self.V, self.El = c["shared_expert_intermediate_size"], c["vocab_size"], self.E // self.EP
        self.per_pool = c["layers_per_pool"]
        self.learned_scale = router_kind(c["router_type"]).learned_scale  # routers carry `norm_scale`

    # ---- names and per-rank shapes ------------------------------------------------------
    def _expert_keys(self, l: int) -> dict[str, tuple[int, ...]]:
        p, H, Fp, El = f"decoder.layers.{l}.mlp.experts.", self.H, self.F // self.T, self.El
        if self.experts_layout == "legacy_grouped":
            return {p + "weight1": (H, El * 2 * Fp), p + "weight2": (El * Fp, H)}
        shapes = {}
        for j in range(El):
            if self.experts_layout == "sequential":
                shapes[f"{p}local_experts.{j}.linear_fc1.weight"] = (2 * Fp, H)
                shapes[f"{p}local_experts.{j}.linear_fc2.weight"] = (H, Fp)
            else:
                shapes[f"{p}linear_fc1.weight{j}"] = (2 * Fp, H)
                shapes[f"{p}linear_fc2.weight{j}"] = (H, Fp)
        return shapes

    def _norm_key(self, l: int) -> str:
        return f"decoder.layers.{l}." + ("self_attention.linear_qkv.layer_norm_weight" if self.te_norms
                                         else "input_layernorm.weight")

    def replicated_keys(self) -> list[str]:
        keys = ["decoder.final_layernorm.weight"]
        for l in range(self.L):
            p = f"decoder.layers.{l}."
            keys += [self._norm_key(l), p + "pre_mlp_layernorm.weight", p + "mlp.router.weight"]
            if self.learned_scale:
                keys.append(p + "mlp.router.norm_scale")
        return keys

    def rank_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor each rank file must hold, with its per-rank shape."""
        H, T = self.H, self.T
        shapes = {k: (H,) for k in self.replicated_keys() if "layernorm" in k or k.endswith("layer_norm_weight")}
        shapes["embedding.word_embeddings.weight"] = (self.V // T, H)
        if not self.cfg["tie_word_embeddings"]:
            shapes["output_layer.weight"] = (self.V // T, H)
        for l in range(self.L):
            p = f"decoder.layers.{l}."
            shapes[p + "self_attention.linear_qkv.weight"] = (self.G * (self.Q // self.G + 2) * self.D // T, H)
            shapes[p + "self_attention.linear_proj.weight"] = (H, self.Q * self.D // T)
            shapes[p + "mlp.router.weight"] = (self.E, H)
            if self.learned_scale:
                shapes[p + "mlp.router.norm_scale"] = (1,)
            if self.S:
                shapes[p + "mlp.shared_experts.linear_fc1.weight"] = (2 * self.S // T, H)
                shapes[p + "mlp.shared_experts.linear_fc2.weight"] = (H, self.S // T)
            shapes.update(self._expert_keys(l))
        return shapes

    # ---- checks, before anything is written ------------------------------------------------
    def check(self, trust_pool_leader: bool, progress) -> None:
        """Names, shapes and dtypes of every rank; replicated tensors equal; pool copies identical."""
        want = self.rank_shapes()
        context = (f"tensor_model_parallel_size={self.T}, expert_model_parallel_size={self.EP}, "
                   f"num_experts={self.E}, moe_ffn_hidden_size={self.F}, expert layout {self.experts_layout}")
        for (t, e), state in progress(sorted(self.states.items()), desc="checking rank files"):
            label = self.grid.label(t, e)
            keys = {k for k in state if not k.endswith(EXTRA_STATE)}
            missing, unexpected = sorted(set(want) - keys), sorted(keys - set(want))
            if missing:
                raise ConversionError(f"{label}: missing {_few(missing)} (expected from the checkpoint's args: {context})")
            if unexpected:
                raise ConversionError(f"{label}: unexpected {_few(unexpected)}: the run used a feature this converter "
                                      f"does not map ({context})")
            for key, shape in want.items():
                tensor = state[key]
                if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
                    got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                    raise ConversionError(f"{label}: {key} has shape {got}, the checkpoint's args imply {shape} ({context})")
                if tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                    raise ConversionError(f"{label}: {key} has dtype {tensor.dtype}; supported: float32, bfloat16, float16")
            for key in self.replicated_keys():
                if not torch.equal(state[key], self.states[(0, 0)][key]):
                    raise ConversionError(f"{key} differs between {self.grid.label(0, 0)} and {label}: replicated "
                                          "tensors must be equal, so the rank files come from different runs or iterations")
            if not trust_pool_leader:
                self._check_pool_copies(state, label)

    def _check_pool_copies(self, state: dict, label: str) -> None:
        for l in range(self.L):
            leader = l - l % self.per_pool
            if leader == l:
                continue
            for key, lead_key in zip(self._expert_keys(l), self._expert_keys(leader)):
                a, b = state[key], state[lead_key]
                if not (_same_storage(a, b) or torch.equal(a, b)):
                    raise ConversionError(
                        f"{label}: {key} differs from layer {leader}'s copy, but the run's pool mode makes layers "
                        f"{leader}..{leader + self.per_pool - 1} share one pool; pass --trust-pool-leader to take "
                        f"each pool's experts from its first layer anyway")

    # ---- merged tensors ---------------------------------------------------------------------
    def _fc1(self, t: int, e: int, l: int, j: int) -> torch.Tensor:  # [2F/T, H]
        state, p = self.states[(t, e)], f"decoder.layers.{l}.mlp.experts."
        if self.experts_layout == "sequential":
            return state[f"{p}local_experts.{j}.linear_fc1.weight"]
        if self.experts_layout == "te_grouped":
            return state[f"{p}linear_fc1.weight{j}"]
        return state[p + "weight1"].reshape(self.El, self.H, -1)[j].t()

    def _fc2(self, t: int, e: int, l: int, j: int) -> torch.Tensor:  # [H, F/T]
        state, p = self.states[(t, e)], f"decoder.layers.{l}.mlp.experts."
        if self.experts_layout == "sequential":
            return state[f"{p}local_experts.{j}.linear_fc2.weight"]
        if self.experts_layout == "te_grouped":
            return state[f"{p}linear_fc2.weight{j}"]
        return state[p + "weight2"].reshape(self.El, -1, self.H)[j].t()

    @staticmethod
    def _gate_up(pieces: list[torch.Tensor]) -> torch.Tensor:  # T x [2F/T, H] -> [2F, H]
        half = pieces[0].shape[0] // 2
        return torch.cat([p[:half] for p in pieces] + [p[half:] for p in pieces])

    def _pool_gate_up(self, leader: int) -> Iterator[torch.Tensor]:
        for g in range(self.E):
            e, j = divmod(g, self.El)
            yield self._gate_up([self._fc1(t, e, leader, j) for t in range(self.T)])

    def _pool_down(self, leader: int) -> Iterator[torch.Tensor]:
        for g in range(self.E):
            e, j = divmod(g, self.El)
            yield torch.cat([self._fc2(t, e, leader, j) for t in range(self.T)], dim=1)

    def _rows(self, key: str) -> Iterator[torch.Tensor]:
        return (self.states[(t, 0)][key] for t in range(self.T))

    def _one(self, key: str) -> Iterator[torch.Tensor]:
        return iter([self.states[(0, 0)][key]])

    def _qkv(self, l: int, part: int) -> Iterator[torch.Tensor]:
        full = torch.cat(list(self._rows(f"decoder.layers.{l}.self_attention.linear_qkv.weight")))
        per_group = self.Q // self.G
        grouped = full.reshape(self.G, per_group + 2, self.D, self.H)  # [G, Q/G + 2, D, H]
        rows = {0: grouped[:, :per_group], 1: grouped[:, per_group], 2: grouped[:, per_group + 1]}[part]
        return iter([rows.reshape(-1, self.H)])

    def plan(self) -> list[PlannedTensor]:
        """Every tensor of the output folder, in docs/checkpoint-format.md's names."""
        H, out = self.H, []

        def add(name, shape, pieces, is_router=False):
            out.append(PlannedTensor(name, tuple(shape), is_router, pieces))

        add("model.embed_tokens.weight", (self.V, H), lambda: self._rows("embedding.word_embeddings.weight"))
        for l in range(self.L):
            m, p = f"model.layers.{l}.", f"decoder.layers.{l}."
            add(m + "input_layernorm.weight", (H,), lambda k=self._norm_key(l): self._one(k))
            add(m + "self_attn.q_proj.weight", (self.Q * self.D, H), lambda l=l: self._qkv(l, 0))
            add(m + "self_attn.k_proj.weight", (self.G * self.D, H), lambda l=l: self._qkv(l, 1))
            add(m + "self_attn.v_proj.weight", (self.G * self.D, H), lambda l=l: self._qkv(l, 2))
            add(m + "self_attn.o_proj.weight", (H, self.Q * self.D),
                lambda k=p + "self_attention.linear_proj.weight": iter([torch.cat(list(self._rows(k)), dim=1)]))
            add(m + "post_attention_layernorm.weight", (H,), lambda k=p + "pre_mlp_layernorm.weight": self._one(k))
            if self.S:
                fc1, fc2 = p + "mlp.shared_experts.linear_fc1.weight", p + "mlp.shared_experts.linear_fc2.weight"
                gate_up = lambda k=fc1: self._gate_up(list(self._rows(k)))  # noqa: E731
                add(m + "shared_expert.gate_proj.weight", (self.S, H), lambda g=gate_up: iter([g()[: self.S]]))
                add(m + "shared_expert.up_proj.weight", (self.S, H), lambda g=gate_up: iter([g()[self.S:]]))
                add(m + "shared_expert.down_proj.weight", (H, self.S),
                    lambda k=fc2: iter([torch.cat(list(self._rows(k)), dim=1)]))
            add(f"model.routers.{l}.weight", (self.E, H), lambda k=p + "mlp.router.weight": self._one(k), True)
            if self.learned_scale:
                add(f"model.routers.{l}.norm_scale", (1,), lambda k=p + "mlp.router.norm_scale": self._one(k), True)
        for pool in range(self.L // self.per_pool):
            leader = pool * self.per_pool
            add(f"model.pools.{pool}.gate_up_proj", (self.E, 2 * self.F, H), lambda ld=leader: self._pool_gate_up(ld))
            add(f"model.pools.{pool}.down_proj", (self.E, H, self.F), lambda ld=leader: self._pool_down(ld))
        add("model.norm.weight", (H,), lambda: self._one("decoder.final_layernorm.weight"))
        if not self.cfg["tie_word_embeddings"]:
            add("lm_head.weight", (self.V, H), lambda: self._rows("output_layer.weight"))
        return out


def _few(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
