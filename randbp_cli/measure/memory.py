"""Saved-tensor bytes: what autograd keeps for backward, counted exactly, by kind and by module.

`SavedTensorCounter` is the exact, device-independent number: every tensor autograd saves
for backward during a forward pass passes through `torch.autograd.graph.saved_tensors_hooks`;
we count each underlying storage once (keyed by its data pointer: a view and its base, or
the same tensor saved by Q, K and V, cost one storage), and skip storages that belong to the
model's parameters and buffers or to the model inputs (docs/method.md §4.6). The counter attributes
each storage to the innermost module running when it was first saved, and sorts it into:

  linear_inputs         saved only by exact linear layers (nn.Linear, GPT-2's Conv1D): what sketching can shrink
  linear_inputs_shared  saved by a linear layer *and* by another op, so it stays alive anyway
  sketches              saved by randomized layers (sketches, indices)
  weight_copies         low-precision weight copies a linear layer saved under autocast
  other                 everything else (attention, activations, norms, dropout masks ...)

and, for the activation savers (randbp_cli/savers/registry.py), a kind of their own named by the saver:
a tensor carrying the attribute `_randbp_saved_kind`, or one saved inside a module with a
`saved_kind` class attribute, is filed under that name (`gelu_codes`, `attention_probs`,
`dropout_seeds`: 0 bytes, the seeds are host integers). Such a kind is listed, at 0 if need be,
whenever a module declaring it is in the model; models without savers show only the kinds above.

The device's own measurements (CUDA allocator, NVML sampling, wall-clock steps) are in
meters.py: they depend on the device and are reported beside these bytes, never instead of them.
"""

from __future__ import annotations

import gc
import re
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..core.layers import RandomizedConv1D, RandomizedLinear, is_conv1d

KINDS = ("linear_inputs", "linear_inputs_shared", "sketches", "weight_copies",
         "attention", "mlp", "norms", "logits", "other")
SAVED_KIND_ATTR = "_randbp_saved_kind"  # on a saved tensor: the saver kind it is filed under
_BUILTIN_SAVERS = frozenset({"other", "linear", "sketch", "weight_copy"})


def _storage_key(t: Tensor) -> tuple[str, int, int] | None:
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse or other storage-less tensors
        return None
    return (t.device.type, t.device.index or 0, storage.data_ptr())


def _storage_bytes(t: Tensor) -> int:
    try:
        return t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return t.numel() * t.element_size()


def _as_saved(t: Tensor) -> Tensor:
    """What a pack hook hands autograd: the same storage, without `t`'s own grad_fn.

    NOTE: returning `t` itself would store an output inside its own grad_fn (node -> saved
    tensor -> grad_fn -> node), a cycle in C++ that nothing collects: a forward that is never
    backwarded (as when only bytes are measured) would then leak all its activations.
    """
    return t.detach()


def _is_weight_copy(t: Tensor, weight: Tensor) -> bool:
    """Is `t` a cast (or a transposed view of a cast) of `weight`, as autocast makes?

    Judged by autograd history, not shape: a sketch or an input can have the weight's shape.
    """
    if t.dtype == weight.dtype or t.dim() != 2 or t.shape not in (weight.shape, weight.T.shape):
        return False
    fn, cast = t.grad_fn, False
    for _ in range(4):  # view/transpose -> to(dtype) -> the weight's AccumulateGrad
        if fn is None:
            return False
        if getattr(fn, "variable", None) is weight:
            return cast
        cast = cast or type(fn).__name__.startswith("ToCopyBackward")
        parents = [f for f, _ in fn.next_functions if f is not None]
        if len(parents) != 1:
            return False
        fn = parents[0]
    return False


def fold_layer_indices(name: str) -> str:
    """`roberta.encoder.layer.7.attention` -> `roberta.encoder.layer.*.attention`."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


@dataclass
class SavedTensorStats:
    """What one forward pass saved for backward."""

    total_bytes: int = 0
    by_kind: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    by_module: dict[str, int] = field(default_factory=dict)
    storages: int = 0

    def by_module_folded(self) -> dict[str, int]:
        folded: dict[str, int] = defaultdict(int)
        for name, nbytes in self.by_module.items():
            folded[fold_layer_indices(name)] += nbytes
        return dict(sorted(folded.items(), key=lambda kv: -kv[1]))


def _is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm (torch's and every model's own `...RMSNorm`), GroupNorm ..."""
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or type(module).__name__.endswith("Norm")


