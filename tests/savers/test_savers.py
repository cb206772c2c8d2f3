"""Activation savers: seed dropout (exact, same mask in backward, checkpoint-safe), the seed
attention function against transformers' eager attention, few-bit GELU (optimal levels,
packing, bytes, error), and apply/restore on tiny models."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_batch
from randbp_cli import SavedTensorCounter, convert, converted_names, restore
from randbp_cli.savers.attention import ATTN_IMPLEMENTATION, SeedAttentionFunction, seed_attention_forward
from randbp_cli.savers.dropout import SeedDropout, SeedDropoutFunction, _keep_threshold, keep_noise, seed_dropout
from randbp_cli.errors import ConfigError
from randbp_cli.savers.gelu import (FewBitGELU, few_bit_gelu, gelu_gradient_error, gelu_levels, pack_codes, quantize,
                             unpack_codes)
from randbp_cli.core.layers import RandomizedLinear, draw_seed
from randbp_cli.savers.registry import apply_savers, describe_savers, parse_savers, restore_savers, saver_names


def _eager_roberta():
    from randbp_cli.data.models import load_model

    return load_model("roberta-tiny", offline=True, attn_implementation="eager").model.train()


def _saved(fn, model=None, exclude=()):
    with SavedTensorCounter(model, exclude=exclude) as counter:
        out = fn()
    return out, counter.stats()


# ---------------------------------------------------------------------------- seed dropout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_seed_dropout_gradient_is_that_of_the_forward_mask(dtype):
    torch.manual_seed(0)
    x = torch.randn(6, 40, dtype=dtype).requires_grad_(True)
    g = torch.randn(6, 40, dtype=dtype)
    out = seed_dropout(x, 0.3, training=True)
    out.backward(g)
    mask = (out != 0).to(dtype)  # x has no zeros: the kept elements
    assert torch.equal(out, x.detach() * (mask / (1 - 0.3)))  # bit for bit
    assert torch.equal(x.grad, g * (mask / (1 - 0.3)))
    assert 0 < int(mask.sum()) < mask.numel()


def _seeded_dropout(t, p=0.4):
    torch.manual_seed(1234)  # the op draws its seed from torch's RNG: the same seed every call
    return SeedDropoutFunction.apply(t, p)


def test_seed_dropout_non_contiguous_input_gradcheck_and_gradgradcheck():
    """Dropout is linear: its backward is its own derivative, so second order is exact."""
    x = torch.randn(7, 5, dtype=torch.float64).t().requires_grad_(True)  # (5, 7), transposed
    torch.autograd.gradcheck(_seeded_dropout, (x,))
    torch.autograd.gradgradcheck(_seeded_dropout, (x,))
    torch.manual_seed(1234)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    assert torch.equal(_seeded_dropout(x), x * keep_noise(x, 0.4, seed))


def test_seed_dropout_keeps_nothing_but_a_host_seed():
    layer = SeedDropout(0.2)
    x = torch.randn(32, 16, requires_grad=True)
    out, stats = _saved(lambda: layer(x), layer, exclude=[x])
    out.sum().backward()
    assert stats.total_bytes == 0
    assert stats.by_kind["dropout_seeds"] == 0
    _, native = _saved(lambda: F.dropout(x, 0.2, True), exclude=[x])
    assert native.total_bytes == 32 * 16 * 4  # torch's CPU dropout keeps an fp32 mask


def test_seed_dropout_masks_are_fresh_and_reproducible():
    x = torch.ones(64, 64)
    torch.manual_seed(3)
    a, b = seed_dropout(x, 0.5), seed_dropout(x, 0.5)
    torch.manual_seed(3)
    a2 = seed_dropout(x, 0.5)
    assert not torch.equal(a, b)
    assert torch.equal(a, a2)


def test_seed_dropout_drop_rate_matches_p():
    p, n = 0.1, 400_000
    dropped = float((seed_dropout(torch.ones(n), p) == 0).float().mean())
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_keep_threshold_gives_p_to_2_pow_minus_32():
    # keep iff a uniform signed 32-bit lane s >= T: P(drop) = (T + 2^31) / 2^32
    for p in (0.1, 0.5, 0.9, 1e-3, 1 - 1e-3):
        drop = (_keep_threshold(p) + 2**31) / 2**32
        assert abs(drop - p) <= 2**-33
    assert _keep_threshold(1e-12) == -2**31  # keeps everything
    assert _keep_threshold(1 - 1e-12) == 2**31 - 1  # within int32


@pytest.mark.parametrize("n", [1, 7, 64])
def test_keep_noise_is_one_mask_in_every_dtype(n):
    """fp32 writes keep over its random words, other dtypes into a new tensor: same mask."""
    like = torch.empty(n, 3)
    masks = [keep_noise(like.to(dtype), 0.3, 99) != 0 for dtype in (torch.float32, torch.float64, torch.bfloat16)]
    assert all(torch.equal(masks[0], m) for m in masks[1:])
    assert torch.equal(keep_noise(like, 0.3, 99), keep_noise(like, 0.3, 99))
    assert keep_noise(like, 0.3, 99).shape == (n, 3)


def test_seed_dropout_eval_and_zero_p_are_identity_without_drawing():
    x = torch.randn(4, 4, requires_grad=True)
    state = torch.get_rng_state()
    assert seed_dropout(x, 0.5, training=False) is x
    assert seed_dropout(x, 0.0, training=True) is x
    layer = SeedDropout(0.5).eval()
    assert layer(x) is x
    assert torch.equal(torch.get_rng_state(), state)


def test_seed_dropout_under_no_grad_still_drops_and_draws():
    state = torch.get_rng_state()
    with torch.no_grad():
        out = SeedDropout(0.5)(torch.ones(100))
    assert (out == 0).any() and (out == 2).any()
    assert not torch.equal(torch.get_rng_state(), state)


def test_seed_dropout_p_one_and_bad_p():
    assert torch.equal(seed_dropout(torch.ones(5), 1.0), torch.zeros(5))
    with pytest.raises(ValueError):
        seed_dropout(torch.ones(5), 1.5)


def test_seed_dropout_falls_back_to_native_under_eager_cuda_graph_capture(monkeypatch):
    """A seed drawn once at capture would be replayed forever: torch's own dropout there."""
    monkeypatch.setattr("randbp_cli.savers.dropout.capturing", lambda x: True)
    x = torch.randn(8, 8, requires_grad=True)
    _, stats = _saved(lambda: seed_dropout(x, 0.5), exclude=[x])
    assert stats.total_bytes == 8 * 8 * 4  # native dropout: the mask is kept


