"""The gelu-new saver: GPT-2's written-out tanh GELU as one op, the same gradients, three d_ff tensors less."""

import math

import pytest
import torch
from typer.testing import CliRunner

from decoder_models import grads, padded_batch, tiny_decoder
from randbp_cli.cli.main import app
from randbp_cli.measure.memory import count_saved_bytes
from randbp_cli.savers.gelu_new import TanhGELU
from randbp_cli.savers.registry import apply_savers, describe_savers, restore_savers, saver_names

F32 = 4


def _gpt2(lora: int | None = None):
    return tiny_decoder("gpt2-tiny", lora)


def test_the_op_is_the_written_out_formula():
    from transformers.activations import FastGELUActivation, NewGELUActivation

    x = torch.randn(200, dtype=torch.float64, requires_grad=True)
    for original in (NewGELUActivation(), FastGELUActivation()):
        ours, theirs = TanhGELU()(x), original(x)
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(torch.autograd.grad(ours.sum(), x)[0], torch.autograd.grad(theirs.sum(), x)[0],
                                   rtol=1e-9, atol=1e-9)
    assert math.isclose(0.7978845608, math.sqrt(2 / math.pi), rel_tol=1e-10)
    assert torch.autograd.gradgradcheck(TanhGELU(), (x[:5].detach().requires_grad_(),))


@pytest.mark.parametrize("lora", [None, 4])
def test_every_gradient_is_gpt2s_with_padding(lora):
    model = _gpt2(lora)
    path = "base_model.model.transformer.h.0.mlp.act" if lora else "transformer.h.0.mlp.act"
    act = model.get_submodule(path)
    batch = padded_batch(model.config.vocab_size)
    exact = grads(model, batch)
    model = apply_savers(model, ["gelu-new"])
    assert saver_names(model) == ["gelu-new"] and len(describe_savers(model)["tanh_gelus"]) == 2
    assert isinstance(model.get_submodule(path), TanhGELU)
    ours = grads(model, batch)
    assert ours.keys() == exact.keys() and exact
    for name, grad in exact.items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert restore_savers(model).get_submodule(path) is act


@pytest.mark.parametrize("mode", ["compile", "checkpoint", "autocast"])
def test_every_gradient_is_gpt2s_in_every_mode(mode):
    model = _gpt2()
    batch = padded_batch(model.config.vocab_size)
    if mode == "checkpoint":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def autocast(m, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(**b).loss

    run = {"compile": lambda m, b: torch.compile(m, backend="aot_eager")(**b).loss,
           "checkpoint": lambda m, b: m(**b).loss, "autocast": autocast}[mode]
    exact = grads(model, batch, run)
    model = apply_savers(model, ["gelu-new"])
    ours = grads(model, batch, run)
    tolerance = dict(rtol=2e-2, atol=2e-3) if mode == "autocast" else dict(rtol=1e-5, atol=1e-6)
    for name, grad in exact.items():
        torch.testing.assert_close(ours[name], grad, **tolerance, msg=lambda m: f"{name}: {m}")
    torch._dynamo.reset()


def test_three_d_ff_tensors_less_per_token_and_layer():
    """By kind: the written-out GELU's x, tanh, 0.5·x and 1 + tanh (mlp) become x alone (gelu_inputs)."""
    model = _gpt2()
    batch = padded_batch(model.config.vocab_size)
    _, before = count_saved_bytes(lambda: model(**batch).loss, model, exclude=batch.values())
    model = apply_savers(model, ["gelu-new"])
    _, after = count_saved_bytes(lambda: model(**batch).loss, model, exclude=batch.values())
    config, tokens = model.config, batch["input_ids"].numel()
    d_ff = (config.n_inner or 4 * config.n_embd) * tokens * config.n_layer * F32
    assert after.by_kind["gelu_inputs"] == d_ff
    assert before.by_kind["mlp"] - after.by_kind["mlp"] == 4 * d_ff
    assert before.total_bytes - after.total_bytes == 3 * d_ff


def test_a_model_without_it_is_refused_in_one_line():
    result = CliRunner().invoke(app, ["profile", "--model", "llama-tiny", "--saver", "gelu-new", "-b", "1",
                                      "--seq-len", "8", "--steps", "1", "--warmup", "0", "--device", "cpu",
                                      "--offline"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "saver 'gelu-new' finds nothing to replace" in lines[0] and "NewGELUActivation" in lines[0]


def test_gelu_bits_take_the_tanh_form_and_not_with_gelu_new():
    """`gelu:2` on GPT-2: a FewBitGELU of the tanh form (the forward as before, to rounding; 2 bits
    kept per element); given with gelu-new, which replaces the same modules, it is refused."""
    from randbp_cli.errors import ConfigError

    model = _gpt2()
    batch = padded_batch(model.config.vocab_size)
    torch.manual_seed(5)
    loss = model(**batch).loss
    model = apply_savers(model, ["gelu:2"])
    assert model.transformer.h[0].mlp.act.approximate == "tanh"
    torch.manual_seed(5)
    torch.testing.assert_close(model(**batch).loss, loss)
    _, stats = count_saved_bytes(lambda: model(**batch).loss, model, exclude=batch.values())
    config, tokens = model.config, batch["input_ids"].numel()
    d_ff = config.n_inner or 4 * config.n_embd
    assert stats.by_kind["gelu_codes"] == config.n_layer * math.ceil(2 * tokens * d_ff / 8)
    with pytest.raises(ConfigError, match="savers 'gelu-new' and 'gelu:2' would both replace transformer.h.0.mlp.act"):
        apply_savers(model, ["gelu-new", "gelu:2"])


@pytest.mark.parametrize("mode", ["compile", "checkpoint"])
def test_gelu_bits_on_the_tanh_form_in_every_mode(mode):
    """gelu:2 on GPT-2's tanh GELU: compiled (aot_eager) and checkpointed, every gradient as eager's
    with the same saver (its gradient is approximate, so eager gelu:2 is the reference)."""
    model = apply_savers(_gpt2(), ["gelu:2"])
    batch = padded_batch(model.config.vocab_size)
    eager = grads(model, batch)
    if mode == "checkpoint":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ours = grads(model, batch)
    else:
        ours = grads(model, batch, lambda m, b: torch.compile(m, backend="aot_eager")(**b).loss)
        torch._dynamo.reset()
    for name, grad in eager.items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
