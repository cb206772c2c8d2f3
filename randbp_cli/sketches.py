"""Random sketches S ∈ R^{N×k} along the token dimension, with E[S Sᵀ] = I (METHOD §2).

A sketch is never stored. The forward pass calls `compress(x, k, seed)` and keeps what it
returns (the first tensor is always Sᵀx, k × d_in); the backward pass calls
`compress_grad(y, k, seed, saved)` to apply the very same S to the incoming gradient, by
regenerating it from the seed (or, for data-dependent sketches, from the saved indices).
Then `(Sᵀy)ᵀ(Sᵀx) = yᵀ S Sᵀ x` is an unbiased estimate of the weight gradient `yᵀx`.

S is built in the input's dtype and on its device from a `torch.Generator` seeded with the
per-call seed, so the same seed gives the same S in forward and backward, on any device.

`variance(x, y, k)` is the closed form of E‖Ĝ − G‖²_F for G = xᵀy (METHOD §2): what
`randbp variance` compares against the Monte-Carlo measurement.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

from .errors import ConfigError

# NOTE: a dense sketch of N = 16k tokens at k = 8k would be a 512 MiB matrix; we generate it
# in row blocks of at most this many elements, so the transient cost stays bounded (16 MiB in
# fp32) whatever N is. Forward and backward use the same blocks, hence the same S.
DENSE_BLOCK_ELEMENTS = 1 << 22


def sketch_rows(n_rows: int, rho: float, min_rows: int = 1) -> int:
    """k = round(ρ·N), clamped to [min_rows, N] (METHOD §4.4: never 0, never above N)."""
    return max(0, min(n_rows, max(min_rows, round(rho * n_rows))))


def check_rho(rho: float) -> float:
    if not isinstance(rho, (int, float)) or isinstance(rho, bool) or not (0.0 < rho <= 1.0):
        raise ConfigError(
            f"rho must be in (0, 1] (got {rho!r}): it is the fraction of token rows kept, "
            "e.g. 0.5 or 0.1"
        )
    return float(rho)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _frobenius_terms(x: Tensor, y: Tensor) -> tuple[float, float, float]:
    """(‖X‖²‖Y‖², ‖XᵀY‖², Σᵢ‖xᵢ‖²‖yᵢ‖²) in float64."""
    x = x.reshape(-1, x.shape[-1]).double()
    y = y.reshape(-1, y.shape[-1]).double()
    row_x = x.square().sum(1)
    row_y = y.square().sum(1)
    xy = float(row_x.sum() * row_y.sum())
    grad = float((x.T @ y).square().sum())
    diag = float((row_x * row_y).sum())
    return xy, grad, diag


class Sketch(ABC):
    """Base class. Subclasses set `name`, `cost` and implement the three methods."""

    name: ClassVar[str] = ""
    cost: ClassVar[str] = ""  # shown in docs and `--help`
    description: ClassVar[str] = ""

    @abstractmethod
    def compress(self, x: Tensor, k: int, seed: int) -> tuple[Tensor, ...]:
        """x: (N, d). Returns the tensors to save for backward; element 0 is Sᵀx, (k, d)."""

    @abstractmethod
    def compress_grad(self, y: Tensor, k: int, seed: int, saved: tuple[Tensor, ...]) -> Tensor:
        """y: (N, d_out). Returns Sᵀy, (k, d_out), with the S used by `compress`."""

    @abstractmethod
    def variance(self, x: Tensor, y: Tensor, k: int) -> float:
        """Closed-form E‖yᵀSSᵀx − yᵀx‖²_F."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _DenseSketch(Sketch):
    """S with i.i.d. entries of variance 1/k, generated block by block (O(k·N·d))."""

    @abstractmethod
    def _draw(self, shape: tuple[int, int], gen: torch.Generator, like: Tensor) -> Tensor:
        """Unscaled i.i.d. entries of unit variance, in `like`'s dtype and device."""

    def _apply(self, a: Tensor, k: int, seed: int) -> Tensor:
        n, d = a.shape
        gen = _generator(a.device, seed)
        out = a.new_zeros(k, d)
        block = max(1, DENSE_BLOCK_ELEMENTS // max(k, 1))
        for start in range(0, n, block):
            rows = a[start : start + block]
            s = self._draw((rows.shape[0], k), gen, a)  # (rows, k), unscaled
            out.addmm_(s.T, rows)
        # scale once on the small result instead of on every S block
        return out.mul_(1.0 / math.sqrt(k))

    def compress(self, x: Tensor, k: int, seed: int) -> tuple[Tensor, ...]:
        return (self._apply(x, k, seed),)

    def compress_grad(self, y: Tensor, k: int, seed: int, saved: tuple[Tensor, ...]) -> Tensor:
        return self._apply(y, k, seed)


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
    def _hash(n: int, k: int, seed: int, like: Tensor) -> tuple[Tensor, Tensor]:
        gen = _generator(like.device, seed)
        bucket = torch.randint(0, k, (n,), generator=gen, device=like.device)
        sign = torch.empty(n, 1, device=like.device, dtype=like.dtype)
        sign.bernoulli_(0.5, generator=gen).mul_(2).sub_(1)
        return bucket, sign

    def _apply(self, a: Tensor, k: int, seed: int) -> Tensor:
        bucket, sign = self._hash(a.shape[0], k, seed, a)
        return a.new_zeros(k, a.shape[1]).index_add_(0, bucket, a * sign)

    def compress(self, x, k, seed):
        return (self._apply(x, k, seed),)

    def compress_grad(self, y, k, seed, saved):
        return self._apply(y, k, seed)

    def variance(self, x, y, k):
        xy, grad, diag = _frobenius_terms(x, y)
        return (xy + grad - 2 * diag) / k


SKETCHES: dict[str, type[Sketch]] = {
    cls.name: cls for cls in (GaussianSketch, RademacherSketch, CountSketch)
}


def sketch_names() -> list[str]:
    return list(SKETCHES)


def get_sketch(sketch: str | Sketch) -> Sketch:
    """A sketch by name (or pass an instance through)."""
    if isinstance(sketch, Sketch):
        return sketch
    try:
        return SKETCHES[str(sketch).lower()]()
    except KeyError:
        raise ConfigError(
            f"unknown sketch {sketch!r}: choose one of {', '.join(SKETCHES)}"
        ) from None


def sketch_matrix(sketch: str | Sketch, n_rows: int, k: int, seed: int,
                  dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> Tensor:
    """The explicit S (N × k) a data-independent sketch uses for `seed`: Sᵀ applied to I."""
    eye = torch.eye(n_rows, dtype=dtype, device=device)
    return get_sketch(sketch).compress(eye, k, seed)[0].T