def test_compiled_seed_dropout_keeps_its_seed_not_a_mask_and_a_fresh_mask_each_call():
    """Under torch.compile the op draws inside the graph: 8 bytes saved instead of torch.compile's
    bool mask, the backward uses the forward's mask, and every call draws a new one."""
    x = torch.randn(64, 32, requires_grad=True)
    drop = SeedDropout(0.5)
    compiled = torch.compile(lambda t: drop(t) * 3, backend="aot_eager", fullgraph=True)
    native = torch.compile(lambda t: F.dropout(t, 0.5, True) * 3, backend="aot_eager", fullgraph=True)
    for fn in (compiled, native):
        fn(x).sum().backward()  # compile forward and backward once
    _, ours = _saved(lambda: compiled(x), exclude=[x])
    _, theirs = _saved(lambda: native(x), exclude=[x])
    assert ours.total_bytes == 8 and theirs.total_bytes == 64 * 32  # a seed vs a bool per element
    masks = []
    for _ in range(2):
        x.grad = None
        out = compiled(x)
        out.sum().backward()
        kept = out != 0
        assert torch.equal(x.grad, kept * 3.0 / 0.5)  # the backward's mask is the forward's
        masks.append(kept)
    assert not torch.equal(masks[0], masks[1])
    torch._dynamo.reset()


def test_compiled_calls_on_one_input_draw_their_own_masks():
    """R-Drop, SimCSE: one module applied twice to one tensor in one compiled step. Two equal calls
    must stay two masks, as eagerly; a compiler merging equal calls would make them one."""
    drop = SeedDropout(0.5)
    x = torch.ones(64, 32)
    compiled = torch.compile(lambda t: (drop(t), drop(t), seed_dropout(t, 0.5), seed_dropout(t, 0.5)),
                             backend="aot_eager", fullgraph=True)
    masks = [m != 0 for m in compiled(x.clone().requires_grad_(True))]
    assert all(not torch.equal(a, b) for i, a in enumerate(masks) for b in masks[i + 1:])
    torch._dynamo.reset()


