"""SwiGLU that keeps two d_ff tensors instead of three: SiLU(gate) recomputed in backward (exact).

The Llama family's MLP is down(SiLU(gate(x)) ⊙ up(x)). Run as written, autograd keeps three
d_ff-wide tensors per token until backward: gate(x) (for SiLU's derivative), SiLU(gate(x)) and up(x)
(for the product's). `swiglu(gate, up)` keeps gate and up only, and recomputes SiLU(gate) and its
derivative from gate in backward, as Liger's SwiGLU does: one d_ff per token per layer less, and
the same gradients.

What is saved for backward (through `ctx.save_for_backward`): `gate` and `up`, the inputs, as
they are (no copy). What is recomputed in backward: σ(gate), in float32 for half-precision inputs:
  ∂L/∂up   = g ⊙ gate ⊙ σ(gate)
  ∂L/∂gate = g ⊙ up ⊙ σ(gate) ⊙ (1 + gate ⊙ (1 − σ(gate)))
What is exact: the forward output (F.silu(gate) * up, the same ops in the same dtype as the model)
and both gradients, up to rounding (the backward's formula rounds differently from torch's
silu_backward; in half precision it is computed in float32 and rounded once).

The backward is written in differentiable torch ops, so second-order gradients flow through it;
activation checkpointing recomputes it like any op. torch.compile traces the Function into its
joint graph, and there Inductor's partitioner, not the Function, decides what is kept: it already
recomputes cheap pointwise ops such as SiLU for the plain MLP, and `randbp profile --compile` shows
the compiled graphs keeping the same bytes with the saver as without it. The saving is eager mode's.

`SwiGLUMLP` stands in for a verified MLP module (`VERIFIED_MLPS`: the classes whose forward is
exactly `down_proj(act_fn(gate_proj(x)) * up_proj(x))` with act_fn SiLU) and shares its child
modules (the very `_modules` dict), so the projections stay the model's own objects: a layer
`convert` or PEFT puts under it is under the original too, in whichever order they are applied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SAVED_KIND = "swiglu_inputs"
# transformers' MLP classes whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)) (read in
# transformers 5.2x); another class may compute something else under the same attribute names
VERIFIED_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


def _is_silu(module: nn.Module) -> bool:
    if type(module) is nn.SiLU:
        return True
    from transformers.activations import SiLUActivation

    return type(module) is SiLUActivation and type(module).forward is SiLUActivation.forward


def is_swiglu_mlp(module: nn.Module) -> bool:
    """A verified MLP class computing SwiGLU with a plain SiLU."""
    return (type(module).__name__ in VERIFIED_MLPS and all(hasattr(module, n) for n in ("gate_proj", "up_proj",
                                                                                          "down_proj"))
            and _is_silu(getattr(module, "act_fn", None)))


class SwiGLUFunction(torch.autograd.Function):
    """SiLU(gate) ⊙ up, keeping gate and up; the module doc has the backward."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: Tensor):
        gate, up = ctx.saved_tensors
        wide = torch.promote_types(gate.dtype, torch.float32)  # float32 for half inputs, float64 stays
        g, u, dy = gate.to(wide), up.to(wide), grad.to(wide)
        sigmoid = torch.sigmoid(g)
        grad_up = dy * g * sigmoid
        grad_gate = dy * u * sigmoid * (1 + g * (1 - sigmoid))
        return grad_gate.to(gate.dtype), grad_up.to(up.dtype)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """`F.silu(gate) * up` keeping gate and up for backward, not SiLU(gate) too."""
    if not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)):
        return F.silu(gate) * up
    return SwiGLUFunction.apply(gate, up)


class SwiGLUMLP(nn.Module):
    """A stand-in for a verified SwiGLU MLP: its own projections, through `swiglu`."""

    saved_kind = SAVED_KIND  # how memory.SavedTensorCounter files gate and up

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_modules", original._modules)  # the very dict: see the module doc

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