def _is_output_model(module: nn.Module) -> bool:
    """A transformers model with a head on top (`LlamaForCausalLM`, `GPT2LMHeadModel`,
    `RobertaForSequenceClassification`): what runs in its own forward is the head's loss."""
    base = getattr(module, "base_model", None)
    return hasattr(module, "config") and isinstance(base, nn.Module) and base is not module


def part_of_model(stack: list[tuple[str, nn.Module]]) -> str:
    """Which part of a Transformer the running modules are, for a tensor no linear layer and no
    saver claims: `norms` (saved inside a norm), `attention` or `mlp` (inside an attention or
    feed-forward block: scores, softmax, rotary, SwiGLU's gate/SiLU/up, GELU's input, their
    dropout masks), `logits` (inside an output head, or by the loss the task model computes
    over the logits in its own forward), else `other` (embeddings, the dropout between blocks ...).

    Judged by class names, innermost module first: `...Attention`/`...Attn`,
    `...MLP`/`...Intermediate`/`...FeedForward`, `...Head`; they name these blocks in every
    architecture transformers ships that randbp loads.
    """
    if not stack:
        return "other"
    innermost = stack[-1][1]
    if _is_norm(innermost):
        return "norms"
    if _is_output_model(innermost):
        return "logits"
    for _, module in reversed(stack):
        cls = type(module).__name__.lower()
        if "attention" in cls or cls.endswith("attn"):
            return "attention"
        if "mlp" in cls or "intermediate" in cls or "feedforward" in cls:
            return "mlp"
        if cls.endswith("head"):
            return "logits"
    return "other"


@dataclass
class _Storage:
    nbytes: int
    module: str
    savers: set[str]
    part: str  # part_of_model() when first saved: the kind of an `other` tensor


