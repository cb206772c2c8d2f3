"""Few-bit GELU: exact forward, a b-bit piecewise-constant derivative in backward (approximate).

After Novikov et al., "Few-bit backward: quantized gradients of activation functions for memory
footprint reduction" (ICML 2023).

Trade-off: `nn.GELU` keeps its whole input x (N elements, 2–4 bytes each) until backward, only to
evaluate GELU'(x) there. `FewBitGELU` keeps, per element, the index of the interval x fell in:
b bits, packed, ⌈b·N/8⌉ bytes in all (2 bits: 1/16 of an fp32 input). Backward multiplies the
incoming gradient by a constant per interval instead of GELU'(x).

What is saved for backward (through `ctx.save_for_backward`): one uint8 tensor of ⌈b·N/8⌉
bytes, the packed interval indices. Nothing else: not x, not the output.
What is recomputed in backward: q(x) per element, read straight from the packed bytes through a
small table (one row of levels per byte, or per 12 bits for b = 3), times the incoming gradient.

What is exact: the forward output (`F.gelu`: the erf form, as `GELUActivation` and `nn.GELU()`
compute it, or with `approximate="tanh"` the tanh form GPT-2's `gelu_new` writes out). What is
approximate: ∂L/∂x = g ⊙ q(x) instead of g ⊙ GELU'(x).

The levels q are gelu_levels.py's: 2^b intervals and one value each, fitted to the erf GELU' under
N(0, 1). The tanh form uses the same levels: its derivative differs from the erf form's by at most
8.7e-4 (at x ≈ −2.02; 2.9e-4 rms under N(0, 1)), far below what b bits miss of either (the 2-bit
fit's relative rms error is gelu_levels(2).relative_rms_error, about 0.15); `gelu_gradient_error`
measures q against the derivative of the form the module computes.

Caveats:
  * Boundaries are compared in the input's dtype (in bf16 they move by up to 2^-8 relative).
  * Only the erf and tanh forms: `randbp_cli.savers.registry` refuses other GELU variants (sigmoid,
    clipped) rather than quantize a derivative the levels were not meant for.
  * Nothing is quantized or saved under `torch.no_grad()` or for inputs that need no gradient.
  * No second-order gradients: q′ = 0 where GELU″ is not, so differentiating the backward again
    raises `SecondOrderError` rather than silently dropping that term.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.ops import traced_or_direct
from ..core.second_order import graph_anchor, refuse_differentiation
from ..errors import ConfigError
from ..measure.memory import SAVED_KIND_ATTR
from .gelu_levels import check_bits, gelu_derivative, gelu_levels

APPROXIMATIONS = ("none", "tanh")  # F.gelu's: the erf form, the tanh form


def tanh_gelu_derivative(x: Tensor) -> Tensor:
    """The derivative of 0.5·x·(1 + tanh(u)), u = √(2/π)(x + 0.044715x³), in x's dtype."""
    c = math.sqrt(2.0 / math.pi)
    t = torch.tanh(c * (x + 0.044715 * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)

SAVED_KIND = "gelu_codes"


# ---------------------------------------------------------------------------- packing
#
# Layout: a little-endian bitstream, code i at bits [b·i, b·i + b), ⌈b·n/8⌉ bytes. A group of 8
# codes fills exactly b bytes, so packing works on 8 codes at once (one int64 per group), and
# backward reads whole chunks of codes with one table row per chunk (`_chunk_levels`).


def _gather_bits_(words: Tensor, bits: int) -> Tensor:
    """In place: int64 words holding 8 codes in byte lanes -> the codes b bits apart (low 8·b bits).

    Three steps, each halving the number of lanes: pairs, quads, then all eight.
    """
    shifted = torch.empty_like(words)
    for step in range(3):
        lane = 8 << step  # 8, 16, 32 bits: the lanes being merged
        width = bits << step  # bits already gathered at the bottom of each lane
        words.bitwise_or_(torch.bitwise_right_shift(words, lane - width, out=shifted))
        keep = (1 << (2 * width)) - 1  # the gathered bits at the bottom of each double lane
        words.bitwise_and_(sum(keep << (2 * lane * i) for i in range(64 // (2 * lane))))  # < 2^63 for b <= 4
    return words


def _pack_(codes: Tensor, bits: int) -> Tensor:
    """`pack_codes` that may overwrite `codes` (a flat uint8 tensor the caller no longer needs)."""
    n = codes.numel()
    if n % 8:
        codes = torch.cat([codes, codes.new_zeros(8 - n % 8)])
    words = _gather_bits_(codes.view(torch.int64), bits)  # (G,) one group of 8 codes each
    nbytes = math.ceil(bits * n / 8)
    packed = words.view(torch.uint8).view(-1, 8)[:, :bits].reshape(-1)[:nbytes]  # the low b bytes of each
    # own exactly the bytes kept (a view would keep the words, or the padded tail, alive)
    return packed if packed.untyped_storage().nbytes() == nbytes else packed.clone()


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """n b-bit codes (uint8, values < 2^b) -> exactly ⌈b·n/8⌉ bytes (see the layout above)."""
    return _pack_(codes.reshape(-1).clone(), bits)


def _chunks(packed: Tensor, bits: int, n: int) -> Tensor:
    """The packed stream as int32 chunk indices: bytes, or 12-bit pieces for b = 3."""
    groups = math.ceil(n / 8)
    if packed.numel() < bits * groups:  # the truncated tail back to whole groups
        packed = torch.cat([packed, packed.new_zeros(bits * groups - packed.numel())])
    if bits != 3:
        return packed.to(torch.int32)  # (b·G,) 8 / b codes per byte
    b = packed.view(groups, 3).to(torch.int32)  # 24 bits = two 12-bit chunks of 4 codes
    low = b[:, 0] | ((b[:, 1] & 0xF) << 8)
    high = (b[:, 1] >> 4) | (b[:, 2] << 4)
    return torch.stack([low, high], dim=1).reshape(-1)  # (2·G,)


def _chunk_bits(bits: int) -> int:
    return 12 if bits == 3 else 8


@functools.cache
def _chunk_codes(bits: int, device: torch.device) -> Tensor:
    """(2^chunk_bits, codes per chunk) int64: row c holds the codes packed in chunk value c."""
    per_chunk = _chunk_bits(bits) // bits
    chunk = torch.arange(1 << _chunk_bits(bits), device=device)[:, None]
    return (chunk >> (bits * torch.arange(per_chunk, device=device))) & ((1 << bits) - 1)


@functools.cache
def _chunk_levels(bits: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Row c: q at the codes packed in chunk value c, in `dtype`."""
    return torch.tensor(gelu_levels(bits).values, dtype=dtype, device=device)[_chunk_codes(bits, device)]


def unpack_codes(packed: Tensor, bits: int, n: int) -> Tensor:
    """The inverse of `pack_codes`: n uint8 codes."""
    table = _chunk_codes(bits, packed.device).to(torch.uint8)
    return table.index_select(0, _chunks(packed, bits, n)).reshape(-1)[:n]


def unpack_levels(packed: Tensor, bits: int, n: int, dtype: torch.dtype) -> Tensor:
    """q(x) for the n packed codes, in `dtype`: one table row per chunk, no per-code pass."""
    table = _chunk_levels(bits, dtype, packed.device)
    return table.index_select(0, _chunks(packed, bits, n)).reshape(-1)[:n]


def quantize(x: Tensor, bits: int) -> Tensor:
    """The interval index of every element of x (flattened), as uint8: #{k : x >= t_k}."""
    cuts = gelu_levels(bits).boundaries
    flat = x.reshape(-1)
    codes = torch.ge(flat, cuts[0]).view(torch.uint8)
    above = torch.empty_like(codes, dtype=torch.bool)
    for t in cuts[1:]:  # the intervals are ordered by x even though their values are not
        codes.add_(torch.ge(flat, t, out=above).view(torch.uint8))
    return codes


# ---------------------------------------------------------------------------- autograd


def _codes(x: Tensor, bits: int) -> Tensor:
    """The packed b-bit interval codes of x: ⌈b·N/8⌉ bytes."""
    return _pack_(quantize(x, bits), bits)


def _codes_backward(grad: Tensor, packed: Tensor, bits: int) -> Tensor:
    """grad ⊙ q(x), q read from the packed codes."""
    slope = unpack_levels(packed, bits, grad.numel(), grad.dtype)  # (N,) q(x)
    return slope.view(grad.shape).mul_(grad)


# the ops torch.compile sees (quantising and packing would break its graph); eagerly the functions
# themselves run (ops.traced_or_direct)
_codes_op = torch.library.custom_op("randbp::gelu_codes", _codes, mutates_args=())
_codes_backward_op = torch.library.custom_op("randbp::gelu_codes_backward", _codes_backward, mutates_args=())


@_codes_op.register_fake
def _(x, bits):
    return x.new_empty(((bits * x.numel() + 7) // 8,), dtype=torch.uint8)


@_codes_backward_op.register_fake
def _(grad, packed, bits):
    return grad.new_empty(grad.shape)


_NO_SECOND_ORDER = ("randbp: the gelu:{bits} saver's backward multiplies by a {bits}-bit piecewise-constant q(x) "
                    "in place of GELU'(x); its own derivative is 0, not GELU''(x), so a second-order gradient "
                    "through it would silently lose that term. Leave out gelu:B for second-order gradients "
                    "(Hessian-vector products, gradient penalties, MAML)")


class FewBitGeluFunction(torch.autograd.Function):
    """out = GELU(x) exactly; backward: ∂L/∂x = g ⊙ q(x) from the packed b-bit interval codes.

    The codes are made and read by custom ops (`randbp::gelu_codes`, `randbp::gelu_codes_backward`),
    so torch.compile traces this Function without a graph break. A second derivative through the
    backward is refused (`second_order.refuse_differentiation`): q′ = 0 is not GELU″."""

    @staticmethod
    def forward(ctx, x: Tensor, bits: int, anchor: Tensor | None, approximate: str = "none"):
        packed = traced_or_direct(_codes_op, _codes, x, bits)  # (⌈b·N/8⌉,) uint8
        if not torch.compiler.is_compiling():
            setattr(packed, SAVED_KIND_ATTR, SAVED_KIND)
        ctx.bits, ctx.anchor = bits, anchor
        ctx.save_for_backward(packed)
        return F.gelu(x, approximate=approximate)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (packed,) = ctx.saved_tensors
        grad = traced_or_direct(_codes_backward_op, _codes_backward, grad_out, packed, ctx.bits)
        return refuse_differentiation(grad, _NO_SECOND_ORDER.format(bits=ctx.bits), ctx.anchor), None, None, None


def _check_approximate(approximate: str) -> str:
    if approximate not in APPROXIMATIONS:
        raise ConfigError(f"approximate must be one of {', '.join(APPROXIMATIONS)} (got {approximate!r})")
    return approximate


def few_bit_gelu(x: Tensor, bits: int = 2, approximate: str = "none") -> Tensor:
    """`F.gelu(x, approximate=...)` whose backward uses the b-bit derivative; see the module doc."""
    check_bits(bits)
    _check_approximate(approximate)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return F.gelu(x, approximate=approximate)  # nothing will be differentiated: nothing to keep
    return FewBitGeluFunction.apply(x, bits, graph_anchor(x), approximate)


class FewBitGELU(nn.Module):
    """Drop-in GELU (erf form, or the tanh form with approximate="tanh") that keeps b bits per
    element for backward instead of its input."""

    saved_kind = SAVED_KIND  # how memory.SavedTensorCounter files what this module saves

    def __init__(self, bits: int = 2, approximate: str = "none") -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.approximate = _check_approximate(approximate)

    def forward(self, x: Tensor) -> Tensor:
        return few_bit_gelu(x, self.bits, self.approximate)

    def extra_repr(self) -> str:
        return f"bits={self.bits}" + (f", approximate={self.approximate!r}" if self.approximate != "none" else "")


# ---------------------------------------------------------------------------- error report


def gelu_gradient_error(x: Tensor, bits: int, grad: Tensor | None = None, approximate: str = "none") -> dict:
    """How far the b-bit derivative is from GELU' (of the erf form, or the tanh form with
    approximate="tanh") on captured GELU inputs `x`.

    relative_error: ‖q(x) − GELU'(x)‖ / ‖GELU'(x)‖ over all elements.
    weighted_relative_error (given the upstream gradient g, shaped like x):
    ‖(q(x) − GELU'(x)) ⊙ g‖ / ‖GELU'(x) ⊙ g‖, the relative error of ∂L/∂x itself.
    q is evaluated exactly as backward does (boundaries compared in x's dtype); the norms are
    taken in float64. `normal_relative_rms_error` is the same ratio expected for x ~ N(0, 1).
    """
    levels = gelu_levels(check_bits(bits))
    codes = quantize(x.detach(), bits)
    x64 = x.detach().reshape(-1).double()
    exact = tanh_gelu_derivative(x64) if _check_approximate(approximate) == "tanh" else gelu_derivative(x64)
    approx = torch.tensor(levels.values, dtype=torch.float64, device=x.device)[codes.long()]
    result = {
        "bits": bits,
        "elements": x64.numel(),
        "relative_error": _ratio(approx - exact, exact),
        "weighted_relative_error": None,
        "normal_relative_rms_error": levels.relative_rms_error,
    }
    if grad is not None:
        if grad.shape != x.shape:
            raise ConfigError(f"grad must have the shape of x {tuple(x.shape)} (got {tuple(grad.shape)})")
        g64 = grad.detach().reshape(-1).double()
        result["weighted_relative_error"] = _ratio((approx - exact) * g64, exact * g64)
    return result


def _ratio(num: Tensor, den: Tensor) -> float:
    den_norm = float(torch.linalg.vector_norm(den))
    return float(torch.linalg.vector_norm(num)) / den_norm if den_norm > 0 else 0.0
