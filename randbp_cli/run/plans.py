"""Every command's options, and their resolution into a frozen plan, once.

A config (`ProfileConfig`, `FinetuneConfig`, `VarianceConfig`) holds the options as a user
gives them: strings and numbers, the defaults of the CLI. `config.resolve()` checks all of
them and parses what needs parsing (device, dtype, sketches, methods) into a frozen plan;
the engine and the commands run plans, so no option is checked or parsed twice. The plan
keeps a private copy of the config, which the report records as given.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch

from ..core.sketches import Sketch, check_rho, get_sketch
from ..data.tasks import TaskSpec, get_task
from ..errors import ConfigError
from ..options import (DEFAULT_MODEL, SYNTHETIC_DEFAULT_MODEL, SYNTHETIC_LM_DEFAULT_MODEL, FinetuneOptions,
                       ProfileOptions, VarianceOptions)
from ..savers.registry import SaverSpec, parse_savers
from .devices import dtype_name, resolve_device, resolve_dtype
from .lora import LoraSpec, lora_spec
from .methods import EXACT, METHOD_NAMES, Method, check_method_name, randomizes



def _unique_sketches(names: Iterable[str]) -> list[Sketch]:
    """One instance per distinct sketch, in the order first given."""
    unique: dict[str, Sketch] = {}
    for name in names:
        sketch = get_sketch(name)
        unique.setdefault(sketch.name, sketch)
    return list(unique.values())


def _runs(names: Iterable[str], rhos: Sequence[float], sketches: Sequence[Sketch], savers: tuple[SaverSpec, ...] = ()
          ) -> list[Method]:
    """The methods `names` asks for, in METHOD_NAMES order: one per sketch × ρ when randomized,
    each with the savers."""
    methods: list[Method] = []
    for name in METHOD_NAMES:
        if name in names:
            methods += ([Method.named(name, rho, sketch, savers) for sketch in sketches for rho in rhos]
                        if randomizes(name) else [Method.named(name, savers=savers)])
    return methods


def _savers(names: Sequence[str] | None) -> tuple[SaverSpec, ...]:
    """The --saver options parsed and checked, once (e.g. "gelu:2" -> SaverSpec("gelu", 2))."""
    return parse_savers(list(names or []))


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _compile_mode(compile: bool, mode: str | None, device: torch.device) -> str | None:
    """The torch.compile mode every method runs under, or None (eager).

    Without --compile-mode: CUDA graphs on a GPU ("reduce-overhead": launches are what a
    randomized step adds there), inductor's default elsewhere.
    """
    if not compile:
        if mode is not None:
            raise ConfigError(f"--compile-mode {mode} needs --compile")
        return None
    mode = mode or ("reduce-overhead" if device.type == "cuda" else "default")
    if mode not in COMPILE_MODES:
        raise ConfigError(f"unknown --compile-mode {mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    return mode


def lora_record(lora: LoraSpec | None) -> dict:
    """What a report's config says of LoRA: its settings, checked; nothing without it (reports
    made before LoRA keep their keys)."""
    return {"lora": lora.describe()} if lora is not None else {}


_LORA_OPTIONS = ("lora", "lora_alpha", "lora_dropout", "lora_targets")  # recorded by lora_record


# ---------------------------------------------------------------------------- profile


BUDGET_OVER = ("batch", "seq")  # what --budget-mib's search grows


@dataclass(frozen=True)
class ProfileCase:
    method: Method
    batch_size: int

    @property
    def label(self) -> str:
        return f"{self.method.label} b={self.batch_size}"


@dataclass
class ProfileConfig(ProfileOptions):
    """`randbp profile`'s options (options.py: each default there, once) resolved into a plan."""

    def resolve(self) -> ProfilePlan:
        """Check every option once; the plan `profile` runs (ConfigError/DeviceError otherwise)."""
        for method in self.methods:
            check_method_name(method)
        if self.budget_mib is not None and not self.budget_mib > 0:
            raise ConfigError(f"--budget-mib must be positive (got {self.budget_mib})")
        if self.budget_over not in BUDGET_OVER:
            raise ConfigError(f"--budget-over must be one of {', '.join(BUDGET_OVER)} (got {self.budget_over!r})")
        if not self.rhos:
            raise ConfigError("give at least one --rho")
        rhos = list(dict.fromkeys(check_rho(rho) for rho in self.rhos))
        sketches = _unique_sketches(self.sketches)
        if not sketches:
            raise ConfigError("give at least one --sketch")
        self._check_sizes()
        dtype = resolve_dtype(self.dtype)
        savers = _savers(self.savers)
        # each method plain and, with savers, with them (exact too): every contribution shows
        methods = [EXACT]
        for name in METHOD_NAMES:
            if name in self.methods or name == "exact":
                methods += _runs({name}, rhos, sketches) + (_runs({name}, rhos, sketches, savers) if savers else [])
        methods = list(dict.fromkeys(methods))
        cases = tuple(ProfileCase(method, batch) for batch in dict.fromkeys(self.batch_sizes) for method in methods)
        device = resolve_device(self.device)
        lora = lora_spec(self.lora, self.lora_alpha, self.lora_dropout, self.lora_targets)
        return ProfilePlan(copy.deepcopy(self), device, dtype, cases,
                           _compile_mode(self.compile, self.compile_mode, device), lora,
                           bool(self.skip_kept))

    def _check_sizes(self) -> None:
        for batch in self.batch_sizes:
            if batch <= 0:
                raise ConfigError(f"--batch-size must be a positive integer (got {batch})")
        if not self.batch_sizes:
            raise ConfigError("give at least one --batch-size")
        if self.seq_len <= 0:
            raise ConfigError(f"--seq-len must be a positive integer (got {self.seq_len})")
        if self.steps < 1:
            raise ConfigError(f"--steps must be at least 1 (got {self.steps})")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be 0 or more (got {self.warmup})")
        _check_attention(self.attn_implementation)


