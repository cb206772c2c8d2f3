"""Reports: the typed report objects, their JSON files, and the environment every report records.

Every report is a dataclass whose `to_dict()` is exactly its JSON document: a `schema` with a
version first, then the environment, the config and the measurements, with units in the key
names. `load_report` is the one place a report file is read back (`randbp check`, `randbp
report`): it checks the schema and returns the typed object. Keys a report has and this
version does not know are kept (`extra`) and written back as they were.

Rendering (tables, Markdown, plots) lives in render.py; nothing here imports a UI library.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import ClassVar

import torch

from .errors import ConfigError, OutputError, ReportError, ReportWriteError

PROFILE_SCHEMA = "randbp.profile/1"
FINETUNE_SCHEMA = "randbp.finetune/1"
VARIANCE_SCHEMA = "randbp.variance/1"
CHECK_SCHEMA = "randbp.check/1"


# ---------------------------------------------------------------------------- typed reports


@dataclass(kw_only=True)
class Record:
    """A dataclass that is exactly one JSON object: its fields in order, then the unknown keys."""

    extra: dict = field(default_factory=dict, repr=False)  # keys this version does not know, kept as read
    missing: frozenset[str] = field(default=frozenset(), repr=False)  # fields an older report read lacked
    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset()  # keys a report leaves out rather than null
    ROWS: ClassVar[dict[str, type[Record]]] = {}  # list fields whose items are records themselves

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            left_out = f.name in self.missing or (value is None and f.name in self.OMIT_IF_NONE)
            if f.name in ("extra", "missing") or left_out:
                continue
            out[f.name] = [row.to_dict() for row in value] if f.name in self.ROWS else value
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: dict):
        """The record of a JSON object: what a report read back holds is written back unchanged."""
        names = {f.name for f in fields(cls)} - {"extra", "missing"}
        known = {key: value for key, value in data.items() if key in names}
        for name, row in cls.ROWS.items():
            if isinstance(known.get(name), list):
                known[name] = [row.from_dict(item) if isinstance(item, dict) else item for item in known[name]]
        return cls(**known, extra={key: value for key, value in data.items() if key not in names},
                   missing=frozenset(names - known.keys()))


@dataclass(kw_only=True)
class Report(Record):
    """A whole report: `SCHEMA` first in its JSON, `command` (the command line) last when set."""

    SCHEMA: ClassVar[str] = ""
    KIND: ClassVar[str] = ""  # profile, finetune, variance
    MAIN: ClassVar[str] = ""  # the list a report of this kind cannot be without

    def to_dict(self) -> dict:
        return {"schema": self.SCHEMA, **super().to_dict()}

    @classmethod
    def from_dict(cls, data: dict):
        return super().from_dict({key: value for key, value in data.items() if key != "schema"})


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
                              "compile"})


@dataclass(kw_only=True)
class ProfileReport(Report):
    environment: dict | None = None
    config: dict | None = None
    model: dict | None = None
    results: list[ProfileResult] = field(default_factory=list)
    command: str | None = None

    SCHEMA, KIND, MAIN = PROFILE_SCHEMA, "profile", "results"
    ROWS = {"results": ProfileResult}
    OMIT_IF_NONE = frozenset({"command"})


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


REPORTS: dict[str, type[Report]] = {cls.SCHEMA: cls for cls in (ProfileReport, FinetuneReport, VarianceReport)}


def load_report(path: str | Path, expect: str | None = None) -> Report:
    """Read a randbp JSON report; `expect` = the schema it must have (name and version)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ReportError(f"report {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"cannot read report {str(path)!r}: {getattr(err, 'strerror', None) or err}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ReportError(f"{str(path)!r} is not valid JSON ({err.msg} at line {err.lineno}); "
                          "is it a complete randbp report?") from None
    schema = data.get("schema") if isinstance(data, dict) else None
    if not isinstance(schema, str) or not schema.startswith("randbp."):
        raise ReportError(f"{str(path)!r} is not a randbp report (no randbp 'schema' key)")
    if schema not in REPORTS:
        raise ReportError(f"{str(path)!r} has schema {schema!r}, which this randbp does not read "
                          f"(it reads {', '.join(REPORTS)})")
    if expect is not None and schema != expect:
        raise ReportError(f"{str(path)!r} is a {schema} report; expected {expect}")
    kind = REPORTS[schema]
    if not isinstance(data.get(kind.MAIN), list):
        raise ReportError(f"{str(path)!r} is a {schema} report without its {kind.MAIN!r} list: corrupt or truncated")
    return kind.from_dict(data)


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


# ---------------------------------------------------------------------------- environment and files


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> dict | None:
    """The commit the code ran from, and whether tracked files other than results/ differ from it
    (regenerating one result after another must not make the later ones look dirty)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)results"], capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}


def environment(device: torch.device | None = None) -> dict:
    """Versions and hardware that change the numbers, for every report."""
    import transformers

    from . import __version__
    from .memory import nvml_info

    device = device or torch.device("cpu")
    cuda = torch.cuda.is_available()
    env = {
        "randbp": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cuda_version": torch.version.cuda,
        "cuda_available": cuda,
        "nvml": nvml_info(device) if cuda else {"available": False, "reason": "no CUDA device visible to torch"},
        "git": _git_commit(),
    }
    env["driver_version"] = env["nvml"].get("driver_version")
    return env


# ---------------------------------------------------------------------------- files


def check_writable(path: str | Path) -> Path:
    """Fail early (before a long run) if the report cannot be written at `path`."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(f"output path {str(path)!r} is a directory: give a file name such as {path / 'report.json'}")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"cannot write {str(path)!r}: {str(parent)!r} is a file, not a directory")
    if not parent.is_dir():
        raise OutputError(f"cannot write {str(path)!r}: directory {str(parent)!r} does not exist (create it first)")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OutputError(f"cannot write {str(path)!r}: permission denied; choose another -o/--output path")
    return path


@contextmanager
def atomic_path(path: str | Path):
    """Yields a temp path beside `path`; renames it onto `path` only if the block succeeds."""
    path = check_writable(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise ReportWriteError(f"cannot write {str(path)!r}: {err.strerror}") from None
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise ReportWriteError(f"could not write {str(path)!r}: {err.strerror}; nothing was written") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: dict) -> Path:
    """Write JSON to a temp file beside `path`, then rename: never a half-written report."""
    text = json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n"
    with atomic_path(path) as tmp:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def _json_default(value):
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def to_json(data: dict) -> str:
    return json.dumps(data, indent=2, default=_json_default)
