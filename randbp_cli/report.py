"""Reports: the environment block, atomic JSON files, and the rich tables the CLI prints.

Serialisation and rendering live here, apart from the measurements; every report carries a
`schema` with a version, the environment and the config, and keeps units in key names.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.table import Table

from .errors import OutputError, ReportWriteError

MiB = 1 << 20


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> dict | None:
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
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


# ---------------------------------------------------------------------------- tables


def _mib(value: float | None) -> str:
    return "—" if value is None else f"{value / MiB:,.1f}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:+.1f}%"


def profile_table(report: dict) -> Table:
    """The `randbp profile` table: one row per case, savings and ratios vs exact."""
    results = report["results"]
    model = report.get("model", {})
    show_cuda = any(r.get("cuda") for r in results)
    show_nvml = any((r.get("nvml") or {}).get("available") for r in results)
    show_peak = any(r.get("checkpointing") for r in results)
    show_budget = any(r.get("budget") for r in results)
    title = f"randbp profile: {model.get('name', '?')} ({model.get('weights', '?')} weights)"
    table = Table(title=title, caption=_profile_caption(report), title_justify="left")
    for column, justify in [("method", "left"), ("ρ", "right"), ("sketch", "left"), ("batch", "right"),
                            ("seq", "right"), ("activations MiB", "right"), ("vs exact", "right")]:
        table.add_column(column, justify=justify, no_wrap=True)
    if show_peak:
        table.add_column("act. peak MiB", justify="right", no_wrap=True)
    if show_cuda:
        table.add_column("CUDA peak MiB", justify="right", no_wrap=True)
    if show_nvml:
        table.add_column("NVML peak MiB", justify="right", no_wrap=True)
    table.add_column("step ms", justify="right", no_wrap=True)
    table.add_column("time × exact", justify="right", no_wrap=True)
    if show_budget:
        budget = next(r["budget"] for r in results if r.get("budget"))
        table.add_column(f"max batch ≤ {budget['budget_bytes'] / MiB:g} MiB", justify="right", no_wrap=True)
    for r in results:
        saving = r.get("activation_saving_vs_exact")
        row = [r["method"], "—" if r["rho"] is None else f"{r['rho']:g}", r.get("sketch") or "—",
               str(r["batch_size"]), str(r["seq_len"]), _mib(r["activation_bytes"]),
               "baseline" if r["method"] == "exact" else ("—" if saving is None else f"{-100 * saving:+.1f}%")]
        if show_peak:
            row.append(_mib(r.get("activation_peak_bytes", r["activation_bytes"])))
        if show_cuda:
            row.append(_mib((r.get("cuda") or {}).get("peak_allocated_bytes")))
        if show_nvml:
            row.append(_mib((r.get("nvml") or {}).get("peak_used_bytes")))
        median = (r.get("step_time_s") or {}).get("median")
        ratio = r.get("time_ratio_vs_exact")
        row += ["—" if median is None else f"{1000 * median:,.1f}", "—" if ratio is None else f"{ratio:.2f}×"]
        if show_budget:
            found = r.get("budget")
            row.append("" if not found else f"{found['max_batch_size']}{'+' if found['capped'] else ''}")
        table.add_row(*row, style="bold" if r["method"] == "exact" else None)
    return table


def _profile_caption(report: dict) -> str:
    config, env = report.get("config", {}), report.get("environment", {})
    parts = [f"device {config.get('device', '?')} ({env.get('device_name', '?')})",
             f"dtype {config.get('dtype', '?')}",
             f"median of {config.get('steps', '?')} steps after {config.get('warmup', '?')} warm-up"]
    nvml = env.get("nvml") or {}
    if config.get("device", "cpu").startswith("cuda") and not nvml.get("available"):
        parts.append(f"NVML unavailable: {nvml.get('reason', 'unknown')}")
    return "; ".join(parts)


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def finetune_table(report: dict) -> Table:
    """The paper's kind of table: task metric, activation MiB, peak MiB, time/step, ratio to exact."""
    task = report.get("task", {})
    model = report.get("model", {})
    runs = report["runs"]
    metric = runs[0]["metric"] if runs else "metric"
    title = (f"randbp finetune: {task.get('task', '?')} on {model.get('name', '?')} "
             f"({model.get('weights', '?')} weights), status {report.get('status', '?')}")
    table = Table(title=title, title_justify="left")
    show_cuda = any((r["memory"].get("cuda") or {}) for r in runs)
    columns = ["run", "ρ", f"best {metric}", "epoch", f"last {metric}", "activations MiB", "vs exact"]
    if show_cuda:
        columns += ["CUDA peak MiB"]
    columns += ["s/step", "tokens/s", "time × exact"]
    for column in columns:
        table.add_column(column, justify="left" if column == "run" else "right", no_wrap=True)
    for r in runs:
        vs = r.get("vs_exact", {})
        best, last = r.get("best") or {}, r.get("last") or {}
        row = [r["name"] + (" (interrupted)" if r["status"] == "interrupted" else ""),
               "—" if r["rho"] is None else f"{r['rho']:g}",
               _fmt(best.get("value")), _fmt(best.get("epoch")), _fmt(last.get("value")),
               _mib(r["memory"].get("activation_bytes")),
               "baseline" if r["method"] == "exact" else _pct(None if "activation_bytes" not in vs
                                                              else vs["activation_bytes"] - 1)]
        if show_cuda:
            row.append(_mib((r["memory"].get("cuda") or {}).get("peak_allocated_bytes")))
        step_time = r["time"].get("step_time_s")
        tokens_per_s = r["time"].get("tokens_per_s")
        row += [_fmt(step_time, 3), "—" if tokens_per_s is None else f"{tokens_per_s:,.0f}",
                "—" if "step_time" not in vs else f"{vs['step_time']:.2f}×"]
        table.add_row(*row, style="bold" if r["method"] == "exact" else None)
    return table