def _check_attention(name: str | None) -> None:
    """An attention kernel transformers knows (or a Hub kernel, `org/repo`), refused before the model is
    built: transformers' own message is longer than a line and would lose the list of choices."""
    if name is None or "/" in name:
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    valid = ["eager", *sorted(key for key in ALL_ATTENTION_FUNCTIONS.valid_keys() if "|" not in key)]
    if name not in valid:
        raise ConfigError(f"--attn-implementation {name!r} is not one of {', '.join(valid)} (or a Hub kernel, "
                          "org/repo); flash_attention_* needs its package and a GPU")


@dataclass(frozen=True)
class ProfilePlan:
    """A checked `ProfileConfig`: the device, dtype and every case (exact first per batch size)."""

    config: ProfileConfig  # the options as given (a private copy): recorded in the report
    device: torch.device
    dtype: torch.dtype
    cases: tuple[ProfileCase, ...]
    compile: str | None = None  # the torch.compile mode every case runs under (None: eager)
    lora: LoraSpec | None = None  # PEFT's LoRA on the model, every case alike
    skip_kept: bool = False  # leave exact the layers whose input another op keeps (a probe forward)

    @property
    def batch_sizes(self) -> list[int]:
        return list(dict.fromkeys(self.config.batch_sizes))

    @property
    def budget_bytes(self) -> float | None:
        return None if self.config.budget_mib is None else self.config.budget_mib * 2**20

    @property
    def warmup_steps(self) -> int:
        """Untimed steps per case: `--warmup`, and compiled at least 3 — the first compiles, the
        model's own first-call setup (transformers sets `problem_type`) recompiles once, and the
        backward graph compiles lazily at its first use."""
        return max(self.config.warmup, 3) if self.compile else self.config.warmup

    @property
    def total_steps(self) -> int:
        """Training steps the whole profile runs (what a progress bar counts)."""
        per_case = self.warmup_steps + 1 + (self.device.type == "cuda") + self.config.steps
        return per_case * len(self.cases)

    def config_record(self) -> dict:
        config = self.config
        options = {key: value for key, value in asdict(config).items() if key not in _LORA_OPTIONS}
        return {**options, "rhos": list(config.rhos), "sketches": list(config.sketches),
                "methods": list(config.methods), "batch_sizes": list(config.batch_sizes),
                "device": str(self.device), "dtype": dtype_name(self.dtype), "warmup": self.warmup_steps,
                "compile_mode": self.compile, **lora_record(self.lora)}


