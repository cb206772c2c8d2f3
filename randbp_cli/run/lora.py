"""LoRA through PEFT, the library its users already have: the rank and targets checked once, the
adapters applied, and which layers randomized backprop then sketches.

With LoRA the base weights are frozen, so a frozen linear layer saves nothing for its own weight
gradient: several large activations (the norm outputs, the MLP's down-projection input) are kept
alive only by the adapters' `lora_A` layers, and the r-wide adapter outputs only by `lora_B`. A
randomized method converts the trainable layers, which are exactly those (convert leaves frozen
ones exact): the adapters that read one tensor (q/k/v, gate/up) share one sketch of it
(sharing.py), and an adapter whose input another op keeps anyway (the `o_proj` adapter reads SDPA's
output) is left exact, found by a probe forward (core/convert.py, `inputs_kept_anyway`).

LoRA dropout > 0 gives each adapter its own dropped copy of the input: that copy is kept only by
`lora_A`, so it is sketched too, but the adapters of one tensor no longer share a sketch (each has
its own copy); see the README's "Decoders and LoRA" for what it costs.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..data.heads import CAUSAL_LM, head_of
from ..errors import ConfigError

LORA_A = "*.lora_A.*"  # the adapters' down-projections (an include pattern for convert)
ALL_LINEAR = "all-linear"  # PEFT's: every linear layer but the output head
# Without --lr, LoRA trains at 10× the task's full fine-tuning rate: the adapters start at zero (lora_B)
# and only they move, the usual LoRA practice (on synthetic-lm, 1e-2 learns in 100 steps where 1e-3 does not)
LORA_LR_SCALE = 10


@dataclass(frozen=True)
class LoraSpec:
    """PEFT's LoRA settings, checked: rank, alpha (scaling alpha / r), dropout, target patterns."""

    r: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = (ALL_LINEAR,)

    def describe(self) -> dict:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}


def lora_spec(r: int | None, alpha: float | None = None, dropout: float = 0.0,
              targets: list[str] | tuple[str, ...] | None = None) -> LoraSpec | None:
    """The options checked into a LoraSpec (None without a rank); a ConfigError names a bad value."""
    if r is None:
        if alpha is not None or dropout or targets:
            raise ConfigError("--lora-alpha, --lora-dropout and --lora-targets need --lora RANK")
        return None
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ConfigError(f"--lora takes the adapters' rank, a whole number >= 1 (got {r!r})")
    alpha = 2.0 * r if alpha is None else alpha
    if not alpha > 0:
        raise ConfigError(f"--lora-alpha must be positive (got {alpha!r})")
    if not 0 <= dropout < 1:
        raise ConfigError(f"--lora-dropout must be in [0, 1) (got {dropout!r})")
    return LoraSpec(r, float(alpha), float(dropout), tuple(targets) if targets else (ALL_LINEAR,))


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("--lora applies PEFT's LoRA, and PEFT is not installed: pip install peft "
                          "(or the randbp-cli[lora] extra)") from None
    return peft


def apply_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """`model` with PEFT's LoRA adapters (base weights frozen); returns the PeftModel."""
    peft = _peft()
    targets = ALL_LINEAR if spec.targets == (ALL_LINEAR,) else list(spec.targets)
    config = peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                             task_type=_task_type(model))
    try:
        return peft.get_peft_model(model, config)
    except ValueError as err:
        names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"})
        raise ConfigError(f"--lora-targets {' '.join(spec.targets)}: {' '.join(str(err).split())[:200]}; "
                          f"the model's linear layers are named: {', '.join(names)}") from None


def _task_type(model: nn.Module) -> str:
    return "CAUSAL_LM" if head_of(model) == CAUSAL_LM else "SEQ_CLS"
