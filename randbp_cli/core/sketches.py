"""The sketches, and the registry they are found in by name (`get_sketch`, `SKETCHES`).

What a sketch is and does (compress, compress_grad, transpose, variance) is sketch.py's `Sketch`;
the row-sampling sketches (CRS, WTA-CRS) are in row_sampling.py. Here: the dense (Gaussian,
Rademacher), hashing (countsketch, balanced) and structured (SRHT) sketches.

Seeds: `draw_seed(device)` draws one per sketched input from torch's RNG, as an int64 tensor,
so `torch.manual_seed` reproduces a run; ops.py draws it inside the same custom op that
compresses (so a compiled graph can never draw a second one for the backward). The balanced
sketch (the default) derives S from a counter-based hash of the seed (`balanced.py`): its seed
is drawn on the input's device — CUDA graphs then replay with a fresh seed — and all 64 bits of
it matter (`graph_safe`). The other sketches build S in the input's dtype and on its device from
a `torch.Generator` seeded with the seed's value, drawn on the CPU (reading it costs no device
synchronisation); a CPU generator uses only the low 32 bits of its seed (a CUDA one all 64), so
on a CPU two calls share S with probability 2⁻³² rather than 2⁻⁶².

`variance(x, y, k)` is the closed form of E‖Ĝ − G‖²_F for G = xᵀy (docs/method.md §2): what
`randbp variance` compares against the Monte-Carlo measurement.
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch
from torch import Tensor

from ..errors import ConfigError
from ..kernels import balanced, balanced_triton
from .row_sampling import CRSSketch, WTACRSSketch
# the interface and what every sketch shares (sketch.py), importable from here too
from .sketch import DEFAULT_SKETCH, Sketch, _frobenius_terms, _generator, check_rho, draw_seed, sketch_rows

__all__ = ["DATA_DEPENDENT", "DEFAULT_SKETCH", "SKETCHES", "BalancedSketch", "CRSSketch", "CountSketch",
           "GaussianSketch", "RademacherSketch", "SRHTSketch", "Sketch", "WTACRSSketch", "check_rho", "draw_seed",
           "get_sketch", "sketch_matrix", "sketch_names", "sketch_rows"]

# NOTE: a dense sketch of N = 16k tokens at k = 8k would be a 512 MiB matrix; we generate it
# in row blocks of at most this many elements, so the transient cost stays bounded (16 MiB in
# fp32) whatever N is. Forward and backward use the same blocks, hence the same S.
DENSE_BLOCK_ELEMENTS = 1 << 22


class _DenseSketch(Sketch):
    """S with i.i.d. entries of variance 1/k, generated block by block (O(k·N·d))."""

    @abstractmethod
    def _draw(self, shape: tuple[int, int], gen: torch.Generator, like: Tensor) -> Tensor:
        """Unscaled i.i.d. entries of unit variance, in `like`'s dtype and device."""

    def _apply(self, a: Tensor, k: int, seed: int) -> Tensor:
        n, d = a.shape
        gen = _generator(a.device, seed)
        out = None
        block = max(1, DENSE_BLOCK_ELEMENTS // max(k, 1))
        for start in range(0, max(n, 1), block):
            rows = a[start : start + block]
            s = self._draw((rows.shape[0], k), gen, a)  # (rows, k), unscaled
            out = s.T.mm(rows) if out is None else out.addmm_(s.T, rows)
        # scale once on the small result instead of on every S block
        return out.mul_(1.0 / math.sqrt(k))

    def compress(self, x: Tensor, k: int, seed: int) -> tuple[Tensor, ...]:
        return (self._apply(x, k, seed),)

    def compress_grad(self, y: Tensor, k: int, seed: int, saved: tuple[Tensor, ...]) -> Tensor:
        return self._apply(y, k, seed)

    def transpose(self, g: Tensor, n_rows: int, seed: int, saved: tuple[Tensor, ...]) -> Tensor:
        k = g.shape[0]
        gen = _generator(g.device, seed)
        block = max(1, DENSE_BLOCK_ELEMENTS // max(k, 1))
        parts = [self._draw((min(block, n_rows - start), k), gen, g).mm(g) for start in range(0, n_rows, block)]
        return torch.cat(parts).mul_(1.0 / math.sqrt(k)) if parts else g.new_zeros(0, g.shape[1])


class GaussianSketch(_DenseSketch):
    name = "gaussian"
    cost = "O(k·N·d)"
    description = "i.i.d. N(0, 1/k) entries (the paper's default)"

    def _draw(self, shape, gen, like):
        return torch.randn(shape, generator=gen, device=like.device, dtype=like.dtype)

    def variance(self, x, y, k):
        xy, grad, _ = _frobenius_terms(x, y)
        return (xy + grad) / k


class RademacherSketch(_DenseSketch):
    name = "rademacher"
    cost = "O(k·N·d)"
    description = "i.i.d. ±1/√k entries"

    def _draw(self, shape, gen, like):
        s = torch.empty(shape, device=like.device, dtype=like.dtype)
        return s.bernoulli_(0.5, generator=gen).mul_(2).sub_(1)

    def variance(self, x, y, k):
        xy, grad, diag = _frobenius_terms(x, y)
        return (xy + grad - 2 * diag) / k


class CountSketch(Sketch):
    """Sparse sign sketch: row i of S has a single ±1 in a uniformly random column h(i).

    (S Sᵀ)ᵢⱼ = sᵢsⱼ[h(i) = h(j)]: the diagonal is exactly 1 and the off-diagonal has mean 0,
    so E[S Sᵀ] = I. Applying it is a signed scatter-add of rows, linear in N.
    """

    name = "countsketch"
    cost = "O(N·d)"
    description = "one random ±1 per token row (sparse sign), linear cost"

    @staticmethod
    def _buckets(n: int, k: int, seed: int, device: torch.device) -> Tensor:
        """h(i) + k·[sᵢ = −1]: the bucket and the sign of every row folded into one index."""
        gen = _generator(device, seed)
        bucket = torch.randint(0, k, (n,), generator=gen, device=device)
        # NOTE: int64 Bernoulli draws and an in-place add with alpha: 3 kernels instead of 5 (each
        # launch counts on a GPU), the same numbers as float draws converted afterwards.
        negative = torch.empty(n, dtype=torch.int64, device=device).bernoulli_(0.5, generator=gen)
        return bucket.add_(negative, alpha=k)

    def _apply(self, a: Tensor, k: int, seed: int) -> Tensor:
        # NOTE: scatter-adding rows into 2k buckets (positive and negative signs apart) and
        # subtracting the halves avoids materialising the signed copy a·s (N × d), which on a
        # CPU cost several times more than the scatter itself.
        index = self._buckets(a.shape[0], k, seed, a.device)
        halves = a.new_zeros(2 * k, a.shape[1]).index_add_(0, index, a)
        return halves[:k] - halves[k:]

    def compress(self, x, k, seed):
        return (self._apply(x, k, seed),)

    def compress_grad(self, y, k, seed, saved):
        return self._apply(y, k, seed)

    def transpose(self, g, n_rows, seed, saved):
        index = self._buckets(n_rows, g.shape[0], seed, g.device)
        return torch.cat([g, -g]).index_select(0, index)  # row i: sᵢ · g_{h(i)}

    def variance(self, x, y, k):
        xy, grad, diag = _frobenius_terms(x, y)
        return (xy + grad - 2 * diag) / k


class BalancedSketch(Sketch):
    """Countsketch with balanced buckets: a seeded permutation lays the N rows out in a line cut
    into k groups of ⌊N/k⌋ or ⌈N/k⌉, one bucket per group, and a random sign per row
    (`balanced.py` has the construction and the proof that E[S Sᵀ] = I).

    Two rows share a bucket with probability q = Σⱼ nⱼ(nⱼ − 1)/(N(N − 1)) — (N/k − 1)/(N − 1)
    when k divides N, below countsketch's 1/k — so the variance is countsketch's times q·k,
    and zero at k = N. S comes from a hash of (seed, index): one fused kernel on CUDA (no
    atomics: bit-reproducible), the torch reference elsewhere, the same S on every device.
    """

    name = "balanced"
    cost = "O(N·d)"
    description = "countsketch with balanced buckets (⌊N/k⌋ or ⌈N/k⌉ rows each); one fused kernel on CUDA"

    # the seed lives on the input's device: a CUDA graph replays its draw, so every replay
    # sketches with a fresh seed (a host int would be baked in: the same S forever)
    graph_safe = True

    @staticmethod
    def _sketch(a: Tensor, k: int, seed) -> Tensor:
        if balanced_triton.runs_on(a):  # the fused kernel reads the seed from device memory
            seed = seed if isinstance(seed, Tensor) else torch.tensor(seed, dtype=torch.int64, device=a.device)
            return balanced_triton.sketch(a, k, seed)
        return balanced.sketch_reference(a, k, int(seed))  # free on a CPU; a sync on a GPU without Triton

    def compress(self, x, k, seed):
        return (self._sketch(x, k, seed),)

    def compress_grad(self, y, k, seed, saved):
        return self._sketch(y, k, seed)

    def transpose(self, g, n_rows, seed, saved):
        return balanced.unsketch_reference(g, n_rows, int(seed))

    @staticmethod
    def collision_probability(n_rows: int, k: int) -> float:
        """q: the probability that two given rows share a bucket."""
        if n_rows <= 1:
            return 0.0
        size, big = divmod(n_rows, k)
        return (big * (size + 1) * size + (k - big) * size * (size - 1)) / (n_rows * (n_rows - 1))

    def variance(self, x, y, k):
        n_rows = x.reshape(-1, x.shape[-1]).shape[0]
        xy, grad, diag = _frobenius_terms(x, y)
        return self.collision_probability(n_rows, k) * (xy + grad - 2 * diag)


def _hadamard_rows(a: Tensor) -> Tensor:
    """H·a for the orthonormal Walsh–Hadamard H of order n = len(a) (a power of two), O(n·d·log n)."""
    n, d = a.shape
    h = 1
    while h < n:
        pairs = a.view(n // (2 * h), 2, h, d)
        a = torch.stack((pairs[:, 0] + pairs[:, 1], pairs[:, 0] - pairs[:, 1]), dim=1).view(n, d)
        h *= 2
    return a.mul_(1.0 / math.sqrt(n))


class SRHTSketch(Sketch):
    """Subsampled randomized Hadamard transform: Sᵀ = √(n/k) · R · H · D.

    D flips the sign of each token row at random, H is the orthonormal Walsh–Hadamard transform
    along tokens (rows zero-padded to n, the next power of two), and R keeps k of the n
    transformed rows, uniformly without replacement. E[RᵀR] = (k/n)·I, so E[S Sᵀ] = D Hᵀ H D = I.
    The scale is √(n/k) — the reference implementation's DCT was k² off here (docs/method.md §4.5).
    Cost O(N·d·log N).
    """

    name = "srht"
    cost = "O(N·d·log N)"
    description = "random signs, Walsh–Hadamard transform along tokens, k rows kept"

    @staticmethod
    def _padded(n: int) -> int:
        return 1 << max(0, (n - 1).bit_length())

    def _signs_and_rows(self, n_rows: int, k: int, seed: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """D's diagonal (n_rows × 1) and R's kept rows, drawn in this order from the seed."""
        gen = _generator(like.device, seed)
        signs = torch.empty(n_rows, 1, device=like.device, dtype=like.dtype).bernoulli_(0.5, generator=gen)
        keep = torch.randperm(self._padded(n_rows), generator=gen, device=like.device)[:k]
        return signs.mul_(2).sub_(1), keep

    def _apply(self, a: Tensor, k: int, seed: int) -> Tensor:
        n_rows, d = a.shape
        n = self._padded(n_rows)
        signs, keep = self._signs_and_rows(n_rows, k, seed, a)
        padded = a.new_zeros(n, d)
        padded[:n_rows] = a * signs
        return _hadamard_rows(padded)[keep].mul_(math.sqrt(n / k))

    def compress(self, x, k, seed):
        return (self._apply(x, k, seed),)

    def compress_grad(self, y, k, seed, saved):
        return self._apply(y, k, seed)

    def transpose(self, g, n_rows, seed, saved):
        # S = √(n/k) · D · H · Rᵀ (H is symmetric): scatter g to the kept rows, transform, sign
        k, d = g.shape
        n = self._padded(n_rows)
        signs, keep = self._signs_and_rows(n_rows, k, seed, g)
        spread = g.new_zeros(n, d).index_copy(0, keep, g * math.sqrt(n / k))
        return _hadamard_rows(spread)[:n_rows] * signs

    def variance(self, x, y, k):
        # Every |Hⱼᵢ|² = 1/n, so averaging over the signs D gives the Rademacher terms; sampling k
        # of n rows without replacement adds the finite-population factor (n − k)/(n − 1).
        n = self._padded(x.reshape(-1, x.shape[-1]).shape[0])
        if n <= 1:
            return 0.0
        xy, grad, diag = _frobenius_terms(x, y)
        return (n - k) / ((n - 1) * k) * (xy + grad - 2 * diag)


SKETCHES: dict[str, type[Sketch]] = {
    cls.name: cls for cls in (BalancedSketch, GaussianSketch, RademacherSketch, CountSketch, SRHTSketch, CRSSketch,
                              WTACRSSketch)
}


def sketch_names() -> list[str]:
    return list(SKETCHES)


_INSTANCES = {name: cls() for name, cls in SKETCHES.items()}  # sketches hold no state: one each


def _register(sketch: Sketch) -> Sketch:
    """Make a user's own Sketch instance findable by its name, as randbp's ops look sketches up.

    A custom sketch needs a name of its own: one that is a built-in's, or another class's already,
    would run the other code wherever the name is looked up."""
    name = sketch.name
    known = _INSTANCES.get(name)
    if known is sketch:
        return sketch
    if not name or (known is not None and type(known) is not type(sketch)):
        taken = f"'{name}' is {type(known).__name__}'s" if known is not None else "it is empty"
        raise ConfigError(f"a custom Sketch ({type(sketch).__name__}) needs a name of its own: {taken}")
    _INSTANCES[name] = sketch
    return sketch


def get_sketch(sketch: str | Sketch) -> Sketch:
    """A sketch by name, or an instance (a custom one is registered under its name)."""
    if isinstance(sketch, Sketch):
        return _register(sketch)
    try:
        return _INSTANCES[str(sketch).lower()]
    except KeyError:
        raise ConfigError(
            f"unknown sketch {sketch!r}: choose one of {', '.join(SKETCHES)}"
        ) from None


DATA_DEPENDENT = ("crs", "wta-crs")  # S depends on X (row norms): no fixed matrix per seed


def sketch_matrix(sketch: str | Sketch, n_rows: int, k: int, seed: int,
                  dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> Tensor:
    """The explicit S (N × k) a data-independent sketch uses for `seed`: Sᵀ applied to I."""
    eye = torch.eye(n_rows, dtype=dtype, device=device)
    return get_sketch(sketch).compress(eye, k, seed)[0].T
