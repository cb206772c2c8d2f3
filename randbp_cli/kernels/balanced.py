"""The balanced sparse-sign sketch: one S from (seed, row index), the same on every device.

S ∈ R^{N×k} has one nonzero per row: row i holds sᵢ = ±1 in column b(i). The columns
("buckets") are balanced: a seeded pseudo-random permutation σ lays the N rows out in a
line, and the line is cut into k consecutive groups of ⌊N/k⌋ or ⌈N/k⌉ positions (position
p is in group ⌊p·k/N⌋), so bucket j receives the rows σ(p) for the positions p of group j. Then (Sᵀa)ⱼ = Σ_{p ∈ group j} s_{σ(p)} · a_{σ(p)}.

Why this sketch (docs/method.md §2):
  * E[S Sᵀ] = I: (S Sᵀ)ᵢᵢ = sᵢ² = 1, and (S Sᵀ)ᵢⱼ = sᵢsⱼ[b(i) = b(j)] has mean 0 because
    the signs are independent of the buckets and of each other.
  * Two rows share a bucket with probability q = Σⱼ nⱼ(nⱼ − 1) / (N(N − 1)) (nⱼ the group
    sizes), which is (N/k − 1)/(N − 1) when k divides N — less than countsketch's 1/k, so
    less variance: E‖Ĝ − G‖² = q·(‖X‖²‖Y‖² + ‖XᵀY‖² − 2Σᵢ‖xᵢ‖²‖yᵢ‖²). At k = N it is exact.
  * Every output row is owned by one group, so a GPU kernel needs no atomics: results do
    not depend on scheduling, and a seed reproduces a run bit for bit.
  * σ, b and s come from a counter-based hash of (seed, index): no S, no index or sign
    tensor has to exist in memory, and no generator object is built per call.

The hash: `_mix32` is a 32-bit integer finaliser (two multiply-xorshift rounds, constants
below 2³¹ so that every product of a 32-bit value fits in a signed int64: the same integer
arithmetic runs in torch on any device and in the Triton kernel). σ is an 8-round Feistel
network F on 2h-bit integers (N ≤ 2^2h < 4N, round functions keyed from the seed)
restricted to [0, N) by cycle walking: σ(p) is the first of F(p), F(F(p)), ... below N,
which exists because the cycle of F through p < N contains p.

This module is the reference implementation and the CPU path; `balanced_triton.py` is the
fused GPU kernel, and tests hold one to the other (exactly on buckets and signs).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
_MUL1, _MUL2 = 0x21F0AAAD, 0x735A2D97  # hash-prospector constants, both < 2**31
_GOLDEN = 0x9E3779B9
_SALT = 0x243F6A88
ROUNDS = 8  # 4 rounds left small-N pair-collision rates up to 1.6× off; 8 match to Monte-Carlo error
MAX_ROWS = 1 << 31  # row indices and positions stay below 2³¹ (2h ≤ 32 bits)


def mix32(x):
    """A bijective 32-bit integer hash of x ∈ [0, 2³²); works on ints and int64 tensors alike."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & MASK32
    return x ^ (x >> 15)


def seed_keys(seed: int) -> tuple[int, ...]:
    """The ROUNDS Feistel round keys and the sign key, derived from a 64-bit seed (all 64 bits used)."""
    lo, hi = seed & MASK32, (seed >> 32) & MASK32
    base = mix32(lo ^ mix32(hi ^ _SALT))
    return tuple(mix32((base + (r + 1) * _GOLDEN) & MASK32) for r in range(ROUNDS + 1))


def half_bits(n_rows: int) -> int:
    """h such that the Feistel domain 2^(2h) covers [0, N) with 2^(2h) < 4N."""
    return (max(1, (n_rows - 1).bit_length()) + 1) // 2


def _feistel(x: Tensor, keys: tuple[int, ...], h: int) -> Tensor:
    """F(x) for x = arange(2^2h): ROUNDS rounds of (L, R) -> (R, L ^ f_r(R)), f_r(v) = mix32(v ^ key_r) mod 2^h.

    NOTE: f_r only ever sees h-bit values, so it is tabulated once per call (ROUNDS × 2^h
    entries, 2^h ≤ 2√(4N)) and each round is a gather: ~3 ops per round on x instead of ~10.
    The Triton kernel computes f_r directly; the numbers are the same.
    """
    mask = (1 << h) - 1
    values = x[: 1 << h]  # x is arange(2^2h) here: its first 2^h values are 0 .. 2^h − 1
    round_keys = torch.tensor(keys[:ROUNDS], dtype=torch.int64, device=x.device)
    tables = mix32(values[None, :] ^ round_keys[:, None]) & mask  # (ROUNDS, 2^h)
    left, right = x >> h, x & mask
    for table in tables.unbind(0):
        left, right = right, left ^ table.index_select(0, right)
    return (left << h) | right


