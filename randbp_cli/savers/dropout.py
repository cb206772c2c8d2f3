"""Seed dropout: keep a per-call seed instead of the dropout mask, regenerate the mask in backward.

Trade-off: `nn.Dropout` keeps its mask until backward (on the CPU a full tensor of the input's
dtype, on CUDA one byte per element). `SeedDropout` keeps one integer and draws the same mask
again in backward: memory for one extra pass of random number generation.

What is saved for backward: nothing through `ctx.save_for_backward` in eager mode (the input is
not needed: ∂L/∂x = g ⊙ mask/(1−p)); the 8-byte seed tensor sits on ctx, like p. A compiled
graph saves the seed (8 bytes) instead of the mask torch.compile's own dropout keeps (a bool
per element).
What is recomputed in backward: the mask, from the seed, on the gradient's device.

What is exact: forward out = x ⊙ noise and backward g ⊙ noise with the same noise tensor,
noise = keep/(1−p) in x's dtype (keep ∈ {0, 1}, computed as `keep.div_(1 − p)`, the formula
of torch's own CPU dropout). keep = [u ≥ round(p·2^32)] for u a uniform 32-bit integer, from a
generator seeded with the call's seed, so P(keep) = 1 − p to 2^-33 (finer than `bernoulli_`'s
float32 draw). The masks differ from `nn.Dropout`'s (another random stream) but have the same
distribution. Why 32-bit integers, two per 64-bit draw: torch's CPU generator fills tensors
serially, one draw per element, and one 64-bit draw per two elements takes a fraction of the time
of `uniform_`, and less again of `bernoulli_`'s (benchmarks/savers.py measures the saver's step),
which makes drawing each mask twice (forward and backward) cheaper than native dropout's one draw.

Seeds: each call draws a fresh seed from torch's global CPU RNG, inside the custom op
`randbp::seed_dropout` that also applies the mask and returns the seed (for the reason ops.py
gives: a compiler may not draw another one for the backward); so `torch.manual_seed`
reproduces a run, eager and compiled alike, and activation checkpointing (which restores the
RNG state before recomputing a block) redraws the same seeds, hence the same masks. In
training mode a call draws and drops even under `torch.no_grad()`, as nn.Dropout does. The
seed has 62 bits but torch's CPU generator uses the low 32 (a CUDA one all 64): two calls on a
CPU share a mask with probability 2⁻³² — over 100k roberta-base steps (3.7M dropout calls)
about 1,600 pairs of calls, each pair in different layers or steps, which changes nothing
statistically; mixing the 62 bits into the 32 would not change that count.

The ops are tagged `cudagraph_unsafe` (a generator seeded from a host integer cannot be
replayed by a CUDA graph): Inductor keeps them out of CUDA graphs.

Caveats (where it falls back to torch's native dropout, which keeps its mask):
  * on CUDA under torch.compile: inside a compiled activation-checkpointing region the
    compiler replays a recomputed random op under the saved state of the *device's* generator,
    but this seed comes from the CPU's, so the recompute would draw another mask (on a CPU the
    two are the same generator, and it compiles);
  * under eager CUDA-graph capture (`torch.cuda.is_current_stream_capturing()`): the seed would
    be drawn once at capture and every replay would repeat the same mask;
  * p = 1 (everything dropped; there is no mask to keep).
Eval mode and p = 0 are the identity (the input itself is returned, nothing drawn or saved).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.ops import CUDAGRAPH_UNSAFE, capturing, traced_or_direct

SAVED_KIND = "dropout_seeds"


def seed_is_graph_safe(x: Tensor) -> bool:
    """May a host-side seed be used for x? Not inside torch.compile or a CUDA-graph capture
    (what the attention saver, which has no op of its own, still falls back under)."""
    return not (torch.compiler.is_compiling() or capturing(x))


def _keep_threshold(p: float) -> int:
    """T with P(s >= T) = 1 − round(p·2^32)/2^32 for s a uniform signed 32-bit integer."""
    return min(max(round(p * 2**32), 0), 2**32 - 1) - 2**31


def keep_noise(like: Tensor, p: float, seed: int) -> Tensor:
    """The dropout multiplier keep/(1−p) drawn from `seed`, shaped like `like`, in its dtype and device."""
    generator = torch.Generator(device=like.device)
    generator.manual_seed(seed)
    n = like.numel()
    words = torch.empty((n + 1) // 2, dtype=torch.int64, device=like.device)
    words.random_(-2**63, None, generator=generator)  # all 64 bits uniform: two int32 lanes each
    lanes = words.view(torch.int32)[:n].view(like.shape)
    if like.dtype == torch.float32:  # write keep over the lanes it reads (same 4-byte slots): no second buffer
        noise = words.view(torch.float32)[:n].view(like.shape)
    else:
        noise = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    torch.ge(lanes, _keep_threshold(p), out=noise)  # 1 where kept, 0 where dropped
    return noise.div_(1 - p)


def _dropout(x: Tensor, p: float, token: Tensor) -> tuple[Tensor, Tensor]:
    """(x ⊙ noise(seed), seed) for a seed freshly drawn from torch's CPU RNG.

    `token` is an empty tensor made for this call alone: two calls on one input with one p are
    then still two calls to a compiler, which would otherwise merge them into one mask
    (common-subexpression elimination leaves fresh `empty` tensors apart)."""
    seed = torch.randint(0, 2**62, (), dtype=torch.int64)
    return keep_noise(x, p, int(seed)).mul_(x), seed


def _dropout_backward(grad: Tensor, p: float, seed: Tensor) -> Tensor:
    """grad ⊙ noise(seed): the forward's mask, drawn again. Linear in grad, so it is its own derivative."""
    return keep_noise(grad, p, int(seed)).mul_(grad)


