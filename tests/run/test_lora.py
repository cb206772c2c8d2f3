"""LoRA through PEFT: the adapters' lora_A layers are what gets sketched (frozen base layers left
alone), their weight gradients stay unbiased and are exact at ρ = 1 with `balanced`; the adapters
that read one tensor share one sketch; the o_proj adapter, whose input SDPA keeps anyway, is left
exact; `restore` undoes it; bad options are one line, exit 2."""

import json
import math
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from randbp_cli import convert, converted_names, describe_conversion, restore
from randbp_cli.cli.main import app
from randbp_cli.core.convert import FROZEN, KEPT_ANYWAY
from randbp_cli.data.models import load_model
from randbp_cli.measure.memory import count_saved_bytes
from randbp_cli.run.lora import LORA_A, apply_lora, lora_spec


def _peft_llama(r=4):
    torch.manual_seed(0)
    model = apply_lora(load_model("llama-tiny", offline=True).model, lora_spec(r))
    for name, param in model.named_parameters():  # PEFT starts lora_B at zero: give lora_A a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    return model.train()


def _batch(model, batch=2, seq=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _lora_a_grads(model, batch):
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if "lora_A" in name}


def test_convert_on_a_peft_model_sketches_only_trainable_layers_and_restores():
    model = _peft_llama()
    frozen = [name for name, m in model.named_modules() if name.endswith("base_layer")]
    model = convert(model, 0.5, sketch="countsketch", include=LORA_A)
    names = converted_names(model)
    assert names and all(".lora_A." in name for name in names)
    assert not any(name in names for name in frozen)
    # without include: the frozen base layers and the tied LM head are left exact, and said so
    model = convert(restore(model), 0.5, sketch="countsketch")
    left = describe_conversion(model)["left_exact"]
    assert all(name in left for name in frozen) and "frozen" in left[frozen[0]]
    assert not any(name.endswith("base_layer") for name in converted_names(model))
    model = restore(model)
    assert not converted_names(model) and "left_exact" not in describe_conversion(model)


def test_lora_gradients_are_exact_at_rho_one_balanced():
    model = _peft_llama()
    batch = _batch(model)
    exact = _lora_a_grads(model, batch)
    model = convert(model, 1.0, sketch="balanced", include=LORA_A)
    for name, grad in _lora_a_grads(model, batch).items():
        torch.testing.assert_close(grad, exact[name], rtol=1e-4, atol=1e-6)


def test_lora_a_weight_gradients_are_unbiased():
    model = _peft_llama().double()
    batch = _batch(model, batch=1, seq=12)
    exact = _lora_a_grads(model, batch)
    model = convert(model, 0.5, sketch="countsketch", include=LORA_A)
    repeats = 600
    sums = {name: torch.zeros_like(g) for name, g in exact.items()}
    squares = {name: torch.zeros_like(g) for name, g in exact.items()}
    for _ in range(repeats):
        for name, grad in _lora_a_grads(model, batch).items():
            sums[name] += grad
            squares[name] += grad * grad
    worst = 0.0
    for name, grad in exact.items():
        mean = sums[name] / repeats
        std = (squares[name] / repeats - mean * mean).clamp_min(0).sqrt()
        z = (mean - grad).abs() / (std / math.sqrt(repeats)).clamp_min(1e-12)
        worst = max(worst, float(z.max()))
    assert worst < 5.5  # ~3,000 entries: no bias beyond Monte-Carlo error


def test_adapters_of_one_tensor_share_a_sketch_and_o_proj_is_left_exact():
    """Per layer: one sketch of the attention norm's output (q/k/v), one of the MLP norm's (gate/up),
    one of down_proj's input; o_proj's adapter reads SDPA's output, which SDPA keeps: left exact."""
    model = _peft_llama()
    batch = _batch(model, batch=2, seq=32)
    config = model.config
    model = convert(model, 0.25, sketch="balanced", include=LORA_A, probe=lambda m: m(**batch))
    left = describe_conversion(model)["left_exact"]
    assert set(left) == {f"base_model.model.model.layers.{i}.self_attn.o_proj.lora_A.default"
                         for i in range(config.num_hidden_layers)}
    assert set(left.values()) == {KEPT_ANYWAY}
    _, stats = count_saved_bytes(lambda: model(**batch).loss, model, exclude=batch.values())
    k = round(0.25 * 2 * 32)
    per_layer = k * (2 * config.hidden_size + config.intermediate_size) * 4
    assert stats.by_kind["sketches"] == per_layer * config.num_hidden_layers
    # every trainable layer, lora_B too (--lora's default): each lora_B draws between two lora_A that
    # read one tensor, and they still share (the scope keeps more than the latest sketch)
    model = convert(restore(model), 0.25, sketch="balanced", probe=lambda m: m(**batch))
    _, stats = count_saved_bytes(lambda: model(**batch).loss, model, exclude=batch.values())
    lora_b = k * 4 * 7 * 4  # seven r-wide inputs per layer
    assert stats.by_kind["sketches"] == (per_layer + lora_b) * config.num_hidden_layers
    assert stats.by_kind["linear_inputs"] == 0


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("value, needle", [("0", "whole number >= 1"), ("-1", "whole number >= 1"),
                                           ("four", "Input should be a valid integer")])
