"""Activation savers beyond linear layers: one call to apply them, one to undo them.

    model = apply_savers(model, ["dropout", "gelu:2"])   # alone, or on top of convert(model, rho)
    ...train as usual...
    model = restore_savers(model)                        # the original modules and attention back

Savers (names as the CLI takes them):
  dropout   exact. Every `nn.Dropout` (exactly that type, not in-place) becomes a `SeedDropout`
            that keeps a seed instead of its mask (randbp_cli/savers/dropout.py). On a model with
            eager attention of a verified type (attention.VERIFIED_MODEL_TYPES), the attention
            implementation becomes `randbp_eager`, which keeps the softmax output once and a
            seed instead of the mask and the dropped copy (randbp_cli/savers/attention.py).
  gelu:B    approximate, B = 1, 2, 3 or 4 bits. Every GELU module of the erf form (transformers'
            `GELUActivation`, `nn.GELU()`) or the tanh form (`nn.GELU(approximate="tanh")`,
            `GELUTanh`, GPT-2's `gelu_new`) becomes a `FewBitGELU` computing the same form that keeps
            B bits per element instead of its input (randbp_cli/savers/gelu.py). Another GELU variant
            (sigmoid, clipped) is refused: its derivative is not the one fitted. Give gelu:B or
            gelu-new, not both: each replaces the tanh GELU.
  swiglu    exact. Every SwiGLU MLP of a verified class (Llama, Mistral, Qwen2/3: swiglu.VERIFIED_MLPS)
            becomes a `SwiGLUMLP` that keeps gate and up for backward and recomputes SiLU(gate)
            there: one d_ff-wide tensor per token per layer less (randbp_cli/savers/swiglu.py).
  gelu-new  exact. Every GELU transformers writes out as the tanh approximation (GPT-2's `gelu_new`:
            gelu_new.VERIFIED_GELUS) becomes a `TanhGELU`, torch's fused op, which keeps its input
            instead of four d_ff-wide tensors (randbp_cli/savers/gelu_new.py).
  lm-head   exact. A causal LM of a verified class (Llama, Mistral, Qwen2/3, GPT-2:
            lm_head.VERIFIED_HEADS) computes its loss block by block from the hidden states, never
            holding the N × vocab logits: its `lm_head` becomes a `FusedLMHead` and its forward
            `fused_loss_forward`, which returns `logits=None` when it computes a loss with gradients
            on (randbp_cli/savers/lm_head.py). Apply it before `convert`: a randomized head is refused.

Each saver is a `Saver` in the `SAVERS` registry (how its name parses, what it replaces and with
what); the swap itself is swap.py's, the one `convert` uses. Like `convert`: everything is checked
before anything is replaced, so a bad name or an
unsuitable model never leaves a half-converted model; the new modules hold no parameters,
the model's Parameter objects are untouched; a module registered under two names becomes one
new module; the replacements share the originals' hook dictionaries (a handle taken before
the swap still removes its hook) and training flag; `restore_savers` puts the very original
objects back. Savers are independent of the randomized linear layers: apply them alone or on
a model `convert` has converted, in either order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from ..core.swap import original_of, register_undo, replaced, stand_in, swap, unswap
from ..errors import ConfigError
from . import attention, lm_head
from .dropout import SeedDropout
from .gelu import FewBitGELU
from .gelu_levels import BITS
from .gelu_new import VERIFIED_GELUS, TanhGELU, is_written_out_tanh_gelu
from .lm_head import VERIFIED_HEADS, FusedLMHead
from .swiglu import VERIFIED_MLPS, SwiGLUMLP, is_swiglu_mlp

_BITS_TEXT = ", ".join(map(str, BITS))
KIND = "saver"  # what swap.py records the savers' replacements as
_ATTN_ATTR = "_randbp_saver_attention"  # on the transformers model: its attention implementation before


@dataclass(frozen=True)
class SaverSpec:
    """One parsed saver: `name` is "dropout" or "gelu"; `bits` is set for gelu."""

    name: str
    bits: int | None = None

    def __str__(self) -> str:
        return self.name if self.bits is None else f"{self.name}:{self.bits}"


def parse_saver(text: str | SaverSpec) -> SaverSpec:
    """"dropout" or "gelu:B" -> SaverSpec (the registry's savers); anything else is a one-line ConfigError.
    A SaverSpec is already parsed: it is returned as it is."""
    if isinstance(text, SaverSpec):
        return text
    if not isinstance(text, str):
        raise ConfigError(f"saver names are strings like {SAVER_HELP} (got {text!r})")
    name, sep, argument = text.partition(":")
    saver = SAVERS.get(name)
    if saver is None:
        raise ConfigError(f"unknown saver {text!r}: choose from {SAVER_HELP}")
    return saver.parse(text, argument if sep else None)


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


def _tanh_form(module: nn.Module) -> bool:
    """A GELU computing the tanh form: nn.GELU(approximate="tanh"), transformers' GELUTanh (either
    act), or the tanh form written out (gelu_new.is_written_out_tanh_gelu)."""
    if type(module) is nn.GELU:
        return module.approximate == "tanh"
    from transformers.activations import GELUTanh

    if type(module) is GELUTanh and "forward" not in vars(module):
        act = getattr(module, "act", None)
        return (getattr(act, "__func__", None) is GELUTanh._gelu_tanh_python
                or (getattr(act, "func", None) is nn.functional.gelu and act.keywords == {"approximate": "tanh"}))
    return is_written_out_tanh_gelu(module)


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
    """The GELU modules of the erf or the tanh form; raises if the model also has a GELU variant we
    cannot replace."""
    found, refused = {}, []
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, FewBitGELU):
            continue
        if _is_erf_gelu(m) or _tanh_form(m) or isinstance(m, TanhGELU):
            found[name] = m
        elif _looks_like_gelu(m):
            kind = f"approximate={m.approximate!r}" if isinstance(m, nn.GELU) else type(m).__name__
            refused.append(f"{name} ({kind})")
    if refused:
        raise ConfigError(f"saver 'gelu' quantizes the derivative of the erf or tanh GELU only; this model also has "
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


# ---------------------------------------------------------------------------- the registry


class Saver(ABC):
    """One kind of saver: how its name parses, which modules it replaces, and with what. A new saver
    is a subclass and one line in `SAVERS`."""

    name: str = ""
    usage: str = ""  # how --help and errors spell it

    def parse(self, text: str, argument: str | None) -> SaverSpec:
        if argument is not None:
            raise ConfigError(f"saver {self.name!r} takes no argument (got {text!r})")
        return SaverSpec(self.name)

    @abstractmethod
    def targets(self, model: nn.Module, spec: SaverSpec) -> dict[str, nn.Module]:
        """The modules `spec` replaces, by name; a ConfigError if there is nothing to gain."""

    @abstractmethod
    def make(self, original: nn.Module, spec: SaverSpec) -> nn.Module:
        """The module that replaces `original`."""

    def prepare(self, model: nn.Module, plan: _Plan) -> None:
        """Anything beyond module swaps the saver needs (checked, not yet done: `apply_savers` does it)."""

    def applied(self, model: nn.Module, replacements: list[nn.Module]) -> list[str]:
        """The names (as `apply_savers` takes them) this saver is applied under in `model`."""
        return [self.name] if any(self.owns(m) for m in replacements) else []

    @abstractmethod
    def owns(self, module: nn.Module) -> bool:
        """Whether `module` is one of this saver's replacements."""


