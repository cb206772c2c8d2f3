"""Activation savers beyond linear layers: one call to apply them, one to undo them.

    model = apply_savers(model, ["dropout", "gelu:2"])   # alone, or on top of convert(model, rho)
    ...train as usual...
    model = restore_savers(model)                        # the original modules and attention back

Savers (names as the CLI takes them):
  dropout   exact. Every `nn.Dropout` (exactly that type, not in-place) becomes a `SeedDropout`
            that keeps a seed instead of its mask (randbp_cli/dropout.py). On a model with
            eager attention of a verified type (attention.VERIFIED_MODEL_TYPES), the attention
            implementation becomes `randbp_eager`, which keeps the softmax output once and a
            seed instead of the mask and the dropped copy (randbp_cli/attention.py).
  gelu:B    approximate, B = 1, 2, 3 or 4 bits. Every erf GELU module (transformers'
            `GELUActivation`, `nn.GELU(approximate="none")`) becomes a `FewBitGELU` that keeps
            B bits per element instead of its input (randbp_cli/gelu.py). A tanh-approximate
            or otherwise different GELU is refused: its derivative is not the one fitted.

Like `convert`: everything is checked before anything is replaced, so a bad name or an
unsuitable model never leaves a half-converted model; the new modules hold no parameters,
the model's Parameter objects are untouched; a module registered under two names becomes one
new module; the replacements share the originals' hook dictionaries (a handle taken before
the swap still removes its hook) and training flag; `restore_savers` puts the very original
objects back. Savers are independent of the randomized linear layers: apply them alone or on
a model `convert` has converted, in either order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from . import attention
from .dropout import SeedDropout
from .errors import ConfigError
from .gelu import BITS, FewBitGELU
from .swap import share_hooks

_BITS_TEXT = ", ".join(map(str, BITS))
SAVER_HELP = f"dropout, gelu:B (B = {_BITS_TEXT} bits, e.g. gelu:2)"
_ORIGINAL_ATTR = "_randbp_saver_original"  # on a replacement module: what it replaced
_ATTN_ATTR = "_randbp_saver_attention"  # on the transformers model: its attention implementation before


@dataclass(frozen=True)
class SaverSpec:
    """One parsed saver: `name` is "dropout" or "gelu"; `bits` is set for gelu."""

    name: str
    bits: int | None = None

    def __str__(self) -> str:
        return self.name if self.bits is None else f"{self.name}:{self.bits}"


def parse_saver(text: str) -> SaverSpec:
    """"dropout" or "gelu:B" -> SaverSpec; anything else is a one-line ConfigError."""
    if not isinstance(text, str):
        raise ConfigError(f"saver names are strings like {SAVER_HELP} (got {text!r})")
    if text == "dropout":
        return SaverSpec("dropout")
    name, sep, bits = text.partition(":")
    if name == "gelu" and not sep:
        raise ConfigError(f"saver 'gelu' needs a bit count: gelu:B with B in {_BITS_TEXT} (e.g. gelu:2)")
    if name == "gelu":
        if not bits.isdigit() or int(bits) not in BITS:
            raise ConfigError(f"saver {text!r}: the bit count must be one of {_BITS_TEXT} (got {bits!r})")
        return SaverSpec("gelu", int(bits))
    raise ConfigError(f"unknown saver {text!r}: choose from {SAVER_HELP}")


def parse_savers(names: str | Sequence[str] | None) -> tuple[SaverSpec, ...]:
    """Parse and check a list of saver names (a single string is one name); no duplicates."""
    if names is None:
        return ()
    specs = tuple(parse_saver(n) for n in ([names] if isinstance(names, str) else names))
    seen: dict[str, SaverSpec] = {}
    for spec in specs:
        if spec.name in seen:
            twice = f"'{seen[spec.name]}' and '{spec}'" if seen[spec.name] != spec else f"'{spec}'"
            raise ConfigError(f"saver {spec.name!r} given twice ({twice}): give each saver once")
        seen[spec.name] = spec
    return specs


# ---------------------------------------------------------------------------- what can be replaced


def _dropout_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules(remove_duplicate=False)
            if type(m) is nn.Dropout and not m.inplace}


def _is_erf_gelu(module: nn.Module) -> bool:
    if type(module) is nn.GELU:
        return module.approximate == "none"
    from transformers.activations import GELUActivation

    if type(module) is not GELUActivation:
        return False
    act = getattr(module, "act", None)  # F.gelu, or the erf formula written out in Python
    return act is nn.functional.gelu or getattr(act, "__func__", None) is GELUActivation._gelu_python


def _looks_like_gelu(module: nn.Module) -> bool:
    return isinstance(module, nn.GELU) or "gelu" in type(module).__name__.lower()


def _gelu_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The erf GELU modules; raises if the model also has a GELU variant we cannot replace."""
    found, refused = {}, []
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, FewBitGELU):
            continue
        if _is_erf_gelu(m):
            found[name] = m
        elif _looks_like_gelu(m):
            kind = f"approximate={m.approximate!r}" if isinstance(m, nn.GELU) else type(m).__name__
            refused.append(f"{name} ({kind})")
    if refused:
        raise ConfigError(f"saver 'gelu' fits the derivative of the erf GELU only; this model also has "
                          f"{', '.join(refused[:3])}{', ...' if len(refused) > 3 else ''}: leave out gelu:B")
    return found


def _transformers_model(model: nn.Module) -> nn.Module | None:
    """The outermost transformers model in `model` (set_attn_implementation reaches the rest)."""
    for m in model.modules():
        if hasattr(m, "set_attn_implementation") and hasattr(m, "config"):
            return m
    return None


