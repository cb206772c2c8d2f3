"""What every module swap (`convert`, `apply_savers`) keeps of the module it replaces.

The new module shares the original's hook dictionaries — the very dict objects, so a handle
taken before the swap still removes its hook, and a hook added after it is there after the
swap is undone — and the flag that says whether its backward hooks are full backward hooks
(`register_full_backward_hook`): without it, the shared hooks would be called as the old
module-level backward hooks, or, as a full hook registered before the swap, not at all.
"""

from __future__ import annotations

from torch import nn


def share_hooks(original: nn.Module, new: nn.Module) -> None:
    """Make `new` use `original`'s hook dictionaries (the same objects) and backward-hook kind."""
    for name, value in vars(original).items():
        if name.endswith("hooks") or name.endswith("hooks_with_kwargs") or name.endswith("hooks_always_called"):
            if isinstance(value, dict):
                object.__setattr__(new, name, value)
    object.__setattr__(new, "_is_full_backward_hook", getattr(original, "_is_full_backward_hook", None))
