"""The balanced sketch: its construction (buckets, signs, hash), its collision rate and closed-form
variance, the fused Triton kernel held to the torch reference (on CPU under TRITON_INTERPRET=1),
the op count of a layer step, and torch.compile (no graph break, fresh S, shared Q/K/V sketch)."""

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from randbp_cli import RandomizedLinear, convert

from randbp_cli.kernels import balanced, balanced_triton
from randbp_cli.core.sketches import BalancedSketch, get_sketch

from conftest import tiny_batch

needs_triton = pytest.mark.skipif(not balanced_triton.interpreted() and not torch.cuda.is_available(),
                                  reason="needs triton (its interpreter on CPU, or a GPU)")


# ---------------------------------------------------------------------------- construction


def _scalar_row(position: int, n_rows: int, seed: int) -> int:
    """σ(p) straight from balanced.py's docstring, in plain Python ints: an independent spec."""
    keys = balanced.seed_keys(seed)
    h = balanced.half_bits(n_rows)
    mask = (1 << h) - 1

    def feistel(x):
        left, right = x >> h, x & mask
        for key in keys[:balanced.ROUNDS]:
            left, right = right, left ^ (balanced.mix32(right ^ key) & mask)
        return (left << h) | right

    x = feistel(position)
    while x >= n_rows:
        x = feistel(x)
    return x