def test_seed_dropout_on_cuda_under_compile_is_torchs_dropout(monkeypatch):
    """A compiled checkpointed region replays a recomputed random op under the device generator's
    saved state, not the CPU generator's this seed comes from: on CUDA, under compile, native."""
    class FakeCuda(torch.Tensor):
        is_cuda = True

    calls = []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr("randbp_cli.savers.dropout.capturing", lambda x: False)
    monkeypatch.setattr(F, "dropout", lambda x, p, training: calls.append(p) or x)
    seed_dropout(torch.ones(4).as_subclass(FakeCuda), 0.5)
    assert calls == [0.5]


class _Block(nn.Module):
    """Seed dropout around randomized layers (Q, K, V share an input), as in a Transformer."""

    def __init__(self):
        super().__init__()
        self.drop = SeedDropout(0.3)
        self.q, self.k, self.v = (RandomizedLinear(8, 8, rho=0.5, sketch="countsketch") for _ in range(3))
        self.out = RandomizedLinear(8, 4, rho=0.5, sketch="countsketch")
        self.act = FewBitGELU(2)

    def forward(self, x):
        h = self.drop(x)
        mixed = self.q(h) * self.k(h) + self.v(h)
        return self.out(self.drop(self.act(mixed)))


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpoint_recompute_sees_the_same_seed_dropout(use_reentrant):
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    block = _Block()
    x = torch.randn(16, 8)

    def grads(use_checkpoint):
        block.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        inp = x.clone().requires_grad_(True)
        out = checkpoint(block, inp, use_reentrant=use_reentrant) if use_checkpoint else block(inp)
        out.square().sum().backward()
        return [p.grad.clone() for p in block.parameters()] + [inp.grad]

    plain, checkpointed = grads(False), grads(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, checkpointed))


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpointed_roberta_with_all_savers_has_bit_identical_gradients(use_reentrant):
    model = apply_savers(_eager_roberta(), ["dropout", "gelu:2"])
    batch = tiny_batch(model)

    def grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(11)
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    assert all(torch.equal(plain[n], checkpointed[n]) for n in plain)


# ---------------------------------------------------------------------------- attention


def _Attn():
    """A real RoBERTa self-attention module in training mode (the function reads `.training`)."""
    return _eager_roberta().roberta.encoder.layer[0].attention.self


def _eager_with_seed_dropout(monkeypatch):
    """transformers' own eager attention, its F.dropout drawing a seed and a mask as we do."""
    native = F.dropout

    def dropout(x, p=0.5, training=True, inplace=False):
        if not training or p == 0.0:
            return native(x, p, training, inplace)
        return x * keep_noise(x, p, draw_seed())

    monkeypatch.setattr(torch.nn.functional, "dropout", dropout)


def _qkv(dtype, tq=5, tk=7, requires_grad=True):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, tq, 3, 4, generator=gen, dtype=dtype).transpose(1, 2)  # (B, H, Tq, D), a view
    k = torch.randn(2, tk, 3, 4, generator=gen, dtype=dtype).transpose(1, 2)
    v = torch.randn(2, tk, 3, 4, generator=gen, dtype=dtype).transpose(1, 2)
    return [t.detach().requires_grad_(requires_grad) for t in (q, k, v)]


def _masks(dtype, tq=5, tk=7):
    padding = torch.zeros(2, 1, tq, tk, dtype=dtype)
    padding[1, ..., -3:] = torch.finfo(dtype).min  # the second sequence is padded
    causal = torch.full((tq, tk), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]
    return {"none": None, "padding": padding, "causal": causal}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask_name", ["none", "padding", "causal"])
