"""The one module swap `convert` and `apply_savers` both use: replace, remember, carry hooks, restore.

A replacement remembers the module it stands in for, and for whom (`kind`: "linear" for convert,
"saver" for the savers), as a plain attribute, not a submodule: parameters are not counted twice,
`state_dict` keys do not change, and restoring puts back the very original object. One module
registered under two names (tied layers) gets one replacement, put under both names.

The replacement shares the original's hook dictionaries — the very dict objects, so a handle taken
before the swap still removes its hook, and a hook added after it is there after the swap is
undone — and the flag that says whether its backward hooks are full backward hooks
(`register_full_backward_hook`): without it, the shared hooks would be called as the old
module-level backward hooks, or, as a full hook registered before the swap, not at all. It takes
the original's train/eval mode, and gives its own back on restore.

Each kind registers how it is undone (`register_undo`): `undo_all` (what `restore` calls) runs
every kind's undo, so the converter does not need to know the savers above it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_STANDS_IN_FOR = "_randbp_stands_in_for"  # on a replacement: (kind, the module it replaced)
_UNDO: dict[str, Callable[[nn.Module], nn.Module]] = {}  # kind -> how to undo it (register_undo)


def register_undo(kind: str, undo: Callable[[nn.Module], nn.Module]) -> None:
    """`undo(model) -> model` puts back what `kind` changed: its swaps (`unswap`) and anything else."""
    _UNDO[kind] = undo


def undo_all(model: nn.Module) -> nn.Module:
    """Undo every registered kind, in the order they registered; returns the model."""
    for undo in list(_UNDO.values()):
        model = undo(model)
    return model


def share_hooks(original: nn.Module, new: nn.Module) -> None:
    """Make `new` use `original`'s hook dictionaries (the same objects) and backward-hook kind."""
    for name, value in vars(original).items():
        if name.endswith("hooks") or name.endswith("hooks_with_kwargs") or name.endswith("hooks_always_called"):
            if isinstance(value, dict):
                object.__setattr__(new, name, value)
    object.__setattr__(new, "_is_full_backward_hook", getattr(original, "_is_full_backward_hook", None))


def stand_in(original: nn.Module, new: nn.Module, kind: str) -> nn.Module:
    """Make `new` the replacement of `original` for `kind`: it remembers it, shares its hooks and
    takes its train/eval mode. Returns `new`."""
    object.__setattr__(new, _STANDS_IN_FOR, (kind, original))
    share_hooks(original, new)
    new.train(original.training)
    return new


def original_of(module: nn.Module, kind: str) -> nn.Module | None:
    """The module `module` replaced for `kind`, or None when it is no such replacement."""
    entry = module.__dict__.get(_STANDS_IN_FOR)
    return entry[1] if entry is not None and entry[0] == kind else None


def put(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """`module` under `name` in `model` (the root when `name` is ""); returns the model."""
    if name == "":
        return module
    model.set_submodule(name, module)
    return model


def swap(model: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """Put each replacement (made by `stand_in`) under its name; returns the model."""
    for name, new in replacements.items():
        model = put(model, name, new)
    return model


def replaced(model: nn.Module, kind: str) -> list[tuple[str, nn.Module]]:
    """(name, replacement) for every module swapped in for `kind`, every name of a shared one."""
    return [(name, module) for name, module in model.named_modules(remove_duplicate=False)
            if original_of(module, kind) is not None]


def unswap(model: nn.Module, kind: str) -> nn.Module:
    """Put back every original `kind` replaced, with the hooks added meanwhile and the current mode."""
    for name, new in replaced(model, kind):
        original = original_of(new, kind)
        original.train(new.training)
        share_hooks(new, original)  # the same dicts; a full backward hook added meanwhile stays full
        model = put(model, name, original)
    return model
