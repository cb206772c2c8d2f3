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
What is kept, and for how long: the entry holds the sketch tensors themselves (followers must
get the leader's very objects even when a saved-tensor hook stores copies) until the pass
ends, another input is sketched, or the input dies — so nothing outlives the layers that use
it, under activation checkpointing too.

Under torch.compile the checks that cannot be traced (weak references, pointers, version
counters, pass counters) are skipped: inside one compiled graph a tensor cannot be refilled
behind the compiler's back, and the entry is cleared at the end of every pass, so each trace
starts from the same state and nothing recompiles.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(eq=False)
class _Entry:
    key: tuple  # (sketch name, k, dtype, rng_only)
    anchor: object  # weakref.ref to the input (eager) or the input itself (compiling)
    version: int
    data_ptr: int
    pass_id: int
    seed: object
    saved: tuple[Tensor, ...]
    users: set


class SketchSharing:
    """A sharing scope: the model `convert` made it for, or `DEFAULT_SHARING` for other layers."""

    def __init__(self) -> None:
        self._entry: _Entry | None = None
        self._pass = 0

    # -- pass boundaries (hooks on the converted model's root; backward for the default scope)
    def begin_pass(self, *_hook_args) -> None:
        self._entry = None
        if not torch.compiler.is_compiling():  # a traced counter would be a guard: recompiles
            self._pass += 1

    def end_pass(self, *_hook_args) -> None:
        self._entry = None

    def end_backward(self) -> None:
        self._pass += 1

    # -- lookup and publication
    def take(self, x: Tensor, key: tuple, user: str) -> tuple[object, tuple[Tensor, ...]] | None:
        """(seed, saved) of the sketch another layer made of `x` in this pass, or None."""
        entry = self._entry
        if entry is None or entry.key != key or user in entry.users:
            return None
        if torch.compiler.is_compiling():
            if entry.anchor is not x:
                return None
        elif (entry.anchor() is not x or entry.pass_id != self._pass or entry.version != x._version
              or entry.data_ptr != x.data_ptr()):
            return None
        entry.users.add(user)
        return entry.seed, entry.saved

    def offer(self, x: Tensor, key: tuple, user: str, seed: object, saved: tuple[Tensor, ...]) -> None:
        """Publish the sketch `user` just made of `x` (replacing whatever was there)."""
        if torch.compiler.is_compiling():
            self._entry = _Entry(key, x, 0, 0, 0, seed, saved, {user})
            return
        anchor = weakref.ref(x, self._forget)  # the input's death drops the entry (and its sketch)
        self._entry = _Entry(key, anchor, x._version, x.data_ptr(), self._pass, seed, saved, {user})

    def __getstate__(self) -> dict:  # copies and pickles of a model start with no entry
        return {"_entry": None, "_pass": self._pass}

    def _forget(self, anchor: weakref.ref) -> None:
        if self._entry is not None and self._entry.anchor is anchor:
            self._entry = None


DEFAULT_SHARING = SketchSharing()
