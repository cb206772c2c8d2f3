"""Seed dropout: keep a per-call seed instead of the dropout mask, regenerate the mask in backward.

Trade-off: `nn.Dropout` keeps its mask until backward (on the CPU a full tensor of the input's
dtype, on CUDA one byte per element). `SeedDropout` keeps one integer and draws the same mask
again in backward: memory for one extra pass of random number generation.

What is saved for backward: nothing through `ctx.save_for_backward` (the input is not needed:
∂L/∂x = g ⊙ mask/(1−p)). The seed and p sit on ctx as plain Python numbers.
What is recomputed in backward: the mask, from the seed, on the gradient's device.

What is exact: forward out = x ⊙ noise and backward g ⊙ noise with the same noise tensor,
noise = keep/(1−p) in x's dtype (keep ∈ {0, 1}, computed as `keep.div_(1 − p)`, the formula
of torch's own CPU dropout). keep = [u ≥ round(p·2^32)] for u a uniform 32-bit integer, from a
generator seeded with the call's seed, so P(keep) = 1 − p to 2^-33 (finer than `bernoulli_`'s
float32 draw). The masks differ from `nn.Dropout`'s (another random stream) but have the same
distribution. Why 32-bit integers, two per 64-bit draw: torch's CPU generator fills tensors
serially, one draw per element, and one 64-bit draw per two elements takes 0.56× the time of
`uniform_` and 0.30× that of `bernoulli_` (roberta-base's hidden dropout, 2 cores), which
makes drawing each mask twice (forward and backward) cheaper than native dropout's one draw.

Seeds: each call draws a fresh seed from torch's global CPU RNG, so `torch.manual_seed`
reproduces a run, no two calls share a mask by accident, and activation checkpointing (which
restores the RNG state before recomputing a block) redraws the same seeds, hence the same
masks. In training mode a call draws and drops even under `torch.no_grad()`, as nn.Dropout does.

Caveats (where it falls back to torch's native dropout, which keeps its mask):
  * under `torch.compile` (`torch.compiler.is_compiling()`) and under CUDA-graph capture
    (`torch.cuda.is_current_stream_capturing()`): a seed read on the host would be baked into
    the graph as a constant, and every replay would repeat the same mask;
  * p = 1 (everything dropped; there is no mask to keep).
Eval mode and p = 0 are the identity (the input itself is returned, nothing drawn or saved).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import draw_seed

SAVED_KIND = "dropout_seeds"


def seed_is_graph_safe(x: Tensor) -> bool:
    """May a host-side seed be used for x? Not inside torch.compile or a CUDA-graph capture."""
    if torch.compiler.is_compiling():
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


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


class SeedDropoutFunction(torch.autograd.Function):
    """out = x ⊙ noise(seed); backward: g ⊙ noise(seed), the noise drawn again from the seed."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float, seed: int):
        ctx.p, ctx.seed = p, seed
        return keep_noise(x, p, seed).mul_(x)  # = x ⊙ noise, into the fresh noise tensor

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return keep_noise(grad_out, ctx.p, ctx.seed).mul_(grad_out), None, None


def seed_dropout(x: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """`F.dropout(x, p, training)` that keeps a seed, not a mask; see the module doc."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0 or x.numel() == 0:
        return x
    if p == 1.0 or not seed_is_graph_safe(x):
        return F.dropout(x, p, training)
    return SeedDropoutFunction.apply(x, p, draw_seed())


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
