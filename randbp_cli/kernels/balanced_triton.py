"""The fused balanced-sketch kernel: Sᵀa in one launch, with S derived inside the kernel.

One program owns BLOCK_K buckets × BLOCK_D columns of the result. For each of its buckets
it walks the bucket's positions p (⌈jN/k⌉ ≤ p < ⌈(j+1)N/k⌉), computes the row σ(p) and the
sign from (seed, p) with the same integer hash as `balanced.py` (the reference), loads that
row's BLOCK_D values, and accumulates ±row in float32 (float64 for float64 inputs). Each
output row is written by exactly one program: no atomics, so the result does not depend on
scheduling. The seed is read from a device tensor, so a CUDA graph replays with whatever
seed the graph's RNG op wrote this time. No S, bucket or sign tensor ever exists in memory.

Triton is optional: without it (or without a GPU) the reference runs instead. With
TRITON_INTERPRET=1 set before this module is imported, the kernel also runs on CPU tensors
(slowly): `sketch` can be called directly, and inside `kernel_on_cpu()` the layers use it on
a CPU too. That is how CI tests the kernel and how `benchmarks/layer_overhead.py` counts the
fused path's ops on a CPU.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from torch import Tensor

from .balanced import ROUNDS, check_shape, half_bits

try:  # shipped with torch's CUDA builds; optional on CPU-only machines
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

_ON_CPU = False


def available() -> bool:
    return triton is not None


def interpreted() -> bool:
    """Triton's interpreter runs kernels on CPU tensors (slowly): used by the tests."""
    return triton is not None and os.environ.get("TRITON_INTERPRET") == "1"


@contextmanager
def kernel_on_cpu():
    """Route CPU tensors through the (interpreted) kernel instead of the reference."""
    global _ON_CPU
    if not interpreted():
        raise RuntimeError("the kernel runs on a CPU only under Triton's interpreter: set TRITON_INTERPRET=1 "
                           "before importing randbp_cli (and install triton)")
    previous, _ON_CPU = _ON_CPU, True
    try:
        yield
    finally:
        _ON_CPU = previous


def runs_on(a: Tensor) -> bool:
    """Whether the layers use the kernel for `a`: on CUDA with Triton, or inside `kernel_on_cpu()`."""
    return triton is not None and (a.is_cuda or (_ON_CPU and a.device.type == "cpu"))


if triton is not None:

    @triton.jit
    def _mix32(x):
        # the same bijective finaliser as balanced.mix32, in int64 lanes (products < 2**63)
        x = x ^ (x >> 16)
        x = (x * 0x21F0AAAD) & 0xFFFFFFFF
        x = x ^ (x >> 15)
        x = (x * 0x735A2D97) & 0xFFFFFFFF
        return x ^ (x >> 15)

    @triton.jit
    def _round_key(base, r):
        return _mix32((base + (r + 1) * 0x9E3779B9) & 0xFFFFFFFF)

    @triton.jit
    def _feistel(x, base, h, mask, ROUNDS_: tl.constexpr):
        left = x >> h
        right = x & mask
        for r in tl.static_range(ROUNDS_):
            mixed = left ^ (_mix32(right ^ _round_key(base, r)) & mask)
            left = right
            right = mixed
        return (left << h) | right

    @triton.jit
    def _balanced_sketch_kernel(a_ptr, out_ptr, seed_ptr, n_rows, n_cols, k, h, stride_a, stride_out,
                                max_group, ROUNDS_: tl.constexpr, BLOCK_K: tl.constexpr,
                                BLOCK_D: tl.constexpr, ACC: tl.constexpr):
        bucket = (tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        live = bucket < k
        col_ok = cols < n_cols
        start = (bucket * n_rows + k - 1) // k  # ⌈jN/k⌉: bucket j's first position
        end = ((bucket + 1) * n_rows + k - 1) // k
        seed = tl.load(seed_ptr)
        base = _mix32((seed & 0xFFFFFFFF) ^ _mix32(((seed >> 32) & 0xFFFFFFFF) ^ 0x243F6A88))
        sign_key = _round_key(base, ROUNDS_)
        mask = (1 << h) - 1
        acc = tl.zeros((BLOCK_K, BLOCK_D), dtype=ACC)
        for t in range(0, max_group):
            pos = start + t
            valid = live & (pos < end)
            pos = tl.where(valid, pos, 0)  # idle lanes walk from 0, which always ends
            row = _feistel(pos, base, h, mask, ROUNDS_)
            outside = row >= n_rows
            while tl.max(outside.to(tl.int32), axis=0) > 0:  # cycle walking into [0, N)
                row = tl.where(outside, _feistel(row, base, h, mask, ROUNDS_), row)
                outside = row >= n_rows
            negative = (_mix32(pos ^ sign_key) >> 31).to(ACC)
            values = tl.load(a_ptr + row[:, None] * stride_a + cols[None, :],
                             mask=valid[:, None] & col_ok[None, :], other=0.0).to(ACC)
            acc += values * (1.0 - 2.0 * negative)[:, None]
        tl.store(out_ptr + bucket[:, None] * stride_out + cols[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=live[:, None] & col_ok[None, :])


def _block_sizes(n_cols: int) -> tuple[int, int]:
    block_d = min(128, max(16, triton.next_power_of_2(n_cols)))
    return 32 if block_d <= 64 else 16, block_d


_TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def compile_ahead(capability: int, dtype: torch.dtype, n_cols: int = 768):
    """Compile the kernel `sketch` launches for rows of `n_cols` in `dtype`, ahead of time, for a
    CUDA device of compute capability `capability` (80: A100, 90: H100): no GPU needed, so CI
    catches a kernel that would not build. Returns Triton's compiled kernel (ptx, cubin). Needs
    Triton compiling, not interpreting (TRITON_INTERPRET unset when this module was imported)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointer = f"*{_TRITON_TYPES[dtype]}"
    scalars = ("n_rows", "n_cols", "k", "h", "stride_a", "stride_out", "max_group")
    block_k, block_d = _block_sizes(n_cols)
    source = ASTSource(
        fn=_balanced_sketch_kernel,
        signature={"a_ptr": pointer, "out_ptr": pointer, "seed_ptr": "*i64", **dict.fromkeys(scalars, "i32"),
                   **dict.fromkeys(("ROUNDS_", "BLOCK_K", "BLOCK_D", "ACC"), "constexpr")},
        constexprs={"ROUNDS_": ROUNDS, "BLOCK_K": block_k, "BLOCK_D": block_d, "ACC": _accumulator(dtype)})
    return triton.compile(source, target=GPUTarget("cuda", capability, 32))


def _accumulator(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def sketch(a: Tensor, k: int, seed: Tensor) -> Tensor:
    """Sᵀa (k × d) for a (N × d) in one kernel; `seed` is a one-element int64 tensor on a's device."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    n_rows, n_cols = a.shape
    check_shape(n_rows, k)
    if a.stride(1) != 1:
        a = a.contiguous()
    out = torch.empty(k, n_cols, dtype=a.dtype, device=a.device)
    block_k, block_d = _block_sizes(n_cols)
    grid = (triton.cdiv(k, block_k), triton.cdiv(n_cols, block_d))
    _balanced_sketch_kernel[grid](a, out, seed, n_rows, n_cols, k, half_bits(n_rows), a.stride(0), out.stride(0),
                                  -(-n_rows // k), ROUNDS_=ROUNDS, BLOCK_K=block_k, BLOCK_D=block_d,
                                  ACC=_accumulator(a.dtype))
    return out