def epoch_table(run: dict) -> Table:
    """One run's epochs: train loss and every evaluation metric per split."""
    table = Table(title=f"{run['name']}: per epoch", title_justify="left")
    splits_metrics: list[tuple[str, str]] = []
    for entry in run["epochs"]:
        for split, metrics in (entry.get("eval") or {}).items():
            for name in metrics:
                if (split, name) not in splits_metrics:
                    splits_metrics.append((split, name))
    several = len({s for s, _ in splits_metrics}) > 1
    for column in ["epoch", "steps", "train loss", *[f"{s}:{m}" if several else m for s, m in splits_metrics],
                   "train s"]:
        table.add_column(column, justify="right", no_wrap=True)
    for entry in run["epochs"]:
        evals = entry.get("eval") or {}
        table.add_row(str(entry["epoch"]) + (" (partial)" if entry.get("partial") else ""), str(entry["steps"]),
                      _fmt(entry["train_loss"]),
                      *[_fmt((evals.get(s) or {}).get(m)) for s, m in splits_metrics],
                      _fmt(entry.get("train_time_s"), 1))
    return table


def _sci(value) -> str:
    return "—" if value is None else f"{value:.3g}"


def variance_table(report: dict, max_rows: int = 40) -> Table:
    """Every (step, layer, sketch) record, or, for long runs, the per-(layer, sketch) summary."""
    config = report.get("config", {})
    records = report["records"]
    title = (f"randbp variance: {config.get('task', '?')} on {config.get('model', '?')}, ρ = {config.get('rho', '?')}, "
             f"{config.get('repeats', '?')} repeats")
    table = Table(title=title, title_justify="left",
                  caption="ratio = (k/(B−1))·D²_RMM/D²_SGD (measured); bound = (α+1)/α (paper, Theorem 1)")
    if len(records) <= max_rows:
        for column in ["step", "layer", "sketch", "k / B", "α", "D²_SGD", "D²_RMM measured ± se",
                       "D²_RMM theory", "ratio", "bound"]:
            table.add_column(column, justify="left" if column in ("layer", "sketch") else "right", no_wrap=True)
        for r in records:
            table.add_row(str(r["step"]), r["layer"], r["sketch"], f"{r['k']} / {r['rows']}", f"{r['alpha']:.4f}",
                          _sci(r["d2_sgd"]), f"{r['d2_rmm_measured']:.3g} ± {r['d2_rmm_se']:.2g}",
                          _sci(r["d2_rmm_theory"]), _fmt(r["ratio"], 3), _fmt(r["bound"], 3))
    else:
        for column in ["layer", "sketch", "steps", "mean α", "ratio mean", "ratio min–max", "mean bound",
                       "within bound"]:
            table.add_column(column, justify="left" if column in ("layer", "sketch") else "right", no_wrap=True)
        for s in report["summary"]:
            table.add_row(s["layer"], s["sketch"], str(s["steps"]), f"{s['alpha_mean']:.4f}", _fmt(s["ratio_mean"], 3),
                          f"{_fmt(s['ratio_min'], 3)}–{_fmt(s['ratio_max'], 3)}", _fmt(s["bound_mean"], 3),
                          "yes" if s["within_bound"] else "no")
    return table


