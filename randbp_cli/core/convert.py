"""One call to make a model's linear layers randomized, and one to undo it.

`convert(model, rho)` replaces the selected `nn.Linear` modules with `RandomizedLinear`
modules that hold the very same Parameter objects (no copies), so an optimizer built before
the conversion keeps stepping the right tensors. Everything is checked before anything is
replaced: a bad pattern never leaves a half-converted model. `restore(model)` puts the
original module objects back.

Module hooks of every kind (forward, forward-pre, with kwargs, always-call, backward,
backward-pre, full-backward, state-dict) keep working: the new module shares the original's
hook dictionaries, so a handle taken before the conversion still removes its hook, and a
hook added to the converted layer is there after `restore`. The converted layers share one
`SketchSharing` scope (Q, K and V keep one sketch of their common input), bracketed by hooks
on the model itself so that a sketch is shared within one forward pass only.

Selection by name patterns (each pattern may match a module's full name exactly, its last
components (`"query"` matches `...attention.self.query`), a shell glob
(`"*.attention.self.*"`), or a regular expression written `"re:<regex>"`, matched against
the full name). The default selects every `nn.Linear`, as the paper did, and transformers'
`Conv1D` (GPT-2's linear layers, weight stored (in, out)), which becomes a `RandomizedConv1D`.
Only modules whose type is exactly `nn.Linear` are converted: subclasses (quantized or adapter
layers, or the `out_proj` of `nn.MultiheadAttention`, whose weights are used without calling its
forward) are left alone and listed by `skipped_linears(model)`.

Two kinds of selected layer are left exact by default, because a sketch of them frees nothing and
costs its own bytes; `describe_conversion` lists them with the reason:
  * frozen ones (`trainable_only`): a layer whose weight needs no gradient saves no input for it
    (the base layers of a PEFT LoRA model: only the adapters train);
  * with a `probe` (one training forward, e.g. `lambda m: m(**batch)`), those whose input another
    op saves for backward anyway (SDPA keeps its output, which feeds `o_proj` and its adapter):
    found by watching what autograd saves during the probe (`inputs_kept_anyway`).
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .layers import RandomizedConv1D, RandomizedLinear, is_conv1d
from .sharing import SketchSharing
from .sketches import DEFAULT_SKETCH, Sketch, check_rho, get_sketch
from .swap import register_undo, replaced, stand_in, swap, undo_all, unswap

log = logging.getLogger("randbp")

KIND = "linear"  # what swap.py records convert's replacements as
_SHARING_ATTR = "_randbp_sharing_hooks"
_SKIPPED_ATTR = "_randbp_left_exact"  # on the model: {layer name: why convert left it exact}
FROZEN = "frozen: its weight needs no gradient, so it saves nothing a sketch could replace"
KEPT_ANYWAY = "its input is saved for backward by another op anyway: a sketch would free nothing"


def _as_list(patterns: str | Sequence[str] | None) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    return list(patterns)


def name_matches(name: str, pattern: str) -> bool:
    """Does module `name` match `pattern` (exact, suffix, glob, or `re:` regex)?"""
    if pattern.startswith("re:"):
        try:
            return re.fullmatch(pattern[3:], name) is not None
        except re.error as err:
            raise ConfigError(f"bad regular expression in pattern {pattern!r}: {err}") from None
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def linear_names(model: nn.Module) -> list[str]:
    """Names of every module whose type is exactly nn.Linear, or transformers' Conv1D (what
    `convert` can swap)."""
    return [name for name, module in model.named_modules(remove_duplicate=False)
            if type(module) is nn.Linear or is_conv1d(module)]


def skipped_linears(model: nn.Module) -> list[str]:
    """Subclasses of nn.Linear that `convert` leaves alone, as 'name (TypeName)'."""
    return [f"{name} ({type(module).__name__})" for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and type(module) is not nn.Linear
            and not isinstance(module, (RandomizedLinear, RandomizedConv1D))]


def select_linears(model: nn.Module, include: str | Sequence[str] | None = None,
                   exclude: str | Sequence[str] | None = None) -> list[str]:
    """The names `convert` would swap, after checking every pattern matches something."""
    names = linear_names(model)
    include_list, exclude_list = _as_list(include), _as_list(exclude)
    for option, patterns in (("include", include_list), ("exclude", exclude_list)):
        for pattern in patterns:
            if not any(name_matches(n, pattern) for n in names):
                shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
                raise ConfigError(
                    f"{option} pattern {pattern!r} matches no nn.Linear layer; "
                    f"layer names look like: {shown or '(the model has no nn.Linear layers)'}"
                )
    selected = [n for n in names
                if (not include_list or any(name_matches(n, p) for p in include_list))
                and not any(name_matches(n, p) for p in exclude_list)]
    if not selected:
        raise ConfigError("no nn.Linear layer left to convert: the include/exclude patterns "
                          "select nothing" if names else "the model has no nn.Linear layers to convert")
    return selected


def _bracket_passes(model: nn.Module, sharing: SketchSharing) -> None:
    """Open and close a sharing pass around every forward of the model (even one that raises)."""
    handles = (model.register_forward_pre_hook(sharing.begin_pass),
               model.register_forward_hook(sharing.end_pass, always_call=True))
    object.__setattr__(model, _SHARING_ATTR, handles)


def inputs_kept_anyway(model: nn.Module, names: Sequence[str], probe: Callable[[nn.Module], object]) -> list[str]:
    """Of the layers `names`, those whose input another op saves for backward anyway: found by
    running `probe(model)` (one training forward; the RNG state is restored after it) under
    saved-tensor hooks and noting which layer inputs were saved outside those layers."""
    layers: dict[nn.Module, list[str]] = {}
    for name in names:
        layers.setdefault(model.get_submodule(name), []).append(name)
    readers: dict[int, set[str]] = {}  # an input's storage -> the layers reading it
    saved_outside: set[int] = set()
    inside: list[nn.Module] = []

    def enter(module, args):
        inside.append(module)
        if args and isinstance(args[0], Tensor):
            readers.setdefault(_storage(args[0]), set()).update(layers[module])

    def leave(module, args, output):
        if inside and inside[-1] is module:
            inside.pop()

    def pack(tensor: Tensor) -> Tensor:
        if not inside:
            saved_outside.add(_storage(tensor))
        return tensor.detach()  # not the tensor itself: an output inside its own grad_fn never dies

    handles = [handle for module in layers for handle in (module.register_forward_pre_hook(enter),
                                                          module.register_forward_hook(leave, always_call=True))]
    try:
        with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            probe(model)
    finally:
        for handle in handles:
            handle.remove()
    kept = {name for storage, names_ in readers.items() if storage in saved_outside for name in names_}
    return [name for name in names if name in kept]


def _storage(tensor: Tensor) -> int:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # sparse or other storage-less tensors
        return -id(tensor)


def _left_exact(model: nn.Module, selected: list[str], trainable_only: bool,
                probe: Callable[[nn.Module], object] | None) -> dict[str, str]:
    """The selected layers convert leaves exact, and why (see the module doc)."""
    left: dict[str, str] = {}
    if trainable_only:
        left |= {name: FROZEN for name in selected if not model.get_submodule(name).weight.requires_grad}
    if probe is not None:
        candidates = [name for name in selected if name not in left]
        left |= {name: KEPT_ANYWAY for name in inputs_kept_anyway(model, candidates, probe)}
    if len(left) == len(selected):
        reasons = sorted(set(left.values()))
        raise ConfigError(f"every selected layer would be left exact ({'; '.join(reasons)}): nothing to sketch"
                          + ("; pass trainable_only=False to convert frozen layers anyway"
                             if FROZEN in reasons else ""))
    return left


def _randomized(original: nn.Module, name: str, **settings) -> nn.Module:
    if is_conv1d(original):
        return RandomizedConv1D.from_conv1d(original, name=name, **settings)
    return RandomizedLinear.from_linear(original, name=name, **settings)


def convert(model: nn.Module, rho: float, *, sketch: str | Sketch = DEFAULT_SKETCH,
            include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None,
            min_rows: int = 1, share_sketch: bool = True, trainable_only: bool = True,
            probe: Callable[[nn.Module], object] | None = None) -> nn.Module:
    """Swap the selected nn.Linear (and Conv1D) modules for randomized ones at compression rate `rho`.

    Returns the model (the new module if `model` itself is an nn.Linear). Converting an
    already converted model first restores it. `converted_names(model)` lists what was swapped;
    `describe_conversion(model)["left_exact"]` what was selected but left exact, and why.
    """
    check_rho(rho)
    sketch = get_sketch(sketch)
    model = _restore_linears(model)
    selected = select_linears(model, include, exclude)
    left = _left_exact(model, selected, trainable_only, probe)
    # A module registered under two names (tied layers) must become one new module.
    originals = {name: model.get_submodule(name) for name in selected if name not in left}
    replacements: dict[int, nn.Module] = {}
    sharing = SketchSharing()
    for name, original in originals.items():
        if id(original) not in replacements:
            layer = stand_in(original, _randomized(original, name, rho=rho, sketch=sketch, min_rows=min_rows,
                                                   share_sketch=share_sketch), KIND)
            layer.sharing = sharing
            replacements[id(original)] = layer
    model = swap(model, {name: replacements[id(original)] for name, original in originals.items()})
    _bracket_passes(model, sharing)
    if left:
        object.__setattr__(model, _SKIPPED_ATTR, left)
    log.info("randbp: converted %d linear layers to randomized ones (rho=%s, sketch=%s); %d left exact",
             len(originals), rho, sketch.name, len(left))
    return model


def converted_names(model: nn.Module) -> list[str]:
    """Names of the layers `convert` swapped (and `restore` would put back)."""
    return [name for name, _ in replaced(model, KIND)]


def restore(model: nn.Module) -> nn.Module:
    """Undo `convert` and `apply_savers`: the original modules (and attention) back. Returns the model."""
    return undo_all(model)


def _restore_linears(model: nn.Module) -> nn.Module:
    """Undo `convert` only: put the original nn.Linear objects back."""
    for handle in getattr(model, _SHARING_ATTR, ()):
        handle.remove()
    for attribute in (_SHARING_ATTR, _SKIPPED_ATTR):
        if attribute in model.__dict__:
            object.__delattr__(model, attribute)
    return unswap(model, KIND)


register_undo(KIND, _restore_linears)


def describe_conversion(model: nn.Module) -> dict:
    """What is randomized in `model`: counts, names, and each layer's rho and sketch."""
    layers = {name: module for name, module in model.named_modules(remove_duplicate=False)
              if isinstance(module, (RandomizedLinear, RandomizedConv1D))}
    left = model.__dict__.get(_SKIPPED_ATTR, {})
    return {
        "linear_layers": len(linear_names(model)) + len(layers),
        "randomized_layers": len(layers),
        "layers": {name: {"rho": m.rho, "sketch": m.sketch.name} for name, m in layers.items()},
        **({"left_exact": dict(left)} if left else {}),
    }

