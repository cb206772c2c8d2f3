"""The few-bit GELU's levels: the b-bit piecewise-constant q that stands in for GELU'(x) in backward.

The levels q: 2^b intervals of the real line, cut at boundaries t_1 < … < t_{K-1}, with one
value each, chosen to minimise E[(GELU'(X) − q(X))²] for X ~ N(0, 1). Why that distribution:
GELU's input in a Transformer is a linear layer applied to a LayerNorm output, roughly zero-mean
and unit-scale, and the paper weights the fit the same way; `gelu_gradient_error` measures the
error on real activations, where that assumption can be checked. GELU'(x) = Φ(x) + x·φ(x) is
not monotonic (a dip to −0.13 at x = −√2, a bump to 1.13 at +√2), so the intervals are not
found by a quantile heuristic: a dynamic programme finds the optimal partition among cut
points on a fine grid, then coordinate ascent on the exact objective moves each cut off the
grid to its stationary point (`_refine`). At the optimum each value is the N(0,1)-
weighted mean of GELU' over its interval and GELU' at each cut equals the midpoint of the two
values beside it (tests/savers/test_savers.py checks both, against an independent brute force).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError

BITS = (1, 2, 3, 4)

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise ConfigError(f"GELU bits must be one of {', '.join(map(str, BITS))} (got {bits!r})")
    return bits


def _cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _pdf(x: float) -> float:
    return _INV_SQRT_2PI * math.exp(-0.5 * x * x)


def gelu_derivative(x: Tensor) -> Tensor:
    """GELU'(x) = Φ(x) + x·φ(x), the derivative of the erf GELU, in x's dtype."""
    return torch.special.ndtr(x) + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _moment(x: float) -> float:
    """M(x) = ∫_{-∞}^{x} GELU'(t) φ(t) dt = (Φ(x)² − φ(x)²) / 2 (d/dx: φ·(Φ + xφ) = φ·GELU')."""
    if x == math.inf:
        return 0.5
    if x == -math.inf:
        return 0.0
    return 0.5 * (_cdf(x) ** 2 - _pdf(x) ** 2)


def _cdf_or_limit(x: float) -> float:
    return 1.0 if x == math.inf else 0.0 if x == -math.inf else _cdf(x)


def _interval_means(cuts: list[float]) -> list[float]:
    """E[GELU'(X) | X in interval k] for the intervals cut at `cuts` (with ±∞ at the ends)."""
    edges = [-math.inf, *cuts, math.inf]
    return [(_moment(b) - _moment(a)) / (_cdf_or_limit(b) - _cdf_or_limit(a)) for a, b in zip(edges, edges[1:])]


def _objective(cuts: list[float]) -> float:
    """Σ_k (∫_k GELU' φ)² / ∫_k φ. The expected squared error is E[GELU'²] minus this."""
    edges = [-math.inf, *cuts, math.inf]
    return sum((_moment(b) - _moment(a)) ** 2 / (_cdf_or_limit(b) - _cdf_or_limit(a))
               for a, b in zip(edges, edges[1:]))


def _grid_partition(levels: int, half_width: float = 5.0, step: float = 1 / 128) -> list[float]:
    """The best partition into `levels` intervals with cuts on a grid: exact DP, O(levels·G²).

    best[j] after round r = the largest objective of r intervals covering (−∞, node j]; nodes
    are −∞, the grid, +∞. Each interval's term depends only on its two ends, so the optimum
    over all partitions is found exactly (for cuts restricted to the grid).
    """
    grid = torch.arange(-half_width, half_width + step / 2, step, dtype=torch.float64)
    nodes = torch.cat([grid.new_tensor([-math.inf]), grid, grid.new_tensor([math.inf])])  # (G,)
    pdf = torch.exp(-0.5 * nodes * nodes) * _INV_SQRT_2PI  # 0 at ±∞
    cdf = torch.special.ndtr(nodes)
    moment = 0.5 * (cdf * cdf - pdf * pdf)
    mass = cdf[None, :] - cdf[:, None]  # (G, G): [i, j] = P(node_i < X <= node_j)
    score = (moment[None, :] - moment[:, None]) ** 2 / mass
    score = torch.where(mass > 0, score, torch.full_like(score, -math.inf))  # only i < j
    best = score[0].clone()  # one interval: (−∞, node_j]
    choices = []
    for _ in range(levels - 1):
        total = best[:, None] + score  # (G, G): end the previous intervals at i, add (i, j]
        choice = total.argmax(0)
        best = total.gather(0, choice[None]).squeeze(0)
        choices.append(choice)
    cuts, j = [], len(nodes) - 1
    for choice in reversed(choices):
        j = int(choice[j])
        cuts.append(float(nodes[j]))
    return sorted(cuts)


def _stationarity(cuts: Tensor) -> Tensor:
    """2·GELU'(t_k) − c_k − c_{k+1} for every cut: zero where ∂J/∂t_k is zero.

    ∂J/∂t_k = φ(t_k)·(c_k − c_{k+1})·(2·GELU'(t_k) − c_k − c_{k+1}), c the interval means.
    """
    c = _interval_means(cuts.tolist())
    return torch.tensor([2 * (_cdf(t) + t * _pdf(t)) - c[k] - c[k + 1] for k, t in enumerate(cuts.tolist())],
                        dtype=torch.float64)


def _refine(cuts: list[float], iterations: int = 50, tol: float = 1e-13) -> list[float]:
    """Newton's method on the stationarity equations, from the grid optimum, off the grid.

    The grid optimum lies within a grid step of the continuous one, so Newton (with a central-
    difference Jacobian, tridiagonal in fact, and steps halved until the objective does not
    fall and the cuts stay ordered) converges to it in a few iterations.
    """
    t = torch.tensor(cuts, dtype=torch.float64)
    for _ in range(iterations):
        residual = _stationarity(t)
        if float(residual.abs().max()) < tol:
            break
        h = 1e-7
        jacobian = torch.stack([(_stationarity(t + h * e) - _stationarity(t - h * e)) / (2 * h)
                                for e in torch.eye(len(cuts), dtype=torch.float64)], dim=1)
        step = torch.linalg.solve(jacobian, -residual)
        base = _objective(t.tolist())
        for _ in range(30):
            trial = t + step
            if bool((trial.diff() > 0).all()) and _objective(trial.tolist()) >= base - 1e-15:
                break
            step = step / 2
        t = trial
    return t.tolist()


def _second_moment(half_width: float = 12.0, points: int = 200_001) -> float:
    """E[GELU'(X)²], X ~ N(0,1), by the trapezoid rule (the integrand is smooth and decays fast)."""
    x = torch.linspace(-half_width, half_width, points, dtype=torch.float64)
    integrand = gelu_derivative(x) ** 2 * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return float(torch.trapezoid(integrand, x))


@dataclass(frozen=True)
class GeluLevels:
    """The b-bit derivative q: `values[k]` on [boundaries[k-1], boundaries[k]), ±∞ at the ends."""

    bits: int
    boundaries: tuple[float, ...]  # 2^b − 1 increasing cuts
    values: tuple[float, ...]  # 2^b levels, one per interval
    expected_squared_error: float  # E[(GELU'(X) − q(X))²], X ~ N(0, 1)
    relative_rms_error: float  # sqrt(expected_squared_error / E[GELU'(X)²])


@functools.cache
def gelu_levels(bits: int) -> GeluLevels:
    """The optimal b-bit levels (computed once per b and cached, deterministic; < 1 s each)."""
    check_bits(bits)
    cuts = _refine(_grid_partition(2 ** bits))
    second = _second_moment()
    error = max(second - _objective(cuts), 0.0)
    return GeluLevels(bits, tuple(cuts), tuple(_interval_means(cuts)), error, math.sqrt(error / second))
