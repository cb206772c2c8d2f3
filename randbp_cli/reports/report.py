"""The typed reports: what `randbp profile`, `finetune`, `variance` and `check` return.

Every report is a `Record` (record.py) whose `to_dict()` is exactly its JSON document: a `schema`
with a version first, then the environment, the config and the measurements, with units in the
key names. Reports are read back by load.py; rendered by render.py, tables.py and plots.py;
written by files.py. Nothing here imports a UI library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .record import BatchBudget, CudaMemory, NvmlMemory, Record, RunMemory, StepTimes

PROFILE_SCHEMA = "randbp.profile/1"
FINETUNE_SCHEMA = "randbp.finetune/1"
VARIANCE_SCHEMA = "randbp.variance/1"
CHECK_SCHEMA = "randbp.check/1"


@dataclass(kw_only=True)
class Report(Record):
    """A whole report: `SCHEMA` first in its JSON, `command` (the command line) last when set.
    `source`: the file it was read from (load_report), for messages; never written."""

    source: str | None = field(default=None, repr=False, compare=False)
    SCHEMA: ClassVar[str] = ""
    KIND: ClassVar[str] = ""  # profile, finetune, variance
    MAIN: ClassVar[str] = ""  # the list a report of this kind cannot be without

    def to_dict(self) -> dict:
        return {"schema": self.SCHEMA, **super().to_dict()}

    @classmethod
    def from_dict(cls, data: dict, where: str = ""):
        if isinstance(data, dict):
            data = {key: value for key, value in data.items() if key != "schema"}
        return super().from_dict(data, where)


@dataclass(kw_only=True)
class ProfileResult(Record):
    """One profiled case: one method at one batch size (bytes, times, and how they compare to exact)."""

    model: str | None = None
    method: str | None = None
    rho: float | None = None
    sketch: str | None = None
    savers: list | None = None  # activation savers applied with the method (savers/registry.py); left out when none
    compile: str | None = None  # the torch.compile mode it ran under; left out when eager
    batch_size: int | None = None
    seq_len: int | None = None
    tokens: int | None = None
    dtype: str | None = None
    device: str | None = None
    activation_bytes: int | None = None  # saved for backward by one forward (parameters and inputs excluded)
    activation_bytes_by_kind: dict | None = None
    activation_bytes_by_module: dict | None = None
    saved_storages: int | None = None
    checkpointing: dict | None = None  # checkpointed cases: units and the largest recompute
    compiled: dict | None = None  # compiled cases: what the compiled graphs save, and the warm-up it took
    activation_peak_bytes: int | None = None  # stored bytes plus the largest recompute
    randomized_layers: int | None = None
    left_exact: dict | None = None  # selected layers a randomized case left exact (indices folded): why
    cuda: CudaMemory | None = None  # allocator phases of one step, on CUDA only
    nvml: NvmlMemory | None = None  # the device's own memory counter, on CUDA only
    step_time_s: StepTimes | None = None
    budget: BatchBudget | None = None  # with --budget-mib: the largest batch that fits
    activation_saving_vs_exact: float | None = None
    activation_peak_saving_vs_exact: float | None = None
    activation_limit_bytes: float | None = None  # the most sketching could save (exact and randomized only)
    time_ratio_vs_exact: float | None = None
    contributions: dict | None = None  # checkpoint+randomized: what each part saved

    OMIT_IF_NONE = frozenset({"checkpointing", "budget", "activation_limit_bytes", "contributions", "savers",
                              "compile", "compiled", "left_exact"})
    REQUIRED = frozenset({"method", "batch_size", "seq_len"})  # what tells one case from another
    SHAPES = {
        "savers": list[str], "compile": str, "left_exact": dict[str, str],
        "activation_bytes_by_kind": dict[str, int], "activation_bytes_by_module": dict[str, int],
        "checkpointing": {"units": int, "recompute_unit_bytes": int},
        "compiled": {"activation_bytes": int, "saved_storages": int, "warmup_steps": int},
    }
    NESTED = {"cuda": CudaMemory, "nvml": NvmlMemory, "step_time_s": StepTimes, "budget": BatchBudget}


_ENVIRONMENT = {"torch": str, "transformers": str, "device": str, "device_name": str, "nvml": dict}
_MODEL = {"name": str, "weights": str}


@dataclass(kw_only=True)
class ProfileReport(Report):
    status: str | None = None  # "interrupted" when a stop request cut the run short; left out when complete
    environment: dict | None = None
    config: dict | None = None
    model: dict | None = None
    results: list[ProfileResult] = field(default_factory=list)
    command: str | None = None

    SCHEMA, KIND, MAIN = PROFILE_SCHEMA, "profile", "results"
    ROWS = {"results": ProfileResult}
    OMIT_IF_NONE = frozenset({"status", "command"})
    SHAPES = {"environment": _ENVIRONMENT, "model": _MODEL,
              "config": {"device": str, "dtype": str, "steps": int, "warmup": int}}


@dataclass(kw_only=True)
class FinetuneRun(Record):
    """One fine-tuning run: per-epoch losses and metrics, memory, time, the best and last epoch."""

    name: str | None = None
    method: str | None = None
    rho: float | None = None
    sketch: str | None = None
    savers: list | None = None  # activation savers the run trained with; left out when none
    checkpointing: bool | None = None
    status: str | None = None  # completed or interrupted
    converted_layers: dict | None = None
    hyperparameters: dict | None = None
    epochs: list[dict] = field(default_factory=list)
    memory: RunMemory | None = None
    distributed: dict | None = None  # several ranks: every rank's memory and time
    time: dict | None = None
    metric: str | None = None
    best: dict | None = None
    last: dict | None = None
    saved_to: str | None = None
    save_error: str | None = None
    vs_exact: dict | None = None  # ratios to the exact run, when there is one

    OMIT_IF_NONE = frozenset({"distributed", "saved_to", "save_error", "vs_exact", "savers"})
    REQUIRED = frozenset({"name"})
    NESTED = {"memory": RunMemory}
    SHAPES = {
        "savers": list[str],
        "epochs": list[{"epoch": int, "steps": int, "train_loss": float, "train_time_s": float, "partial": bool,
                        "eval": dict[str, dict[str, float]]}],
        "time": {"step_time_s": float, "tokens_per_s": float},
        "best": {"epoch": int, "value": float}, "last": {"epoch": int, "value": float},
        "vs_exact": {"activation_bytes": float, "step_time": float},
    }


@dataclass(kw_only=True)
class FinetuneReport(Report):
    status: str | None = None
    environment: dict | None = None
    distributed: dict | None = None
    config: dict | None = None
    task: dict | None = None
    model: dict | None = None
    runs: list[FinetuneRun] = field(default_factory=list)
    command: str | None = None

    SCHEMA, KIND, MAIN = FINETUNE_SCHEMA, "finetune", "runs"
    ROWS = {"runs": FinetuneRun}
    OMIT_IF_NONE = frozenset({"command"})
    SHAPES = {"environment": _ENVIRONMENT, "model": _MODEL, "task": {"task": str}}


@dataclass(kw_only=True)
class VarianceRecord(Record):
    """One (step, layer, sketch) measurement: α, D²_SGD, D²_RMM measured and in closed form, the ratio."""

    layer: str | None = None
    step: int | None = None
    sketch: str | None = None
    rho: float | None = None
    k: int | None = None
    rows: int | None = None  # rows the sketch sees (padding included)
    real_rows: int | None = None  # non-padding rows: the SGD samples α and D²_SGD run over
    grad_norm: float | None = None
    alpha: float | None = None
    d2_sgd: float | None = None
    d2_rmm_measured: float | None = None
    d2_rmm_se: float | None = None
    d2_rmm_theory: float | None = None
    ratio: float | None = None
    ratio_theory: float | None = None
    bound: float | None = None

    REQUIRED = frozenset({"layer", "step", "sketch"})


@dataclass(kw_only=True)
class VarianceSummary(Record):
    """How the ratio behaved over the measured steps, per (layer, sketch)."""

    layer: str | None = None
    sketch: str | None = None
    steps: int | None = None
    ratio_mean: float | None = None
    ratio_min: float | None = None
    ratio_max: float | None = None
    bound_mean: float | None = None
    alpha_mean: float | None = None
    within_bound: bool | None = None

    REQUIRED = frozenset({"layer", "sketch"})


@dataclass(kw_only=True)
class VarianceReport(Report):
    status: str | None = None
    environment: dict | None = None
    config: dict | None = None
    task: dict | None = None
    model: dict | None = None
    layers: list[str] = field(default_factory=list)
    train_loss: dict | None = None  # step -> loss on the measured steps
    records: list[VarianceRecord] = field(default_factory=list)
    summary: list[VarianceSummary] = field(default_factory=list)
    gelu_errors: list[dict] | None = None  # with a gelu:B saver: the b-bit derivative's error per step and module
    command: str | None = None

    SCHEMA, KIND, MAIN = VARIANCE_SCHEMA, "variance", "records"
    ROWS = {"records": VarianceRecord, "summary": VarianceSummary}
    OMIT_IF_NONE = frozenset({"command", "gelu_errors"})
    SHAPES = {"environment": _ENVIRONMENT, "train_loss": dict[str, float],
              "gelu_errors": list[{"step": int, "layer": str, "bits": int, "relative_error": float}],
              "config": {"task": str, "model": str, "rho": float, "repeats": int}}


REPORTS: dict[str, type[Report]] = {cls.SCHEMA: cls for cls in (ProfileReport, FinetuneReport, VarianceReport)}


# ---------------------------------------------------------------------------- the memory gate's verdict


@dataclass
class MetricChange:
    """One metric of one case, baseline against now; `limit`: the largest allowed value (None: shown only)."""

    case: str
    metric: str
    baseline: float
    current: float
    limit: float | None
    status: str  # "regressed", "improved", "unchanged", "info"

    @property
    def delta(self) -> float:
        return self.current - self.baseline

    @property
    def delta_pct(self) -> float | None:
        return None if not self.baseline else 100 * self.delta / self.baseline

    def to_dict(self) -> dict:
        return {"case": self.case, "metric": self.metric, "baseline": self.baseline, "current": self.current,
                "delta": self.delta, "delta_pct": self.delta_pct, "limit": self.limit, "status": self.status}


@dataclass
class CheckResult:
    """What `randbp check` found (commands/check.py): every change, the cases matched and new."""

    changes: list[MetricChange] = field(default_factory=list)
    matched: int = 0
    new_cases: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[MetricChange]:
        return [c for c in self.changes if c.status == "regressed"]

    @property
    def improvements(self) -> list[MetricChange]:
        return [c for c in self.changes if c.status == "improved"]

    @property
    def exit_code(self) -> int:
        return 1 if self.regressions else 0

    def to_dict(self) -> dict:
        """The `randbp.check/1` report."""
        return {"schema": CHECK_SCHEMA, "passed": not self.regressions, "matched_cases": self.matched,
                "regressions": len(self.regressions), "improvements": len(self.improvements),
                "new_cases": self.new_cases, "warnings": self.warnings,
                "changes": [c.to_dict() for c in self.changes]}
