"""The lm-head saver: a causal LM's loss and every gradient as the model's own, the logits never held."""

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from decoder_models import grads, padded_batch, tiny_decoder
from randbp_cli import convert, converted_names, restore
from randbp_cli.cli.main import app
from randbp_cli.core.sketches import get_sketch
from randbp_cli.errors import ConfigError
from randbp_cli.measure.memory import count_saved_bytes
from randbp_cli.run.methods import Method, prepare_model
from randbp_cli.savers.lm_head import (FusedLMHead, block_rows, linear_cross_entropy, reference_linear_cross_entropy,
                                       shift_targets)
from randbp_cli.savers.registry import apply_savers, describe_savers, restore_savers, saver_names

F32, I64 = 4, 8
MODELS = ("llama-tiny", "gpt2-tiny")


def _assert_same_grads(ours, exact, **tolerance):
    assert ours.keys() == exact.keys() and exact
    for name, grad in exact.items():
        torch.testing.assert_close(ours[name], grad, **(tolerance or dict(rtol=1e-5, atol=1e-6)),
                                   msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------- the function


@pytest.mark.parametrize("train_head", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [1, 7, None])
def test_the_function_is_the_unfused_loss_with_its_gradients(train_head, dtype, rows):
    """Loss and gradients of hidden states, weight and bias as linear → float → cross_entropy,
    whatever the block size, with ignored rows, and scaled by the incoming gradient."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 13, 16, generator=gen, dtype=dtype).requires_grad_()
    weight = torch.randn(50, 16, generator=gen, dtype=dtype).requires_grad_(train_head)
    bias = torch.randn(50, generator=gen, dtype=dtype).requires_grad_(train_head)
    targets = torch.randint(0, 50, (2, 13), generator=gen)
    targets[0, :5] = -100
    inputs = [t for t in (hidden, weight, bias) if t.requires_grad]
    ours = linear_cross_entropy(hidden, weight, bias, targets, rows=rows)
    theirs = reference_linear_cross_entropy(hidden, weight, bias, targets)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(torch.autograd.grad(3 * ours, inputs), torch.autograd.grad(3 * theirs, inputs)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_num_items_in_batch_and_nothing_to_count():
    """transformers' convention: the sum over `num_items_in_batch` when given; NaN when no target counts."""
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(9, 8, generator=gen), torch.randn(20, 8, generator=gen)
    targets = torch.randint(0, 20, (9,), generator=gen)
    for items in (7, torch.tensor(7)):
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, None, targets, num_items_in_batch=items),
                                   reference_linear_cross_entropy(hidden, weight, None, targets, num_items_in_batch=7))
    nothing = torch.full((9,), -100)
    assert linear_cross_entropy(hidden, weight, None, nothing).isnan()
    assert reference_linear_cross_entropy(hidden, weight, None, nothing).isnan()


def test_bf16_autocast_is_the_unfused_heads():
    """Under autocast the products run in bf16 as the unfused head's do; the loss in float32."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(20, 16, generator=gen).requires_grad_()
    weight = torch.randn(50, 16, generator=gen).requires_grad_()
    targets = torch.randint(0, 50, (20,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(hidden, weight, None, targets, rows=6)
        theirs = reference_linear_cross_entropy(hidden, weight, None, targets)
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(torch.autograd.grad(ours, (hidden, weight)), torch.autograd.grad(theirs, (hidden, weight))):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_second_order_through_it_raises():
    """The backward is not differentiable: a create_graph backward through it says so, rather than
    hand back a gradient without the loss's second-order part (frozen and trained head alike)."""
    for weight in (torch.randn(10, 8), torch.randn(10, 8, requires_grad=True)):
        hidden = torch.randn(4, 8, requires_grad=True)
        loss = linear_cross_entropy(hidden, weight, None, torch.tensor([1, 2, 3, -100]))
        with pytest.raises(RuntimeError, match="no second-order gradients"):
            torch.autograd.grad(loss, hidden, create_graph=True)


