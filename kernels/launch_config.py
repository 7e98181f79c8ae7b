"""Launch parameters for the fused pool MoE, tuned per shape and device.

Tuned files live in kernels/configs/ (and in folders added with `use_config_dir`; the
plugin adds $UNIPOOL_MOE_CONFIG_DIR), one per
(E, H, F, k, dtype, device), e.g.
`E=192,H=1024,F=4096,k=1,dtype=bfloat16,device=NVIDIA_H100_80GB_HBM3.json`,
holding {"<token count>": {"BLOCK_M": .., "BLOCK_N": .., "BLOCK_K": .., "GROUP_M": ..,
"num_warps": .., "num_stages": .., "SPLIT_K": ..}, ...} (SPLIT_K may be left out: 1).
A call with T tokens uses the bucket nearest to T. benchmarks/tune_fused_moe.py
writes these files; without one the heuristic `default_config` applies.

The small-T path: at decode a few experts get a row or two each, so the default
tiles give the down GEMM (N = H columns per expert) fewer programs than the GPU
has SMs, and a few SMs stream the whole expert. `default_config` then narrows the
column tiles and splits the down GEMM's K (= F) into SPLIT_K ranges, whose fp32
partial sums the combine kernel adds, so every SM streams part of the weights.
The target (SMALL_T_PROGRAMS_PER_SM) is a first guess pending measurement on a GPU;
tuned files override it.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SMALL_T_PROGRAMS_PER_SM = 2  # down-GEMM programs per SM below which the small-T path applies
MAX_SPLIT_K = 16
DEFAULT_NUM_SMS = 132  # H100/H200 SXM; used where no CUDA device can be asked
_PACKAGED_DIR = Path(__file__).parent / "configs"
_extra_dirs: list[Path] = []  # searched before the packaged folder, newest first


@dataclass(frozen=True)
class MoELaunchConfig:
    """Tile sizes and launch options shared by the gate_up and down grouped GEMMs.

    SPLIT_K splits the down GEMM's reduction (over F) into that many ranges, each
    its own program writing an fp32 partial sum; the combine kernel adds them. The
    gate_up GEMM never splits K: SiLU(gate) * up needs the whole sum.
    """

    BLOCK_M: int = 16
    BLOCK_N: int = 64
    BLOCK_K: int = 64
    GROUP_M: int = 1
    num_warps: int = 4
    num_stages: int = 3
    SPLIT_K: int = 1

    def __post_init__(self) -> None:
        for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            value = getattr(self, name)
            # tl.dot needs every tile side >= 16 and a power of two.
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name}={value}: must be a power of two >= 16")
        if self.GROUP_M < 1 or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"GROUP_M, num_warps and num_stages must be >= 1: {self}")
        if not 1 <= self.SPLIT_K <= MAX_SPLIT_K:
            raise ValueError(f"SPLIT_K={self.SPLIT_K}: must be in 1..{MAX_SPLIT_K}")

    def to_json(self) -> dict:
        return asdict(self)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def current_device_name() -> str:
    """`NVIDIA_H100_80GB_HBM3` on CUDA, `cpu` otherwise (no tuned files apply there)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "_")
    return "cpu"


def config_file_name(E: int, H: int, F: int, k: int, dtype: torch.dtype, device: str) -> str:
    return f"E={E},H={H},F={F},k={k},dtype={dtype_name(dtype)},device={device}.json"


def use_config_dir(folder: str | Path) -> None:
    """Search `folder` for tuned files before the packaged ones (kernels read no environment)."""
    _extra_dirs.insert(0, Path(folder))
    load_tuned_configs.cache_clear()


def config_dirs() -> list[Path]:
    return [*_extra_dirs, _PACKAGED_DIR]


@functools.lru_cache(maxsize=None)
def load_tuned_configs(file_name: str) -> dict[int, MoELaunchConfig] | None:
    """{token bucket: config} from the first config dir holding `file_name`, else None."""
    for folder in config_dirs():
        path = folder / file_name
        if path.is_file():
            raw = json.loads(path.read_text())
            return {int(bucket): MoELaunchConfig(**cfg) for bucket, cfg in raw.items()}
    return None


@functools.lru_cache(maxsize=None)
def current_num_sms() -> int:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return DEFAULT_NUM_SMS


def default_config(
    T: int, E: int, H: int, F: int, k: int, dtype: torch.dtype, num_sms: int | None = None
) -> MoELaunchConfig:
    """Heuristic when no tuned file matches: tile M to the expected rows per touched expert.

    num_sms: the GPU's SM count (default: the current device's, else DEFAULT_NUM_SMS).
    """
    slots = T * k
    touched = max(1, min(E, slots))  # experts with a slot, at most
    rows_per_expert = slots / touched
    wide = dtype != torch.float32  # fp32 tiles take twice the shared memory
    num_sms = num_sms or current_num_sms()
    if takes_small_t_path(T, E, H, k, num_sms):
        return small_t_config(touched, H, F, wide, SMALL_T_PROGRAMS_PER_SM * num_sms)
    if rows_per_expert <= 16:  # decode: weight streaming; small M, deep K pipeline
        return MoELaunchConfig(16, 64, 64, 1, 4, 4 if wide else 3)
    if rows_per_expert <= 64:
        return MoELaunchConfig(32, 64, 64 if wide else 32, 8, 4, 4 if wide else 3)
    return MoELaunchConfig(64, 128, 64 if wide else 32, 8, 8 if wide else 4, 3)


def takes_small_t_path(T: int, E: int, H: int, k: int, num_sms: int) -> bool:
    """At most 16 rows per touched expert, and the default decode tiles (one row block per
    expert, BLOCK_N 64) would give the down GEMM fewer than SMALL_T_PROGRAMS_PER_SM per SM."""
    slots = T * k
    touched = max(1, min(E, slots))
    return slots / touched <= 16 and touched * -(-H // 64) < SMALL_T_PROGRAMS_PER_SM * num_sms


def small_t_config(touched: int, H: int, F: int, wide: bool, target: int) -> MoELaunchConfig:
    """Narrow column tiles, then the largest split-K that keeps the down GEMM within `target` programs."""
    block_n, block_k = 32, 128 if wide else 64
    programs = touched * -(-H // block_n)  # down-GEMM programs without a split
    split_k = 1
    # Each K range keeps at least two BLOCK_K steps, so the pipeline has work to overlap.
    while (2 * split_k <= MAX_SPLIT_K and programs * 2 * split_k <= target
           and F >= 2 * split_k * 2 * block_k):
        split_k *= 2
    return MoELaunchConfig(16, block_n, block_k, 1, 4, 4 if wide else 3, SPLIT_K=split_k)


def get_config(
    T: int, E: int, H: int, F: int, k: int, dtype: torch.dtype, device: str | None = None
) -> MoELaunchConfig:
    """Tuned config for the nearest token bucket, or the heuristic default."""
    device = current_device_name() if device is None else device
    tuned = load_tuned_configs(config_file_name(E, H, F, k, dtype, device))
    if not tuned:
        return default_config(T, E, H, F, k, dtype)
    bucket = min(tuned, key=lambda b: (abs(b - T), b))
    return tuned[bucket]
