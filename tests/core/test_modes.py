"""Every execution mode a user can pick computes the gradient the README promises (issue 20).

The same checks, parametrised over the modes: eager; torch.compile with the backends users get
(`aot_eager`, and Inductor, the default); the fused Triton kernel (its interpreter on a CPU);
activation checkpointing, reentrant and not, eager and inside a compiled region; autocast bf16;
the savers (`dropout`, `gelu:2`) on and off. "It runs" and "steps differ" prove nothing about a
gradient, so each check compares with the exact gradient:
  * at ρ = 1 the balanced sketch is a signed permutation (S Sᵀ = I exactly): every gradient must
    equal nn.Linear's to rounding — the sharpest test that forward and backward share S;
  * at ρ < 1 the mean of many steps' weight gradients must be the exact one (Monte Carlo, z-test);
  * on a model with many converted layers every sketch and every saver compiles, without a graph
    break the plain model does not have and without recompiling after warm-up;
  * second order: unbiased, or refused with a clear error; hooks keep firing; training learns.
CUDA graphs cannot run here: tests/test_cuda.py has their checks, run by scripts/gpu_check.sh.
"""

from __future__ import annotations

import copy
import json
import math
from contextlib import ExitStack
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from randbp_cli import RandomizedLinear, apply_savers, convert, restore

from randbp_cli.kernels import balanced_triton
from randbp_cli.errors import SecondOrderError
from randbp_cli.core.sketches import sketch_names

from conftest import tiny_batch


@dataclass(frozen=True)
class Mode:
    compile: str | None = None  # a torch.compile backend
    checkpoint: str | None = None  # "reentrant" or "non-reentrant"
    autocast: bool = False  # torch.autocast bf16
    kernel: bool = False  # the fused Triton kernel (interpreted on a CPU)