class DropoutSaver(Saver):
    name, usage = "dropout", "dropout"

    def targets(self, model: nn.Module, spec: SaverSpec) -> dict[str, nn.Module]:
        targets = _dropout_modules(model)
        reason = attention_switch_reason(model)
        if not targets and reason is not None:
            raise ConfigError(f"saver 'dropout' finds nothing to replace: no (out-of-place) nn.Dropout modules, "
                              f"and the attention cannot be switched ({reason})")
        return targets

    def make(self, original: nn.Module, spec: SaverSpec) -> nn.Module:
        return SeedDropout(original.p)

    def prepare(self, model: nn.Module, plan: _Plan) -> None:
        if attention_switch_reason(model) is None:
            plan.attention_model = _transformers_model(model)

    def applied(self, model: nn.Module, replacements: list[nn.Module]) -> list[str]:
        switched = any(getattr(m, _ATTN_ATTR, None) is not None for m in model.modules())
        return [self.name] if switched or any(self.owns(m) for m in replacements) else []

    def owns(self, module: nn.Module) -> bool:
        return isinstance(module, SeedDropout)


class GeluSaver(Saver):
    name, usage = "gelu", f"gelu:B (B = {_BITS_TEXT} bits, e.g. gelu:2)"

    def parse(self, text: str, argument: str | None) -> SaverSpec:
        if argument is None:
            raise ConfigError(f"saver 'gelu' needs a bit count: gelu:B with B in {_BITS_TEXT} (e.g. gelu:2)")
        if not argument.isdigit() or int(argument) not in BITS:
            raise ConfigError(f"saver {text!r}: the bit count must be one of {_BITS_TEXT} (got {argument!r})")
        return SaverSpec(self.name, int(argument))

    def targets(self, model: nn.Module, spec: SaverSpec) -> dict[str, nn.Module]:
        targets = _gelu_modules(model)
        if not targets:
            raise ConfigError(f"saver '{spec}' finds nothing to replace: the model has no GELU module "
                              "(transformers' GELUActivation or nn.GELU)")
        return targets

    def make(self, original: nn.Module, spec: SaverSpec) -> nn.Module:
        tanh = isinstance(original, TanhGELU) or _tanh_form(original)
        return FewBitGELU(spec.bits, approximate="tanh" if tanh else "none")

    def applied(self, model: nn.Module, replacements: list[nn.Module]) -> list[str]:
        return [f"gelu:{bits}" for bits in sorted({m.bits for m in replacements if self.owns(m)})]

    def owns(self, module: nn.Module) -> bool:
        return isinstance(module, FewBitGELU)


