"""The launch configuration of the fused kernels: one fixed table, shared by forward and backward.

A configuration depends only on (D bucket, dtype, float32 matmul path), never on N, and the
forward and the backward of one call use the same one, so both compute every c_ij with the same
tile shape, the same MMA instruction and the same K chunks: the backward's threshold decisions
are the forward's, bit for bit, and the same inputs give the same bits in any process (nothing
is timed at run time, unlike ``triton.autotune``). FlashAttention chooses its tiles the same way.

How the entries were chosen: no GPU was available when this table was written, so every entry
comes from compiling both kernels for sm_90 (H100/H200) on a CPU
(``python -m adaptive_cl.kernels.compile_check``; candidates with triton 3.9, CI's, and the CI
subset again with 3.6, the GPU machine's): among the candidate shapes, the one with no register
spill in either kernel, shared memory within the 227 KB of an sm_90 block, and the fewest
instructions per similarity element on the interior path of the backward (the pass that
dominates), preferring larger tiles (fewer reloads of Z_J) at equal counts. Every entry compiles
without a register spill (at D >= 256 the float32 tensor-core paths need smaller tiles or a split
backward output for that, at a cost in instructions per element). These are compile facts, not
timings: ``python -m adaptive_cl.kernels.autotune`` times the candidates on a GPU and prints a
replacement for ``TABLE`` to paste here.

K_CHUNK (None: all of D in one product, Zs_I held on chip) splits the S = Zs_I Zs_J^T product
along D: the float32 "ieee" (FMA) path takes D in 16-wide pieces, which keeps its operands in
registers without spilling; D wider than MAX_BLOCK_D is always chunked. D_CHUNK (None: all of
D) splits the backward's output over a second grid axis, each program recomputing the S tile:
more work, fewer registers (the float32 "3xtf32" backward at D >= 128).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import adaptive_info_nce_fwd as fwd


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    k_chunk: int | None = None  # None: block_d(D), all of D at once when it fits
    d_chunk: int | None = None  # None: block_d(D); else the backward's output chunk (grid axis 1)

    def as_tuple(self) -> tuple:
        return (self.block_m, self.block_n, self.num_warps, self.num_stages, self.k_chunk, self.d_chunk)


#: float32 paths: "ieee" (FMA, float32 products), "3xtf32" (three tf32 tensor-core passes,
#: symmetric), "tf32" (one pass, when torch allows it); half types: "native" tensor cores.
PATHS = ("ieee", "3xtf32", "tf32", "native")
#: D buckets: block_d(D) for D <= MAX_BLOCK_D, "wide" above (256-wide chunks, split backward).
D_BUCKETS = (16, 32, 64, 128, 256, "wide")

_C = LaunchConfig
# (D bucket, dtype, path) -> configuration. See the module docstring for how it was chosen.
TABLE: dict[tuple, LaunchConfig] = {
    (16, "float32", "ieee"): _C(64, 32, 4, 1, 16),
    (32, "float32", "ieee"): _C(64, 32, 4, 1, 16),
    (64, "float32", "ieee"): _C(64, 32, 4, 1, 16),
    (128, "float32", "ieee"): _C(64, 32, 4, 1, 16),
    (256, "float32", "ieee"): _C(32, 32, 4, 1, 16),
    ("wide", "float32", "ieee"): _C(32, 32, 4, 1, 16),
    (16, "float32", "3xtf32"): _C(128, 64, 8, 2),
    (32, "float32", "3xtf32"): _C(128, 64, 8, 2),
    (64, "float32", "3xtf32"): _C(128, 32, 8, 2),  # 128x64: 12 B spill once the S tile sums symmetrically
    (128, "float32", "3xtf32"): _C(64, 32, 4, 2, 32, 64),  # K_CHUNK None: 108 B spill with the symmetric S tile
    (256, "float32", "3xtf32"): _C(64, 32, 4, 2, 32, 64),  # K_CHUNK 64: 108 B spill with the symmetric S tile
    ("wide", "float32", "3xtf32"): _C(64, 32, 4, 2, 32, 64),  # as D 256
    (16, "float32", "tf32"): _C(128, 64, 8, 2),
    (32, "float32", "tf32"): _C(128, 64, 8, 2),
    (64, "float32", "tf32"): _C(128, 64, 8, 2),
    (128, "float32", "tf32"): _C(64, 32, 4, 2),
    (256, "float32", "tf32"): _C(32, 32, 4, 1, None, 128),
    ("wide", "float32", "tf32"): _C(32, 32, 4, 1, None, 128),
    (16, "bfloat16", "native"): _C(128, 64, 8, 2),
    (32, "bfloat16", "native"): _C(128, 64, 8, 2),
    (64, "bfloat16", "native"): _C(128, 64, 8, 2),
    (128, "bfloat16", "native"): _C(128, 64, 8, 2),
    (256, "bfloat16", "native"): _C(64, 32, 4, 2),
    ("wide", "bfloat16", "native"): _C(64, 32, 4, 2, None, 128),
    (16, "float16", "native"): _C(128, 64, 8, 2),
    (32, "float16", "native"): _C(128, 64, 8, 2),
    (64, "float16", "native"): _C(128, 64, 8, 2),
    (128, "float16", "native"): _C(128, 64, 8, 2),
    (256, "float16", "native"): _C(64, 32, 4, 2),
    ("wide", "float16", "native"): _C(64, 32, 4, 2, None, 128),
}

#: Tile shapes (BLOCK_M, BLOCK_N) under Triton's CPU interpreter (tests change it).
INTERPRET_BLOCKS = (16, 16)
#: Whether the interpreter applies the table's K_CHUNK. Off by default: the chunked S product
#: is the same code as wide D (tested with MAX_BLOCK_D lowered), and 16-wide pieces multiply
#: the interpreter's per-operation cost; tests switch it on for the float32 "ieee" path.
INTERPRET_K_CHUNK = False


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def d_bucket(d: int):
    return "wide" if d > fwd.MAX_BLOCK_D else fwd.block_d(d)


#: The soft threshold's widest column tile. Its backward keeps, per element, a membership and
#: its complement for two rows, and per column five factors (16 registers each in a 64-wide
#: wgmma tile): with 128x64 tiles the bf16 D = 64 backward needs 255 registers and spills 256
#: bytes per thread; with 128x32, 222 registers and no spill (compile_check, sm_90). Both
#: passes of a call use the same configuration.
SOFT_MAX_BLOCK_N = 32
#: Soft-threshold entries where that rule still spilled (backward, labels and stats on, triton
#: 3.9, sm_90: bf16 D 256 at 64x32 240 B, tf32 D 128 20 B, "ieee" D 128 148 B, "3xtf32" D 128 /
#: 256 64 B, bf16 wide 156 B): the spill-free candidate with the fewest backward instructions
#: per element (bf16 D 256: 93.6 at 32x32; tf32 D 128: 87.0 at 64x16; "ieee" D 128: 206;
#: "3xtf32" D 128-320: 92.3; bf16 wide: 73.8).
SOFT_TABLE: dict[tuple, LaunchConfig] = {
    (256, "bfloat16", "native"): _C(32, 32, 4, 2),
    (256, "float16", "native"): _C(32, 32, 4, 2),
    ("wide", "bfloat16", "native"): _C(64, 16, 4, 2, None, 128),
    ("wide", "float16", "native"): _C(64, 16, 4, 2, None, 128),
    (128, "float32", "tf32"): _C(64, 16, 4, 2),
    (128, "float32", "ieee"): _C(64, 16, 4, 1, 16),
    (128, "float32", "3xtf32"): _C(64, 16, 4, 2, None, 64),
    (256, "float32", "3xtf32"): _C(64, 16, 4, 2, 64, 64),
    ("wide", "float32", "3xtf32"): _C(64, 16, 4, 2, 64, 64),
}


def lookup(d: int, dtype: torch.dtype, path: str, table: dict | None = None, *, soft: bool = False) -> LaunchConfig:
    """The configuration for rows of width ``d`` (the interpreter's small tiles under
    TRITON_INTERPRET=1); ``soft``: for the soft threshold (BLOCK_N at most SOFT_MAX_BLOCK_N)."""
    key = (d_bucket(d), dtype_name(dtype), path)
    cfg = (TABLE if table is None else table)[key]
    if soft and table is None and key in SOFT_TABLE:
        cfg = SOFT_TABLE[key]
    elif soft and cfg.block_n > SOFT_MAX_BLOCK_N:
        cfg = LaunchConfig(cfg.block_m, SOFT_MAX_BLOCK_N, cfg.num_warps, cfg.num_stages, cfg.k_chunk, cfg.d_chunk)
    if fwd.INTERPRET:
        m, n = INTERPRET_BLOCKS
        cfg = LaunchConfig(m, n, 4, 1, cfg.k_chunk if INTERPRET_K_CHUNK else None,
                           cfg.d_chunk if INTERPRET_K_CHUNK else None)
    return cfg


@dataclass(frozen=True)
class Shape:
    """The compile-time shape of one call: what every launch of its kernels shares."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    block_d: int  # width of a row chunk (the backward's output chunk)
    k_chunk: int  # width of a piece of the S product
    one_chunk: bool  # all of D in one product (Zs_I held on chip)
    split_d: bool  # the backward splits its output over BLOCK_D chunks (grid axis 1)


def shape_for(d: int, cfg: LaunchConfig) -> Shape:
    bd = fwd.block_d(d) if cfg.d_chunk is None else min(fwd.block_d(d), cfg.d_chunk)
    kc = bd if cfg.k_chunk is None else min(cfg.k_chunk, bd)
    return Shape(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, bd, kc,
                 one_chunk=kc >= d, split_d=bd < d)