@pytest.mark.parametrize("scaling", [None, 0.3])
def test_seed_attention_matches_transformers_eager_attention(monkeypatch, dtype, mask_name, scaling):
    from transformers.models.roberta.modeling_roberta import eager_attention_forward

    mask = _masks(dtype)[mask_name]
    grad_out = torch.randn(2, 5, 3, 4, dtype=dtype)
    grad_weights = torch.randn(2, 3, 5, 7, dtype=dtype)

    def run(fn):
        q, k, v = _qkv(dtype)
        torch.manual_seed(5)
        out, weights = fn(_Attn(), q, k, v, mask, scaling=scaling, dropout=0.3)
        torch.autograd.backward([out, weights], [grad_out, grad_weights])
        return out, weights, q.grad, k.grad, v.grad

    ours = run(seed_attention_forward)
    with monkeypatch.context() as patch:
        _eager_with_seed_dropout(patch)
        reference = run(eager_attention_forward)
    assert torch.equal(ours[0], reference[0]) and torch.equal(ours[1], reference[1])  # same ops, same mask
    assert (ours[1] == 0).any()  # something was dropped
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for a, b in zip(ours[2:], reference[2:]):
        torch.testing.assert_close(a, b, **tol)


def test_seed_attention_gradcheck_and_mask_gradient():
    q, k, v = _qkv(torch.float64)
    bias = torch.randn(1, 3, 5, 7, dtype=torch.float64, requires_grad=True)  # a learned additive bias

    def attend(q, k, v, bias):
        return SeedAttentionFunction.apply(q, k, v, bias, 0.5, 0.25, 99)[0]

    assert torch.autograd.gradcheck(attend, (q, k, v, bias))
    assert torch.autograd.gradgradcheck(attend, (q, k, v, bias))


@pytest.mark.parametrize("mask_name", ["none", "padding"])
def test_seed_attention_double_backward_is_exact(mask_name):
    """Second order through the attention saver (a mask that needs no gradient is not kept: the
    derivative of P in Q and K is rebuilt from P itself) equals the double backward of eager
    attention under the same mask; the hand-written backward alone would drop dP/dQ, dP/dK."""
    mask = _masks(torch.float64)[mask_name]
    q, k, v = _qkv(torch.float64)

    def attend_ours(q, k, v):
        return SeedAttentionFunction.apply(q, k, v, mask, 0.5, 0.25, 99)[0]

    def attend_reference(q, k, v):
        scores = torch.matmul(q, k.transpose(2, 3)) * 0.5 + (0 if mask is None else mask)
        probs = torch.softmax(scores, dim=-1)
        return torch.matmul(probs * keep_noise(probs, 0.25, 99), v)

    assert torch.autograd.gradgradcheck(attend_ours, (q, k, v))

    def hvp(attend):
        grads = torch.autograd.grad(attend(q, k, v).square().sum(), (q, k), create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), (q, k, v))

    for ours, reference in zip(hvp(attend_ours), hvp(attend_reference)):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)


def test_seed_attention_keeps_q_k_v_and_the_probabilities_once():
    q, k, v = _qkv(torch.float32)
    _, stats = _saved(lambda: seed_attention_forward(_Attn(), q, k, v, None, dropout=0.1), exclude=[q, k, v])
    assert stats.by_kind["attention_probs"] == 2 * 3 * 5 * 7 * 4  # P, (B, H, Tq, Tk) fp32
    assert stats.total_bytes == stats.by_kind["attention_probs"]  # Q, K, V are the inputs here


def test_seed_attention_delegates_to_eager_in_eval_mode():
    from transformers.models.roberta.modeling_roberta import eager_attention_forward

    q, k, v = _qkv(torch.float32)
    module = _Attn().eval()
    ours = seed_attention_forward(module, q, k, v, None, dropout=0.0)[0]
    assert torch.equal(ours, eager_attention_forward(module, q, k, v, None, dropout=0.0)[0])


def test_roberta_with_seed_attention_matches_eager_roberta_under_the_same_masks(monkeypatch):
    """A whole model: hidden dropouts off, attention dropout on, padding in the batch."""
    model = _eager_roberta()
    hidden = [m for n, m in model.named_modules() if type(m) is nn.Dropout and not n.endswith("self.dropout")]
    for m in hidden:
        m.p = 0.0
    batch = tiny_batch(model)
    batch["attention_mask"][1, -5:] = 0

    def run():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    with monkeypatch.context() as patch:
        _eager_with_seed_dropout(patch)
        reference = run()
    model = apply_savers(model, ["dropout"])
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    ours = run()
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-6, atol=1e-7)
    for name in reference[1]:
        torch.testing.assert_close(ours[1][name], reference[1][name], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- few-bit GELU


def _quadrature():
    """GELU' (by autograd of F.gelu) and cumulative ∫φ, ∫GELU'·φ on a fine grid: independent of gelu.py."""
    x = torch.linspace(-12, 12, 480_001, dtype=torch.float64).requires_grad_(True)
    F.gelu(x).sum().backward()
    x, slope = x.detach(), x.grad
    pdf = torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)

    def cumulative(y):
        return torch.cat([y.new_zeros(1), torch.cumulative_trapezoid(y, x)])

    return x, slope, cumulative(pdf), cumulative(slope * pdf), cumulative(slope * slope * pdf)