def test_block_rows():
    assert block_rows(512, 49152) == 341  # 64 MiB of float32 logits per block on the CPU
    assert block_rows(4096, 128256, "cuda") == 523  # 256 MiB on a GPU
    assert block_rows(10, 49152) == 10 and block_rows(512, 10**9) == 1


def test_shift_targets():
    labels = torch.tensor([[5, 6, 7], [8, -100, 9]])
    assert shift_targets(labels).tolist() == [[6, 7, -100], [-100, 9, -100]]


# ---------------------------------------------------------------------------- the saver on models


@pytest.mark.parametrize("lora", [None, 4])
@pytest.mark.parametrize("name", MODELS)
def test_every_gradient_is_the_models_with_padding(name, lora):
    """Llama (untied head) and GPT-2 (head tied to the embedding), full fine-tuning and LoRA, a padded
    row: the loss and every parameter's gradient as without the saver; no logits in training, the
    logits as before without gradients (evaluation); restore puts back the very head."""
    model = tiny_decoder(name, lora)
    head = model.get_submodule("base_model.model.lm_head" if lora else "lm_head")
    batch = padded_batch(model.config.vocab_size)
    torch.manual_seed(5)
    loss = model(**batch).loss
    exact = grads(model, batch)
    with torch.no_grad():
        torch.manual_seed(5)
        logits = model(**batch).logits
    model = apply_savers(model, ["lm-head"])
    assert saver_names(model) == ["lm-head"] and len(describe_savers(model)["fused_lm_heads"]) == 1
    torch.manual_seed(5)
    out = model(**batch)
    assert out.logits is None and "logits" not in out.keys()
    torch.testing.assert_close(out.loss, loss)
    _assert_same_grads(grads(model, batch), exact)
    with torch.no_grad():
        torch.manual_seed(5)
        torch.testing.assert_close(model(**batch).logits, logits)
    model = restore_savers(model)
    assert model.get_submodule("base_model.model.lm_head" if lora else "lm_head") is head
    assert not any("forward" in vars(m) for m in model.modules())