# the ops torch.compile sees (ops.py: why the seed is drawn inside); eagerly the functions themselves
# run (ops.traced_or_direct)
_dropout_op = torch.library.custom_op("randbp::seed_dropout", _dropout, mutates_args=(),
                                      tags=(*CUDAGRAPH_UNSAFE, torch.Tag.nondeterministic_seeded))
_dropout_backward_op = torch.library.custom_op("randbp::seed_dropout_backward", _dropout_backward, mutates_args=(),
                                               tags=CUDAGRAPH_UNSAFE)


@_dropout_op.register_fake
def _(x, p, token):
    return x.new_empty(x.shape), torch.empty((), dtype=torch.int64)


@_dropout_backward_op.register_fake
def _(grad, p, seed):
    return grad.new_empty(grad.shape)


def _save_seed(ctx, inputs, output) -> None:
    _, ctx.p, seed = inputs
    ctx.save_for_backward(seed)


def _backward_of_backward(ctx, grad):
    (seed,) = ctx.saved_tensors
    return _dropout_backward_op(grad, ctx.p, seed), None, None


_dropout_backward_op.register_autograd(_backward_of_backward, setup_context=_save_seed)


class SeedDropoutFunction(torch.autograd.Function):
    """out = x ⊙ noise(seed); backward: g ⊙ noise(seed), the noise drawn again from the seed."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float):
        out, seed = traced_or_direct(_dropout_op, _dropout, x, p, torch.empty(0, device=x.device))
        ctx.p = p
        # eager: the seed on ctx (8 bytes, out of the saved-tensor accounting); traced: saved
        ctx.seed_saved = torch.compiler.is_compiling()
        ctx.seed = None if ctx.seed_saved else seed
        ctx.save_for_backward(*((seed,) if ctx.seed_saved else ()))
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        seed = ctx.saved_tensors[0] if ctx.seed_saved else ctx.seed
        return traced_or_direct(_dropout_backward_op, _dropout_backward, grad_out, ctx.p, seed), None


def seed_dropout(x: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """`F.dropout(x, p, training)` that keeps a seed, not a mask; see the module doc."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0 or x.numel() == 0:
        return x
    if p == 1.0 or capturing(x) or (x.is_cuda and torch.compiler.is_compiling()):
        return F.dropout(x, p, training)
    return SeedDropoutFunction.apply(x, p)


class SeedDropout(nn.Dropout):
    """Drop-in `nn.Dropout` (same `p`, same train/eval behaviour) that keeps a seed, not a mask.

    A subclass, so code that reads `module.p` (transformers' attention modules pass their
    dropout module's `p` to the attention function) keeps working.
    """

    saved_kind = SAVED_KIND  # how memory.SavedTensorCounter files what this module saves

    def forward(self, x: Tensor) -> Tensor:
        if self.inplace:  # an in-place dropout must modify its input: only torch's can
            return F.dropout(x, self.p, self.training, inplace=True)
        return seed_dropout(x, self.p, self.training)
