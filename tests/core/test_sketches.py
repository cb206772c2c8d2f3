"""Monte-Carlo checks of every sketch: E[S Sᵀ] = I, unbiased weight gradient, closed-form variance.

Tolerances come from the estimators' own spread (z-scores against the Monte-Carlo standard
error), not from fixed epsilons; every test is seeded, and a deliberately mis-scaled sketch
shows the checks can fail.
"""

import math

import pytest
import torch

from randbp_cli.errors import ConfigError
from randbp_cli.core.sketches import (DATA_DEPENDENT, GaussianSketch, check_rho, get_sketch, sketch_matrix,
                                 sketch_names, sketch_rows)

ALL = sketch_names()
DATA_INDEPENDENT = [name for name in ALL if name not in DATA_DEPENDENT]
EXACT_DIAGONAL = ["rademacher", "countsketch"]  # (S Sᵀ)ᵢᵢ = 1 for every draw


def _xy(n=12, d_in=5, d_out=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    y = torch.randn(n, d_out, generator=gen, dtype=torch.float64)
    x[0] *= 4  # uneven row norms, so the row-norm terms of the formulas matter
    y[3] *= 3
    return x, y


def sketched_gradients(sketch, x, y, k, repeats, seed0=1000):
    """(repeats, d_out, d_in): yᵀ S Sᵀ x for `repeats` independent seeds."""
    sketch = get_sketch(sketch)
    grads = []
    for i in range(repeats):
        saved = sketch.compress(x, k, seed0 + i)
        sketched_y = sketch.compress_grad(y, k, seed0 + i, saved)
        grads.append(sketched_y.T @ saved[0])
    return torch.stack(grads)


def max_bias_z(grads, exact):
    """Largest |mean − exact| in units of its Monte-Carlo standard error.

    Taken over every entry and over the projection ⟨Ĝ, G⟩/‖G‖² (mean 1 when unbiased), which
    pools all entries and so catches a small overall scaling error that single entries miss.
    """
    repeats = grads.shape[0]
    mean = grads.mean(0)
    se = grads.std(0) / math.sqrt(repeats)
    entry_z = float(((mean - exact).abs() / se.clamp_min(1e-12)).max())
    projection = (grads * exact).sum((1, 2)) / exact.square().sum()
    projection_z = abs(float(projection.mean()) - 1) / (float(projection.std()) / math.sqrt(repeats))
    return max(entry_z, projection_z)


@pytest.mark.parametrize("name", DATA_INDEPENDENT)
def test_expected_s_st_is_identity(name):
    n, k, repeats = 6, 3, 4000
    mats = torch.stack([sketch_matrix(name, n, k, seed) for seed in range(repeats)])
    sst = mats @ mats.transpose(1, 2)
    mean = sst.mean(0)
    se = sst.std(0) / math.sqrt(repeats)
    eye = torch.eye(n, dtype=torch.float64)
    # exact where the entry is deterministic (sign sketches: diagonal is exactly 1)
    deterministic = se < 1e-12
    assert torch.allclose(mean[deterministic], eye[deterministic], atol=1e-12)
    z = ((mean - eye).abs() / se.clamp_min(1e-12))[~deterministic]
    assert float(z.max()) < 5.0
    if name in EXACT_DIAGONAL:
        assert torch.allclose(torch.diagonal(sst, dim1=1, dim2=2), torch.ones(repeats, n, dtype=torch.float64))


@pytest.mark.parametrize("name", ALL)
def test_weight_gradient_is_unbiased(name):
    x, y = _xy()
    grads = sketched_gradients(name, x, y, k=4, repeats=6000)
    assert max_bias_z(grads, y.T @ x) < 5.0


@pytest.mark.parametrize("name", ALL)
def test_variance_matches_closed_form(name):
    x, y = _xy(seed=1)
    k, repeats = 4, 3000
    grads = sketched_gradients(name, x, y, k, repeats, seed0=7)
    errors = (grads - y.T @ x).square().sum((1, 2))
    theory = get_sketch(name).variance(x, y, k)
    se = float(errors.std()) / math.sqrt(repeats)
    assert abs(float(errors.mean()) - theory) < 5 * se, (float(errors.mean()), theory, se)
    assert 5 * se < 0.2 * theory  # the check is tight enough to mean something


def test_variance_formulas_differ_as_derived():
    """Gaussian: (‖X‖²‖Y‖² + ‖XᵀY‖²)/k (plus sign, docs/method.md §2); sign sketches subtract 2Σ‖xᵢ‖²‖yᵢ‖²."""
    x, y = _xy()
    k = 3
    xy = float(x.square().sum() * y.square().sum())
    g2 = float((x.T @ y).square().sum())
    diag = float((x.square().sum(1) * y.square().sum(1)).sum())
    assert get_sketch("gaussian").variance(x, y, k) == pytest.approx((xy + g2) / k)
    assert get_sketch("rademacher").variance(x, y, k) == pytest.approx((xy + g2 - 2 * diag) / k)
    assert get_sketch("countsketch").variance(x, y, k) == pytest.approx((xy + g2 - 2 * diag) / k)


class _MisScaled(GaussianSketch):
    """The kind of scaling bug docs/method.md §4.5 warns about: every estimate 10% too large."""

    name = "misscaled"

    def compress(self, x, k, seed):
        return (super().compress(x, k, seed)[0] * 1.1,)


def test_unbiasedness_check_catches_a_scaling_bug():
    x, y = _xy()
    grads = sketched_gradients(_MisScaled(), x, y, k=4, repeats=6000)
    assert max_bias_z(grads, y.T @ x) > 6.0


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_sketch_built_in_input_dtype(name, dtype):
    x = torch.randn(10, 3).to(dtype)
    saved = get_sketch(name).compress(x, 4, seed=5)
    assert saved[0].dtype == dtype and saved[0].shape == (4, 3)
    again = get_sketch(name).compress(x, 4, seed=5)
    assert torch.equal(saved[0], again[0])  # same seed, same S


@pytest.mark.parametrize("name", DATA_INDEPENDENT)
def test_forward_and_backward_use_the_same_matrix(name):
    x = torch.randn(9, 3, dtype=torch.float64)
    s = sketch_matrix(name, 9, 4, seed=11)
    assert torch.allclose(get_sketch(name).compress(x, 4, 11)[0], s.T @ x)
    assert torch.allclose(get_sketch(name).compress_grad(x, 4, 11, ()), s.T @ x)


def test_dense_sketch_blocks_do_not_change_the_distribution(monkeypatch):
    """Blocked generation (bounded transient memory) still gives an unbiased estimate."""
    import randbp_cli.core.sketches as sketches

    monkeypatch.setattr(sketches, "DENSE_BLOCK_ELEMENTS", 8)  # 2 rows per block at k = 4
    x, y = _xy()
    grads = sketched_gradients("gaussian", x, y, k=4, repeats=2000)
    assert max_bias_z(grads, y.T @ x) < 5.0


@pytest.mark.parametrize("n, rho, min_rows, expected", [
    (8, 0.1, 1, 1),      # int(0.1 * 8) == 0 was the reference's bug (docs/method.md §4.4)
    (4, 0.1, 1, 1),
    (1000, 0.2, 1, 200),
    (1024, 0.5, 1, 512),
    (1024, 0.1, 1, 102),
    (5, 0.5, 10, 5),     # never above N
    (100, 0.01, 8, 8),   # the configurable minimum
    (7, 1.0, 1, 7),
    (0, 0.5, 1, 0),
])
def test_sketch_rows_clamped(n, rho, min_rows, expected):
    assert sketch_rows(n, rho, min_rows) == expected


@pytest.mark.parametrize("rho", [0, -0.5, 1.5, float("nan"), True, "0.5"])
def test_rho_out_of_range_rejected(rho):
    with pytest.raises(ConfigError, match="rho"):
        check_rho(rho)


def test_srht_keeping_every_row_is_exact():
    """k = n (a power of two): H and D are orthogonal, so the estimate has no variance at all."""
    x, y = _xy(n=16)
    grads = sketched_gradients("srht", x, y, k=16, repeats=5)
    assert torch.allclose(grads, (y.T @ x).expand_as(grads))
    assert get_sketch("srht").variance(x, y, 16) == 0


@pytest.mark.parametrize("name", DATA_DEPENDENT)
def test_row_sampling_stores_real_rows_indices_and_scales(name):
    x, _ = _xy()
    rows, index, scale = get_sketch(name).compress(x, 5, seed=3)
    assert rows.shape == (5, x.shape[1]) and index.dtype == torch.int64 and scale.shape == (5,)
    assert torch.allclose(rows, x[index] * scale[:, None])


def test_wta_crs_keeps_the_largest_rows_exactly():
    x, y = _xy()
    x[5] *= 50  # one dominant row
    rows, index, scale = get_sketch("wta-crs").compress(x, 6, seed=0)
    assert int(index[0]) == 5 and float(scale[0]) == 1.0  # kept deterministically, unscaled
    assert get_sketch("wta-crs").variance(x, y, 12) == 0  # k ≥ N: every row kept


def test_crs_ignores_zero_rows():
    x, y = _xy()
    x[:6] = 0  # these rows contribute nothing to G and are never sampled
    rows, index, scale = get_sketch("crs").compress(x, 50, seed=0)
    assert int(index.min()) >= 6
    grads = sketched_gradients("crs", x, y, k=4, repeats=3000)
    assert max_bias_z(grads, y.T @ x) < 5.0


def test_unknown_sketch_names_the_choices():
    with pytest.raises(ConfigError, match="gaussian"):
        get_sketch("dct2")
    assert {"gaussian", "rademacher", "countsketch", "srht", "crs", "wta-crs"} <= set(sketch_names())


def test_a_custom_sketch_is_used_eagerly_and_compiled_and_a_taken_name_is_refused():
    """A user's Sketch instance runs its own code (the ops look sketches up by name: it is
    registered under its own); one that reuses a built-in's name would run the built-in's."""
    from randbp_cli import ConfigError, RandomizedLinear
    from randbp_cli.core.sketches import CountSketch, GaussianSketch

    class Counted(CountSketch):
        name = "counted-countsketch"
        calls = 0

        def compress(self, x, k, seed):
            Counted.calls += 1
            return super().compress(x, k, seed)

    layer = RandomizedLinear(4, 3, rho=0.5, sketch=Counted())
    layer(torch.randn(6, 4)).sum().backward()
    compiled = torch.compile(layer, backend="aot_eager")
    compiled(torch.randn(6, 4)).sum().backward()
    torch._dynamo.reset()
    assert Counted.calls == 2 and layer.weight.grad is not None

    class Renamed(GaussianSketch):
        pass

    with pytest.raises(ConfigError, match="name of its own: 'gaussian'"):
        RandomizedLinear(4, 3, rho=0.5, sketch=Renamed())
