"""Eager attention that keeps the softmax output once and a dropout seed (transformers' registry).

Trade-off: transformers' eager attention (softmax → dropout → @V as separate ops) keeps, per
layer, Q, K, V, the softmax output P (for softmax's backward), the dropout mask and the
dropped copy P_d = P ⊙ mask/(1−p) (for @V's backward): three (B, H, Tq, Tk) tensors. One
autograd Function for the whole block keeps Q, K, V, P and the seed, and recomputes the
mask and P_d in backward: one (B, H, Tq, Tk) tensor instead of three, for one pass of
random number generation and one multiply.

What is saved for backward (through `ctx.save_for_backward`): Q, K, V (as given: views of the
projections), P (tagged `attention_probs` for memory.SavedTensorCounter), and the additive
mask if it needs a gradient. The seed, p and the scaling sit on ctx as numbers.
What is recomputed in backward: noise = keep/(1−p) from the seed (`dropout.keep_noise`),
P_d = P ⊙ noise for ∂L/∂V.

What is exact: the forward runs the very ops of transformers' `eager_attention_forward`
(matmul, scaling, + mask, softmax, dropout as x ⊙ noise, matmul), and backward the ops
autograd would run for them, so outputs match eager attention bit for bit under the same
mask and gradients to float rounding (the matmuls see other memory layouts).
The returned attention weights are P_d, as eager returns, and a gradient through them is
honoured.

`register()` adds this function to transformers' `AttentionInterface` (and the eager mask
builder to `AttentionMaskInterface`) as `randbp_eager`; `randbp_cli.savers.registry` switches a model's
attention implementation to it and back. It stands in for the eager attention of the model
types in `VERIFIED_MODEL_TYPES` (their `eager_attention_forward` is RoBERTa's, line for line).

Falls back to the model's own eager attention (native dropout, which keeps its mask) when
there is nothing to gain or no safe seed: eval mode or p = 0 (nothing dropped), p = 1, a
`head_mask`, `torch.autocast` (eager's casts would have to be mirrored op by op), and under
`torch.compile` or CUDA-graph capture (a host seed would be baked into the graph).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..core.layers import draw_seed
from ..measure.memory import SAVED_KIND_ATTR
from .dropout import keep_noise, seed_is_graph_safe

ATTN_IMPLEMENTATION = "randbp_eager"
SAVED_KIND = "attention_probs"

# model types whose eager attention this mirrors (same eager_attention_forward as RoBERTa's,
# called the same way); others keep their attention implementation
VERIFIED_MODEL_TYPES = frozenset({"roberta", "xlm-roberta", "camembert", "bert", "electra"})


class SeedAttentionFunction(torch.autograd.Function):
    """softmax(Q Kᵀ·scaling + mask) → seed dropout → @V, keeping Q, K, V, P and the seed."""

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                scaling: float, p: float, seed: int):
        # query (B, H, Tq, D), key and value (B, H, Tk, D), mask broadcastable to (B, H, Tq, Tk)
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, Tq, Tk)
        if mask is not None:
            scores = scores + mask
        probs = torch.softmax(scores, dim=-1)
        del scores
        dropped = keep_noise(probs, p, seed).mul_(probs)  # P_d = P ⊙ noise
        out = torch.matmul(dropped, value)  # (B, H, Tq, D)
        setattr(probs, SAVED_KIND_ATTR, SAVED_KIND)
        mask_needs_grad = mask is not None and ctx.needs_input_grad[3]
        ctx.save_for_backward(query, key, value, probs, mask if mask_needs_grad else None)
        ctx.scaling, ctx.p, ctx.seed = scaling, p, seed
        ctx.set_materialize_grads(False)  # the weights' gradient is usually None: no zeros
        return out, dropped

    @staticmethod
    def backward(ctx, grad_out: Tensor | None, grad_dropped: Tensor | None):
        query, key, value, probs, mask = ctx.saved_tensors
        noise = keep_noise(probs, ctx.p, ctx.seed)  # the forward's mask, drawn again
        if torch.is_grad_enabled():  # create_graph: gradients that can be differentiated again
            return _differentiable_backward(ctx, query, key, value, probs, mask, noise, grad_out, grad_dropped)
        grad_q = grad_k = grad_v = grad_mask = None
        grad_d = grad_dropped  # ∂L/∂P_d, (B, H, Tq, Tk)
        if grad_out is not None:
            if ctx.needs_input_grad[2]:
                grad_v = torch.matmul((probs * noise).transpose(2, 3), grad_out)
            from_out = torch.matmul(grad_out, value.transpose(2, 3))
            grad_d = from_out if grad_d is None else from_out + grad_d
        if grad_d is None:
            return None, None, grad_v, None, None, None, None
        grad_probs = noise.mul_(grad_d)  # ∂L/∂P = ∂L/∂P_d ⊙ noise, in place of the noise
        del grad_d
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        if mask is not None:
            grad_mask = grad_scores.sum_to_size(mask.shape)
        grad_scores = grad_scores * ctx.scaling
        if ctx.needs_input_grad[0]:
            grad_q = torch.matmul(grad_scores, key)
        if ctx.needs_input_grad[1]:
            grad_k = torch.matmul(query.transpose(2, 3), grad_scores).transpose(2, 3)
        return grad_q, grad_k, grad_v, grad_mask, None, None, None


def _differentiable_backward(ctx, query, key, value, probs, mask, noise, grad_out, grad_dropped):
    """The backward with `create_graph=True`: the forward's ops run again from the saved Q, K, V
    (which carry their graph) with the same mask, and autograd differentiates them with a graph.

    The hand-written backward holds P without P's dependence on Q and K, so its own derivative
    would drop those terms. Here scores = Q Kᵀ·scaling + C with C = log P − (Q Kᵀ·scaling),
    held constant: softmax(scores) is P (C is the additive mask plus a constant per row, to
    which softmax is blind, and −∞ where P is 0), and its derivative in Q and K is that of the
    forward, without keeping the mask alive for this rare path. A mask that needs a gradient is
    saved, and used as it is. This costs one more attention forward, only when a second
    derivative is asked for (Hessian-vector products, gradient penalties, MAML)."""
    inputs = [(i, t) for i, t in enumerate((query, key, value, mask)) if t is not None and ctx.needs_input_grad[i]]
    with torch.enable_grad():
        scores = torch.matmul(query, key.transpose(2, 3)) * ctx.scaling
        if mask is not None:
            scores = scores + mask
        else:
            scores = scores + (torch.log(probs) - scores.detach())
        dropped = torch.softmax(scores, dim=-1) * noise
        out = torch.matmul(dropped, value)
        outputs = [(o, g) for o, g in ((out, grad_out), (dropped, grad_dropped)) if g is not None]
        grads = torch.autograd.grad([o for o, _ in outputs], [t for _, t in inputs], [g for _, g in outputs],
                                    create_graph=True, allow_unused=True)
    result = [None] * 7
    for (i, _), grad in zip(inputs, grads):
        result[i] = grad
    return tuple(result)


def model_eager_attention(module: nn.Module) -> Callable:
    """The `eager_attention_forward` of the modeling file that defines `module`'s class."""
    return sys.modules[type(module).__module__].eager_attention_forward


def seed_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                           attention_mask: Tensor | None, scaling: float | None = None,
                           dropout: float = 0.0, **kwargs) -> tuple[Tensor, Tensor]:
    """An attention function for transformers' registry: eager attention with a seed dropout.

    Same signature and results as `eager_attention_forward`: (output (B, Tq, H, D), weights).
    """
    if not _worth_a_seed(module, query, dropout, kwargs):
        return model_eager_attention(module)(module, query, key, value, attention_mask,
                                             scaling=scaling, dropout=dropout, **kwargs)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    out, weights = SeedAttentionFunction.apply(query, key, value, attention_mask, scaling, dropout, draw_seed())
    return out.transpose(1, 2).contiguous(), weights


def _worth_a_seed(module: nn.Module, query: Tensor, dropout: float, kwargs: dict) -> bool:
    return (module.training and 0.0 < dropout < 1.0 and kwargs.get("head_mask") is None
            and not torch.is_autocast_enabled(query.device.type) and seed_is_graph_safe(query))


def register() -> None:
    """Make `randbp_eager` a valid attention implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, seed_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)  # eager's additive mask
