"""RandomizedLinear against plain nn.Linear: exact output, input and bias gradients; unbiased,
fresh, reproducible weight gradients; dtypes, autocast, no_grad, k clamping, shared sketches."""

import math

import pytest
import torch
from torch import nn

from randbp_cli import RandomizedLinear, SavedTensorCounter, randomized_linear
from randbp_cli.errors import ConfigError
from randbp_cli.core.sketches import sketch_names

SKETCHES = sketch_names()


def _pair(d_in=6, d_out=5, bias=True, sketch="gaussian", rho=0.5, dtype=torch.float32):
    torch.manual_seed(0)
    plain = nn.Linear(d_in, d_out, bias=bias).to(dtype)
    randomized = RandomizedLinear.from_linear(plain, rho=rho, sketch=sketch)
    return plain, randomized


def _saved_bytes(sketch, n_rows, features, dtype, rho=0.5):
    """What the sketch keeps for N rows: Sᵀx, plus indices and scales for row sampling."""
    from randbp_cli.core.sketches import get_sketch, sketch_rows

    saved = get_sketch(sketch).compress(torch.randn(n_rows, features).to(dtype), sketch_rows(n_rows, rho), 0)
    return sum(t.numel() * t.element_size() for t in saved)


def _grads(layer, x, grad_out):
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out = layer(x)
    out.backward(grad_out)
    return out, x.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad


@pytest.mark.parametrize("sketch", SKETCHES)
@pytest.mark.parametrize("shape", [(7, 6), (3, 4, 6)])
@pytest.mark.parametrize("bias", [True, False])
def test_output_input_and_bias_gradients_are_exact(sketch, shape, bias):
    plain, randomized = _pair(bias=bias, sketch=sketch)
    x = torch.randn(*shape)
    grad_out = torch.randn(*shape[:-1], 5)
    out_p, gx_p, _, gb_p = _grads(plain, x, grad_out)
    out_r, gx_r, gw_r, gb_r = _grads(randomized, x, grad_out)
    assert torch.equal(out_p, out_r)
    assert torch.equal(gx_p, gx_r)  # bit for bit, not just close
    if bias:
        assert torch.equal(gb_p, gb_r)
    assert gw_r.shape == plain.weight.shape


def test_gradcheck_of_the_exact_paths_in_float64():
    """Input and bias gradients through the randomized Function pass gradcheck."""
    weight = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)  # keeps the sketch path on
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: randomized_linear(x, weight, b, rho=0.4), (x, bias))


@pytest.mark.parametrize("sketch", SKETCHES)
def test_layer_weight_gradient_is_unbiased(sketch):
    torch.manual_seed(1)
    layer = RandomizedLinear(4, 3, rho=0.5, sketch=sketch).double()
    x = torch.randn(10, 4, dtype=torch.float64)
    grad_out = torch.randn(10, 3, dtype=torch.float64)
    exact = grad_out.T @ x
    repeats = 3000
    samples = []
    for _ in range(repeats):
        layer.weight.grad = None
        layer(x).backward(grad_out)
        samples.append(layer.weight.grad.clone())
    samples = torch.stack(samples)
    z = (samples.mean(0) - exact).abs() / (samples.std(0) / math.sqrt(repeats))
    assert float(z.max()) < 5.0


def test_fresh_sketch_every_call_and_reproducible_under_manual_seed():
    layer = RandomizedLinear(6, 5, rho=0.5)
    x = torch.randn(8, 6)

    def weight_grad():
        layer.weight.grad = None
        layer(x).sum().backward()
        return layer.weight.grad.clone()

    torch.manual_seed(123)
    first, second = weight_grad(), weight_grad()
    assert not torch.equal(first, second)  # a new S for each call (docs/method.md §4.1)
    torch.manual_seed(123)
    assert torch.equal(weight_grad(), first)  # bit for bit
    assert torch.equal(weight_grad(), second)


