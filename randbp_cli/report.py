"""Reports: the typed report objects and how a report file is read back.

Every report is a dataclass whose `to_dict()` is exactly its JSON document: a `schema` with a
version first, then the environment, the config and the measurements, with units in the key
names. `load_report` is the one place a report file is read back (`randbp check`, `randbp
report`): it checks the schema and the shape (each record's `from_dict`: every field against its
annotation, the keys read from its objects against `SHAPES`, the keys it cannot be without in
`REQUIRED`; shapes.py) and returns the typed object, or, for a benchmark script's output, a
`BenchmarkOutput`. Keys a report has and this version does not know are kept (`extra`) and
written back as they were.

Rendering lives in render.py, tables.py and plots.py; nothing here imports a UI library. The
environment a report records is environment.py's, and files are written by files.py.
"""

from __future__ import annotations

import functools
import json
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import ClassVar


from .errors import ConfigError, ReportError
from .shapes import at, check_shape, or_null, shown

PROFILE_SCHEMA = "randbp.profile/1"
FINETUNE_SCHEMA = "randbp.finetune/1"
VARIANCE_SCHEMA = "randbp.variance/1"
CHECK_SCHEMA = "randbp.check/1"


# ---------------------------------------------------------------------------- typed reports

_BOOKKEEPING = frozenset({"extra", "missing", "source"})  # dataclass fields that are not JSON keys


@functools.cache
def _field_specs(cls) -> dict:
    """Each JSON field of a record: its annotation, or what SHAPES says about its object (null
    where the annotation allows it)."""
    hints, specs = typing.get_type_hints(cls), {}
    for f in fields(cls):
        if f.name in _BOOKKEEPING:
            continue
        hint, shape = hints[f.name], cls.SHAPES.get(f.name)
        if shape is not None and type(None) in typing.get_args(hint):
            shape = or_null(shape)
        specs[f.name] = hint if shape is None else shape
    return specs


