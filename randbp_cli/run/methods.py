"""How a model is trained, as a value: exact, randomized, checkpointed, or both.

A `Method` says whether Hugging Face activation checkpointing is on and, when the linear
layers are randomized, at which ρ with which `Sketch`. Commands resolve their `--method`,
`--rho` and `--sketch` options into `Method` values once (plans.py); `prepare_model` puts a
model into a method, and `label` names it the way every report and table does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..core.convert import convert, restore
from ..core.sketches import DEFAULT_SKETCH, Sketch  # noqa: F401 - the one default, re-exported for the CLI and plans
from ..errors import ConfigError
from ..savers.registry import SaverSpec, apply_savers, parse_savers

# name -> (checkpointed, randomized); the order is the order runs and cases are made in
_PARTS = {"exact": (False, False), "randomized": (False, True), "checkpoint": (True, False),
          "checkpoint+randomized": (True, True)}
METHOD_NAMES = tuple(_PARTS)


def check_method_name(name: str) -> str:
    if name not in _PARTS:
        raise ConfigError(f"unknown method {name!r}: choose from {', '.join(METHOD_NAMES)}")
    return name


def randomizes(name: str) -> bool:
    """Does the method called `name` randomize the linear layers (so it needs ρ and a sketch)?"""
    return _PARTS[check_method_name(name)][1]


def method_label(method: str, rho: float | None, sketch: str | None, savers=()) -> str:
    """'exact', 'checkpoint', 'countsketch rho=0.1', 'checkpoint+countsketch rho=0.1', and the
    savers after it ('countsketch rho=0.1 +dropout +gelu:2'), from a report's fields."""
    if sketch is None or rho is None:
        label = method
    else:
        what = f"{sketch} rho={rho:g}"
        label = f"checkpoint+{what}" if _PARTS.get(method, (False, False))[0] else what
    return " ".join([label, *(f"+{name}" for name in savers or ())])


@dataclass(frozen=True, eq=False)
class Method:
    """Activation checkpointing on or off; randomized linear layers (ρ and sketch) or exact ones;
    and the activation savers applied with them (savers/registry.py), parsed once: names given
    as text ("dropout", "gelu:2") become `SaverSpec`s here, which `apply_savers` takes as they are."""

    checkpoint: bool = False
    rho: float | None = None
    sketch: Sketch | None = None
    savers: tuple[SaverSpec, ...] = ()

    def __post_init__(self) -> None:
        if (self.rho is None) != (self.sketch is None):
            raise ValueError("a randomized method needs both rho and sketch; an exact one neither")
        object.__setattr__(self, "savers", parse_savers(list(self.savers)))

    @property
    def saver_names(self) -> list[str]:
        """The savers as reports record them (["dropout", "gelu:2"])."""
        return [str(spec) for spec in self.savers]

    @classmethod
    def named(cls, name: str, rho: float | None = None, sketch: Sketch | None = None,
              savers: tuple[SaverSpec | str, ...] = ()) -> Method:
        """`Method.named("checkpoint+randomized", 0.1, CountSketch())`; ρ and sketch only for randomized ones."""
        checkpoint, randomized = _PARTS[check_method_name(name)]
        return cls(checkpoint, rho, sketch, savers) if randomized else cls(checkpoint, savers=savers)

    @property
    def randomized(self) -> bool:
        return self.rho is not None

    @property
    def name(self) -> str:
        """One of METHOD_NAMES (what reports record as `method`)."""
        return next(name for name, parts in _PARTS.items() if parts == (self.checkpoint, self.randomized))

    @property
    def sketch_name(self) -> str | None:
        return None if self.sketch is None else self.sketch.name

    @property
    def label(self) -> str:
        return method_label(self.name, self.rho, self.sketch_name, self.savers)

    def _key(self) -> tuple:
        return self.checkpoint, self.rho, self.sketch_name, self.savers

    def __eq__(self, other: object) -> bool:  # sketches compare by name: instances carry no state
        return isinstance(other, Method) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


EXACT = Method()


def set_checkpointing(model: nn.Module, on: bool) -> None:
    """Hugging Face activation checkpointing, reentrant, so its saved inputs pass our hooks."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if on:
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": True})
        else:  # transformers < 5
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    else:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()


def prepare_model(model: nn.Module, method: Method, include: Sequence[str] | None = None,
                  exclude: Sequence[str] | None = None) -> nn.Module:
    """Put `model` into `method` (whatever method it was in before); returns the model."""
    model = restore(model)
    set_checkpointing(model, method.checkpoint)
    if method.savers:  # first: a layer a saver takes over (the lm-head saver's head) is no nn.Linear to convert
        model = apply_savers(model, method.savers)
    if method.randomized:
        model = convert(model, method.rho, sketch=method.sketch, include=include, exclude=exclude)
    return model