class SwiGLUSaver(Saver):
    name, usage = "swiglu", "swiglu"

    def targets(self, model: nn.Module, spec: SaverSpec) -> dict[str, nn.Module]:
        targets = {name: m for name, m in model.named_modules(remove_duplicate=False) if is_swiglu_mlp(m)}
        if not targets:
            unverified = sorted({type(m).__name__ for m in model.modules()
                                 if hasattr(m, "gate_proj") and hasattr(m, "up_proj") and not isinstance(m, SwiGLUMLP)})
            found = (f"its gated MLPs ({', '.join(unverified)}) are not of a class randbp has verified"
                     if unverified else "it has no SwiGLU MLP")
            raise ConfigError(f"saver 'swiglu' finds nothing to replace: {found}; it replaces "
                              f"{', '.join(VERIFIED_MLPS)} (with a SiLU activation)")
        return targets

    def make(self, original: nn.Module, spec: SaverSpec) -> nn.Module:
        return SwiGLUMLP(original)

    def owns(self, module: nn.Module) -> bool:
        return isinstance(module, SwiGLUMLP)


class GeluNewSaver(Saver):
    name, usage = "gelu-new", "gelu-new"

    def targets(self, model: nn.Module, spec: SaverSpec) -> dict[str, nn.Module]:
        targets = {name: m for name, m in model.named_modules(remove_duplicate=False) if is_written_out_tanh_gelu(m)}
        if not targets:
            raise ConfigError(f"saver 'gelu-new' finds nothing to replace: the model has no GELU written out as "
                              f"the tanh approximation ({', '.join(VERIFIED_GELUS)}: GPT-2's gelu_new)")
        return targets

    def make(self, original: nn.Module, spec: SaverSpec) -> nn.Module:
        return TanhGELU()

    def owns(self, module: nn.Module) -> bool:
        return isinstance(module, TanhGELU)


def _causal_lms(model: nn.Module) -> dict[str, nn.Module]:
    """The causal LMs of a verified class in `model`, by name."""
    return {name: m for name, m in model.named_modules() if type(m).__name__ in VERIFIED_HEADS}


