"""What every sketch is: the `Sketch` interface, the seed it is regenerated from, and k = ρ·N.

A sketch S ∈ R^{N×k} along the token dimension has E[S Sᵀ] = I (docs/method.md §2). It is never
stored: the forward keeps what `compress(x, k, seed)` returns (first Sᵀx, k × d_in), the backward
applies the very same S to the incoming gradient with `compress_grad` by regenerating it from
the seed (or, for data-dependent sketches, from the saved indices), and `(Sᵀy)ᵀ(Sᵀx) = yᵀ S Sᵀ x`
is an unbiased estimate of the weight gradient `yᵀx`. `transpose` applies S itself (the
derivative of Sᵀx, for second order); `variance` is the closed form of E‖Ĝ − G‖²_F.
The sketches themselves are in sketches.py (and row_sampling.py), with the registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import ConfigError
from ..options import DEFAULT_SKETCH  # noqa: F401 - re-exported: the one default, in options.py


def sketch_rows(n_rows: int, rho: float, min_rows: int = 1) -> int:
    """k = round(ρ·N), clamped to [min_rows, N] (docs/method.md §4.4: never 0, never above N)."""
    return max(0, min(n_rows, max(min_rows, round(rho * n_rows))))


def check_rho(rho: float) -> float:
    if not isinstance(rho, (int, float)) or isinstance(rho, bool) or not (0.0 < rho <= 1.0):
        raise ConfigError(
            f"rho must be in (0, 1] (got {rho!r}): it is the fraction of token rows kept, "
            "e.g. 0.5 or 0.1"
        )
    return float(rho)




def draw_seed() -> int:
    """A fresh 62-bit seed from torch's global (CPU) RNG, as a host int; no device synchronisation."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


def _generator(device: torch.device, seed: int | Tensor) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))  # a CPU tensor's value: read without a device synchronisation
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
    """Base class. Subclasses set `name`, `cost` and implement the four methods.

    `seed` is an int64 tensor from `draw_seed` (a plain int works too, for tests and
    `sketch_matrix`). The layers never call these methods directly but through ops.py.
    """

    name: ClassVar[str] = ""
    cost: ClassVar[str] = ""  # shown in docs and `--help`
    description: ClassVar[str] = ""
    graph_safe: ClassVar[bool] = False  # S from a device-side seed: CUDA graphs may replay it

    @abstractmethod
    def compress(self, x: Tensor, k: int, seed: int) -> tuple[Tensor, ...]:
        """x: (N, d). Returns the tensors to save for backward; element 0 is Sᵀx, (k, d)."""

    @abstractmethod
    def compress_grad(self, y: Tensor, k: int, seed: int, saved: tuple[Tensor, ...]) -> Tensor:
        """y: (N, d_out). Returns Sᵀy, (k, d_out), with the S used by `compress`."""

    @abstractmethod
    def transpose(self, g: Tensor, n_rows: int, seed, saved: tuple[Tensor, ...]) -> Tensor:
        """g: (k, d). Returns S g, (n_rows, d): the transpose of `compress`, for second order."""

    @abstractmethod
    def variance(self, x: Tensor, y: Tensor, k: int) -> float:
        """Closed-form E‖yᵀSSᵀx − yᵀx‖²_F."""

    def draw_seed(self, device: torch.device) -> Tensor:
        """A fresh 62-bit seed for one sketched input, from torch's RNG: on the CPU (a generator
        is seeded with its value), or on `device` for a graph-safe sketch."""
        return torch.randint(0, 2**62, (), dtype=torch.int64, device=device if self.graph_safe else "cpu")

    def empty_seed(self, device: torch.device) -> Tensor:
        """An uninitialised seed tensor where `draw_seed` puts one (for the ops' fake kernels)."""
        return torch.empty((), dtype=torch.int64, device=device if self.graph_safe else "cpu")

    def empty_saved(self, x: Tensor, k: int) -> tuple[Tensor, ...]:
        """Uninitialised tensors shaped like what `compress` returns (for the ops' fake kernels)."""
        return (x.new_empty((k, x.shape[1])),)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