def test_bad_lora_ranks_are_one_line_exit_2(value, needle):
    result = _cli("profile", "--model", "llama-tiny", "--lora", value, "--device", "cpu", "--offline")
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr


def test_profile_with_lora_prints_no_library_warnings():
    """PEFT reads a property transformers 5.25 deprecates: the FutureWarning is theirs, and our
    stderr holds only our own lines (a real process: pytest would catch the warning itself)."""
    result = subprocess.run([sys.executable, "-c", "from randbp_cli.cli.main import main; main()", "profile",
                             "--model", "llama-tiny", "--lora", "4", "-b", "1", "--seq-len", "8", "--steps", "1",
                             "--warmup", "0", "--device", "cpu", "--offline", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["config"]["lora"]["r"] == 4
    assert "Warning" not in result.stderr, result.stderr


def test_an_unknown_lora_target_is_one_line_exit_2():
    result = _cli("profile", "--model", "llama-tiny", "--lora", "4", "--lora-targets", "qproj", "-b", "1",
                  "--seq-len", "8", "--steps", "1", "--warmup", "0", "--device", "cpu", "--offline")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.stderr
    assert "qproj" in lines[0] and "q_proj" in lines[0]


def test_lora_without_peft_installed_is_one_line_exit_2(tmp_path):
    """`import peft` fails as it would without the package: one line that says how to install it."""
    shadow = tmp_path / "peft"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('No module named peft')\n")
    code = ("import sys; sys.path.insert(0, %r); from randbp_cli.cli.main import main; "
            "sys.argv = ['randbp', 'profile', '--model', 'llama-tiny', '--lora', '4', '-b', '1', '--seq-len', '8', "
            "'--steps', '1', '--warmup', '0', '--device', 'cpu', '--offline']; main()") % str(tmp_path)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "pip install peft" in lines[0]


def test_profile_with_lora_reports_the_settings_and_what_was_left_exact():
    from randbp_cli.commands.profile import run_profile
    from randbp_cli.run.plans import ProfileConfig

    report = run_profile(ProfileConfig(model="llama-tiny", rhos=[0.5], batch_sizes=[1], seq_len=16, steps=1, warmup=0,
                                       device="cpu", offline=True, lora=4, lora_dropout=0.0))
    assert report["config"]["lora"] == {"r": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["all-linear"]}
    exact, randomized = report["results"]
    left = randomized["left_exact"]
    assert left.pop("base_model.model.model.layers.*.self_attn.o_proj.lora_A.default") == KEPT_ANYWAY
    assert left.pop("base_model.model.lm_head") == FROZEN  # tied to the frozen embeddings
    assert len(left) == 7 and set(left.values()) == {FROZEN}  # the seven projections' base layers
    assert randomized["randomized_layers"] == (6 + 7) * 2  # 6 lora_A (o_proj's left) and 7 lora_B, 2 layers
    assert randomized["activation_bytes"] < exact["activation_bytes"]
    assert randomized["activation_bytes_by_kind"]["linear_inputs_shared"] == exact["activation_bytes_by_kind"][
        "linear_inputs_shared"]  # o_proj's input: kept by SDPA, not sketched on top


def _lora_grads(model, batch, run):
    model.zero_grad(set_to_none=True)
    run(model, batch).float().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def _autocast_loss(model, batch):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(**batch).loss


@pytest.mark.parametrize("mode", ["compile", "checkpoint", "autocast"])
def test_lora_gradients_are_exact_at_rho_one_in_every_mode(mode):
    """A PEFT model converted as the CLI converts it (every trainable layer, shared sketches, the
    kept input left exact) at ρ = 1 with balanced gives every adapter the exact LoRA gradient under
    torch.compile (aot_eager), Hugging Face's activation checkpointing (non-reentrant) and bf16
    autocast, each against the same mode without randbp."""
    model = _peft_llama()
    batch = _batch(model)
    if mode == "checkpoint":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    run = {"compile": lambda m, b: torch.compile(m, backend="aot_eager")(**b).loss,
           "checkpoint": lambda m, b: m(**b).loss, "autocast": _autocast_loss}[mode]
    exact = _lora_grads(model, batch, run)
    model = convert(model, 1.0, sketch="balanced", probe=lambda m: m(**batch))
    assert converted_names(model)
    ours = _lora_grads(model, batch, run)
    assert ours.keys() == exact.keys() and len(ours) == 2 * 7 * 2  # lora_A and lora_B, 7 projections, 2 layers
    tolerance = dict(rtol=2e-2, atol=2e-3) if mode == "autocast" else dict(rtol=1e-4, atol=1e-6)
    for name, grad in exact.items():
        torch.testing.assert_close(ours[name], grad, **tolerance, msg=lambda m: f"{name}: {m}")
    torch._dynamo.reset()