# ---------------------------------------------------------------------------- any report


def report_kind(report: dict) -> str:
    """'profile', 'finetune' or 'variance' from the schema."""
    return report["schema"].removeprefix("randbp.").split("/")[0]


def merge_profiles(reports: list[dict]) -> dict:
    """Several profile reports as one comparison (results concatenated, each tagged with its file)."""
    if len(reports) == 1:
        return reports[0]
    merged = dict(reports[0])
    merged["results"] = [r for report in reports for r in report["results"]]
    names = list(dict.fromkeys((rep.get("model") or {}).get("name", "?") for rep in reports))
    merged["model"] = {**(reports[0].get("model") or {}), "name": ", ".join(names)}
    return merged


def tables_for(reports: list[dict]) -> list[Table]:
    """The same rich tables the commands print, for reports of one kind (profiles merged)."""
    kinds = {report_kind(r) for r in reports}
    if len(kinds) > 1:
        from .errors import ConfigError

        raise ConfigError(f"cannot merge reports of different kinds ({', '.join(sorted(kinds))}): "
                          "render each kind separately")
    kind = kinds.pop()
    if kind == "profile":
        return [profile_table(merge_profiles(reports))]
    if kind == "finetune":
        tables = []
        for report in reports:
            tables += [epoch_table(run) for run in report["runs"]] + [finetune_table(report)]
        return tables
    return [variance_table(report) for report in reports]


def table_to_markdown(table: Table) -> str:
    """A GitHub-flavoured Markdown table with the rich table's headers and cells."""

    def clean(cell) -> str:
        return str(cell).replace("|", "\\|").replace("\n", " ")

    headers = [clean(c.header) for c in table.columns]
    align = ["---:" if c.justify == "right" else "---" for c in table.columns]
    rows = list(zip(*[[clean(cell) for cell in c.cells] for c in table.columns]))
    lines = [f"| {' | '.join(headers)} |", f"| {' | '.join(align)} |"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    title = f"**{table.title}**\n\n" if table.title else ""
    caption = f"\n\n_{table.caption}_" if table.caption else ""
    return title + "\n".join(lines) + caption


def check_table(result, show_all: bool = False) -> Table:
    """Every metric that moved (or all with `show_all`): baseline, now, delta, delta %, limit."""
    table = Table(title=f"randbp check: {result.matched} case(s) compared", title_justify="left")
    for column in ["case", "metric", "baseline", "now", "delta", "delta %", "limit", "status"]:
        table.add_column(column, justify="left" if column in ("case", "metric", "status") else "right", no_wrap=True)

    def value(metric: str, number) -> str:
        if number is None:
            return "—"
        return f"{number * 1000:,.1f} ms" if metric == "step_time_s" else f"{number:,.0f} B"

    for change in result.changes:
        moved = change.current != change.baseline
        if not (show_all or change.status in ("regressed", "improved") or (change.status == "info" and moved
                                                                            and change.metric != "step_time_s")):
            continue
        pct = change.delta_pct
        style = {"regressed": "bold red", "improved": "green"}.get(change.status)
        table.add_row(change.case, change.metric, value(change.metric, change.baseline),
                      value(change.metric, change.current),
                      ("+" if change.delta > 0 else "") + value(change.metric, change.delta),
                      "—" if pct is None else f"{pct:+.2f}%", value(change.metric, change.limit), change.status,
                      style=style)
    return table