def _at(grid, values, t):
    """Piecewise-linear interpolation of a cumulative integral at points t."""
    t = torch.as_tensor(t, dtype=torch.float64).clamp(float(grid[0]), float(grid[-1]))
    i = torch.searchsorted(grid, t).clamp(1, len(grid) - 1)
    w = (t - grid[i - 1]) / (grid[i] - grid[i - 1])
    return values[i - 1] + w * (values[i] - values[i - 1])


def _squared_error(q, cuts):
    """E[(GELU' − q)²] under N(0,1) for the best values given `cuts` (..., K-1), by quadrature."""
    grid, _, mass, first, second = q
    lo = torch.full(cuts.shape[:-1] + (1,), -12.0, dtype=torch.float64)
    edges = torch.cat([lo, cuts, -lo], dim=-1)
    w, m = _at(grid, mass, edges).diff(dim=-1), _at(grid, first, edges).diff(dim=-1)
    return float(second[-1]) - (m * m / w).sum(-1)


@pytest.fixture(scope="module")
def quadrature():
    return _quadrature()


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_gelu_levels_satisfy_the_optimality_conditions(quadrature, bits):
    grid, slope, mass, first, _ = quadrature
    levels = gelu_levels(bits)
    cuts = torch.tensor(levels.boundaries, dtype=torch.float64)
    assert len(levels.values) == 2 ** bits and bool((cuts.diff() > 0).all())
    edges = torch.cat([grid[:1], cuts, grid[-1:]])
    means = _at(grid, first, edges).diff() / _at(grid, mass, edges).diff()
    torch.testing.assert_close(torch.tensor(levels.values, dtype=torch.float64), means, rtol=0, atol=1e-7)
    t = cuts.clone().requires_grad_(True)  # GELU' at each cut = midpoint of the values beside it
    F.gelu(t).sum().backward()
    values = torch.tensor(levels.values, dtype=torch.float64)
    torch.testing.assert_close(t.grad, (values[:-1] + values[1:]) / 2, rtol=0, atol=1e-9)
    assert abs(float(_squared_error(quadrature, cuts)) - levels.expected_squared_error) < 1e-8


def test_gelu_levels_beat_a_brute_force_search(quadrature):
    # 1 bit: every cut on a 0.001 grid
    candidates = torch.arange(-3, 3.0005, 0.001, dtype=torch.float64)
    errors = _squared_error(quadrature, candidates[:, None])
    best = float(candidates[errors.argmin()])
    assert abs(gelu_levels(1).boundaries[0] - best) <= 0.001
    assert gelu_levels(1).expected_squared_error <= float(errors.min()) + 1e-9
    # 2 bits: every increasing triple of cuts on a 0.05 grid (GELU' is not monotonic)
    grid = torch.arange(-2.5, 2.5001, 0.05, dtype=torch.float64)
    i, j, k = torch.meshgrid(*[torch.arange(len(grid))] * 3, indexing="ij")
    keep = (i < j) & (j < k)
    triples = torch.stack([grid[i[keep]], grid[j[keep]], grid[k[keep]]], dim=-1)  # (C, 3)
    errors = _squared_error(quadrature, triples)
    best = triples[errors.argmin()]
    ours = torch.tensor(gelu_levels(2).boundaries, dtype=torch.float64)
    assert float((ours - best).abs().max()) <= 0.05
    assert gelu_levels(2).expected_squared_error <= float(errors.min()) + 1e-9


