"""Sketches that keep real token rows instead of mixing them: CRS and WTA-CRS (docs/method.md §2).

S samples rows with probability ∝ ‖xᵢ‖ (and WTA-CRS keeps the heaviest rows exactly), so S
depends on X: what is saved is the scaled rows, their indices and their scales, and the backward
applies the same S from those, not from the seed alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sketch import Sketch, _generator


def _row_norm_probabilities(x: Tensor) -> Tensor:
    """pᵢ ∝ ‖xᵢ‖ in float32 (uniform when every row is zero)."""
    norms = x.float().norm(dim=1)
    total = norms.sum()
    if not (total > 0 and torch.isfinite(total)):  # all zero, or NaN/inf (the loss will show it)
        return torch.full_like(norms, 1.0 / len(norms))
    return norms / total


class _RowSampling(Sketch):
    """Sketches that keep real token rows: saved = (scaled rows of X, their indices, their scales)."""

    def empty_saved(self, x, k):
        return (x.new_empty((k, x.shape[1])), x.new_empty((k,), dtype=torch.int64), x.new_empty((k,)))

    def compress_grad(self, y, k, seed, saved):
        _, index, scale = saved
        return y[index] * scale[:, None]

    def transpose(self, g, n_rows, seed, saved):
        # the sampled rows and their scales are fixed given the draw: Ĝ is linear in x with
        # weights of mean 1, so this derivative is unbiased (docs/method.md, second order)
        _, index, scale = saved
        return g.new_zeros(n_rows, g.shape[1]).index_add_(0, index, g * scale[:, None])

    @staticmethod
    def _sampled_variance(x: Tensor, y: Tensor, probabilities: Tensor, draws: int) -> float:
        """E‖Ĝ − G‖² of (1/m)Σₜ g_{iₜ}/p_{iₜ}, m draws with replacement: (Σᵢ‖gᵢ‖²/pᵢ − ‖G‖²)/m."""
        p = probabilities.double()
        terms = x.square().sum(1) * y.square().sum(1)
        used = p > 0  # rows with pᵢ = 0 have xᵢ = 0: their gradient term is 0 and never sampled
        grad = float((x.T @ y).square().sum())
        return (float((terms[used] / p[used]).sum()) - grad) / draws


class CRSSketch(_RowSampling):
    """Column-row sampling: k token rows drawn with replacement, pᵢ ∝ ‖xᵢ‖, scaled 1/√(k·pᵢ).

    The forward pass knows X, so the probabilities use ‖xᵢ‖ only. Ĝ = (1/k)Σₜ y_{iₜ}x_{iₜ}ᵀ/p_{iₜ}
    is unbiased. What is stored is real (scaled) rows of X plus their indices and scales; the
    backward pass gathers the same rows of Y. Cost O(N·d).
    """

    name = "crs"
    cost = "O(N·d)"
    description = "k token rows sampled with replacement, p ∝ ‖xᵢ‖"

    def compress(self, x, k, seed):
        probabilities = _row_norm_probabilities(x)
        gen = _generator(x.device, seed)
        index = torch.multinomial(probabilities, k, replacement=True, generator=gen)
        scale = (1.0 / torch.sqrt(k * probabilities[index])).to(x.dtype)
        return x[index] * scale[:, None], index, scale

    def variance(self, x, y, k):
        x = x.reshape(-1, x.shape[-1]).double()
        y = y.reshape(-1, y.shape[-1]).double()
        return self._sampled_variance(x, y, _row_norm_probabilities(x), k)


class WTACRSSketch(_RowSampling):
    """Winner-take-all CRS (after WTA-CRS, arXiv 2305.15265): the c = ⌊k/2⌋ rows with the
    largest ‖xᵢ‖ are kept exactly (scale 1; all of them when k = N); the other k − c rows are sampled with replacement
    from the remaining rows with qⱼ ∝ ‖xⱼ‖ and scaled 1/√((k − c)·qⱼ). Unbiased: the kept rows
    contribute their exact gradient terms, the sample estimates the rest.

    Where it departs from the published method: (1) probabilities come from ‖xᵢ‖ alone, which
    the forward pass has — the paper uses ‖xᵢ‖·‖yᵢ‖ with gradient norms cached from the
    previous epoch; (2) the deterministic set has the fixed size ⌊k/2⌋ instead of the size the
    paper picks from the probability mass; (3) nothing is cached between steps. Cost O(N·d).
    """

    name = "wta-crs"
    cost = "O(N·d)"
    description = "top ⌊k/2⌋ rows by ‖xᵢ‖ kept, the rest sampled (p ∝ ‖xᵢ‖)"

    @staticmethod
    def _split(x: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """(kept indices, remaining indices, probabilities over the remaining rows)."""
        n = x.shape[0]
        c = n if k >= n else k // 2  # k = N: keep every row, the estimate is exact
        norms = x.float().norm(dim=1)
        order = torch.argsort(norms, descending=True, stable=True)
        kept, rest = order[:c], order[c:]
        rest_norms = norms[rest]
        total = rest_norms.sum()
        if len(rest) and not (total > 0 and torch.isfinite(total)):
            probabilities = torch.full_like(rest_norms, 1.0 / len(rest))
        else:
            probabilities = rest_norms / total if len(rest) else rest_norms
        return kept, rest, probabilities

    def compress(self, x, k, seed):
        kept, rest, probabilities = self._split(x, k)
        sampled = k - len(kept)
        if sampled == 0 or len(rest) == 0:  # k ≥ N: every row kept, exact
            index = kept
            scale = torch.ones(len(index), device=x.device, dtype=x.dtype)
        else:
            gen = _generator(x.device, seed)
            pick = torch.multinomial(probabilities, sampled, replacement=True, generator=gen)
            index = torch.cat([kept, rest[pick]])
            scale = torch.cat([torch.ones(len(kept), device=x.device),
                               1.0 / torch.sqrt(sampled * probabilities[pick])]).to(x.dtype)
        return x[index] * scale[:, None], index, scale

    def variance(self, x, y, k):
        x = x.reshape(-1, x.shape[-1]).double()
        y = y.reshape(-1, y.shape[-1]).double()
        kept, rest, q = self._split(x, k)
        sampled = k - len(kept)
        if sampled == 0 or len(rest) == 0:
            return 0.0
        # the kept rows are exact: only the sampled remainder has variance
        return self._sampled_variance(x[rest], y[rest], q, sampled)
