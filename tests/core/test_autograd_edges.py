"""Autograd edge cases that must never give a silent wrong gradient or hide memory (issue 12):
second-order gradients, module hooks across convert/restore, a shared sketch outliving its
input's values, and sketches kept alive under non-reentrant checkpointing."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from randbp_cli import RandomizedLinear, convert, restore
from randbp_cli.measure.memory import live_bytes_after
from randbp_cli.core.sketches import sketch_names

from conftest import tiny_batch

SKETCHES = sketch_names()


# ---------------------------------------------------------------------------- second order


def _hvp_samples(layer, x, v, repeats):
    """∂/∂x ⟨∂L/∂W, v⟩ for L = Σ tanh(layer(x)) — a Hessian-vector product through dW."""
    samples = []
    for _ in range(repeats):
        xr = x.clone().requires_grad_(True)
        loss = torch.tanh(layer(xr)).sum()
        (grad_w,) = torch.autograd.grad(loss, layer.weight, create_graph=True)
        (hvp,) = torch.autograd.grad((grad_w * v).sum(), xr)
        samples.append(hvp)
    return torch.stack(samples)


@pytest.mark.parametrize("sketch", SKETCHES)
def test_second_order_through_the_weight_gradient_is_unbiased(sketch):
    """The estimator's own derivative w.r.t. x (through Sᵀx and through Sᵀ dY) averages to the
    exact one: nothing is dropped, so MAML / Hessian-vector products / gradient penalties work."""
    torch.manual_seed(3)
    plain = nn.Linear(4, 3).double()
    layer = RandomizedLinear.from_linear(plain, rho=0.5, sketch=sketch)
    x = torch.randn(8, 4, dtype=torch.float64)
    v = torch.randn(3, 4, dtype=torch.float64)
    (exact,) = [_hvp_samples(plain, x, v, 1)[0]]
    repeats = 1500
    samples = _hvp_samples(layer, x, v, repeats)
    se = samples.std(0) / math.sqrt(repeats)
    z = (samples.mean(0) - exact).abs() / se.clamp_min(1e-12)
    assert float(z.max()) < 5.0, f"second-order mean off by z = {float(z.max()):.1f}"


def test_second_order_of_a_shared_sketch_reaches_the_shared_input():
    """Q, K and V share one sketch of h: the second-order term of each weight gradient must
    flow back to h through that one sketch (exact at k = N for the balanced sketch)."""
    torch.manual_seed(4)
    plain = nn.ModuleList(nn.Linear(4, 4).double() for _ in range(3))
    model = nn.ModuleList(RandomizedLinear.from_linear(p, rho=1.0, sketch="balanced") for p in plain)

    def hvp(layers):
        h = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        q, k, v = (layer(torch.tanh(h)) for layer in layers)
        loss = (q * k).sum() + torch.sin(v).sum()
        grads = torch.autograd.grad(loss, [layer.weight for layer in layers], create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), h)[0]

    assert torch.allclose(hvp(model), hvp(plain), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- hooks


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(3, 3)
        self.second = nn.Linear(3, 2)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def test_convert_keeps_every_kind_of_module_hook_and_restore_brings_them_back():
    torch.manual_seed(0)
    model = _Two()
    calls = []
    model.first.register_full_backward_hook(lambda m, gin, gout: (-gin[0],))  # gradient reversal
    model.first.register_full_backward_pre_hook(lambda m, gout: calls.append("bwd-pre") or None)
    model.second.register_forward_hook(lambda m, args, kwargs, out: out * 2, with_kwargs=True)
    model.second.register_forward_pre_hook(lambda m, args, kwargs: calls.append("pre-kw") or None, with_kwargs=True)
    model.second.register_forward_hook(lambda m, args, out: calls.append("always") or None, always_call=True)
    removable = model.second.register_forward_hook(lambda m, args, out: calls.append("removed") or None)
    x = torch.randn(5, 3)

    def run():
        calls.clear()
        inp = x.clone().requires_grad_(True)
        out = model(inp)
        out.sum().backward()
        return out.detach(), inp.grad

    out_plain, grad_plain = run()
    assert calls == ["pre-kw", "always", "removed", "bwd-pre"]
    model = convert(model, 0.5, sketch="countsketch")
    assert isinstance(model.first, RandomizedLinear)
    out_conv, grad_conv = run()
    assert calls == ["pre-kw", "always", "removed", "bwd-pre"]
    assert torch.allclose(out_conv, out_plain) and torch.allclose(grad_conv, grad_plain)  # sign flipped in both
    removable.remove()  # a handle taken before convert removes the hook from the converted layer
    run()
    assert "removed" not in calls
    model = restore(model)
    assert type(model.first) is nn.Linear
    out_back, grad_back = run()
    assert calls == ["pre-kw", "always", "bwd-pre"]
    assert torch.allclose(out_back, out_plain) and torch.allclose(grad_back, grad_plain)


# ---------------------------------------------------------------------------- stale shared sketch


class _Branches(nn.Module):
    """Two layers read the same input; a flag decides which run (conditional computation)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3)

    def forward(self, x, which="ab"):
        return sum(getattr(self, name)(x) for name in which)


def test_a_buffer_refilled_without_a_version_bump_is_sketched_again():
    """Static input buffers refilled through a NumPy view keep their version counter: a sketch
    shared across forward passes would be of the old values. At k = N (srht on 8 rows is exact)
    the weight gradient must be exactly that of the new values."""
    torch.manual_seed(0)
    model = convert(_Branches(), 1.0, sketch="srht")
    buffer = torch.randn(8, 4)
    model(buffer, "a").sum().backward()  # pass 1 sketches the buffer (for a only)
    model.zero_grad(set_to_none=True)
    np.asarray(buffer.numpy())[:] = np.random.default_rng(0).standard_normal((8, 4))  # no version bump
    model(buffer, "b").sum().backward()  # pass 2: b must not reuse pass 1's sketch
    exact = torch.ones(8, 3).T @ buffer
    assert torch.allclose(model.b.weight.grad, exact, atol=1e-5)


def test_standalone_layers_do_not_share_a_sketch_across_passes():
    torch.manual_seed(0)
    a, b = RandomizedLinear(4, 3, rho=1.0, sketch="srht"), RandomizedLinear(4, 3, rho=1.0, sketch="srht")
    buffer = torch.randn(8, 4)
    a(buffer).sum().backward()
    buffer.numpy()[:] = np.random.default_rng(1).standard_normal((8, 4))
    b(buffer).sum().backward()
    assert torch.allclose(b.weight.grad, torch.ones(8, 3).T @ buffer, atol=1e-5)


# ---------------------------------------------------------------------------- non-reentrant checkpointing


def test_no_sketch_kept_alive_under_non_reentrant_checkpointing(tiny_roberta):
    """Hugging Face's default checkpointing (use_reentrant=False) runs the first forward with
    grad enabled: no sketch may stay alive past the layers that use it. Live bytes after the
    forward (every CPU allocation still held) must not exceed exact's."""
    model = tiny_roberta
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers ≥ 5 names it so
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    batch = tiny_batch(model, batch_size=8, seq_len=32)
    live = {}
    for method in ("exact", "randomized"):
        model = convert(model, 0.5, sketch="countsketch") if method == "randomized" else restore(model)
        torch.manual_seed(0)
        loss, live[method] = live_bytes_after(lambda: model(**batch).loss)
        loss.backward()
        del loss
    assert live["randomized"] <= live["exact"], live