def test_gelu_error_decreases_with_bits():
    errors = [gelu_levels(b).expected_squared_error for b in (1, 2, 3, 4)]
    assert errors == sorted(errors, reverse=True)
    torch.manual_seed(0)
    x = torch.randn(50_000) * 1.3 - 0.2  # not quite N(0, 1), as real activations are not
    g = torch.randn(50_000)
    reports = [gelu_gradient_error(x, b, g) for b in (1, 2, 3, 4)]
    for key in ("relative_error", "weighted_relative_error"):
        values = [r[key] for r in reports]
        assert values == sorted(values, reverse=True) and values[-1] > 0
    normal = gelu_gradient_error(torch.randn(200_000), 2)
    assert abs(normal["relative_error"] - gelu_levels(2).relative_rms_error) < 0.01


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 3, 7, 8, 9, 13, 31, 1001])
def test_pack_unpack_round_trip(bits, n):
    codes = torch.randint(0, 2 ** bits, (n,), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(bits * n / 8)
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_two_bit_codes_are_four_to_a_byte():
    codes = torch.tensor([1, 2, 3, 0, 3, 3, 0, 1], dtype=torch.uint8)  # code i at bits [2i, 2i + 2)
    packed = pack_codes(codes, 2)
    assert packed.tolist() == [1 | 2 << 2 | 3 << 4 | 0 << 6, 3 | 3 << 2 | 0 << 4 | 1 << 6]


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_few_bit_gelu_saves_exactly_b_bits_per_element(bits):
    layer = FewBitGELU(bits)
    x = torch.randn(3, 37, requires_grad=True)  # 111 elements: packing crosses byte boundaries
    out, stats = _saved(lambda: layer(x), layer, exclude=[x])
    out.sum().backward()
    assert stats.by_kind["gelu_codes"] == math.ceil(bits * 111 / 8)
    assert stats.total_bytes == stats.by_kind["gelu_codes"]


@pytest.mark.parametrize("bits", [1, 3])
def test_few_bit_gelu_forward_is_exact_and_backward_uses_the_levels(bits):
    x = torch.randn(4, 50, requires_grad=True)
    g = torch.randn(4, 50)
    out = few_bit_gelu(x, bits)
    out.backward(g)
    assert torch.equal(out, F.gelu(x.detach()))
    values = torch.tensor(gelu_levels(bits).values)
    expected = g * values[quantize(x.detach(), bits).long()].view(4, 50)
    assert torch.equal(x.grad, expected)
    edges = torch.tensor(gelu_levels(bits).boundaries)
    assert torch.equal(quantize(x.detach(), bits).long(), torch.bucketize(x.detach().reshape(-1), edges, right=True))


def test_few_bit_gelu_saves_nothing_without_grad():
    x = torch.randn(10, 10)
    out, stats = _saved(lambda: few_bit_gelu(x, 2))
    assert stats.total_bytes == 0 and torch.equal(out, F.gelu(x))


# ---------------------------------------------------------------------------- names, apply, restore


@pytest.mark.parametrize("names,message", [
    (["bogus"], "unknown saver 'bogus'"),
    (["gelu"], "needs a bit count"),
    (["gelu:0"], "must be one of 1, 2, 3, 4"),
    (["gelu:9"], "must be one of 1, 2, 3, 4"),
    (["gelu:x"], "must be one of 1, 2, 3, 4"),
    (["dropout", "dropout"], "given twice"),
    (["gelu:2", "gelu:3"], "given twice ('gelu:2' and 'gelu:3')"),
])
def test_bad_saver_names_are_one_line_config_errors(names, message):
    with pytest.raises(ConfigError) as err:
        parse_savers(names)
    assert message in str(err.value) and "\n" not in str(err.value) and err.value.exit_code == 2


def test_parse_savers():
    assert [str(s) for s in parse_savers(["gelu:2", "dropout"])] == ["gelu:2", "dropout"]
    assert parse_savers("dropout") == parse_savers(["dropout"]) and parse_savers(None) == ()


def test_apply_restore_round_trip_keeps_parameters_hooks_and_outputs():
    model = _eager_roberta()
    params = [id(p) for p in model.parameters()]
    state_keys = list(model.state_dict())
    batch = tiny_batch(model)
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    original_drop = model.roberta.embeddings.dropout
    original_act = model.roberta.encoder.layer[0].intermediate.intermediate_act_fn
    calls = []
    handle = original_drop.register_forward_hook(lambda *args: calls.append(1))

    model = apply_savers(model.train(), ["dropout", "gelu:2"])
    assert saver_names(model) == ["dropout", "gelu:2"]
    assert isinstance(model.roberta.embeddings.dropout, SeedDropout)
    assert isinstance(model.roberta.encoder.layer[0].intermediate.intermediate_act_fn, FewBitGELU)
    assert [id(p) for p in model.parameters()] == params and list(model.state_dict()) == state_keys
    model.eval()
    with torch.no_grad():
        after = model(**batch).logits
    assert torch.equal(before, after) and calls  # eval: identical outputs; the hook still fires
    assert model.roberta.embeddings.dropout.training is False

    model = restore_savers(model)
    assert model.roberta.embeddings.dropout is original_drop and original_drop.training is False
    assert model.roberta.encoder.layer[0].intermediate.intermediate_act_fn is original_act
    assert model.config._attn_implementation == "eager" and saver_names(model) == []
    handle.remove()
    calls.clear()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)
    assert not calls