# ---------------------------------------------------------------------------- finetune and variance


@dataclass
class FinetuneConfig(FinetuneOptions):
    """`randbp finetune`'s options (options.py) resolved into a plan."""

    @property
    def custom_data(self) -> bool:
        return self.train_file is not None

    def model_name(self) -> str:
        if self.model:
            return self.model
        if self.custom_data:
            return DEFAULT_MODEL
        return {"synthetic": SYNTHETIC_DEFAULT_MODEL, "synthetic-lm": SYNTHETIC_LM_DEFAULT_MODEL}.get(self.task,
                                                                                                  DEFAULT_MODEL)

    def resolve(self) -> FinetunePlan:
        """Check every option once; the plan `finetune` runs: one method per run."""
        common, sketch = self._resolve_common()
        rhos = list(dict.fromkeys(float(rho) for rho in self.rhos))
        asked = set(self.methods) if self.methods else {"randomized" if rhos else "exact"}
        baseline = [EXACT] if self.compare else []  # --compare's exact run is the plain one
        methods = dict.fromkeys([*baseline, *_runs(asked, rhos, [sketch], _savers(self.savers))])
        return FinetunePlan(**common, methods=tuple(methods))

    def _resolve_common(self) -> tuple[dict, Sketch]:
        """The fields every training plan has, and the training sketch."""
        for method in self.methods or []:
            if randomizes(method) and not self.rhos:
                raise ConfigError(f"--method {method} needs at least one --rho")
        for rho in self.rhos:
            check_rho(rho)
        sketch = get_sketch(self.sketch)
        dtype = resolve_dtype(self.dtype)
        self._check_numbers()
        task = None if self.custom_data else get_task(self.task)
        self._check_data_options()  # after the task: an unknown task is said as such first
        device = resolve_device(self.device)
        return dict(config=copy.deepcopy(self), device=device, dtype=dtype, model_name=self.model_name(), task=task,
                    compile=_compile_mode(self.compile, self.compile_mode, device),
                    lora=lora_spec(self.lora, self.lora_alpha, self.lora_dropout, self.lora_targets)), sketch

    def _check_numbers(self) -> None:
        positive = {"--epochs": self.epochs, "--max-steps": self.max_steps, "--batch-size": self.batch_size,
                    "--eval-batch-size": self.eval_batch_size, "--max-length": self.max_length,
                    "--grad-accum": self.grad_accum, "--max-train-samples": self.max_train_samples,
                    "--max-eval-samples": self.max_eval_samples}
        for option, value in positive.items():
            if value is not None and value < 1:
                raise ConfigError(f"{option} must be a positive integer (got {value})")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"--lr must be positive (got {self.lr})")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warm-up ratio must be in [0, 1) (got {self.warmup_ratio})")
        if (self.train_file is None) != (self.validation_file is None):
            raise ConfigError("give both --train-file and --validation-file")

    def _check_data_options(self) -> None:
        """Refuse data options the chosen data never reads (silently ignoring them would mislead)."""
        if self.custom_data:
            return
        ignored = {"--text-columns": self.text_columns, "--label-column": self.label_column != "label"}
        if self.task in ("synthetic", "synthetic-lm"):
            ignored["--data-dir"] = self.data_dir
        for option, given in ignored.items():
            if given:
                needs = ("a GLUE task" if option == "--data-dir"
                         else "your own data (--train-file and --validation-file)")
                raise ConfigError(f"{option} applies to {needs}; --task {self.task} has its own columns and "
                                  "data: leave it out")