class SavedTensorCounter:
    """Count the bytes autograd saves for backward inside the `with` block.

        with SavedTensorCounter(model, exclude=[input_ids, mask]) as counter:
            loss = model(input_ids, attention_mask=mask).loss
        stats = counter.stats()

    The hooks only observe: tensors are returned unchanged, so the run is unaffected.
    """

    def __init__(self, model: nn.Module | None = None, exclude: Iterable[Tensor] = ()) -> None:
        self.model = model
        self._excluded: set = set()
        for t in exclude:
            if isinstance(t, Tensor):
                self._excluded.add(_storage_key(t))
        if model is not None:
            for t in (*model.parameters(), *model.buffers()):
                self._excluded.add(_storage_key(t))
        self._storages: dict = {}
        self._saver_kinds: set[str] = set()  # kinds declared by saver modules in the model
        self._stack: list[tuple[str, nn.Module]] = []
        self._handles: list = []
        self._hooks_ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    # -- module stack: which module is running when a tensor is saved
    def _enter(self, name: str):
        def hook(module, args):
            self._stack.append((name, module))
        return hook

    def _leave(self, module, args, output):
        if self._stack and self._stack[-1][1] is module:
            self._stack.pop()

    def __enter__(self) -> "SavedTensorCounter":
        if self.model is not None:
            for name, module in self.model.named_modules():
                if getattr(module, "saved_kind", None):
                    self._saver_kinds.add(module.saved_kind)
                self._handles.append(module.register_forward_pre_hook(self._enter(name)))
                self._handles.append(module.register_forward_hook(self._leave, always_call=True))
        self._hooks_ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks_ctx.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stack.clear()

    def _saver(self, t: Tensor) -> str:
        module = self._stack[-1][1] if self._stack else None
        kind = getattr(t, SAVED_KIND_ATTR, None) or getattr(module, "saved_kind", None)
        if kind:
            return kind
        randomized = isinstance(module, (RandomizedLinear, RandomizedConv1D))
        if not (randomized or isinstance(module, nn.Linear) or is_conv1d(module)):
            return "other"
        if _is_weight_copy(t, module.weight):
            return "weight_copy"  # autocast's half-precision copy of the weight
        return "sketch" if randomized else "linear"

    def _pack(self, t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key is None:
            key = ("untracked", id(t), 0)
        nbytes = _storage_bytes(t)
        if key not in self._excluded and nbytes:
            saver = self._saver(t)
            entry = self._storages.get(key)
            if entry is None:
                module = self._stack[-1][0] if self._stack else ""
                self._storages[key] = _Storage(nbytes, module, {saver}, part_of_model(self._stack))
            else:
                entry.savers.add(saver)
        return _as_saved(t)

    def stats(self) -> SavedTensorStats:
        stats = SavedTensorStats()
        by_module: dict[str, int] = defaultdict(int)
        for entry in self._storages.values():
            savers = entry.savers
            if savers == {"linear"}:
                kind = "linear_inputs"
            elif "linear" in savers:
                kind = "linear_inputs_shared"
            elif savers == {"sketch"}:
                kind = "sketches"
            elif savers == {"weight_copy"}:
                kind = "weight_copies"
            elif len(savers) == 1 and not savers & _BUILTIN_SAVERS:
                kind = next(iter(savers))  # an activation saver's own kind
            else:
                kind = entry.part
            stats.by_kind[kind] = stats.by_kind.get(kind, 0) + entry.nbytes
            stats.total_bytes += entry.nbytes
            by_module[entry.module or "(outside modules)"] += entry.nbytes
        for kind in sorted(self._saver_kinds):
            stats.by_kind.setdefault(kind, 0)
        stats.by_module = dict(by_module)
        stats.storages = len(self._storages)
        return stats


class _StorageRecorder(TorchDispatchMode):
    """Keeps a weak reference to the storage of every tensor an op creates."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.device.type != "meta":
                try:
                    self.storages.append(weakref.ref(t.untyped_storage()))
                except (RuntimeError, NotImplementedError, TypeError):  # storage-less tensors
                    pass
        return out


def live_bytes_after(fn: Callable[[], object]) -> tuple[object, int]:
    """Run `fn()`; return its result and the bytes of every storage it created that is still
    alive when it returns (each storage once), whoever holds it: autograd's saved tensors, a
    checkpoint's stashed inputs, caches hung on tensors or modules, the result itself.

    NOTE: this is the check on `SavedTensorCounter`, which sees only what passes its pack hook
    (non-reentrant checkpointing installs hooks of its own, and a pack hook can change the very
    lifetime it measures). Storage objects live exactly as long as their memory, so a weak
    reference per created storage tells what is really alive.
    """
    gc.collect()
    recorder = _StorageRecorder()
    with recorder:
        result = fn()
    gc.collect()
    alive = {id(s): s.nbytes() for ref in recorder.storages if (s := ref()) is not None}
    return result, sum(alive.values())


def count_saved_bytes(fn: Callable[[], object], model: nn.Module | None = None,
                      exclude: Iterable[Tensor] = ()) -> tuple[object, SavedTensorStats]:
    """Run `fn()` (a forward pass) under a SavedTensorCounter; return its result and stats."""
    with SavedTensorCounter(model, exclude) as counter:
        result = fn()
    return result, counter.stats()


class RecomputeCounter(SavedTensorCounter):
    """Bytes each checkpointed unit saves while it is recomputed during backward.

        with RecomputeCounter(model, units=["roberta.encoder.layer.0", ...]) as counter:
            loss.backward()
        counter.unit_bytes()  # {"roberta.encoder.layer.0": ..., ...}

    Activation checkpointing keeps only each unit's input between the passes; in backward it
    recomputes one unit at a time, and what that recompute saves is alive until the unit's
    backward is done. The largest unit is what checkpointing adds to the stored bytes at the
    peak. Storages are counted per unit (freed memory is reused between units, so one global
    set of storage keys would merge unrelated tensors).
    """

    def __init__(self, model: nn.Module, units: Iterable[str]) -> None:
        super().__init__(model)
        self.units = sorted(units, key=len, reverse=True)  # the most specific prefix first
        self._per_unit: dict[str, dict] = defaultdict(dict)

    def _unit_of(self, name: str) -> str | None:
        for unit in self.units:
            if name == unit or name.startswith(unit + "."):
                return unit
        return None

    def _pack(self, t: Tensor) -> Tensor:
        unit = self._unit_of(self._stack[-1][0]) if self._stack else None
        key = _storage_key(t)
        if unit is not None and key is not None and key not in self._excluded:
            nbytes = _storage_bytes(t)
            if nbytes:
                self._per_unit[unit][key] = nbytes
        return _as_saved(t)

    def unit_bytes(self) -> dict[str, int]:
        return {unit: sum(storages.values()) for unit, storages in self._per_unit.items()}


def checkpoint_units(model: nn.Module) -> list[str]:
    """Names of the layers Hugging Face checkpoints (each GradientCheckpointingLayer switched on)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers: the flag alone, on modules below the model
        GradientCheckpointingLayer = nn.Module
    return [name for name, module in model.named_modules()
            if name and isinstance(module, GradientCheckpointingLayer) and getattr(module, "gradient_checkpointing", False)
            and not hasattr(module, "config")]