@dataclass(kw_only=True)
class Record:
    """A dataclass that is exactly one JSON object: its fields in order, then the unknown keys."""

    extra: dict = field(default_factory=dict, repr=False)  # keys this version does not know, kept as read
    missing: frozenset[str] = field(default=frozenset(), repr=False)  # fields an older report read lacked
    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset()  # keys a report leaves out rather than null
    ROWS: ClassVar[dict[str, type[Record]]] = {}  # list fields whose items are records themselves
    REQUIRED: ClassVar[frozenset[str]] = frozenset()  # keys a record cannot be read without
    SHAPES: ClassVar[dict[str, object]] = {}  # what the code reads out of a field's object (see check_shape)

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            left_out = f.name in self.missing or (value is None and f.name in self.OMIT_IF_NONE)
            if f.name in _BOOKKEEPING or left_out:
                continue
            out[f.name] = [row.to_dict() for row in value] if f.name in self.ROWS else value
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: dict, where: str = ""):
        """The record of a JSON object, its shape checked (a ReportError naming the key path
        otherwise): what a report read back holds is written back unchanged."""
        if not isinstance(data, dict):
            raise ReportError(f"{where or 'the report'} must be an object (got {shown(data)})")
        specs = _field_specs(cls)
        for name in sorted(cls.REQUIRED):
            if data.get(name) is None:
                raise ReportError(f"{where or 'the report'} has no {json.dumps(name)}")
        known = {key: value for key, value in data.items() if key in specs}
        for name, value in known.items():
            if name in cls.ROWS and isinstance(value, list):
                known[name] = [cls.ROWS[name].from_dict(item, at(at(where, name), index))
                               for index, item in enumerate(value)]
            else:
                check_shape(value, specs[name], at(where, name))
        return cls(**known, extra={key: value for key, value in data.items() if key not in specs},
                   missing=frozenset(specs.keys() - known.keys()))


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
    savers: list | None = None  # activation savers applied with the method (savers.py); left out when none
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
    cuda: dict | None = None  # allocator phases of one step, on CUDA only
    nvml: dict | None = None  # the device's own memory counter, on CUDA only
    step_time_s: dict | None = None  # median, min, max and the samples
    budget: dict | None = None  # with --budget-mib: the largest batch that fits
    activation_saving_vs_exact: float | None = None
    activation_peak_saving_vs_exact: float | None = None
    activation_limit_bytes: float | None = None  # the most sketching could save (exact and randomized only)
    time_ratio_vs_exact: float | None = None
    contributions: dict | None = None  # checkpoint+randomized: what each part saved

    OMIT_IF_NONE = frozenset({"checkpointing", "budget", "activation_limit_bytes", "contributions", "savers",
                              "compile", "compiled"})
    REQUIRED = frozenset({"method", "batch_size", "seq_len"})  # what tells one case from another
    SHAPES = {
        "savers": list[str], "compile": str,
        "activation_bytes_by_kind": dict[str, int], "activation_bytes_by_module": dict[str, int],
        "checkpointing": {"units": int, "recompute_unit_bytes": int},
        "compiled": {"activation_bytes": int, "saved_storages": int, "warmup_steps": int},
        "cuda": {"peak_allocated_bytes": int, "resting_allocated_bytes": int, "step_peak_bytes": int},
        "nvml": {"available": bool, "peak_used_bytes": int, "reason": str},
        "step_time_s": {"median": float, "min": float, "max": float, "samples": list[float]},
        "budget": {"budget_bytes": float, "max_batch_size": int, "activation_peak_bytes": int, "capped": bool},
    }


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
    memory: dict | None = None
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
    SHAPES = {
        "savers": list[str],
        "epochs": list[{"epoch": int, "steps": int, "train_loss": float, "train_time_s": float, "partial": bool,
                        "eval": dict[str, dict[str, float]]}],
        "memory": {"activation_bytes": int, "cuda": {"peak_allocated_bytes": int}},
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


def _embedded(value, where: str) -> Report | None:
    """The randbp report `value` is (checked like a file of its own), or None when it is none."""
    kind = REPORTS.get(value.get("schema")) if isinstance(value, dict) else None
    if kind is None:
        return None
    if not isinstance(value.get(kind.MAIN), list):
        raise ReportError(f"{where} is a {kind.SCHEMA} report without its {kind.MAIN!r} list")
    return kind.from_dict(value, where)


def _records(value) -> list[tuple[str | None, dict]] | None:
    """A list of objects, or an object of objects (each row named by its key): a table; else None."""
    if isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
        return [(None, row) for row in value]
    if isinstance(value, dict) and value and all(isinstance(row, dict) for row in value.values()):
        return list(value.items())
    return None


@dataclass
class BenchmarkOutput:
    """What a benchmark script writes (`results/bench-*.json`, `results/methods-*.json`, ...): no report
    kind of its own, but `randbp report` shows its PASS/FAIL checks, each randbp report it embeds
    (checked as a file of its own would be) and its other lists of records as plain tables."""

    schema: str
    command: str | None = None
    checks: list[dict] = field(default_factory=list)  # {"check": what was checked, "passed": bool}
    reports: list[tuple[str, Report]] = field(default_factory=list)  # (where in the file, the report)
    tables: list[tuple[str, list[tuple[str | None, dict]]]] = field(default_factory=list)  # (key, named rows)
    source: str | None = None

    KIND: ClassVar[str] = "benchmark"
    MAIN: ClassVar[str] = "checks"
    NOT_SHOWN: ClassVar[frozenset[str]] = frozenset({"schema", "command", "environment", "config", "checks"})

    @classmethod
    def from_dict(cls, data: dict) -> BenchmarkOutput | None:
        """The benchmark output `data` is, or None when it holds nothing `randbp report` can show."""
        checks = data.get("checks", [])
        check_shape(checks, list[{"check": str, "passed": bool}], "checks")
        command = data.get("command")
        check_shape(command, str | None, "command")
        output = cls(data["schema"], command, checks)
        for key, value in data.items():
            if key in cls.NOT_SHOWN:
                continue
            items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
            embedded = [(at(at("", key), name), _embedded(item, at(at("", key), name))) for name, item in items]
            if embedded and all(report is not None for _, report in embedded):
                output.reports += embedded
            elif _records(value) is not None:
                output.tables.append((key, _records(value)))
        return output if output.checks or output.reports or output.tables else None


def load_report(path: str | Path, expect: str | None = None, *,
                if_missing: str | None = None) -> Report | BenchmarkOutput:
    """Read a randbp JSON report; `expect` = the schema it must have (name and version). Without
    `expect`, a benchmark's output is read too (`BenchmarkOutput`). `if_missing`: what to do when
    the file does not exist, said after that."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ReportError(f"report {str(path)!r} does not exist{': ' + if_missing if if_missing else ''}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"cannot read report {str(path)!r}: {getattr(err, 'strerror', None) or err}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ReportError(f"{str(path)!r} is not valid JSON ({err.msg}: line {err.lineno}, column {err.colno}); "
                          "is it a complete randbp report?") from None
    schema = data.get("schema") if isinstance(data, dict) else None
    if not isinstance(schema, str) or not schema.startswith("randbp."):
        raise ReportError(f"{str(path)!r} is not a randbp report (no randbp 'schema' key)")
    if expect is not None and schema != expect:
        raise ReportError(f"{str(path)!r} is a {schema} report; expected {expect}")
    kind = REPORTS.get(schema)
    if kind is not None and not isinstance(data.get(kind.MAIN), list):
        raise ReportError(f"{str(path)!r} is a {schema} report without its {kind.MAIN!r} list: corrupt or truncated")
    try:
        report = kind.from_dict(data) if kind is not None else BenchmarkOutput.from_dict(data)
    except ReportError as err:  # the key path, said with the file it is in
        raise ReportError(f"{path}: {err}") from None
    if report is None:
        raise ReportError(f"{str(path)!r} has schema {schema!r}, which this randbp does not read (it reads "
                          f"{', '.join(REPORTS)}, and benchmark outputs with checks, reports or tables)")
    report.source = str(path)
    return report


def one_kind(reports: list[Report]) -> str:
    """The kind all `reports` share (a ConfigError when they mix kinds)."""
    kinds = {report.KIND for report in reports}
    if len(kinds) > 1:
        raise ConfigError(f"cannot merge reports of different kinds ({', '.join(sorted(kinds))}): "
                          "render each kind separately")
    return kinds.pop()


def merge_profiles(reports: list[ProfileReport]) -> ProfileReport:
    """Several profile reports as one comparison (results concatenated, model names joined)."""
    if len(reports) == 1:
        return reports[0]
    names = list(dict.fromkeys((report.model or {}).get("name", "?") for report in reports))
    return replace(reports[0], results=[r for report in reports for r in report.results],
                   model={**(reports[0].model or {}), "name": ", ".join(names)})
