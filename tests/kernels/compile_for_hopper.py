"""Compile every kernel variant for sm_90 (H100/H200) with the real Triton compiler, no GPU.

The interpreter runs kernels as numpy and accepts programs the GPU compiler would
reject (scalar types carried through loops, histogram bins, bf16 dots), so this
checks the other half: each variant fused_pool_moe and fused_route launch goes
through Triton's NVIDIA backend down to a cubin. Run it in a process where
TRITON_INTERPRET is unset (test_compiles_for_hopper.py does). Prints one line per
variant: registers are not known without a driver, shared memory is. Arguments are
specialised the way a launch specialises them for the benchmark shapes: pointers
16-byte aligned, unit strides as the constant 1, sizes and other strides
divisible by 16 (that decides vectorised loads and the K-loop pipeline).

    python tests/kernels/compile_for_hopper.py
"""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "needs the compiler, not the interpreter"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from unipool_serve.kernels.fused_align import _align_kernel  # noqa: E402
from unipool_serve.kernels.fused_moe import _expert_gemm_kernel  # noqa: E402
from unipool_serve.kernels.moe_combine import _combine_kernel  # noqa: E402
from unipool_serve.kernels.routing import _route_kernel  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)


# Runtime arguments a launch at the benchmark shapes sees as 1 (Triton makes them constants)
# and as multiples of 16 (Triton marks them divisible), per kernel.
UNIT_ARGS = {"_expert_gemm_kernel": ("stride_ak", "stride_bk", "stride_cn")}
DIV16_ARGS = {
    "_expert_gemm_kernel": ("N", "K", "up_offset", "stride_am", "stride_be", "stride_bn", "stride_cs", "stride_cm"),
    "_combine_kernel": ("N", "stride_ps", "stride_pm", "stride_om"),
    "_align_kernel": ("zero_cols", "stride_zero"),
    "_route_kernel": ("stride_bp", "stride_bl", "stride_mp", "stride_ml"),
}


def compile_variant(kernel, pointers: dict, constexprs: dict, num_warps=4, num_stages=3):
    """pointers: {name: '*bf16', ...}; every other runtime argument is an i32."""
    name = kernel.fn.__name__
    constexprs = dict(constexprs, **{arg: 1 for arg in UNIT_ARGS.get(name, ())})
    signature, attrs = {}, {}
    for index, param in enumerate(kernel.params):
        if param.is_constexpr or param.name in constexprs:
            signature[param.name] = "constexpr"
            continue
        signature[param.name] = pointers.get(param.name, "i32")
        if param.name in pointers and pointers[param.name].startswith("*") or param.name in DIV16_ARGS.get(name, ()):
            attrs[(index,)] = [["tt.divisibility", 16]]
    missing = [p.name for p in kernel.params if p.is_constexpr and p.name not in constexprs]
    assert not missing, f"{name}: no value for {missing}"
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=HOPPER, options=dict(num_warps=num_warps, num_stages=num_stages))


