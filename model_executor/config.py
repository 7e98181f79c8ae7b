"""`UniPoolConfig`: one config class for vanilla MoE, grouped pools, UniPool and PathMoE.

Two maps describe a model (see docs/checkpoint-format.md):
  layer -> pool    layer // layers_per_pool    (1 = vanilla MoE, L = one global pool)
  layer -> router  layer // layers_per_router  (1 = independent routers, B = PathMoE blocks)
"""

from __future__ import annotations

import functools
import hashlib
import json

import numpy as np
from transformers import PretrainedConfig

from unipool_serve.kernels.routing_spec import ROUTER_KINDS, RoutingSpec

# NormRouter's constant c is a Monte Carlo estimate. It is fixed to the exact draw
# sequence of the UniPool training code (numpy's legacy RandomState seeded 42, one
# randn(M) per sample, in order), so a model trained there is served with the very
# constant it was trained with, not merely a close estimate.
NORM_C_SAMPLES = 100_000
NORM_C_SEED = 42

# The chat template of every model folder this project writes (the demo, converted
# checkpoints) whose tokenizer brings none: a minimal format, so /v1/chat/completions works.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@functools.lru_cache(maxsize=64)
def norm_router_constant(num_experts: int, top_k: int) -> float:
    """c = E[1 / sqrt(sum_{j<=k} y_(j)^2)], y = relu(x / ||x||), x ~ N(0, I_M).

    float64 numpy, `np.random.RandomState(42)`, 100k samples each drawn with its own
    `randn(M)` call and reduced one at a time, then `np.mean` over the samples: the
    same operations, in the same order, as UniPool's NormRouter initialisation.
    One difference: a sample whose top-k entries are all zero (every x_i <= 0,
    probability 2^-M per sample) would make the mean infinite; it is skipped, so
    small pools get a finite c. For M >= 32 no such sample occurs in practice and
    the value is the training code's. About a second per (M, k); cached.
    """
    rng = np.random.RandomState(NORM_C_SEED)
    samples = []
    for _ in range(NORM_C_SAMPLES):
        x = rng.randn(num_experts)  # one call per sample: the stream must match draw for draw
        y = np.maximum(0, x / np.linalg.norm(x))
        top = np.sort(y)[::-1][:top_k]
        energy = (top ** 2).sum() ** 0.5
        if energy > 0:
            samples.append(1.0 / energy)
    return float(np.mean(samples))


class UniPoolConfig(PretrainedConfig):
    """Config of a LLaMA-style decoder whose MoE layers draw on shared expert pools.

    Every field is validated at construction; errors name the field and the
    allowed values. `num_experts` is the size of EACH pool (all pools are equal).
    """

    model_type = "unipool"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_parameters: dict | None = None
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    hidden_act: str = "silu"
    attention_bias: bool = False
    attention_dropout: float = 0.0
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # pools and routers
    num_experts: int = 192
    num_experts_per_tok: int = 1
    expert_intermediate_size: int = 4096
    layers_per_pool: int | None = None  # None = num_hidden_layers (one global pool)
    layers_per_router: int = 1
    router_type: str = "norm"
    norm_topk_prob: bool = False
    norm_router_c: float | None = None
    shared_expert_intermediate_size: int = 0

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        if self.layers_per_pool is None:
            self.layers_per_pool = self.num_hidden_layers
        if self.rope_parameters is None and "rope_theta" not in kwargs and "rope_scaling" not in kwargs:
            kwargs["rope_theta"] = 1e6
        self._validate_layout()
        if ROUTER_KINDS[self.router_type].learned_scale and self.norm_router_c is None:
            self.norm_router_c = norm_router_constant(self.num_experts, self.num_experts_per_tok)
        super().__post_init__(**kwargs)

    def _validate_layout(self) -> None:
        positive = (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "num_experts",
            "num_experts_per_tok", "expert_intermediate_size", "layers_per_pool",
            "layers_per_router",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"UniPoolConfig.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"UniPoolConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})"
            )
        layers = self.num_hidden_layers
        for name in ("layers_per_pool", "layers_per_router"):
            value = getattr(self, name)
            if layers % value:
                divisors = [d for d in range(1, layers + 1) if layers % d == 0]
                raise ValueError(
                    f"UniPoolConfig.{name}={value} must divide num_hidden_layers={layers}; "
                    f"allowed values: {divisors}"
                )
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"UniPoolConfig.num_experts_per_tok={self.num_experts_per_tok} exceeds "
                f"num_experts={self.num_experts} (the pool size)"
            )
        if self.router_type not in ROUTER_KINDS:
            raise ValueError(
                f"UniPoolConfig.router_type={self.router_type!r} is not one of {list(ROUTER_KINDS)}"
            )
        if self.norm_topk_prob and not ROUTER_KINDS[self.router_type].may_renormalize:
            raise ValueError(
                f"UniPoolConfig.norm_topk_prob=True is not defined for router_type={self.router_type!r}: "
                "its gates are the raw scores (set it to false)"
            )
        if self.norm_router_c is not None and not (self.norm_router_c > 0):
            raise ValueError(f"UniPoolConfig.norm_router_c must be > 0, got {self.norm_router_c!r}")
        if not isinstance(self.shared_expert_intermediate_size, int) or self.shared_expert_intermediate_size < 0:
            raise ValueError(
                "UniPoolConfig.shared_expert_intermediate_size must be an integer >= 0 (0 = no shared "
                f"expert), got {self.shared_expert_intermediate_size!r}"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"UniPoolConfig.hidden_act={self.hidden_act!r}: only 'silu' (SwiGLU) is supported")

    # ---- the two maps -------------------------------------------------------
    @property
    def num_pools(self) -> int:
        return self.num_hidden_layers // self.layers_per_pool

    @property
    def num_routers(self) -> int:
        return self.num_hidden_layers // self.layers_per_router

    def layer_to_pool(self, layer: int) -> int:
        return layer // self.layers_per_pool

    def layer_to_router(self, layer: int) -> int:
        return layer // self.layers_per_router

    def routing_spec(self) -> RoutingSpec:
        """The routing constants every router of this model uses."""
        return RoutingSpec.of(self.router_type, self.num_experts_per_tok, renormalize=self.norm_topk_prob,
                              norm_c=self.norm_router_c or 1.0)

    def fingerprint(self) -> str:
        """Short hash of what a steering profile or routing statistic depends on."""
        keys = (
            "num_hidden_layers", "num_experts", "num_experts_per_tok", "layers_per_pool",
            "layers_per_router", "router_type", "hidden_size", "vocab_size",
        )
        blob = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
