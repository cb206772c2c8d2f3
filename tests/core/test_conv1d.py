"""GPT-2's Conv1D (weight stored (in, out), y = x W + b) randomized like nn.Linear: exact output,
dX and db; an unbiased dW in Conv1D's layout; ρ = 1 with `balanced` the exact dW."""

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from randbp_cli import convert, converted_names, describe_conversion, restore
from randbp_cli.core.layers import RandomizedConv1D, is_conv1d


def _grads(layer, x, grad_out):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    out.backward(grad_out)
    grads = (out.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone())
    layer.weight.grad = layer.bias.grad = None
    return grads


@pytest.fixture
def conv():
    torch.manual_seed(0)
    layer = Conv1D(12, 8)
    torch.nn.init.normal_(layer.bias)
    return layer


def test_exact_output_input_and_bias_gradients(conv):
    x, grad_out = torch.randn(3, 7, 8), torch.randn(3, 7, 12)
    out, dx, _, db = _grads(conv, x, grad_out)
    randomized = RandomizedConv1D.from_conv1d(conv, rho=0.25, sketch="countsketch")
    assert randomized.weight is conv.weight and randomized.bias is conv.bias
    r_out, r_dx, r_dw, r_db = _grads(randomized, x, grad_out)
    assert torch.equal(r_out, out) and torch.equal(r_dx, dx) and torch.equal(r_db, db)
    assert r_dw.shape == conv.weight.shape == (8, 12)


def test_rho_one_balanced_is_the_exact_weight_gradient(conv):
    x, grad_out = torch.randn(4, 5, 8), torch.randn(4, 5, 12)
    _, _, dw, _ = _grads(conv, x, grad_out)
    _, _, r_dw, _ = _grads(RandomizedConv1D.from_conv1d(conv, rho=1.0, sketch="balanced"), x, grad_out)
    torch.testing.assert_close(r_dw, dw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sketch", ["balanced", "countsketch"])
def test_weight_gradient_is_unbiased(conv, sketch):
    torch.manual_seed(1)
    conv = conv.double()
    x, grad_out = torch.randn(10, 8, dtype=torch.float64), torch.randn(10, 12, dtype=torch.float64)
    _, _, dw, _ = _grads(conv, x, grad_out)
    randomized = RandomizedConv1D.from_conv1d(conv, rho=0.5, sketch=sketch)
    repeats = 2000
    draws = torch.stack([_grads(randomized, x, grad_out)[2] for _ in range(repeats)])
    z = (draws.mean(0) - dw).abs() / (draws.std(0) / repeats ** 0.5)
    assert float(z.max()) < 5.0  # no bias beyond Monte-Carlo error, in every entry


def test_convert_swaps_gpt2s_conv1d_layers_and_restore_puts_them_back():
    from randbp_cli.data.models import load_model

    model = load_model("gpt2-tiny", offline=True).model
    originals = {name: module for name, module in model.named_modules() if is_conv1d(module)}
    model = convert(model, 0.5, sketch="countsketch")
    names = converted_names(model)
    assert set(originals) <= set(names)  # every Conv1D (and the tied LM head, an nn.Linear)
    assert all(isinstance(model.get_submodule(name), RandomizedConv1D) for name in originals)
    assert describe_conversion(model)["randomized_layers"] == len(names)
    model = restore(model)
    assert all(model.get_submodule(name) is module for name, module in originals.items())


def _exact_and_randomized_grads(run):
    """Gradients of a Conv1D and of its ρ = 1 balanced RandomizedConv1D (exact), both through `run`."""
    torch.manual_seed(3)
    conv = Conv1D(12, 8)
    x, grad_out = torch.randn(2, 6, 8), torch.randn(2, 6, 12)
    randomized = RandomizedConv1D.from_conv1d(Conv1D(12, 8), rho=1.0, sketch="balanced")
    randomized.weight.data.copy_(conv.weight.data)
    randomized.bias.data.copy_(conv.bias.data)
    return [_grads_through(layer, x, grad_out, run) for layer in (conv, randomized)]


def _grads_through(layer, x, grad_out, run):
    x = x.clone().requires_grad_(True)
    run(layer, x).float().backward(grad_out)
    return x.grad, layer.weight.grad, layer.bias.grad


@pytest.mark.parametrize("mode", ["compile", "checkpoint", "autocast"])
def test_exact_gradients_at_rho_one_in_every_mode(mode):
    """torch.compile (aot_eager: Dynamo and AOTAutograd's tracing), activation checkpointing and
    bf16 autocast: the randomized Conv1D at ρ = 1 gives Conv1D's gradients."""
    from torch.utils.checkpoint import checkpoint

    runs = {"compile": lambda layer, x: torch.compile(layer, backend="aot_eager")(x),
            "checkpoint": lambda layer, x: checkpoint(layer, x, use_reentrant=False),
            "autocast": lambda layer, x: _autocast(layer, x)}
    exact, randomized = _exact_and_randomized_grads(runs[mode])
    tolerance = dict(rtol=2e-2, atol=2e-2) if mode == "autocast" else dict(rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(randomized, exact):
        torch.testing.assert_close(ours, theirs, **tolerance)


def _autocast(layer, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return layer(x)
