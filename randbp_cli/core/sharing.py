"""One sketch for the layers that read the same tensor (Q, K and V), within one forward pass.

Three independent sketches of one input would cost 3ρ of it — more than the input itself at
ρ > 1/3 (docs/method.md §4.7). A `SketchSharing` scope lets the first layer that sketches a
tensor (the leader) hand its seed and sketch to the other layers that read the same tensor
in the same pass (the followers); each follower takes it at most once.

A follower takes the leader's sketch only if all of these hold, each for a reason:
  * the same tensor object — in eager mode through a weak reference, so the entry never
    keeps an input alive — with its storage pointer and version counter unchanged (an
    in-place write, or `.data` swapped for another storage, means other values);
  * the same forward pass. `convert` brackets every forward of the converted model with
    `begin_pass`/`end_pass`; layers outside a converted model (the process-wide
    `DEFAULT_SHARING`) also end a pass at every randomized backward. A buffer refilled
    through a NumPy or DLPack view keeps its pointer and its version: only the pass tells
    its new values from the old ones;
  * the same sketch, k and dtype, and a layer that has not taken this sketch yet.
What is kept, and for how long: an entry holds the sketch tensors themselves (followers must
get the leader's very objects even when a saved-tensor hook stores copies) until the pass
ends, `KEPT_ENTRIES` other inputs have been sketched since, or the input dies — so nothing
outlives the layers that use it by more than a few draws, under activation checkpointing too.
More than one entry because the readers of one tensor need not be adjacent: a LoRA adapter's
q, k and v `lora_A` each read the norm's output, with a `lora_B` (another input) drawn between.

Under torch.compile a scope is never touched (`active()` is False): a traced graph shares by
itself. Every sharing layer draws with the same `site` (ops.py), so the draws of layers that
read one tensor are the same call on the same graph node, and the compiler's common-
subexpression elimination merges them into one draw, one saved sketch (an in-place write makes
another node). It merges a little more than the eager rules: any two equal draws in one graph,
so a model run twice on one batch within one compiled step sketches both runs with one S.
Each estimate stays unbiased; the two are then not independent. Touching a Python object from a
compiled graph would also be a side effect that activation checkpointing inside the compiled
region refuses (a graph break at every checkpointed block), and a guard that recompiles.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(eq=False)
class _Entry:
    key: tuple  # (sketch name, k, dtype, rng_only)
    anchor: weakref.ref  # to the input
    version: int
    data_ptr: int
    pass_id: int
    use: object  # the sketch's second_order.SketchUse
    drawn: tuple[Tensor, ...]  # (*saved, seed) as the leader's op returned them
    users: set


KEPT_ENTRIES = 4  # the latest sketches a scope holds for followers


class SketchSharing:
    """A sharing scope: the model `convert` made it for, or `DEFAULT_SHARING` for other layers."""

    def __init__(self) -> None:
        self._entries: list[_Entry] = []  # the latest first
        self._pass = 0

    @staticmethod
    def active() -> bool:
        """Whether sharing goes through a scope (eager) or through the compiler (see above)."""
        return not torch.compiler.is_compiling()

    # -- pass boundaries (hooks on the converted model's root; backward for the default scope)
    def begin_pass(self, *_hook_args) -> None:
        if self.active():
            self._entries = []
            self._pass += 1

    def end_pass(self, *_hook_args) -> None:
        if self.active():
            self._entries = []

    def end_backward(self) -> None:
        self._pass += 1

    # -- lookup and publication
    def take(self, x: Tensor, key: tuple, user: str) -> tuple[object, tuple[Tensor, ...]] | None:
        """(use, drawn) of the sketch another layer made of `x` in this pass, or None."""
        for entry in self._entries:
            if entry.anchor() is not x or entry.key != key or user in entry.users:
                continue
            if entry.pass_id != self._pass or entry.version != x._version or entry.data_ptr != x.data_ptr():
                return None
            entry.users.add(user)
            return entry.use, entry.drawn
        return None

    def offer(self, x: Tensor, key: tuple, user: str, use: object, drawn: tuple[Tensor, ...]) -> None:
        """Publish the sketch `user` just made of `x` (the oldest entry beyond KEPT_ENTRIES dropped)."""
        anchor = weakref.ref(x, self._forget)  # the input's death drops the entry (and its sketch)
        entry = _Entry(key, anchor, x._version, x.data_ptr(), self._pass, use, drawn, {user})
        self._entries = [entry, *self._entries[:KEPT_ENTRIES - 1]]

    def __getstate__(self) -> dict:  # copies and pickles of a model start with no entry
        return {"_entries": [], "_pass": self._pass}

    def _forget(self, anchor: weakref.ref) -> None:
        self._entries = [entry for entry in self._entries if entry.anchor is not anchor]


DEFAULT_SHARING = SketchSharing()
