"""Activation savers: few-bit GELU (optimal levels, packing, bytes, error)."""

import math

import pytest
import torch
import torch.nn.functional as F

from randbp_cli import SavedTensorCounter
from randbp_cli.gelu import (FewBitGELU, few_bit_gelu, gelu_gradient_error, gelu_levels, pack_codes, quantize,
                             unpack_codes)


def _saved(fn, model=None, exclude=()):
    with SavedTensorCounter(model, exclude=exclude) as counter:
        out = fn()
    return out, counter.stats()


# ---------------------------------------------------------------------------- few-bit GELU


def _quadrature():
    """GELU' (by autograd of F.gelu) and cumulative ∫φ, ∫GELU'·φ on a fine grid: independent of gelu.py."""
    x = torch.linspace(-12, 12, 480_001, dtype=torch.float64).requires_grad_(True)
    F.gelu(x).sum().backward()
    x, slope = x.detach(), x.grad
    pdf = torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)

    def cumulative(y):
        return torch.cat([y.new_zeros(1), torch.cumulative_trapezoid(y, x)])

    return x, slope, cumulative(pdf), cumulative(slope * pdf), cumulative(slope * slope * pdf)


def _at(grid, values, t):
    """Piecewise-linear interpolation of a cumulative integral at points t."""
    t = torch.as_tensor(t, dtype=torch.float64).clamp(float(grid[0]), float(grid[-1]))
    i = torch.searchsorted(grid, t).clamp(1, len(grid) - 1)
    w = (t - grid[i - 1]) / (grid[i] - grid[i - 1])
    return values[i - 1] + w * (values[i] - values[i - 1])


def _squared_error(q, cuts):
    """E[(GELU' − q)²] under N(0,1) for the best values given `cuts` (..., K-1), by quadrature."""
    grid, _, mass, first, second = q
    lo = torch.full(cuts.shape[:-1] + (1,), -12.0, dtype=torch.float64)
    edges = torch.cat([lo, cuts, -lo], dim=-1)
    w, m = _at(grid, mass, edges).diff(dim=-1), _at(grid, first, edges).diff(dim=-1)
    return float(second[-1]) - (m * m / w).sum(-1)


@pytest.fixture(scope="module")
def quadrature():
    return _quadrature()


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_gelu_levels_satisfy_the_optimality_conditions(quadrature, bits):
    grid, slope, mass, first, _ = quadrature
    levels = gelu_levels(bits)
    cuts = torch.tensor(levels.boundaries, dtype=torch.float64)
    assert len(levels.values) == 2 ** bits and bool((cuts.diff() > 0).all())
    edges = torch.cat([grid[:1], cuts, grid[-1:]])
    means = _at(grid, first, edges).diff() / _at(grid, mass, edges).diff()
    torch.testing.assert_close(torch.tensor(levels.values, dtype=torch.float64), means, rtol=0, atol=1e-7)
    t = cuts.clone().requires_grad_(True)  # GELU' at each cut = midpoint of the values beside it
    F.gelu(t).sum().backward()
    values = torch.tensor(levels.values, dtype=torch.float64)
    torch.testing.assert_close(t.grad, (values[:-1] + values[1:]) / 2, rtol=0, atol=1e-9)
    assert abs(float(_squared_error(quadrature, cuts)) - levels.expected_squared_error) < 1e-8


def test_gelu_levels_beat_a_brute_force_search(quadrature):
    # 1 bit: every cut on a 0.001 grid
    candidates = torch.arange(-3, 3.0005, 0.001, dtype=torch.float64)
    errors = _squared_error(quadrature, candidates[:, None])
    best = float(candidates[errors.argmin()])
    assert abs(gelu_levels(1).boundaries[0] - best) <= 0.001
    assert gelu_levels(1).expected_squared_error <= float(errors.min()) + 1e-9
    # 2 bits: every increasing triple of cuts on a 0.05 grid (GELU' is not monotonic)
    grid = torch.arange(-2.5, 2.5001, 0.05, dtype=torch.float64)
    i, j, k = torch.meshgrid(*[torch.arange(len(grid))] * 3, indexing="ij")
    keep = (i < j) & (j < k)
    triples = torch.stack([grid[i[keep]], grid[j[keep]], grid[k[keep]]], dim=-1)  # (C, 3)
    errors = _squared_error(quadrature, triples)
    best = triples[errors.argmin()]
    ours = torch.tensor(gelu_levels(2).boundaries, dtype=torch.float64)
    assert float((ours - best).abs().max()) <= 0.05
    assert gelu_levels(2).expected_squared_error <= float(errors.min()) + 1e-9


def test_gelu_error_decreases_with_bits():
    errors = [gelu_levels(b).expected_squared_error for b in (1, 2, 3, 4)]
    assert errors == sorted(errors, reverse=True)
    torch.manual_seed(0)
    x = torch.randn(50_000) * 1.3 - 0.2  # not quite N(0, 1), as real activations are not
    g = torch.randn(50_000)
    reports = [gelu_gradient_error(x, b, g) for b in (1, 2, 3, 4)]
    for key in ("relative_error", "weighted_relative_error"):
        values = [r[key] for r in reports]
        assert values == sorted(values, reverse=True) and values[-1] > 0
    normal = gelu_gradient_error(torch.randn(200_000), 2)
    assert abs(normal["relative_error"] - gelu_levels(2).relative_rms_error) < 0.01


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 3, 7, 8, 9, 13, 31, 1001])
def test_pack_unpack_round_trip(bits, n):
    codes = torch.randint(0, 2 ** bits, (n,), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(bits * n / 8)
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_two_bit_codes_are_four_to_a_byte():
    codes = torch.tensor([1, 2, 3, 0, 3, 3, 0, 1], dtype=torch.uint8)  # planes: G = 1 group of 8
    packed = pack_codes(codes, 2)
    assert packed.tolist() == [1 | 2 << 2 | 3 << 4 | 0 << 6, 3 | 3 << 2 | 0 << 4 | 1 << 6]


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_few_bit_gelu_saves_exactly_b_bits_per_element(bits):
    layer = FewBitGELU(bits)
    x = torch.randn(3, 37, requires_grad=True)  # 111 elements: packing crosses byte boundaries
    out, stats = _saved(lambda: layer(x), layer, exclude=[x])
    out.sum().backward()
    assert stats.by_kind["gelu_codes"] == math.ceil(bits * 111 / 8)
    assert stats.total_bytes == stats.by_kind["gelu_codes"]


@pytest.mark.parametrize("bits", [1, 3])
def test_few_bit_gelu_forward_is_exact_and_backward_uses_the_levels(bits):
    x = torch.randn(4, 50, requires_grad=True)
    g = torch.randn(4, 50)
    out = few_bit_gelu(x, bits)
    out.backward(g)
    assert torch.equal(out, F.gelu(x.detach()))
    values = torch.tensor(gelu_levels(bits).values)
    expected = g * values[quantize(x.detach(), bits).long()].view(4, 50)
    assert torch.equal(x.grad, expected)
    edges = torch.tensor(gelu_levels(bits).boundaries)
    assert torch.equal(quantize(x.detach(), bits).long(), torch.bucketize(x.detach().reshape(-1), edges, right=True))


def test_few_bit_gelu_saves_nothing_without_grad():
    x = torch.randn(10, 10)
    out, stats = _saved(lambda: few_bit_gelu(x, 2))
    assert stats.total_bytes == 0 and torch.equal(out, F.gelu(x))
