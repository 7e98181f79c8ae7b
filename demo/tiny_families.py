"""Tiny random checkpoints of vLLM's own MoE families, written with transformers' own config and
model classes (for tests and benchmarks; nothing is downloaded).

Shapes are vLLM-CPU friendly (head dim 32 or 64, widths multiples of 32) and small enough for
an engine to start in seconds. Two rewrites, both forced by what vLLM 0.32 accepts:
  - Phi-MoE: transformers saves `PhimoeForCausalLM`; vLLM maps only `PhiMoEForCausalLM`.
  - DeepSeek: the non-MLA variant (qk_nope/qk_rope dims 0), which vLLM serves with plain
    multi-head attention (deepseek_v2.py's DeepseekAttention) when started with
    VLLM_MLA_DISABLE=1. kv_lora_rank=None would say "no MLA" by itself, but transformers
    5.19's DeepSeek configs refuse it ("Field 'kv_lora_rank' expected int, got NoneType"), so
    it stays an int that nothing uses. transformers' DeepSeek classes always build MLA
    attention, so the model written here (and the reference the tests build,
    `load_reference`) keeps transformers' DeepSeek MoE, routers and MLPs and swaps in
    transformers' Llama attention and rotary embedding, which compute what vLLM's
    DeepseekAttention computes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .tokenizer import BOS_ID, EOS_ID, PAD_ID, write_small_tokenizer

_COMMON = dict(vocab_size=384, hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
               max_position_embeddings=512, initializer_range=0.1, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
               eos_token_id=EOS_ID, tie_word_embeddings=False)
_DEEPSEEK = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=64,
                 n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=3, kv_lora_rank=32, q_lora_rank=None,
                 qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=32, routed_scaling_factor=1.5)

# architecture -> (transformers config class name, config fields)
TINY_FAMILIES: dict[str, tuple[str, dict]] = {
    "MixtralForCausalLM": ("MixtralConfig", dict(num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2,
                                                 intermediate_size=64)),
    "Qwen2MoeForCausalLM": ("Qwen2MoeConfig", dict(num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
                                                   moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                                   intermediate_size=64, mlp_only_layers=[1], norm_topk_prob=False)),
    "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", dict(num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                                                   moe_intermediate_size=32, intermediate_size=64,
                                                   norm_topk_prob=True)),
    "OlmoeForCausalLM": ("OlmoeConfig", dict(num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                                             intermediate_size=32)),
    "DeepseekForCausalLM": ("DeepseekV2Config", dict(_DEEPSEEK, topk_method="greedy", n_group=1, topk_group=1,
                                                     norm_topk_prob=False, scoring_func="softmax")),
    "DeepseekV3ForCausalLM": ("DeepseekV3Config", dict(_DEEPSEEK, n_group=4, topk_group=2, norm_topk_prob=True,
                                                       topk_method="noaux_tc", scoring_func="sigmoid")),
    "PhiMoEForCausalLM": ("PhimoeConfig", dict(num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2,
                                               intermediate_size=64, router_jitter_noise=0.01)),
    "GptOssForCausalLM": ("GptOssConfig", dict(num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2,
                                               intermediate_size=64, head_dim=64, sliding_window=64,
                                               layer_types=["sliding_attention", "full_attention"])),
}
# what makes vLLM build plain multi-head attention (deepseek_v2.py: use_mha when both qk dims are 0)
_NO_MLA = dict(q_lora_rank=None, qk_nope_head_dim=0, qk_rope_head_dim=0)


def _config(architecture: str, **overrides):
    import transformers

    class_name, fields = TINY_FAMILIES[architecture]
    return getattr(transformers, class_name)(**{**_COMMON, **fields, **overrides})


def _swap_deepseek_attention(model, config) -> None:
    """transformers' Llama attention and rotary embedding in place of DeepSeek's MLA (see the module doc)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    llama = LlamaConfig(hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
                        num_key_value_heads=config.num_key_value_heads,
                        head_dim=config.hidden_size // config.num_attention_heads,
                        rope_parameters=dict(config.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}),
                        max_position_embeddings=config.max_position_embeddings, attention_bias=False)
    llama._attn_implementation = "eager"
    model.model.rotary_emb = LlamaRotaryEmbedding(llama)
    for index, layer in enumerate(model.model.layers):
        layer.self_attn = LlamaAttention(llama, index)


def _build(architecture: str, config):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    if architecture.startswith("Deepseek"):
        _swap_deepseek_attention(model, config)
    return model.eval()


def write_family_model(path: str | Path, architecture: str, *, seed: int = 0, **overrides) -> Path:
    """config.json, model.safetensors and a tokenizer for a tiny random model of `architecture`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = _config(architecture, **overrides)
    write_small_tokenizer(path, vocab_size=config.vocab_size)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _build(architecture, config)
        for name, param in model.named_parameters():
            if name.endswith("e_score_correction_bias") or "bias" in name.rsplit(".", 1)[-1]:
                param.data.normal_(0.0, 0.1)  # exercised, not zero
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.data.normal_(0.0, 0.1)
    model.save_pretrained(str(path))
    saved = json.loads((path / "config.json").read_text())
    saved["architectures"] = [architecture]  # Phi-MoE: vLLM's class name; DeepSeek V1: vLLM's DeepseekForCausalLM
    if architecture.startswith("Deepseek"):
        saved.update(_NO_MLA)
    (path / "config.json").write_text(json.dumps(saved, indent=2))
    return path


def load_reference(path: str | Path):
    """transformers' model for a folder written by write_family_model (fp32, eval)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = AutoConfig.from_pretrained(str(path))
    architecture = config.architectures[0]
    if architecture == "PhiMoEForCausalLM":
        config.architectures = ["PhimoeForCausalLM"]
    deepseek = architecture.startswith("Deepseek")
    if deepseek:  # MLA placeholders, so transformers can build the model; replaced below
        for key in _NO_MLA:
            setattr(config, key, TINY_FAMILIES[architecture][1][key])
    model = AutoModelForCausalLM.from_pretrained(str(path), config=config, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    if deepseek:
        _swap_deepseek_attention(model, config)
        attention = {k: v for k, v in load_file(str(path / "model.safetensors")).items() if ".self_attn." in k}
        missing, unexpected = model.load_state_dict(attention, strict=False)
        if unexpected or any(".self_attn." in m for m in missing):
            raise RuntimeError(f"{path}: attention weights do not match ({missing}, {unexpected})")
    return model.eval()