def attention_switch_reason(model: nn.Module) -> str | None:
    """None if the `dropout` saver can switch this model's attention to `randbp_eager`, else why not."""
    hf = _transformers_model(model)
    if hf is None:
        return "not a transformers model"
    current = getattr(hf.config, "_attn_implementation", None)
    if current == attention.ATTN_IMPLEMENTATION:
        return None
    if current != "eager":
        return f"attention implementation is {current!r}, not 'eager' (its dropout stays inside the kernel)"
    model_type = getattr(hf.config, "model_type", None)
    if model_type not in attention.VERIFIED_MODEL_TYPES:
        return f"model type {model_type!r} is not one whose eager attention randbp mirrors"
    can_set = getattr(type(hf), "_can_set_attn_implementation", None)
    if can_set is not None and not can_set():
        return f"{type(hf).__name__} cannot change its attention implementation"
    return None


# ---------------------------------------------------------------------------- apply / restore


@dataclass
class _Plan:
    replacements: dict[str, nn.Module] = field(default_factory=dict)  # name -> new module
    attention_model: nn.Module | None = None


def _replacement(original: nn.Module, new: nn.Module) -> nn.Module:
    object.__setattr__(new, _ORIGINAL_ATTR, original)  # a plain attribute, not a submodule
    share_hooks(original, new)  # old handles still remove hooks; full backward hooks stay full
    new.train(original.training)
    return new


def _targets(model: nn.Module, spec: SaverSpec) -> dict[str, nn.Module]:
    """The modules `spec` replaces, by name; a ConfigError if there is nothing to gain."""
    if spec.name == "gelu":
        targets = _gelu_modules(model)
        if not targets:
            raise ConfigError(f"saver '{spec}' finds nothing to replace: the model has no GELU module "
                              "(transformers' GELUActivation or nn.GELU)")
        return targets
    targets = _dropout_modules(model)
    reason = attention_switch_reason(model)
    if not targets and reason is not None:
        raise ConfigError(f"saver 'dropout' finds nothing to replace: no (out-of-place) nn.Dropout modules, "
                          f"and the attention cannot be switched ({reason})")
    return targets


def _plan(model: nn.Module, specs: tuple[SaverSpec, ...]) -> _Plan:
    """Check everything and build the new modules; touches nothing in `model`."""
    plan, made = _Plan(), {}
    for spec in specs:
        for name, original in _targets(model, spec).items():
            if id(original) not in made:  # one module under two names -> one replacement
                new = SeedDropout(original.p) if spec.name == "dropout" else FewBitGELU(spec.bits)
                made[id(original)] = _replacement(original, new)
            plan.replacements[name] = made[id(original)]
        if spec.name == "dropout" and attention_switch_reason(model) is None:
            plan.attention_model = _transformers_model(model)
    return plan


def _set_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if name == "":
        return new
    model.set_submodule(name, new)
    return model


def apply_savers(model: nn.Module, savers: str | Sequence[str] | None) -> nn.Module:
    """Apply the named savers (see the module doc); returns the model. Empty: just restore.

    Applying to a model that has savers first restores it, so the result has exactly `savers`.
    """
    specs = parse_savers(savers)
    model = restore_savers(model)
    plan = _plan(model, specs)
    if plan.attention_model is not None:
        attention.register()
        hf = plan.attention_model
        previous = hf.config._attn_implementation
        hf.set_attn_implementation(attention.ATTN_IMPLEMENTATION)
        object.__setattr__(hf, _ATTN_ATTR, previous)
    for name, new in plan.replacements.items():
        model = _set_module(model, name, new)
    return model


def restore_savers(model: nn.Module) -> nn.Module:
    """Undo `apply_savers`: the original module objects and attention implementation back."""
    for name, m in list(model.named_modules(remove_duplicate=False)):
        original = getattr(m, _ORIGINAL_ATTR, None)
        if original is not None:
            original.train(m.training)
            share_hooks(m, original)  # the same dicts; a full backward hook added meanwhile stays full
            model = _set_module(model, name, original)
    for m in model.modules():
        previous = m.__dict__.pop(_ATTN_ATTR, None)
        if previous is not None:
            m.set_attn_implementation(previous)
    return model


def saver_names(model: nn.Module) -> list[str]:
    """The savers applied to `model`, as names `apply_savers` takes (e.g. ["dropout", "gelu:2"])."""
    names = []
    modules = list(model.modules())
    if any(getattr(m, _ATTN_ATTR, None) is not None for m in modules) or \
            any(isinstance(m, SeedDropout) and hasattr(m, _ORIGINAL_ATTR) for m in modules):
        names.append("dropout")
    bits = sorted({m.bits for m in modules if isinstance(m, FewBitGELU) and hasattr(m, _ORIGINAL_ATTR)})
    names.extend(f"gelu:{b}" for b in bits)
    return names


def describe_savers(model: nn.Module) -> dict:
    """What the savers changed in `model`, for reports: names, replaced modules, attention."""
    named = list(model.named_modules(remove_duplicate=False))
    hf = _transformers_model(model)
    switched_from = None if hf is None else getattr(hf, _ATTN_ATTR, None)
    names = saver_names(model)
    return {
        "savers": names,
        "seed_dropouts": [n for n, m in named if isinstance(m, SeedDropout) and hasattr(m, _ORIGINAL_ATTR)],
        "native_dropouts": [n for n, m in named if type(m) is nn.Dropout],
        "few_bit_gelus": {n: m.bits for n, m in named if isinstance(m, FewBitGELU) and hasattr(m, _ORIGINAL_ATTR)},
        "attn_implementation": None if hf is None else hf.config._attn_implementation,
        "attn_implementation_before": switched_from,
        # why the dropout saver left the attention alone (None when it switched it or was not asked)
        "attention_not_switched": None if "dropout" not in names or switched_from is not None
        else attention_switch_reason(model),
    }