MODES = {
    "eager": Mode(),
    "aot_eager": Mode(compile="aot_eager"),
    "inductor": Mode(compile="inductor"),
    "triton-kernel": Mode(kernel=True),
    "checkpoint-reentrant": Mode(checkpoint="reentrant"),
    "checkpoint": Mode(checkpoint="non-reentrant"),
    "checkpoint-compiled": Mode(compile="aot_eager", checkpoint="non-reentrant"),
    "autocast-bf16": Mode(autocast=True),
    "autocast-bf16-compiled": Mode(compile="aot_eager", autocast=True),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    yield
    torch._dynamo.reset()


class _MLP(nn.Module):
    """x → up → GELU → dropout → down, plus skip(x); `up` and `skip` read the same x (one shared
    sketch). Returns the output and h, the input of `down`, so a test knows down's exact dW = dYᵀh."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.up, self.act, self.drop = nn.Linear(12, 24), nn.GELU(), nn.Dropout(p)
        self.down, self.skip = nn.Linear(24, 6), nn.Linear(12, 6)

    def forward(self, x):
        h = self.drop(self.act(self.up(x)))
        return self.down(h) + self.skip(x), h


def _stepper(model: nn.Module, mode: Mode):
    """step(x, c): one forward and backward of L = ⟨out, c⟩ in `mode`; returns (out, h), detached."""

    def forward(x):
        if mode.checkpoint:
            return checkpoint(model, x, use_reentrant=mode.checkpoint == "reentrant")
        return model(x)

    if mode.compile:
        forward = torch.compile(forward, backend=mode.compile)

    def step(x, c):
        with ExitStack() as stack:
            if mode.autocast:
                stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
            if mode.kernel:
                stack.enter_context(balanced_triton.kernel_on_cpu())
            out, h = forward(x)
            (out.float() * c).sum().backward()
        return out.detach().float(), h.detach().float()

    return step


def _needs(mode: Mode) -> None:
    if mode.kernel and not balanced_triton.interpreted():
        pytest.skip("the kernel runs on a CPU only under Triton's interpreter")


def _data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(4, 5, 12, generator=gen), torch.randn(4, 5, 6, generator=gen)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _tolerance(mode: Mode) -> dict:
    # bf16 rounds each product and sum to 8 bits; S permutes the order of the sums
    return {"rtol": 2e-2, "atol": 2e-2} if mode.autocast else {"rtol": 1e-5, "atol": 1e-5}


# ---------------------------------------------------------------------------- ρ = 1: exact


@pytest.mark.parametrize("mode_name", MODES)
def test_rho_one_balanced_gives_nn_linears_gradients(mode_name):
    """Output, dX, dW and db equal plain nn.Linear's (run eagerly in the same precision)."""
    mode = MODES[mode_name]
    _needs(mode)
    torch.manual_seed(0)
    plain = _MLP()
    model = convert(copy.deepcopy(plain), 1.0)
    x, c = _data()

    def run(net, run_mode):
        net.zero_grad(set_to_none=True)
        inp = x.clone().requires_grad_(True)
        step = _stepper(net, run_mode)
        for _ in range(2):  # the second step runs the already compiled graphs
            net.zero_grad(set_to_none=True)
            inp.grad = None
            out, h = step(inp, c)
        return out, inp.grad, _grads(net)

    reference = run(plain, Mode(autocast=mode.autocast))
    ours = run(model, mode)
    tol = _tolerance(mode)
    torch.testing.assert_close(ours[0], reference[0], **tol)
    torch.testing.assert_close(ours[1].float(), reference[1].float(), **tol)
    for name, grad in reference[2].items():
        torch.testing.assert_close(ours[2][name], grad, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mode_name", MODES)
def test_rho_one_with_the_savers_gives_the_exact_weight_gradient(mode_name):
    """With seed dropout (p = 0.2) and the 2-bit GELU before it, `down`'s dW is exactly dYᵀh for
    the h this very step computed (dY = c), and `skip`'s is cᵀx: the masks and sketches of the
    forward are the ones the backward uses, whatever mode runs them."""
    mode = MODES[mode_name]
    _needs(mode)
    torch.manual_seed(0)
    model = apply_savers(convert(_MLP(p=0.2), 1.0), ["dropout", "gelu:2"])
    x, c = _data()
    step = _stepper(model, mode)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        inp = x.clone().requires_grad_(True)
        _, h = step(inp, c)
        assert (h == 0).any()  # dropout dropped something
        c2, h2, x2 = c.reshape(-1, 6), h.reshape(-1, 24), x.reshape(-1, 12)
        tol = _tolerance(mode)
        torch.testing.assert_close(model.down.weight.grad, c2.T @ h2, **tol)
        torch.testing.assert_close(model.skip.weight.grad, c2.T @ x2, **tol)


def test_a_checkpointed_block_compiles_without_a_graph_break():
    """Activation checkpointing inside the compiled region: the block traces whole (randbp's
    layers touch no Python state there: a side effect would break the graph at the block and
    run it eagerly, which the gradient checks above could not tell from compiled)."""
    model = apply_savers(convert(_MLP(p=0.2), 0.5), ["dropout", "gelu:2"])
    x = torch.randn(4, 5, 12, requires_grad=True)
    explanation = torch._dynamo.explain(lambda t: checkpoint(model, t, use_reentrant=False))(x)
    assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons]


# ---------------------------------------------------------------------------- ρ < 1: unbiased


def _z(samples: torch.Tensor, exact: torch.Tensor) -> float:
    se = samples.std(0) / math.sqrt(len(samples))
    return float(((samples.mean(0) - exact).abs() / se.clamp_min(1e-7)).max())


@pytest.mark.parametrize("sketch", ["balanced", "countsketch"])
@pytest.mark.parametrize("mode_name", [name for name, mode in MODES.items() if not mode.kernel])
def test_weight_gradients_are_unbiased(mode_name, sketch):
    """ρ = 0.25: the mean of many steps' dW is nn.Linear's (z < 5 over every entry of three
    layers). The bug this guards — a compiled backward re-drawing S — gives mean ≈ 0 (z ≈ 10+)."""
    mode = MODES[mode_name]
    steps = 200
    torch.manual_seed(0)
    plain = _MLP()
    model = convert(copy.deepcopy(plain), 0.25, sketch=sketch)
    x, c = _data()
    _stepper(plain, Mode(autocast=mode.autocast))(x.clone().requires_grad_(True), c)
    exact = _grads(plain)
    step = _stepper(model, mode)
    samples = {name: [] for name in ("up.weight", "down.weight", "skip.weight")}
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        step(x.clone().requires_grad_(True), c)
        for name, grad in _grads(model).items():
            if name in samples:
                samples[name].append(grad.float())
    for name, grads in samples.items():
        z = _z(torch.stack(grads), exact[name].float())
        assert z < 5, f"{name}: mean of {steps} steps off by z = {z:.1f}"


def test_the_kernel_path_computes_the_reference_estimator():
    """ρ = 0.25 under the same seeds: the fused kernel's gradients are the torch reference's (the
    same S from the same hash), so the reference's unbiasedness above is the kernel's. (Monte
    Carlo through Triton's interpreter would take minutes.)"""
    _needs(MODES["triton-kernel"])
    torch.manual_seed(0)
    model = convert(_MLP(), 0.25)
    x, c = _data()

    def grads(mode):
        step, out = _stepper(model, mode), []
        torch.manual_seed(3)
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            step(x.clone().requires_grad_(True), c)
            out.append(_grads(model))
        return out

    reference, fused = grads(MODES["eager"]), grads(MODES["triton-kernel"])
    assert not torch.equal(reference[0]["up.weight"], reference[1]["up.weight"])  # a fresh S per step
    for ours, theirs in zip(fused, reference):
        for name in theirs:
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode_name", ["eager", "aot_eager", "inductor", "checkpoint-reentrant", "checkpoint-compiled"])
def test_weight_gradients_with_the_savers_are_unbiased(mode_name):
    """Savers on, ρ = 0.25: down's dW averages to dYᵀh of each step's own h (a fresh dropout mask
    every step, so the exact gradient is paired step by step, not fixed)."""
    mode = MODES[mode_name]
    torch.manual_seed(0)
    model = apply_savers(convert(_MLP(p=0.2), 0.25), ["dropout", "gelu:2"])
    x, c = _data()
    step = _stepper(model, mode)
    errors = []
    for _ in range(200):
        model.zero_grad(set_to_none=True)
        _, h = step(x.clone().requires_grad_(True), c)
        errors.append(model.down.weight.grad - c.reshape(-1, 6).T @ h.reshape(-1, 24))
    z = _z(torch.stack(errors), torch.zeros(6, 24))
    assert z < 5, f"down.weight: mean error off zero by z = {z:.1f}"


# ---------------------------------------------------------------------------- compile: many layers


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    return BertForSequenceClassification(config).train()


def _compiles(model, batch, steps=3):
    """Graphs compiled at each of `steps` training steps of `model` under aot_eager."""
    from torch._dynamo.backends.debugging import aot_eager

    per_step, count = [], [0]

    def backend(graph_module, example_inputs):
        count[0] += 1
        return aot_eager(graph_module, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    for _ in range(steps):
        before = count[0]
        out = compiled(**batch) if isinstance(batch, dict) else compiled(batch)
        (out.loss if isinstance(batch, dict) else out).square().mean().backward()
        per_step.append(count[0] - before)
    return per_step


def test_every_sketch_compiles_a_deep_stack_in_one_graph_without_recompiling():
    """Fourteen converted layers cycling through every sketch (12 host-seeded ones: such sketches
    once recompiled at every layer, hit Dynamo's limit of eight and crashed): one graph,
    compiled once, for every step."""
    names = sketch_names()
    layers = []
    for i in range(14):
        layers += [RandomizedLinear(16, 16, rho=0.5, sketch=names[i % len(names)]), nn.Tanh()]
    assert _compiles(nn.Sequential(*layers), torch.randn(32, 16)) == [1, 0, 0]


def test_every_sketch_and_saver_compiles_a_bert_without_breaks_or_recompiles():
    """A 2-layer BERT whose 14 linears cycle through every sketch, with the dropout and gelu:2
    savers: as many graphs as the plain model compiles at each step (no graph break of
    randbp's), and none after the warm-up."""
    plain = _tiny_bert()
    batch = tiny_batch(plain, 2, 16)
    expected = _compiles(plain, batch)
    model = apply_savers(convert(_tiny_bert(), 0.5), ["dropout", "gelu:2"])
    names = sketch_names()
    layers = [m for m in model.modules() if isinstance(m, RandomizedLinear)]
    for i, layer in enumerate(layers):
        layer.configure(rho=0.5, sketch=names[i % len(names)])
    assert len(layers) == 14 and {layer.sketch.name for layer in layers} == set(names)
    assert _compiles(model, batch) == expected
    assert expected[-1] == 0  # warm: the last step compiled nothing


# ---------------------------------------------------------------------------- second order


@pytest.mark.parametrize("sketch", sketch_names())
def test_second_order_in_the_weights_is_refused_by_name(sketch):
    """A Hessian-vector product in W would apply S twice (biased): refused, naming the layer."""
    model = convert(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double(), 0.5, sketch=sketch)
    x = torch.randn(8, 4, dtype=torch.float64)
    (g,) = torch.autograd.grad(model(x).square().sum(), model[0].weight, create_graph=True)
    with pytest.raises(SecondOrderError, match=r"'0'.*exclude"):
        torch.autograd.grad(g.square().sum(), model[0].weight)
    loss = model(x).square().sum()  # MAML: an inner SGD step, then the outer loss's meta-gradient
    grads = torch.autograd.grad(loss, [model[0].weight, model[2].weight], create_graph=True)
    adapted = model[2].weight - 0.1 * grads[1]
    outer = torch.tanh(x @ (model[0].weight - 0.1 * grads[0]).T + model[0].bias) @ adapted.T
    with pytest.raises(SecondOrderError):
        torch.autograd.grad(outer.square().sum(), [model[0].weight, model[2].weight])


def test_the_refusal_survives_saving_the_model_and_reaches_computed_weights():
    """A pickled Parameter keeps its attributes but not its hooks; a weight computed from
    parameters (weight norm) is refused through the parameters it is made of, while the pass that
    asks only for x goes through."""
    import io

    from torch.nn.utils.parametrizations import weight_norm

    model = convert(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double(), 0.5)
    x = torch.randn(8, 4, dtype=torch.float64)

    def hvp_in_w(net):
        (g,) = torch.autograd.grad(net(x).square().sum(), net[0].weight, create_graph=True)
        torch.autograd.grad(g.square().sum(), net[0].weight)

    with pytest.raises(SecondOrderError):
        hvp_in_w(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    with pytest.raises(SecondOrderError):
        hvp_in_w(torch.load(buffer, weights_only=False))
    weight_norm(model[0])
    magnitude, direction = model[0].parametrizations.weight.original0, model[0].parametrizations.weight.original1
    inp = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(torch.tanh(model(inp)).sum(), magnitude, create_graph=True)
    assert torch.autograd.grad(g.sum(), inp, retain_graph=True)[0].shape == inp.shape  # in x: allowed
    with pytest.raises(SecondOrderError):
        torch.autograd.grad(g.sum(), direction)


def test_second_order_a_user_may_take_is_exact_at_rho_one():
    """Not refused, and exact (ρ = 1): a gradient penalty on ∂L/∂x (differentiated in W), and
    ∂⟨∂L/∂W, v⟩/∂x (gradient matching), through shared sketches."""
    torch.manual_seed(0)
    plain = _MLP().double()
    model = convert(copy.deepcopy(plain), 1.0)
    x, c = (t.double() for t in _data())
    v = torch.randn(24, 12, dtype=torch.float64)

    def penalty_and_matching(net):
        inp = x.clone().requires_grad_(True)
        out, _ = net(inp)
        loss = (out * c).sum() + torch.tanh(out).sum()
        (gx,) = torch.autograd.grad(loss, inp, create_graph=True)
        penalty = torch.autograd.grad(gx.square().sum(), [p for p in net.parameters()])
        inp2 = x.clone().requires_grad_(True)
        out2, _ = net(inp2)
        (gw,) = torch.autograd.grad(torch.tanh(out2).sum(), net.up.weight, create_graph=True)
        (matching,) = torch.autograd.grad((gw * v).sum(), inp2)
        return (*penalty, matching)

    for ours, exact in zip(penalty_and_matching(model), penalty_and_matching(plain)):
        torch.testing.assert_close(ours, exact, rtol=1e-10, atol=1e-12)


def test_compiled_double_backward_is_refused_by_torch():
    model = convert(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)), 0.5)
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(5, 4, requires_grad=True)
    (g,) = torch.autograd.grad(compiled(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(g.sum(), model[0].weight)


def test_second_order_through_the_gelu_saver_is_refused():
    """q′ = 0 is not GELU″: refused even when the upstream gradient is a constant (x.sum())."""
    model = apply_savers(nn.Sequential(nn.Linear(4, 4), nn.GELU()), ["gelu:2"])
    x = torch.randn(5, 4, requires_grad=True)
    (g,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    with pytest.raises(SecondOrderError, match="gelu:2"):
        torch.autograd.grad(g.square().sum(), x)


# ---------------------------------------------------------------------------- hooks


def test_hooks_of_every_kind_fire_across_convert_savers_and_restore():
    """Registered on the plain modules before any swap: forward, forward-pre, full backward and
    backward-pre hooks on a Linear, a GELU and a Dropout fire with convert, with the savers on top,
    and after restore; a handle taken before still removes its hook."""
    model = _MLP(p=0.1)
    calls = []
    for name in ("up", "act", "drop"):
        module = getattr(model, name)
        module.register_forward_pre_hook(lambda m, a, n=name: calls.append(f"{n}:pre"))
        module.register_forward_hook(lambda m, a, o, n=name: calls.append(f"{n}:fwd"))
        module.register_full_backward_pre_hook(lambda m, g, n=name: calls.append(f"{n}:bwd-pre"))
        module.register_full_backward_hook(lambda m, gi, go, n=name: calls.append(f"{n}:bwd"))
    removable = model.act.register_forward_hook(lambda m, a, o: calls.append("removable"))
    x, c = _data()

    def fired(net):
        calls.clear()
        out, _ = net(x.clone().requires_grad_(True))
        (out * c).sum().backward()
        return sorted(set(calls))

    expected = fired(model)
    assert len(expected) == 13
    model = convert(model, 0.5)
    assert fired(model) == expected
    model = apply_savers(model, ["dropout", "gelu:2"])
    assert type(model.act).__name__ == "FewBitGELU" and isinstance(model.up, RandomizedLinear)
    assert fired(model) == expected
    removable.remove()
    assert fired(model) == [e for e in expected if e != "removable"]
    model = restore(model)
    assert type(model.act) is nn.GELU and type(model.up) is nn.Linear
    assert fired(model) == [e for e in expected if e != "removable"]


# ---------------------------------------------------------------------------- training learns


@pytest.fixture
def aot_eager_compile(monkeypatch):
    """`finetune --compile` through aot_eager (a backend users pick; Inductor's code generation
    would add minutes on 2 cores and is covered above)."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, mode=None, **kw: real(module, backend="aot_eager"))


def test_compiled_randomized_finetune_learns_the_synthetic_task(aot_eager_compile):
    """Balanced ρ = 0.5, compiled, learns (chance is 0.5) — as a zero-mean weight gradient would
    not. (tests/commands/test_finetune.py has the same run in eager mode.)"""
    from typer.testing import CliRunner

    from randbp_cli.cli.main import app

    result = CliRunner().invoke(app, ["finetune", "--task", "synthetic", "--rho", "0.5", "--epochs", "2", "--json",
                                      "--compile"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    (run,) = report["runs"]
    assert run["method"] == "randomized" and run["sketch"] == "balanced" and report["config"]["compile_mode"] == "default"
    assert run["best"]["value"] > 0.75, run["best"]
