"""The sketches as `torch.library` custom ops: what autograd, torch.compile and CUDA graphs see.

  sketch_draw(x, sketch, k, site)             [*saved, seed]: draw a fresh seed from torch's
                                              RNG and compress x with it (saved[0] = Sᵀx)
  sketch_apply(y, sketch, k, seed, saved)     Sᵀy with the same S (the backward's Sᵀ dY)
  sketch_transpose(g, sketch, n, seed, saved) S g, the transpose (second-order gradients only)

`sketch_apply` and `sketch_transpose` are each other's derivative, so gradients of any order
flow through them. `sketch` names a sketch of sketches.py; `site` names the calling layer.

Why the seed is drawn *inside* the op and returned with the sketch (docs/method.md §7): the
backward must apply the very S the forward applied. A seed drawn by a separate RNG op is
cheap to recompute, and torch.compile's partitioner does recompute cheap forward values in the
backward graph rather than save them: the backward would then draw a second, independent S,
and E[(S₂ᵀdY)ᵀ(S₁ᵀX)] = 0. Here one op call yields both Sᵀx and its seed, so whichever graph
runs that call (the forward, or the backward if the partitioner moves it there: nothing in the
forward's output depends on S), every use of S downstream reads the same call's seed. Should a
compiler recompute the call (by default a custom op is outside the partitioner's recompute
allowlist; a compiled activation-checkpointing region, or `activation_memory_budget` < 1, do
recompute), the recomputed seed and sketch still come from one call and so still agree; the
`nondeterministic_seeded` tag, besides, has a checkpointed region replay it under the saved RNG
state of its device. `site` keeps common-subexpression elimination from merging two layers' draws
on the same input — and lets it merge the draws of layers that share a sketch (sharing.py).

Two families, the same functions, different promises:
  randbp::sketch_*       graph-safe sketches (balanced): the seed is drawn on the input's
                         device and S is derived from it inside the kernel, so a CUDA graph
                         replays with a fresh seed every time;
  randbp::host_sketch_*  the other sketches: S comes from a `torch.Generator` seeded with a host
                         integer (the seed is a CPU tensor, read for free). Tagged
                         `cudagraph_unsafe`, so Inductor never captures them in a CUDA graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from .sketches import Sketch, get_sketch

_RANDOM = torch.Tag.nondeterministic_seeded
# Inductor leaves ops with this tag out of CUDA graphs (torch ≥ 2.8; older ones have no such tag)
CUDAGRAPH_UNSAFE = tuple(tag for tag in (getattr(torch.Tag, "cudagraph_unsafe", None),) if tag is not None)


def _draw(x: Tensor, sketch: str, k: int, site: str) -> list[Tensor]:
    s = get_sketch(sketch)
    if not s.graph_safe and capturing(x):
        raise ConfigError(f"the {sketch} sketch cannot be captured in a CUDA graph: its S comes from a host "
                          "seed, which every replay would repeat; use sketch='balanced' (its seed is drawn "
                          "on the GPU), or do not capture")
    seed = s.draw_seed(x.device)
    return [*s.compress(x, k, seed), seed]


def capturing(x: Tensor) -> bool:
    """Is a CUDA graph being captured eagerly on x's stream (a host seed would be baked in)?
    (Inductor never captures the host-seeded ops: they are tagged `cudagraph_unsafe`.)"""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _draw_fake(x: Tensor, sketch: str, k: int, site: str) -> list[Tensor]:
    s = get_sketch(sketch)
    return [*s.empty_saved(x, k), s.empty_seed(x.device)]


def _apply(y: Tensor, sketch: str, k: int, seed: Tensor, saved: list[Tensor]) -> Tensor:
    return get_sketch(sketch).compress_grad(y, k, seed, tuple(saved))


def _apply_fake(y: Tensor, sketch: str, k: int, seed: Tensor, saved: list[Tensor]) -> Tensor:
    return y.new_empty((k, y.shape[1]))


def _transpose(g: Tensor, sketch: str, n_rows: int, seed: Tensor, saved: list[Tensor]) -> Tensor:
    return get_sketch(sketch).transpose(g, n_rows, seed, tuple(saved))


def _transpose_fake(g: Tensor, sketch: str, n_rows: int, seed: Tensor, saved: list[Tensor]) -> Tensor:
    return g.new_empty((n_rows, g.shape[1]))


class _Family:
    """The three ops under one name prefix."""

    def __init__(self, prefix: str, tags: tuple[torch.Tag, ...]) -> None:
        self.draw = torch.library.custom_op(f"randbp::{prefix}_draw", _draw, mutates_args=(),
                                            tags=(*tags, _RANDOM))
        self.draw.register_fake(_draw_fake)
        self.apply = torch.library.custom_op(f"randbp::{prefix}_apply", _apply, mutates_args=(), tags=tags)
        self.apply.register_fake(_apply_fake)
        self.transpose = torch.library.custom_op(f"randbp::{prefix}_transpose", _transpose, mutates_args=(),
                                                 tags=tags)
        self.transpose.register_fake(_transpose_fake)
        self.apply.register_autograd(self._apply_backward, setup_context=self._save_for_transpose)
        self.transpose.register_autograd(self._transpose_backward, setup_context=self._save_for_transpose)

    @staticmethod
    def _save_for_transpose(ctx, inputs, output) -> None:
        tensor, sketch, size, seed, saved = inputs
        ctx.sketch, ctx.size, ctx.n_saved = sketch, tensor.shape[0], len(saved)
        ctx.save_for_backward(seed, *saved)

    def _apply_backward(self, ctx, grad):
        seed, *saved = ctx.saved_tensors
        return self.transpose(grad, ctx.sketch, ctx.size, seed, saved), None, None, None, [None] * ctx.n_saved

    def _transpose_backward(self, ctx, grad):
        seed, *saved = ctx.saved_tensors
        return self.apply(grad, ctx.sketch, ctx.size, seed, saved), None, None, None, [None] * ctx.n_saved


GRAPH_SAFE = _Family("sketch", ())
HOST_SEEDED = _Family("host_sketch", CUDAGRAPH_UNSAFE)


def traced_or_direct(op, function, *args):
    """`op(*args)` while torch.compile traces, `function(*args)` — what the op runs — otherwise.

    NOTE: a traced graph needs randbp's work opaque (see above for why); eagerly an op would add
    only its dispatch, a large share of a small layer's step on a CPU. Only for functions
    built of differentiable torch ops: then the two are the same computation, eagerly
    differentiable to any order."""
    return op(*args) if torch.compiler.is_compiling() else function(*args)


def family(sketch: Sketch) -> _Family:
    return GRAPH_SAFE if sketch.graph_safe else HOST_SEEDED


def _call(sketch: Sketch, op_name: str, function, *args):
    """A sketch's op; eagerly, for a host-seeded sketch, its function itself (`traced_or_direct`:
    the function is made of differentiable torch ops). The graph-safe family always goes through
    its ops: the fused kernel is not differentiable on its own."""
    op = getattr(family(sketch), op_name)
    return op(*args) if sketch.graph_safe else traced_or_direct(op, function, *args)


def sketch_draw(x: Tensor, sketch: Sketch, k: int, site: str = "") -> list[Tensor]:
    """[*saved, seed]: Sᵀx (and a data-dependent sketch's indices) with a freshly drawn seed."""
    return _call(sketch, "draw", _draw, x, sketch.name, k, site)


def sketch_apply(y: Tensor, sketch: Sketch, k: int, seed: Tensor, saved) -> Tensor:
    """Sᵀy for the S that `seed` (and `saved`) stand for."""
    return _call(sketch, "apply", _apply, y, sketch.name, k, seed, list(saved))


def sketch_transpose(g: Tensor, sketch: Sketch, n_rows: int, seed: Tensor, saved) -> Tensor:
    """S g: the derivative of Sᵀx in direction g."""
    return _call(sketch, "transpose", _transpose, g, sketch.name, n_rows, seed, list(saved))