def test_savers_compose_with_randomized_linear_layers_in_either_order():
    model = convert(_eager_roberta(), 0.5, sketch="countsketch")
    converted = converted_names(model)
    model = apply_savers(model, ["dropout", "gelu:3"])
    assert converted_names(model) == converted and saver_names(model) == ["dropout", "gelu:3"]
    batch = tiny_batch(model)
    model(**batch).loss.backward()
    model = restore_savers(model)  # the savers back, the linear layers stay
    assert saver_names(model) == [] and converted_names(model) == converted
    model = convert(apply_savers(model, ["gelu:2"]), 0.1)  # converting keeps the savers
    assert saver_names(model) == ["gelu:2"] and len(converted_names(model)) == len(converted)
    model = restore(model)  # everything randbp did, undone
    assert converted_names(model) == [] and saver_names(model) == []


def test_reapplying_replaces_the_previous_savers():
    model = apply_savers(_eager_roberta(), ["gelu:1"])
    model = apply_savers(model, ["gelu:4"])
    assert saver_names(model) == ["gelu:4"]
    assert restore_savers(model).config._attn_implementation == "eager"
    assert saver_names(apply_savers(model, [])) == []


def test_sdpa_attention_is_left_alone_and_described(tiny_roberta):
    model = apply_savers(tiny_roberta, ["dropout"])
    info = describe_savers(model)
    assert info["attn_implementation"] != ATTN_IMPLEMENTATION and "not 'eager'" in info["attention_not_switched"]
    assert info["seed_dropouts"] and not info["native_dropouts"]
    model(**tiny_batch(model)).loss.backward()


def test_activation_bytes_by_kind_show_each_saver():
    model = apply_savers(_eager_roberta(), ["dropout", "gelu:2"])
    batch = tiny_batch(model)
    loss, stats = _saved(lambda: model(**batch).loss, model, exclude=list(batch.values()))
    loss.backward()
    ffn = 2 * 16 * 256  # (batch, seq, intermediate) per layer, 2 layers
    assert stats.by_kind["gelu_codes"] == 2 * math.ceil(2 * ffn / 8)
    assert stats.by_kind["attention_probs"] == 2 * 2 * 4 * 16 * 16 * 4  # layers × (B, H, T, T) fp32
    assert stats.by_kind["dropout_seeds"] == 0


def test_a_failed_apply_changes_nothing():
    from transformers.activations import QuickGELUActivation

    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), QuickGELUActivation())
    with pytest.raises(ConfigError, match="erf or tanh GELU only"):
        apply_savers(model, ["dropout", "gelu:2"])
    assert type(model[1]) is nn.Dropout
    with pytest.raises(ConfigError, match="no GELU module"):
        apply_savers(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1)), ["gelu:2"])
    with pytest.raises(ConfigError, match="nothing to replace"):
        apply_savers(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), ["dropout"])


@pytest.mark.parametrize("name,form", [
    ("gelu", "none"), ("gelu_python", "none"),  # GELUActivation: F.gelu, or the erf formula in Python
    ("gelu_new", "tanh"), ("gelu_fast", "tanh"), ("gelu_pytorch_tanh", "tanh"), ("gelu_python_tanh", "tanh"),
    ("quick_gelu", None), ("gelu_10", None), ("gelu_accurate", None),  # sigmoid, clipped, other: refused
])
def test_transformers_gelu_variants(name, form):
    """The erf and tanh forms become a FewBitGELU computing the same form (the forward bit for bit
    against F.gelu of that form, to rounding against the written-out formulas); others are refused."""
    from transformers.activations import ACT2FN

    model = nn.Sequential(nn.Linear(4, 4), ACT2FN[name])
    x = torch.randn(3, 4)
    if form is None:
        with pytest.raises(ConfigError, match="erf or tanh GELU only"):
            apply_savers(model, ["gelu:2"])
        return
    expected = model(x)
    model = apply_savers(model, ["gelu:2"])
    assert isinstance(model[1], FewBitGELU) and model[1].approximate == form
    torch.testing.assert_close(model(x.requires_grad_()), expected)