def _joined(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class LMHeadSaver(Saver):
    name, usage = "lm-head", "lm-head"

    def targets(self, model: nn.Module, spec: SaverSpec) -> dict[str, nn.Module]:
        found = _causal_lms(model)
        if not found:
            raise ConfigError(f"saver 'lm-head' finds nothing to replace: {type(model).__name__} is not, and holds "
                              f"no, causal LM of a class randbp has verified ({', '.join(VERIFIED_HEADS)})")
        for name, lm in found.items():
            refusal = lm_head.loss_refusal(lm)
            if refusal is not None:
                raise ConfigError(f"saver 'lm-head' cannot fuse the loss of {name or type(lm).__name__}: {refusal}")
        return {_joined(name, "lm_head"): lm.lm_head for name, lm in found.items()
                if not isinstance(lm.lm_head, FusedLMHead)}

    def make(self, original: nn.Module, spec: SaverSpec) -> nn.Module:
        return FusedLMHead(original)

    def prepare(self, model: nn.Module, plan: _Plan) -> None:
        plan.loss_models.extend(_causal_lms(model).values())

    def owns(self, module: nn.Module) -> bool:
        return isinstance(module, FusedLMHead)


SAVERS: dict[str, Saver] = {saver.name: saver for saver in (DropoutSaver(), GeluSaver(), GeluNewSaver(),
                                                            SwiGLUSaver(), LMHeadSaver())}
SAVER_HELP = ", ".join(saver.usage for saver in SAVERS.values())


# ---------------------------------------------------------------------------- apply / restore


@dataclass
class _Plan:
    replacements: dict[str, nn.Module] = field(default_factory=dict)  # name -> new module
    attention_model: nn.Module | None = None
    loss_models: list[nn.Module] = field(default_factory=list)  # causal LMs whose loss the lm-head saver fuses


def _plan(model: nn.Module, specs: tuple[SaverSpec, ...]) -> _Plan:
    """Check everything and build the new modules; touches nothing in `model`."""
    plan, made, claimed = _Plan(), {}, {}
    for spec in specs:
        saver = SAVERS[spec.name]
        for name, original in saver.targets(model, spec).items():
            if name in claimed:
                raise ConfigError(f"savers '{claimed[name]}' and '{spec}' would both replace {name}: give one of them")
            claimed[name] = spec
            if id(original) not in made:  # one module under two names -> one replacement
                made[id(original)] = stand_in(original, saver.make(original, spec), KIND)
            plan.replacements[name] = made[id(original)]
        saver.prepare(model, plan)
    return plan


def check_savers(model: nn.Module, savers: str | Sequence[str | SaverSpec]) -> None:
    """Raise the ConfigError `apply_savers(model, savers)` would, without changing `model`."""
    _plan(model, parse_savers(savers))


def apply_savers(model: nn.Module, savers: str | Sequence[str | SaverSpec] | None) -> nn.Module:
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
    model = swap(model, plan.replacements)
    for lm in plan.loss_models:
        lm_head.install(lm)
    return model


def restore_savers(model: nn.Module) -> nn.Module:
    """Undo `apply_savers`: the original module objects and attention implementation back."""
    for m in model.modules():
        lm_head.uninstall(m)
    model = unswap(model, KIND)
    for m in model.modules():
        previous = m.__dict__.pop(_ATTN_ATTR, None)
        if previous is not None:
            m.set_attn_implementation(previous)
    return model


register_undo(KIND, restore_savers)  # so that `restore` (convert.py) undoes the savers too


def saver_names(model: nn.Module) -> list[str]:
    """The savers applied to `model`, as names `apply_savers` takes (e.g. ["dropout", "gelu:2"])."""
    replacements = [module for _, module in replaced(model, KIND)]
    return [name for saver in SAVERS.values() for name in saver.applied(model, replacements)]


def describe_savers(model: nn.Module) -> dict:
    """What the savers changed in `model`, for reports: names, replaced modules, attention."""
    named = list(model.named_modules(remove_duplicate=False))
    hf = _transformers_model(model)
    switched_from = None if hf is None else getattr(hf, _ATTN_ATTR, None)
    names = saver_names(model)
    return {
        "savers": names,
        "seed_dropouts": [n for n, m in named if isinstance(m, SeedDropout) and original_of(m, KIND) is not None],
        "native_dropouts": [n for n, m in named if type(m) is nn.Dropout],
        "few_bit_gelus": {n: m.bits for n, m in named if isinstance(m, FewBitGELU) and original_of(m, KIND) is not None},
        "tanh_gelus": [n for n, m in named if isinstance(m, TanhGELU) and original_of(m, KIND) is not None],
        "swiglu_mlps": [n for n, m in named if isinstance(m, SwiGLUMLP) and original_of(m, KIND) is not None],
        "fused_lm_heads": [n for n, m in named if isinstance(m, FusedLMHead) and original_of(m, KIND) is not None],
        "attn_implementation": None if hf is None else hf.config._attn_implementation,
        "attn_implementation_before": switched_from,
        # why the dropout saver left the attention alone (None when it switched it or was not asked)
        "attention_not_switched": None if "dropout" not in names or switched_from is not None
        else attention_switch_reason(model),
    }
