"""The balanced sketch as `torch.library` custom ops: autograd, torch.compile and the profiler
see one op (`randbp::balanced_sketch`), whatever runs inside it.

  balanced_sketch(a, k, seed)      Sᵀa, k × d: the fused Triton kernel on CUDA (or under
                                   TRITON_INTERPRET=1 on CPU), the torch reference elsewhere
  balanced_unsketch(g, n, seed)    S g, n × d: its transpose (only second-order gradients use it)

Each is the other's derivative, so gradients of any order flow through them. `seed` is a
one-element int64 tensor (drawn on the input's device by the caller): a tensor rather than
an int so that CUDA graphs and torch.compile replay with a fresh value instead of baking one
in. The reference reads it with `.item()` (free on CPU; a sync on a GPU without Triton).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import balanced, balanced_triton


@torch.library.custom_op("randbp::balanced_sketch", mutates_args=())
def balanced_sketch(a: Tensor, k: int, seed: Tensor) -> Tensor:
    if balanced_triton.runs_on(a):
        return balanced_triton.sketch(a, k, seed)
    return balanced.sketch_reference(a, k, int(seed))


@balanced_sketch.register_fake
def _(a: Tensor, k: int, seed: Tensor) -> Tensor:
    return a.new_empty((k, a.shape[1]))


@torch.library.custom_op("randbp::balanced_unsketch", mutates_args=())
def balanced_unsketch(g: Tensor, n_rows: int, seed: Tensor) -> Tensor:
    return balanced.unsketch_reference(g, n_rows, int(seed))


@balanced_unsketch.register_fake
def _(g: Tensor, n_rows: int, seed: Tensor) -> Tensor:
    return g.new_empty((n_rows, g.shape[1]))


def _save_seed(ctx, inputs, output) -> None:
    tensor, size, seed = inputs
    ctx.size = tensor.shape[0]
    ctx.save_for_backward(seed)


def _sketch_backward(ctx, grad):
    (seed,) = ctx.saved_tensors
    return balanced_unsketch(grad, ctx.size, seed), None, None


def _unsketch_backward(ctx, grad):
    (seed,) = ctx.saved_tensors
    return balanced_sketch(grad, ctx.size, seed), None, None


balanced_sketch.register_autograd(_sketch_backward, setup_context=_save_seed)
balanced_unsketch.register_autograd(_unsketch_backward, setup_context=_save_seed)
