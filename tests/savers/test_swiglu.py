"""The swiglu saver: the same gradients as the Llama-family MLP it replaces, one d_ff tensor less."""

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from decoder_models import grads, padded_batch, tiny_decoder
from randbp_cli import convert, converted_names, restore
from randbp_cli.cli.main import app
from randbp_cli.measure.memory import count_saved_bytes
from randbp_cli.savers.registry import apply_savers, describe_savers, restore_savers, saver_names
from randbp_cli.savers.swiglu import SwiGLUFunction, SwiGLUMLP, swiglu

F32 = 4


def _llama(lora: int | None = None):
    return tiny_decoder("llama-tiny", lora)


def _autocast_loss(model, batch):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(**batch).loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_function_is_silu_times_up_with_its_gradients(dtype):
    gen = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(6, 10, generator=gen, dtype=dtype).requires_grad_() for _ in range(2))
    grad = torch.randn(6, 10, generator=gen, dtype=dtype)
    out = swiglu(gate, up)
    expected = F.silu(gate) * up
    assert torch.equal(out, expected)  # the same ops in the same dtype: bit for bit
    ours = torch.autograd.grad(out, (gate, up), grad)
    theirs = torch.autograd.grad(expected, (gate, up), grad)
    tolerance = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else {}
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **tolerance)


def test_gradcheck_and_second_order():
    """The backward is differentiable torch ops: gradgradcheck holds, second-order flows."""
    gen = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(4, 5, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(2))
    assert torch.autograd.gradcheck(SwiGLUFunction.apply, (gate, up))
    assert torch.autograd.gradgradcheck(SwiGLUFunction.apply, (gate, up))


@pytest.mark.parametrize("lora", [None, 4])
def test_every_gradient_is_the_mlps_with_padding(lora):
    """Full fine-tuning and LoRA, with a padded row (-100 labels): every parameter's gradient as
    without the saver, to fp32 rounding."""
    model = _llama(lora)
    batch = padded_batch(model.config.vocab_size)
    exact = grads(model, batch)
    model = apply_savers(model, ["swiglu"])
    assert saver_names(model) == ["swiglu"] and len(describe_savers(model)["swiglu_mlps"]) == 2
    ours = grads(model, batch)
    assert ours.keys() == exact.keys() and exact
    for name, grad in exact.items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mode", ["compile", "checkpoint", "autocast"])
def test_every_gradient_is_the_mlps_in_every_mode(mode):
    """torch.compile (aot_eager), Hugging Face activation checkpointing and bf16 autocast, each
    against the same mode without the saver."""
    model = _llama(lora=4)
    batch = padded_batch(model.config.vocab_size)
    if mode == "checkpoint":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    run = {"compile": lambda m, b: torch.compile(m, backend="aot_eager")(**b).loss,
           "checkpoint": lambda m, b: m(**b).loss, "autocast": _autocast_loss}[mode]
    exact = grads(model, batch, run)
    model = apply_savers(model, ["swiglu"])
    ours = grads(model, batch, run)
    tolerance = dict(rtol=2e-2, atol=2e-3) if mode == "autocast" else dict(rtol=1e-5, atol=1e-6)
    for name, grad in exact.items():
        torch.testing.assert_close(ours[name], grad, **tolerance, msg=lambda m: f"{name}: {m}")
    torch._dynamo.reset()


def test_one_d_ff_tensor_less_per_token_and_layer():
    """By kind: SwiGLU's three d_ff tensors (mlp) become two (swiglu_inputs); nothing else moves."""
    model = _llama()
    batch = padded_batch(model.config.vocab_size)
    _, before = count_saved_bytes(lambda: model(**batch).loss, model, exclude=batch.values())
    model = apply_savers(model, ["swiglu"])
    _, after = count_saved_bytes(lambda: model(**batch).loss, model, exclude=batch.values())
    config, tokens = model.config, batch["input_ids"].numel()
    d_ff = config.intermediate_size * tokens * config.num_hidden_layers * F32
    assert before.by_kind["mlp"] == 3 * d_ff
    assert after.by_kind["mlp"] == 0 and after.by_kind["swiglu_inputs"] == 2 * d_ff
    assert before.total_bytes - after.total_bytes == d_ff
    assert {k: v for k, v in after.by_kind.items() if k not in ("mlp", "swiglu_inputs")} == {
        k: v for k, v in before.by_kind.items() if k != "mlp"}


@pytest.mark.parametrize("saver_first", [True, False])
def test_convert_and_the_saver_in_either_order_and_restore(saver_first):
    """The stand-in shares the MLP's child modules: the layers convert puts under it are under the
    original too, and restore puts back the very original objects."""
    model = _llama()
    mlp, gate = model.model.layers[0].mlp, model.model.layers[0].mlp.gate_proj
    if saver_first:
        model = convert(apply_savers(model, ["swiglu"]), 0.5)
    else:
        model = apply_savers(convert(model, 0.5), ["swiglu"])
    assert isinstance(model.model.layers[0].mlp, SwiGLUMLP)
    assert "model.layers.0.mlp.gate_proj" in converted_names(model)
    batch = padded_batch(model.config.vocab_size)
    model(**batch).loss.backward()  # runs: randomized projections inside the saver's MLP
    model = restore(model)
    assert model.model.layers[0].mlp is mlp and mlp.gate_proj is gate
    assert not converted_names(model) and not saver_names(model)
    model = restore_savers(apply_savers(model, ["swiglu"]))
    assert model.model.layers[0].mlp is mlp


def test_a_model_without_swiglu_is_refused_in_one_line():
    """GPT-2's MLP is GELU, RoBERTa's too: `--saver swiglu` is one line, exit 2, before any run."""
    for model in ("gpt2-tiny", "roberta-tiny"):
        result = CliRunner().invoke(app, ["profile", "--model", model, "--saver", "swiglu", "-b", "1", "--seq-len", "8",
                                          "--steps", "1", "--warmup", "0", "--device", "cpu", "--offline"])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, result.output
        assert "saver 'swiglu' finds nothing to replace" in lines[0] and "LlamaMLP" in lines[0]


def test_profile_with_the_saver_reports_its_bytes():
    from randbp_cli.commands.profile import run_profile
    from randbp_cli.run.plans import ProfileConfig

    report = run_profile(ProfileConfig(model="llama-tiny", rhos=[0.5], batch_sizes=[1], seq_len=16, steps=1, warmup=0,
                                       device="cpu", offline=True, lora=4, savers=["swiglu"]))
    cases = {(r["method"], tuple(r.get("savers") or ())): r for r in report["results"]}
    plain, saved = cases[("exact", ())], cases[("exact", ("swiglu",))]
    assert saved["activation_bytes_by_kind"]["swiglu_inputs"] == 2 / 3 * plain["activation_bytes_by_kind"]["mlp"]
    assert cases[("randomized", ("swiglu",))]["activation_bytes"] < saved["activation_bytes"]
