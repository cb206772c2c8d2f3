"""Second-order gradients: allow the unbiased ones, refuse the biased ones with a clear error.

A weight gradient made from a sketch, Ĝ = Yᵀ S Sᵀ X, can itself be differentiated
(`create_graph=True`; docs/method.md §1, "Second-order gradients"):
  * with respect to inputs (x, or parameters of *other* layers): every path multiplies one
    S Sᵀ into otherwise exact terms, so the result is unbiased, like Ĝ;
  * with respect to the weights of the layer that made Ĝ (or of a layer sharing its sketch):
    the path Ĝ → dY → the layer's output → the layer's own weight gradient applies S Sᵀ a
    second time, so the result is quadratic in S Sᵀ and biased (E[S Sᵀ A S Sᵀ] ≠ A). That is
    what Hessian-vector products in W and MAML's meta-gradient compute.
So randbp refuses exactly the second case, when it happens: a hook on Ĝ records the backward
pass (graph task) that differentiates it; a layer whose sketch was so differentiated arms a
hook on its weight for that pass, and the hook raises `SecondOrderError`, naming the layer, if
and only if that pass asks for the weight's gradient. Nothing is recorded in first-order
training, where no weight gradient has a graph.

`refuse_differentiation(grad, message, anchor)` is the blunt form for a backward whose own
derivative is wrong (the few-bit GELU's q′ is 0, not GELU″): any second pass through it raises.
The anchor, a one-element copy of an element of the forward's input, ties that gradient to the
input's graph even when it would otherwise carry none (a constant upstream gradient), so the
missing term cannot silently come out as zero.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

from ..errors import SecondOrderError

# leaf tensor -> {graph task id: message}: the weights armed for a pass, with the one hook that
# reads it. Kept here, not on the tensor: a pickled Parameter keeps its attributes, not its hooks.
_ARMED: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def _current_task() -> int:
    return torch._C._current_graph_task_id()


class SketchUse:
    """The backward passes in which a weight gradient made from one sketch was differentiated.

    One per sketch drawn in eager mode, shared by every layer that uses that sketch."""

    __slots__ = ("tasks",)

    def __init__(self) -> None:
        self.tasks: set[int] = set()

    def watch(self, grad_weight: Tensor) -> None:
        """Record the passes that differentiate `grad_weight` (a weight gradient with a graph)."""
        if grad_weight.requires_grad:
            grad_weight.register_hook(self._record)

    def _record(self, grad: Tensor) -> None:
        self.tasks.add(_current_task())

    def check(self, weight_edge, layer: str) -> None:
        """In a layer's backward: if this pass differentiates a weight gradient made from this
        sketch, refuse the layer's weight gradient in this pass (should it be asked for)."""
        task = _current_task()
        if task not in self.tasks:
            return
        message = (f"randbp: refusing a biased second-order gradient: this backward pass differentiates "
                   f"the sketched weight gradient of {layer} and asks for the gradient of that layer's "
                   "own weight (a Hessian-vector product in W, or a meta-gradient as in MAML), which "
                   "applies its sketch twice (quadratic in S·Sᵀ, biased). Leave the layer exact for "
                   "this (convert(..., exclude=...), or restore(model)); second-order gradients with "
                   "respect to inputs and other layers' weights are unbiased and allowed")
        leaves = _leaf_variables(weight_edge)
        if not leaves:  # nothing to hook (a graph too large to walk): refuse whatever is asked
            raise SecondOrderError(message)
        for leaf in leaves:
            armed = _ARMED.get(leaf)
            if armed is None:
                armed = _ARMED[leaf] = {}
                leaf.register_hook(lambda grad, armed=armed: _refuse_if_armed(armed))
            if task not in armed:
                armed.clear()  # older passes are over
            armed[task] = message


def _refuse_if_armed(armed: dict[int, str]) -> None:
    message = armed.pop(_current_task(), None)
    if message is not None:
        raise SecondOrderError(message)


def _leaf_variables(edge, limit: int = 256) -> list[Tensor]:
    """The leaf tensors a gradient edge leads to: the weight itself (AccumulateGrad's variable),
    or, through a cast (autocast) or a computed weight (weight norm, a merged adapter), the
    parameters it is made of. Empty if the graph is larger than `limit` nodes."""
    leaves, seen, todo = [], set(), [edge]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if len(seen) > limit:
            return []
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaves.append(variable)
        else:
            todo.extend(fn for fn, _ in node.next_functions)
    return leaves


def graph_anchor(x: Tensor) -> Tensor | None:
    """One element of `x`, copied (so it keeps no storage of x alive), still on x's graph."""
    if not x.requires_grad or x.numel() == 0 or torch.compiler.is_compiling():
        return None  # a compiled graph refuses double backward itself
    return x[(0,) * x.dim()].clone()


class _Refuse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor, anchor: Tensor | None, message: str) -> Tensor:
        ctx.message = message
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad, *_):
        raise SecondOrderError(ctx.message)


def refuse_differentiation(grad: Tensor, message: str, anchor: Tensor | None = None) -> Tensor:
    """`grad` itself, but any later backward pass through it raises SecondOrderError(message).

    Acts in a backward that runs with `create_graph=True` (grad mode on); a no-op otherwise."""
    if torch.is_grad_enabled() and (grad.requires_grad or (anchor is not None and anchor.requires_grad)):
        return _Refuse.apply(grad, anchor, message)
    return grad
