"""What a user can set for each command, and its default: written once, here.

`ProfileOptions`, `FinetuneOptions` and `VarianceOptions` are plain dataclasses (strings and numbers,
no torch), so the command line takes its defaults from them at start-up (`randbp --help` stays
fast) and a library user who builds a config gets the same run as the CLI's defaults
(tests/run/test_options.py compares them). plans.py's configs add `resolve()`: checking and parsing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

DEFAULT_MODEL = "roberta-base"
SYNTHETIC_DEFAULT_MODEL = "roberta-tiny"
SYNTHETIC_LM_DEFAULT_MODEL = "llama-tiny"
# sketches.py's default and names, spelled out so that this module needs no torch (a test holds them equal)
DEFAULT_SKETCH = "balanced"
SKETCH_NAMES = ("balanced", "gaussian", "rademacher", "countsketch", "srht", "crs", "wta-crs")


@dataclass
class ProfileOptions:
    """`randbp profile`: the model, the cases (exact beside each method × ρ × sketch × batch) and how
    they are measured."""

    model: str = DEFAULT_MODEL
    rhos: Sequence[float] = field(default_factory=lambda: [0.5])
    sketches: Sequence[str] = field(default_factory=lambda: [DEFAULT_SKETCH])
    methods: Sequence[str] = field(default_factory=lambda: ["randomized"])  # besides the exact baseline
    batch_sizes: Sequence[int] = field(default_factory=lambda: [8])
    seq_len: int = 128
    device: str = "auto"
    dtype: str = "float32"
    steps: int = 3
    warmup: int = 1
    seed: int = 0
    isolate: bool = False
    include: list[str] | None = None
    exclude: list[str] | None = None
    attn_implementation: str | None = None
    offline: bool = False
    num_labels: int = 2
    lr: float = 1e-5
    budget_mib: float | None = None  # find the largest batch (or sequence) whose activations fit this budget
    budget_over: str = "batch"  # what the budget search grows: "batch" (at seq_len) or "seq" (at the first batch)
    budget_max_batch: int = 1024
    budget_max_seq: int = 131072  # the search's upper limit on a sequence, besides the model's own
    savers: list[str] = field(default_factory=list)  # applied with every method but the exact baseline
    compile: bool = False  # torch.compile every case alike
    compile_mode: str | None = None
    lora: int | None = None  # LoRA rank: PEFT's LoRA on the model, every case alike (run/lora.py)
    lora_alpha: float | None = None  # None: 2 × rank
    lora_dropout: float = 0.0
    lora_targets: list[str] | None = None  # None: every linear layer but the LM head ("all-linear")
    skip_kept: bool = True  # leave exact the layers whose input another op keeps anyway (a probe forward)


@dataclass
class FinetuneOptions:
    """`randbp finetune`: the data, the model, the runs and how they train (Fairseq's GLUE recipe)."""

    task: str = "mrpc"
    model: str | None = None  # roberta-base; roberta-tiny for the synthetic task, llama-tiny for synthetic-lm
    rhos: list[float] = field(default_factory=list)  # empty: exact training only
    compare: bool = False  # add an exact run beside the randomized ones
    methods: list[str] | None = None  # explicit: exact, randomized, checkpoint, checkpoint+randomized
    sketch: str = DEFAULT_SKETCH
    include: list[str] | None = None
    exclude: list[str] | None = None
    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    eval_batch_size: int | None = None
    lr: float | None = None
    max_length: int = 512
    grad_accum: int = 1
    warmup_ratio: float = 0.06
    weight_decay: float = 0.1
    adam_betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-6
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    data_dir: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    text_columns: list[str] | None = None
    label_column: str = "label"
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    synthetic_train_size: int = 4000
    synthetic_eval_size: int = 1000
    offline: bool = False
    save_model: str | None = None
    savers: list[str] = field(default_factory=list)  # applied with every run but --compare's exact one
    compile: bool = False  # torch.compile every run alike
    compile_mode: str | None = None
    lora: int | None = None  # LoRA rank: PEFT's LoRA on the model of every run (run/lora.py)
    lora_alpha: float | None = None  # None: 2 × rank
    lora_dropout: float = 0.0
    lora_targets: list[str] | None = None  # None: every linear layer but the LM head ("all-linear")
    skip_kept: bool = True  # leave exact the layers whose input another op keeps anyway (a probe forward)


@dataclass
class VarianceOptions(FinetuneOptions):
    """The data and model options of finetune, plus what to measure."""

    task: str = "synthetic"  # runs offline in seconds; GLUE tasks need their data
    sketches: list[str] = field(default_factory=lambda: [DEFAULT_SKETCH])
    rho: float = 0.5  # the compression rate measured
    repeats: int = 64
    layers: list[str] | None = None
    steps: int = 0  # fine-tune this many steps (0: measure the first batch only)
    every: int = 1
    train_rho: float | None = None  # train randomized at this rate (with `sketch`); None: exact


@dataclass
class CheckOptions:
    """`randbp check` and `profile --check`: how much each guarded metric may grow (check.parse_tolerance
    reads "5%" or 0.05; activation bytes are deterministic, so exact by default)."""

    tolerance_peak: str = "5%"
    tolerance_time: str | None = None  # None: step time is shown, not judged
    tolerance_activation: str = "0"