def permuted_rows(n_rows: int, keys: tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
    """σ(p) for every position p ∈ [0, N): which row sits at each position of the line."""
    h = half_bits(n_rows)
    jump = _feistel(torch.arange(1 << (2 * h), dtype=torch.int64, device=device), keys, h)
    # Cycle walking by pointer doubling: while jump(x) ≥ N, replace it by jump(jump(x)); each
    # pass doubles how many out-of-range values a jump can skip, so a few passes reach every σ(p).
    while bool((jump[:n_rows] >= n_rows).any()):
        jump = torch.where(jump >= n_rows, jump[jump], jump)
    return jump[:n_rows]


def line_layout(n_rows: int, k: int, seed: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """(σ(p), fold(p)) for every position p: the row at p, and where it goes, b + k·[s = −1].

    Position p belongs to bucket ⌊p·k/N⌋, so bucket j holds positions [⌈jN/k⌉, ⌈(j+1)N/k⌉):
    ⌊N/k⌋ or ⌈N/k⌉ of them. The sign of the row at p is the top bit of mix32(p ^ key): a sign
    per position is a sign per row, as σ is a bijection, and it is independent of the bucket.
    """
    check_shape(n_rows, k)
    keys = seed_keys(seed)
    if torch.device(device).type == "cpu":
        return _line_layout_numpy(n_rows, k, keys)
    rows = permuted_rows(n_rows, keys, device)
    positions = torch.arange(n_rows, dtype=torch.int64, device=device)
    negative = mix32(positions ^ keys[ROUNDS]) >> 31
    return rows, positions.mul_(k).floor_divide_(n_rows).add_(negative, alpha=k)


def _line_layout_numpy(n_rows: int, k: int, keys: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """`line_layout` on the CPU, the same integers through NumPy.

    NOTE: the layout is ~40 operations on small integer arrays; a torch op's dispatch on a CPU costs
    several times a NumPy one's, and the arrays that depend only on N and k are made once
    (`_domain`, `_groups`): a call then takes a fraction of the torch path's time (the test in
    tests/kernels/test_balanced.py holds the two equal). It matters where many small layers each
    sketch: LoRA's adapters make hundreds of calls a step.
    """
    h = half_bits(n_rows)
    values, left, right = _domain(h)
    tables = mix32(values[None, :] ^ np.asarray(keys[:ROUNDS], dtype=np.int64)[:, None]) & ((1 << h) - 1)
    for table in tables:
        left, right = right, left ^ table[right]
    jump = (left << h) | right
    while (jump[:n_rows] >= n_rows).any():  # cycle walking by pointer doubling, as permuted_rows
        jump = np.where(jump >= n_rows, jump[jump], jump)
    positions, group = _groups(n_rows, k)
    negative = mix32(positions ^ keys[ROUNDS]) >> 31
    return torch.from_numpy(jump[:n_rows].copy()), torch.from_numpy(group + negative * k)


@functools.lru_cache(maxsize=64)
def _domain(h: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 2^h round-function inputs, and the halves (L, R) of every x in [0, 2^2h): no seed in them."""
    x = np.arange(1 << (2 * h), dtype=np.int64)
    return x[: 1 << h], x >> h, x & ((1 << h) - 1)


@functools.lru_cache(maxsize=64)
def _groups(n_rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every position p and its group ⌊p·k/N⌋: no seed in them."""
    positions = np.arange(n_rows, dtype=np.int64)
    return positions, positions * k // n_rows


def buckets_and_signs(n_rows: int, k: int, seed: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """(b(i), sᵢ ∈ {−1, +1} as int8) for every row i: the whole of S, for tests and `sketch_matrix`."""
    rows, fold = line_layout(n_rows, k, seed, device)
    bucket = torch.empty_like(fold).scatter_(0, rows, fold)
    negative = bucket >= k
    return bucket - k * negative, (1 - 2 * negative).to(torch.int8)


def check_shape(n_rows: int, k: int) -> None:
    if not 1 <= k <= n_rows < MAX_ROWS:
        raise ValueError(f"balanced sketch needs 1 <= k <= N < 2**31 (got N={n_rows}, k={k})")


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def sketch_reference(a: Tensor, k: int, seed: int) -> Tensor:
    """Sᵀa (k × d) for a (N × d), accumulated in float32 (float64 for float64), in a's dtype."""
    rows, fold = line_layout(a.shape[0], k, seed, a.device)
    # NOTE: scatter-add into 2k buckets (negative signs in the upper half) and subtract the
    # halves: no signed copy of a (N × d) is ever made, only the k-row result.
    index = torch.empty_like(fold).scatter_(0, rows, fold)
    acc = _accumulation_dtype(a.dtype)
    halves = torch.zeros(2 * k, a.shape[1], dtype=acc, device=a.device).index_add_(0, index, a.to(acc))
    return (halves[:k] - halves[k:]).to(a.dtype)


def unsketch_reference(g: Tensor, n_rows: int, seed: int) -> Tensor:
    """S g (N × d) for g (k × d): row i is sᵢ · g_{b(i)}. The transpose of `sketch_reference`."""
    bucket, signs = buckets_and_signs(n_rows, g.shape[0], seed, g.device)
    return g.index_select(0, bucket) * signs.to(g.dtype)[:, None]