@pytest.mark.parametrize("n_rows, k", [(1, 1), (2, 1), (10, 3), (37, 5), (64, 64), (100, 7)])
def test_every_row_in_one_bucket_of_balanced_size(n_rows, k):
    bucket, signs = balanced.buckets_and_signs(n_rows, k, seed=12345)
    counts = torch.bincount(bucket, minlength=k)
    assert int(counts.sum()) == n_rows and len(counts) == k
    assert set(counts.tolist()) <= {n_rows // k, -(-n_rows // k)}
    assert set(signs.tolist()) <= {-1, 1}
    rows, _ = balanced.line_layout(n_rows, k, 12345)
    assert sorted(rows.tolist()) == list(range(n_rows))  # σ is a permutation
    assert rows.tolist() == [_scalar_row(p, n_rows, 12345) for p in range(n_rows)]


def test_all_64_seed_bits_matter_and_seeds_differ():
    base = balanced.buckets_and_signs(50, 10, 7)
    for seed in (7 + 2**40, 7 + 2**61, 8):
        other = balanced.buckets_and_signs(50, 10, seed)
        assert not (torch.equal(base[0], other[0]) and torch.equal(base[1], other[1]))
    again = balanced.buckets_and_signs(50, 10, 7)
    assert torch.equal(base[0], again[0]) and torch.equal(base[1], again[1])


@pytest.mark.parametrize("n_rows, k", [(10, 5), (7, 3), (33, 5)])
def test_pair_collisions_match_the_closed_form_and_signs_are_independent(n_rows, k):
    """P(rows i ≠ j share a bucket) = q for every pair (what the variance formula assumes), and
    E[S Sᵀ] = I. 8000 seeds: the standard error of one pair's rate is about 0.005."""
    repeats = 8000
    together = torch.zeros(n_rows, n_rows)
    product = torch.zeros(n_rows, n_rows)
    for seed in range(repeats):
        bucket, signs = balanced.buckets_and_signs(n_rows, k, seed * 2654435761 + 1)
        same = (bucket[:, None] == bucket[None, :]).float()
        together += same
        product += same * (signs[:, None] * signs[None, :]).float()
    q = BalancedSketch.collision_probability(n_rows, k)
    off = ~torch.eye(n_rows, dtype=torch.bool)
    rate = together[off] / repeats
    se = math.sqrt(q * (1 - q) / repeats)
    assert float((rate - q).abs().max()) < 5 * se
    assert float((product[off] / repeats).abs().max()) < 5 / math.sqrt(repeats)


def test_collision_probability_formula():
    assert BalancedSketch.collision_probability(100, 10) == pytest.approx((10 - 1) / 99)
    assert BalancedSketch.collision_probability(8, 8) == 0.0  # k = N: exact
    assert BalancedSketch.collision_probability(1, 1) == 0.0
    assert BalancedSketch.collision_probability(7, 3) == pytest.approx((3 * 2 + 2 * 2 * 1) / 42)


def test_keeping_every_row_is_exact():
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    sketch = get_sketch("balanced")
    saved = sketch.compress(x, 9, 5)
    assert torch.allclose(sketch.compress_grad(y, 9, 5, saved).T @ saved[0], y.T @ x)
    assert sketch.variance(x, y, 9) == 0.0


def test_reference_accumulates_half_precision_in_float32():
    x = torch.full((64, 3), 1.0 / 3).to(torch.bfloat16)
    out = balanced.sketch_reference(x, 1, 3)
    exact = float((balanced.buckets_and_signs(64, 1, 3)[1].double()).sum() * x[0, 0].double())
    assert out.dtype == torch.bfloat16
    assert abs(float(out[0, 0]) - exact) <= abs(exact) * 2**-8 + 1e-6


def test_unsketch_is_the_transpose():
    a, g = torch.randn(11, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    s_t_a = balanced.sketch_reference(a, 4, 99)
    s_g = balanced.unsketch_reference(g, 11, 99)
    assert torch.allclose((s_t_a * g).sum(), (a * s_g).sum())  # ⟨Sᵀa, g⟩ = ⟨a, S g⟩


@pytest.mark.parametrize("name", ["balanced", "countsketch", "gaussian", "srht", "crs"])
def test_the_ops_are_each_others_derivatives_and_pass_opcheck(name):
    """apply (Sᵀ·) and transpose (S·) are each other's derivative, for every family and kind of
    sketch (crs: saved indices and scales); opcheck holds each op's fake kernel and schema to it."""
    from randbp_cli.core import ops

    sketch = get_sketch(name)
    torch.manual_seed(0)
    x = torch.randn(13, 4, dtype=torch.float64)
    *saved, seed = ops.sketch_draw(x, sketch, 5, "test")
    assert seed.dtype == torch.int64 and seed.device.type == "cpu" and saved[0].shape == (5, 4)
    a = torch.randn(13, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: ops.sketch_apply(a, sketch, 5, seed, saved), (a,))
    assert torch.autograd.gradgradcheck(lambda a: ops.sketch_apply(a, sketch, 5, seed, saved), (a,))
    g = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g: ops.sketch_transpose(g, sketch, 13, seed, saved), (g,))
    family = ops.family(sketch)
    torch.library.opcheck(family.apply, (torch.randn(13, 4, dtype=torch.float64), name, 5, seed, saved))
    torch.library.opcheck(family.transpose, (torch.randn(5, 4, dtype=torch.float64), name, 13, seed, saved))
    # the draw is random: its schema and fake kernel, not a comparison of two draws
    torch.library.opcheck(family.draw, (torch.randn(13, 4), name, 5, "test"),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("name", ["countsketch", "gaussian", "crs"])
def test_a_host_seeded_sketch_refuses_to_be_captured_in_a_cuda_graph(monkeypatch, name):
    """Its S comes from a host seed drawn once at capture: every replay would repeat it."""
    from randbp_cli import ConfigError
    from randbp_cli.core import ops

    monkeypatch.setattr(ops, "capturing", lambda x: True)
    layer = RandomizedLinear(6, 4, rho=0.5, sketch=name)
    with pytest.raises(ConfigError, match="cannot be captured in a CUDA graph.*balanced"):
        layer(torch.randn(8, 6))
    assert RandomizedLinear(6, 4, rho=0.5)(torch.randn(8, 6)).shape == (8, 4)  # balanced: graph-safe


def test_the_draw_op_draws_what_a_seed_draw_would():
    """One op call consumes torch's RNG as one seed draw does: a no-grad pass under checkpointing
    that only draws seeds keeps the RNG stream of the pass that sketches."""
    from randbp_cli.core import ops

    for name in ("balanced", "countsketch"):
        sketch = get_sketch(name)
        torch.manual_seed(5)
        *_, seed = ops.sketch_draw(torch.randn(6, 3), sketch, 2, "t")
        after = torch.rand(())
        torch.manual_seed(5)
        torch.randn(6, 3)
        assert int(sketch.draw_seed(torch.device("cpu"))) == int(seed) and torch.equal(torch.rand(()), after)


# ---------------------------------------------------------------------------- the fused kernel


@needs_triton
@pytest.mark.parametrize("n_rows, cols, k", [(1, 3, 1), (10, 6, 5), (37, 20, 4), (40, 130, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_kernel_matches_the_reference(n_rows, cols, k, dtype):
    """Exactly the same S (buckets and signs: sketch the identity), values to rounding."""
    seed = torch.tensor(2**62 - 12345 + n_rows, dtype=torch.int64)
    eye = torch.eye(n_rows, dtype=torch.float64)
    assert torch.equal(balanced_triton.sketch(eye, k, seed), balanced.sketch_reference(eye, k, int(seed)))
    a = torch.randn(n_rows, cols).to(dtype)
    fused, reference = balanced_triton.sketch(a, k, seed), balanced.sketch_reference(a, k, int(seed))
    assert fused.dtype == dtype
    tolerance = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2}[dtype]
    assert torch.allclose(fused.double(), reference.double(), rtol=tolerance, atol=tolerance)


@needs_triton
def test_kernel_reads_strided_rows():
    seed = torch.tensor(77)
    wide = torch.randn(12, 10)
    view = wide[:, 2:7]  # rows of stride 10, columns contiguous
    assert torch.allclose(balanced_triton.sketch(view, 5, seed), balanced.sketch_reference(view, 5, 77), atol=1e-6)


@needs_triton
def test_layer_gradients_through_the_kernel_equal_the_reference_path():
    torch.manual_seed(0)
    layer = RandomizedLinear(6, 5, rho=0.5, sketch="balanced")
    x = torch.randn(3, 8, 6, requires_grad=True)

    def grads():
        layer.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        layer(x).square().sum().backward()
        return layer.weight.grad.clone()

    reference = grads()
    with balanced_triton.kernel_on_cpu():
        fused = grads()
    assert torch.allclose(fused, reference, rtol=1e-5, atol=1e-6)


def test_the_kernel_compiles_ahead_of_time_for_a100_and_h100_in_every_half_and_full_precision():
    """No GPU here, yet a kernel that would not build on one must fail CI: Triton compiles it for
    sm_80 and sm_90 (to PTX and a cubin, with the ptxas it ships), for both block shapes `sketch`
    launches (d = 768 and d = 64), in a process where Triton compiles rather than interprets."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    code = """
import torch
from randbp_cli.kernels import balanced_triton
for capability in (80, 90):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for n_cols in (768, 64):
            kernel = balanced_triton.compile_ahead(capability, dtype, n_cols)
            assert kernel.asm["cubin"] and ".target sm_%d" % capability in kernel.asm["ptx"]
print("compiled")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the default today; set, so Triton says nothing about it
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


class _CountOps(TorchDispatchMode):
    VIEWS = {"view", "t", "_unsafe_view", "permute", "detach", "reshape", "expand", "transpose", "slice", "select"}

    def __init__(self):
        super().__init__()
        self.compute = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name not in self.VIEWS:  # randbp's draw op launches two kernels: the seed, then Sᵀx
            self.compute += 2 if (func.namespace, name) == ("randbp", "sketch_draw") else 1
        return func(*args, **(kwargs or {}))


def _step_ops(layer, x):
    layer(x).sum().backward()  # warm-up (lazy init)
    counter = _CountOps()
    with counter:
        layer(x).sum().backward()
    return counter.compute


def test_a_balanced_layer_step_costs_at_most_three_ops_more_than_nn_linear():
    """The launch budget, counted as non-view ops (each launches a kernel on a GPU): the seed
    draw and Sᵀx in forward (one op, randbp::sketch_draw, two kernels), Sᵀ dY in backward."""
    x = torch.randn(4, 16, 64, requires_grad=True)
    torch.manual_seed(0)
    exact = _step_ops(nn.Linear(64, 128), x)
    randomized = _step_ops(RandomizedLinear(64, 128, rho=0.5, sketch="balanced"), x)
    assert randomized <= exact + 3, (exact, randomized)


# ---------------------------------------------------------------------------- torch.compile


def test_compile_sees_no_graph_break_from_randbp(tiny_roberta):
    model = convert(tiny_roberta, 0.5, sketch="balanced")
    batch = tiny_batch(model, 2, 16)
    explanation = torch._dynamo.explain(lambda **b: model(**b).loss)(**batch)
    ours = [r for r in explanation.break_reasons if any("randbp_cli" in f.filename for f in r.user_stack)]
    assert not ours, [r.reason for r in ours]
    torch._dynamo.reset()


def test_compiled_graphs_draw_each_shared_sketch_once_and_apply_it_per_layer(tiny_roberta):
    """The graphs `aot_eager` makes (users' partitioner, with counting compilers): one draw per
    distinct input — Q, K and V share one; the partitioner may place a draw in either graph, but
    never in both — and one Sᵀ dY per layer in backward. (That the backward uses the forward's S
    is tests/core/test_modes.py's job: exact at ρ = 1, unbiased below.)"""
    import functools

    from torch._dynamo.backends.debugging import aot_eager, boxed_nop

    ops_in = {}

    def counting(tag):
        def compiler(graph_module, example_inputs):
            targets = [n.target for n in graph_module.graph.nodes]
            ops_in[tag] = {name: sum(t is getattr(torch.ops.randbp, name).default for t in targets)
                           for name in ("sketch_draw", "sketch_apply")}
            return boxed_nop(graph_module, example_inputs)
        return compiler

    model = convert(tiny_roberta, 0.5, sketch="balanced")
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    backend = functools.partial(aot_eager, fw_compiler=counting("forward"), bw_compiler=counting("backward"))
    compiled = torch.compile(model, backend=backend)
    compiled(**tiny_batch(model, 2, 16)).loss.backward()
    layers = model.config.num_hidden_layers
    assert ops_in["forward"]["sketch_draw"] + ops_in["backward"]["sketch_draw"] == 4 * layers + 2  # + classifier's two
    assert ops_in["forward"]["sketch_apply"] == 0 and ops_in["backward"]["sketch_apply"] == 6 * layers + 2
    torch._dynamo.reset()


@pytest.mark.parametrize("n_rows", [1, 2, 3, 7, 100, 512, 1000, 4096, 5000])
def test_the_cpu_layout_through_numpy_equals_the_torch_one(n_rows):
    """line_layout on a CPU runs through NumPy (a fraction of torch's dispatch per small op): the same
    integers as the torch path the GPU and the Triton kernel are held to."""
    from randbp_cli.kernels.balanced import ROUNDS, _line_layout_numpy, mix32, permuted_rows, seed_keys

    for k in sorted({1, max(1, n_rows // 10), max(1, n_rows // 2), n_rows}):
        for seed in (0, 1, 2**40 + 17, 2**62 - 5):
            keys = seed_keys(seed)
            rows, fold = _line_layout_numpy(n_rows, k, keys)
            positions = torch.arange(n_rows)
            assert torch.equal(rows, permuted_rows(n_rows, keys, "cpu"))
            assert torch.equal(fold, positions * k // n_rows + (mix32(positions ^ keys[ROUNDS]) >> 31) * k)