@dataclass
class VarianceConfig(VarianceOptions, FinetuneConfig):
    """`randbp variance`'s options (options.py) resolved into a plan."""


    def resolve(self) -> VariancePlan:
        """Check every option once; the plan `variance` runs."""
        common, sketch = self._resolve_common()
        rho = check_rho(self.rho)
        savers = _savers(self.savers)
        train = (Method(savers=savers) if self.train_rho is None
                 else Method(rho=check_rho(self.train_rho), sketch=sketch, savers=savers))
        if not self.sketches:
            raise ConfigError("give at least one --sketch")
        sketches = tuple(get_sketch(name) for name in self.sketches)
        if self.repeats < 2:
            raise ConfigError(f"--repeats must be at least 2 to give a standard error (got {self.repeats})")
        if self.steps < 0:
            raise ConfigError(f"--steps must be 0 or more (got {self.steps})")
        if self.every < 1:
            raise ConfigError(f"--every must be at least 1 (got {self.every})")
        if self.batch_size == 1:  # checked now: it would fail at the first measurement, after loading and training
            raise ConfigError("--batch-size 1: variance compares with the mini-batch (SGD) variance, which needs at "
                              "least 2 examples per batch (the classifier head sees one row per example: B − 1 = 0); "
                              "use --batch-size 2 or more")
        return VariancePlan(**common, rho=rho, sketches=sketches, train_method=train)


@dataclass(frozen=True)
class TrainingPlan:
    """What finetune and variance share: a checked config, where it runs, the model and the task."""

    config: FinetuneConfig  # the options as given (a private copy): recorded in the report
    device: torch.device
    dtype: torch.dtype
    model_name: str
    task: TaskSpec | None  # None: the user's own files, whose labels decide the task
    compile: str | None = None  # the torch.compile mode every method runs under (None: eager)
    lora: LoraSpec | None = None  # PEFT's LoRA on the model of every run

    def optimizer(self, parameters, lr: float) -> torch.optim.Optimizer:
        """AdamW as Fairseq configures it for GLUE (docs/method.md §5): decay on every trained
        parameter (with LoRA, the adapters')."""
        config = self.config
        return torch.optim.AdamW([p for p in parameters if p.requires_grad], lr=lr, betas=config.adam_betas, eps=config.adam_eps,
                                 weight_decay=config.weight_decay)

    def warmup_steps(self, total_steps: int) -> int:
        return round(self.config.warmup_ratio * total_steps)

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int):
        """6% linear warm-up (by default), then linear decay to 0 at `total_steps`."""
        from transformers import get_linear_schedule_with_warmup

        return get_linear_schedule_with_warmup(optimizer, self.warmup_steps(total_steps), total_steps)

    @property
    def trained_methods(self) -> tuple[Method, ...]:
        """Every method a run of this plan trains in."""
        return ()

    def config_record(self, **resolved) -> dict:
        """The config block of the report: the options as given, with what they resolved to."""
        options = {key: value for key, value in asdict(self.config).items() if key not in _LORA_OPTIONS}
        return {**options, "model": self.model_name, "device": str(self.device),
                "compile_mode": self.compile, **lora_record(self.lora), **resolved}


@dataclass(frozen=True)
class FinetunePlan(TrainingPlan):
    methods: tuple[Method, ...] = ()  # one run each, in this order

    @property
    def trained_methods(self) -> tuple[Method, ...]:
        return self.methods


@dataclass(frozen=True)
class VariancePlan(TrainingPlan):
    """`config` is a VarianceConfig."""

    rho: float = 0.5
    sketches: tuple[Sketch, ...] = ()  # measured, in this order (a name given twice is measured twice)
    train_method: Method = EXACT  # how the model is trained between measurements

    @property
    def trained_methods(self) -> tuple[Method, ...]:
        return (self.train_method,)