@pytest.mark.parametrize("mode", ["compile", "checkpoint", "autocast"])
@pytest.mark.parametrize("name, lora", [("llama-tiny", 4), ("gpt2-tiny", None)])
def test_every_gradient_is_the_models_in_every_mode(name, lora, mode):
    """torch.compile (aot_eager; with the saver, one graph: no break), Hugging Face activation checkpointing and bf16
    autocast, each against the same mode without the saver."""
    model = tiny_decoder(name, lora)
    batch = padded_batch(model.config.vocab_size)
    if mode == "checkpoint":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def autocast(m, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(**b)
        assert out.logits is None or "lm-head" not in saver_names(m)
        return out.loss

    def compiled(m, b):  # the saver's forward in one graph; GPT-2's own loss breaks it (transformers logs a warning)
        return torch.compile(m, backend="aot_eager", fullgraph="lm-head" in saver_names(m))(**b).loss

    run = {"compile": compiled,
           "checkpoint": lambda m, b: m(**b).loss, "autocast": autocast}[mode]
    exact = grads(model, batch, run)
    model = apply_savers(model, ["lm-head"])
    ours = grads(model, batch, run)
    _assert_same_grads(ours, exact, **(dict(rtol=2e-2, atol=2e-3) if mode == "autocast" else {}))
    torch._dynamo.reset()


def test_transformers_loss_arguments():
    """`num_items_in_batch` (gradient accumulation's denominator), `shift_labels` given ready-made, and
    labels passed by position: the model's own loss each time."""
    model = tiny_decoder("llama-tiny")
    batch = padded_batch(model.config.vocab_size)
    shifted = shift_targets(batch["labels"]).clone()
    shifted[0, :3] = -100
    calls = [dict(batch, num_items_in_batch=torch.tensor(9)), dict(batch, shift_labels=shifted)]
    expected = [model(**kwargs).loss for kwargs in calls]
    positional = model(batch["input_ids"], batch["attention_mask"], None, None, None, batch["labels"]).loss
    model = apply_savers(model, ["lm-head"])
    for kwargs, loss in zip(calls, expected):
        torch.testing.assert_close(model(**kwargs).loss, loss)
    out = model(batch["input_ids"], batch["attention_mask"], None, None, None, batch["labels"])
    assert out.logits is None
    torch.testing.assert_close(out.loss, positional)


@pytest.mark.parametrize("lora", [None, 4])
def test_the_logits_bytes_go(lora):
    """By kind: `logits` (float32 N × vocab, the labels and a scalar) goes; `lm_head_loss` keeps, for a
    frozen head, the hidden states' gradient (N × H), for a trained one the hidden states, a
    log-sum-exp per row, the targets and the scale (and the head's input leaves `linear_inputs`)."""
    model = tiny_decoder("llama-tiny", lora)
    batch = padded_batch(model.config.vocab_size)
    _, before = count_saved_bytes(lambda: model(**batch).loss, model, exclude=batch.values())
    model = apply_savers(model, ["lm-head"])
    _, after = count_saved_bytes(lambda: model(**batch).loss, model, exclude=batch.values())
    tokens, hidden, vocab = batch["input_ids"].numel(), model.config.hidden_size, model.config.vocab_size
    assert before.by_kind["logits"] == tokens * vocab * F32 + tokens * I64 + F32
    assert after.by_kind.get("logits", 0) == 0
    if lora:
        assert after.by_kind["lm_head_loss"] == tokens * hidden * F32
        assert after.by_kind["linear_inputs"] == before.by_kind["linear_inputs"]
    else:
        assert after.by_kind["lm_head_loss"] == tokens * hidden * F32 + tokens * F32 + tokens * I64 + F32
        assert before.by_kind["linear_inputs"] - after.by_kind["linear_inputs"] == tokens * hidden * F32
    others = {k for k in before.by_kind if k not in ("logits", "linear_inputs", "lm_head_loss")}
    assert {k: after.by_kind[k] for k in others} == {k: before.by_kind[k] for k in others}


def test_with_convert_and_swiglu():
    """The CLI's order (savers, then convert): the head is no nn.Linear to convert, the rest is
    randomized; at ρ = 1 with balanced every gradient is still the exact model's. A head convert
    randomized first is refused in one line."""
    model = tiny_decoder("llama-tiny")
    batch = padded_batch(model.config.vocab_size)
    exact = grads(model, batch)
    model = prepare_model(model, Method.named("randomized", 1.0, get_sketch("balanced"), savers=("swiglu", "lm-head")))
    assert isinstance(model.lm_head, FusedLMHead) and "lm_head" not in converted_names(model)
    assert "model.layers.0.mlp.gate_proj" in converted_names(model)
    _assert_same_grads(grads(model, batch), exact)
    model = convert(restore(model), 0.5)
    with pytest.raises(ConfigError, match="randomized by convert, or wrapped by PEFT"):
        apply_savers(model, ["lm-head"])


def test_a_model_without_a_causal_lm_head_is_refused_in_one_line():
    result = CliRunner().invoke(app, ["profile", "--model", "roberta-tiny", "--saver", "lm-head", "-b", "1",
                                      "--seq-len", "8", "--steps", "1", "--warmup", "0", "--device", "cpu",
                                      "--offline"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "saver 'lm-head' finds nothing to replace" in lines[0] and "LlamaForCausalLM" in lines[0]


def test_a_custom_loss_is_refused():
    model = tiny_decoder("llama-tiny")
    model.loss_function = lambda logits, labels, **kwargs: F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    with pytest.raises(ConfigError, match="has a loss function of its own"):
        apply_savers(model, ["lm-head"])