def test_the_tanh_form_quantized():
    """gelu:2 on the tanh form: the output is F.gelu's tanh form exactly; the gradient error is
    measured against the tanh form's derivative, and the erf-fitted levels miss it by about what
    they miss the erf form's (the two derivatives are 8.7e-4 apart at most)."""
    from randbp_cli.savers.gelu import few_bit_gelu, tanh_gelu_derivative

    x = torch.randn(20000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    out = few_bit_gelu(x, 2, "tanh")
    assert torch.equal(out, F.gelu(x, approximate="tanh"))
    (autograd_slope,) = torch.autograd.grad(F.gelu(x, approximate="tanh").sum(), x)
    torch.testing.assert_close(tanh_gelu_derivative(x.detach()), autograd_slope)
    tanh_error = gelu_gradient_error(x, 2, approximate="tanh")["relative_error"]
    erf_error = gelu_gradient_error(x, 2)["relative_error"]
    assert abs(tanh_error - erf_error) < 0.01 and 0.05 < tanh_error < 0.3
    with pytest.raises(ConfigError, match="approximate must be one of none, tanh"):
        FewBitGELU(2, approximate="sigmoid")


def test_gelu_gradient_error_checks_the_gradient_shape():
    with pytest.raises(ConfigError, match="shape of x"):
        gelu_gradient_error(torch.randn(4, 3), 2, torch.randn(3, 4))


def test_plain_torch_modules_and_shared_modules():
    drop, act = nn.Dropout(0.2), nn.GELU()
    model = nn.Sequential(nn.Linear(4, 4), drop, act, drop)  # one dropout under two names
    model = apply_savers(model, ["dropout", "gelu:2"])
    assert model[1] is model[3] and isinstance(model[1], SeedDropout) and isinstance(model[2], FewBitGELU)
    model(torch.randn(3, 4)).sum().backward()
    model = restore_savers(model)
    assert model[1] is drop and model[3] is drop and model[2] is act


def test_savers_under_autocast_behave_like_the_modules_they_replace():
    torch.manual_seed(0)
    native = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.2), nn.Linear(16, 4))
    x = torch.randn(5, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_dtype = native(x).dtype
        model = apply_savers(native, ["dropout", "gelu:2"])
        out = model(x)
    out.float().sum().backward()
    assert out.dtype == expected_dtype and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in model.parameters())


def test_a_new_saver_is_one_class_and_one_registry_line(monkeypatch):
    """The saver registry (like SKETCHES): a saver is a Saver subclass; apply, name, restore come free."""
    from randbp_cli.savers import registry as savers_module

    class Halved(nn.Module):
        def forward(self, x):
            return torch.tanh(x)

    class TanhSaver(savers_module.Saver):
        name, usage = "tanh", "tanh"

        def targets(self, model, spec):
            return {name: m for name, m in model.named_modules() if type(m) is nn.Tanh}

        def make(self, original, spec):
            return Halved()

        def owns(self, module):
            return isinstance(module, Halved)

    monkeypatch.setitem(savers_module.SAVERS, "tanh", TanhSaver())
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)).eval()
    handle = model[1].register_forward_hook(lambda m, i, o: calls.append(1))
    calls = []
    x = torch.randn(3, 4)
    expected = model(x)
    model = apply_savers(model, ["tanh"])
    assert isinstance(model[1], Halved) and saver_names(model) == ["tanh"]
    torch.testing.assert_close(model(x), expected)
    assert len(calls) == 2  # the hook came along
    with pytest.raises(ConfigError, match="saver 'tanh' takes no argument"):
        apply_savers(model, ["tanh:2"])
    model = restore_savers(model)
    assert type(model[1]) is nn.Tanh and saver_names(model) == []
    handle.remove()