@pytest.mark.parametrize("sketch", SKETCHES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(sketch, dtype):
    _, layer = _pair(sketch=sketch, dtype=dtype)
    x = torch.randn(16, 6).to(dtype).requires_grad_(True)
    with SavedTensorCounter(layer, exclude=[x]) as counter:
        out = layer(x)
    out.float().sum().backward()
    assert out.dtype == dtype
    assert layer.weight.grad.dtype == dtype and torch.isfinite(layer.weight.grad).all()
    assert x.grad.dtype == dtype
    stats = counter.stats()
    assert stats.by_kind["sketches"] == _saved_bytes(sketch, 16, 6, dtype)


@pytest.mark.parametrize("sketch", SKETCHES)
def test_autocast_cpu_bfloat16(sketch):
    layer = RandomizedLinear(6, 5, rho=0.5, sketch=sketch)
    x = torch.randn(16, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with SavedTensorCounter(layer, exclude=[x]) as counter:
            out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and torch.isfinite(layer.weight.grad).all()
    assert x.grad.dtype == torch.float32
    stats = counter.stats()
    assert stats.by_kind["sketches"] == _saved_bytes(sketch, 16, 6, torch.bfloat16)  # kept in bfloat16
    assert stats.by_kind["weight_copies"] == 5 * 6 * 2  # autocast's bf16 copy of W, as nn.Linear keeps


def test_nothing_sketched_or_saved_without_a_weight_gradient():
    layer = RandomizedLinear(6, 5, rho=0.5)
    x = torch.randn(8, 6, requires_grad=True)
    with torch.no_grad(), SavedTensorCounter(layer, exclude=[x]) as counter:
        out = layer(x)
    assert counter.stats().total_bytes == 0
    assert torch.equal(out, nn.functional.linear(x, layer.weight, layer.bias))
    layer.weight.requires_grad_(False)
    state = torch.get_rng_state()
    with SavedTensorCounter(layer, exclude=[x]) as counter:
        out = layer(x)
    assert counter.stats().total_bytes == 0
    assert torch.equal(torch.get_rng_state(), state)  # no seed drawn either
    out.sum().backward()
    assert x.grad is not None and layer.weight.grad is None


@pytest.mark.parametrize("n_rows, rho, min_rows, k", [(3, 0.1, 1, 1), (8, 0.1, 1, 1), (10, 0.5, 1, 5),
                                                      (10, 0.1, 4, 4), (3, 0.5, 9, 3)])
def test_k_clamped_in_the_layer(n_rows, rho, min_rows, k):
    layer = RandomizedLinear(4, 2, rho=rho, min_rows=min_rows)
    x = torch.randn(n_rows, 4)
    with SavedTensorCounter(layer, exclude=[x]) as counter:
        out = layer(x)
    out.sum().backward()
    assert counter.stats().by_kind["sketches"] == k * 4 * 4


def test_empty_input():
    layer = RandomizedLinear(4, 2, rho=0.5)
    x = torch.randn(0, 4, requires_grad=True)
    layer(x).sum().backward()
    assert torch.equal(layer.weight.grad, torch.zeros(2, 4))


def test_bad_arguments():
    with pytest.raises(ConfigError, match="rho"):
        RandomizedLinear(4, 2, rho=0)
    with pytest.raises(ConfigError, match="min_rows"):
        RandomizedLinear(4, 2, rho=0.5, min_rows=0)
    with pytest.raises(ConfigError, match="sketch"):
        RandomizedLinear(4, 2, rho=0.5, sketch="nope")


class _QKV(nn.Module):
    def __init__(self, share):
        super().__init__()
        self.q, self.k, self.v = (RandomizedLinear(8, 8, rho=0.5, share_sketch=share) for _ in range(3))

    def forward(self, x):
        h = torch.tanh(x)  # the shared input: saved by nothing else
        return self.q(h) * self.k(h) + self.v(h)


def test_shared_input_costs_one_sketch_in_bytes():
    x = torch.randn(16, 8)
    sizes = {}
    for share in (True, False):
        model = _QKV(share)
        with SavedTensorCounter(model, exclude=[x]) as counter:
            out = model(x)
        out.sum().backward()
        sizes[share] = counter.stats().by_kind["sketches"]
    one_sketch = 8 * 8 * 4  # k = 8 of 16 rows, 8 features, fp32
    assert sizes[True] == one_sketch
    assert sizes[False] == 3 * one_sketch  # docs/method.md §4.7: 3ρ of the input without sharing


def test_shared_sketch_gradients_stay_unbiased_and_fresh_per_step():
    torch.manual_seed(2)
    model = _QKV(share=True).double()
    x = torch.randn(12, 8, dtype=torch.float64)
    exact = {}
    plain = {name: nn.Linear(8, 8).double() for name in "qkv"}
    for name in "qkv":
        layer = getattr(model, name)
        plain[name].weight.data.copy_(layer.weight.data)
        plain[name].bias.data.copy_(layer.bias.data)
    h = torch.tanh(x)
    (plain["q"](h) * plain["k"](h) + plain["v"](h)).sum().backward()
    exact = {name: plain[name].weight.grad for name in "qkv"}
    repeats = 2000
    samples = {name: [] for name in "qkv"}
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
        for name in "qkv":
            samples[name].append(getattr(model, name).weight.grad.clone())
    for name in "qkv":
        s = torch.stack(samples[name])
        z = (s.mean(0) - exact[name]).abs() / (s.std(0) / math.sqrt(repeats))
        assert float(z.max()) < 5.0
    # the same tensor fed again to the same layer gets a new sketch
    assert not torch.equal(samples["q"][0], samples["q"][1])


def test_in_place_change_invalidates_the_shared_sketch():
    layer_a = RandomizedLinear(4, 4, rho=0.5)
    layer_b = RandomizedLinear(4, 4, rho=0.5)
    h = torch.randn(8, 4)
    with SavedTensorCounter(nn.ModuleList([layer_a, layer_b]), exclude=[h]) as counter:
        out_a = layer_a(h)
        h.mul_(2)  # h changed: layer_b must not reuse a sketch of the old values
        out_b = layer_b(h)
    (out_a.sum() + out_b.sum()).backward()
    stats = counter.stats()
    assert stats.by_kind["sketches"] == 2 * 4 * 4 * 4 and stats.storages == 2  # two separate sketches


class _Block(nn.Module):
    """Dropout before and between randomized layers (Q, K, V share an input), as in a Transformer."""

    def __init__(self, sketch="countsketch"):
        super().__init__()
        self.drop = nn.Dropout(0.3)
        self.q, self.k, self.v = (RandomizedLinear(8, 8, rho=0.5, sketch=sketch) for _ in range(3))
        self.out = RandomizedLinear(8, 4, rho=0.5, sketch=sketch)

    def forward(self, x):
        h = self.drop(x)
        mixed = self.q(h) * self.k(h) + self.v(h)
        return self.out(self.drop(torch.tanh(mixed)))


@pytest.mark.parametrize("sketch", ["balanced", "gaussian", "countsketch", "crs"])
def test_checkpoint_recompute_sees_the_same_dropout_and_sketches(sketch):
    """Checkpointing (no-grad forward, RNG restored, recompute in backward) must give bit for bit
    the gradients of the same run without checkpointing: same dropout masks, same sketch seeds."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    block = _Block(sketch)
    x = torch.randn(16, 8)

    def grads(use_checkpoint):
        block.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        inp = x.clone().requires_grad_(True)
        out = checkpoint(block, inp, use_reentrant=True) if use_checkpoint else block(inp)
        out.square().sum().backward()
        return [p.grad.clone() for p in block.parameters()] + [inp.grad]

    plain, checkpointed = grads(False), grads(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, checkpointed))