def variants():
    """(label, kernel, pointers, constexprs, options) for the launches the wrappers make."""
    gemm_ptrs = dict(slots_ptr="*i32", block_expert_ptr="*i32", weights_ptr="*fp32")
    for dtype in ("bf16", "fp16"):
        for split_k, block_n, block_k in ((1, 64, 64), (8, 32, 128)):
            base = dict(IEEE_FP32=False, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=1)
            if split_k == 1:
                yield (f"gate_up {dtype} BN{block_n} BK{block_k}", _expert_gemm_kernel,
                       dict(gemm_ptrs, a_ptr=f"*{dtype}", b_ptr=f"*{dtype}", c_ptr=f"*{dtype}"),
                       dict(base, GATED=True, WEIGHTED=False, SPLIT_K=1), dict(num_stages=4))
            out = f"*{dtype}" if split_k == 1 else "*fp32"
            yield (f"down {dtype} SPLIT_K={split_k} BN{block_n} BK{block_k}", _expert_gemm_kernel,
                   dict(gemm_ptrs, a_ptr=f"*{dtype}", b_ptr=f"*{dtype}", c_ptr=out),
                   dict(base, GATED=False, WEIGHTED=True, SPLIT_K=split_k), dict(num_stages=4))
            # T = 1, k = 1: a launch turns num_slots, a_row_div and num_m_blocks into the constant 1.
            yield (f"down {dtype} SPLIT_K={split_k} at T=1", _expert_gemm_kernel,
                   dict(gemm_ptrs, a_ptr=f"*{dtype}", b_ptr=f"*{dtype}", c_ptr=out),
                   dict(base, GATED=False, WEIGHTED=True, SPLIT_K=split_k, num_slots=1, a_row_div=1,
                        num_m_blocks=1), dict(num_stages=4))
        for part, top_k, split_k in ((dtype, 4, 1), ("fp32", 1, 8), ("fp32", 8, 2)):
            yield (f"combine {part}->{dtype} k={top_k} SPLIT_K={split_k}", _combine_kernel,
                   dict(part_ptr=f"*{part}", ids_ptr="*i32", out_ptr=f"*{dtype}"),
                   dict(TOP_K=top_k, SPLIT_K=split_k, BLOCK_T=4, BLOCK_N=256), {})
    # The last one is T = 1, k = 1, E = 1: S, E and max_blocks all become the constant 1.
    for ids, zero, experts, chunk, ones in (("*i32", False, 192, 16, ()), ("*i64", True, 1000, 4096, ()),
                                            ("*i32", True, 1, 16, ("num_slots", "num_experts", "max_blocks"))):
        yield (f"align ids {ids[1:]} E={experts} CHUNK={chunk} zero_rows={zero} ones={len(ones)}", _align_kernel,
               dict(ids_ptr=ids, sorted_slots_ptr="*i32", block_expert_ptr="*i32", zero_ptr="*bf16"),
               dict(BLOCK_M=16, BLOCK_E=max(32, triton.next_power_of_2(experts + 1)), CHUNK=chunk,
                    ZERO_DROPPED_ROWS=zero, ZERO_ROWS=16, ZERO_COLS=128, **{name: 1 for name in ones}),
               dict(num_warps=8 if chunk >= 2048 else 4))
    for budgeted, top_k, router in ((False, 1, 0), (True, 4, 1)):
        yield (f"route router={router} E=192 k={top_k} budgeted={budgeted}", _route_kernel,
               dict(logits_ptr="*fp32", steer_ptr="*i32", bias_ptr="*fp32", mask_ptr="*i8", budget_ptr="*i32",
                    scale_ptr="*fp32", ids_ptr="*i32", weights_ptr="*fp32", norm_scale="fp32", norm_c="fp32"),
               dict(ROUTER=router, EXCLUDE_FILL=0.0 if router == 0 else float("-inf"), RENORMALIZE=router == 1,
                    SCALE_IN_MEMORY=True, STEERED=True, BUDGETED=budgeted, TOP_K=top_k,
                    BLOCK_K=top_k, BLOCK_T=8, BLOCK_E=256), {})
    yield ("combine fp32->bf16 k=1 SPLIT_K=8 at T=1", _combine_kernel,
           dict(part_ptr="*fp32", ids_ptr="*i32", out_ptr="*bf16"),
           dict(TOP_K=1, SPLIT_K=8, BLOCK_T=1, BLOCK_N=256, num_tokens=1), {})


NO_BACKEND = 3  # exit status when this triton build has no NVIDIA backend (the test skips)


def main() -> int:
    from triton.backends import backends

    if "nvidia" not in backends:
        print("this triton build has no NVIDIA backend")
        return NO_BACKEND
    failures = 0
    for label, kernel, pointers, constexprs, options in variants():
        try:
            compiled = compile_variant(kernel, pointers, constexprs, **options)
        except Exception as exc:  # report every variant, then fail
            failures += 1
            print(f"FAIL {label}: {type(exc).__name__}: {str(exc)[:400]}")
            continue
        print(f"ok   {label}: shared {compiled.metadata.shared} B")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
