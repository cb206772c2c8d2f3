"""Reports made readable: the rich tables the commands print, one builder per report kind.

Only the CLI renders; every function here takes a typed report (report.py) and returns tables
(tables.py fits them to a width and writes Markdown; plots.py draws the figures).
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from .load import BenchmarkOutput, merge_profiles, one_kind
from .record import RunMemory
from .report import CheckResult, FinetuneReport, FinetuneRun, ProfileReport, Report, VarianceReport
from .tables import ReportTable, add_columns

MiB = 1 << 20


def _mib(value: float | None) -> str:
    return "—" if value is None else f"{value / MiB:,.1f}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:+.1f}%"


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _sci(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


# ---------------------------------------------------------------------------- profile


# What a run was made under, per report file: where merged reports differ in one of these, the
# table gets a column for it, so two "exact" rows from two runs never look the same.
RUN_FIELDS = {
    "device": lambda report: f"{(report.config or {}).get('device', '?')}",
    "device name": lambda report: f"{(report.environment or {}).get('device_name', '?')}",
    "dtype": lambda report: f"{(report.config or {}).get('dtype', '?')}",
    "torch": lambda report: f"{(report.environment or {}).get('torch', '?')}",
    "commit": lambda report: _commit(report.environment or {}),
}


def _commit(environment: dict) -> str:
    git = environment.get("git") or {}
    return f"{(git.get('commit') or '?')[:7]}{' dirty' if git.get('dirty') else ''}"


def profile_table(report: ProfileReport, merged_from: list[ProfileReport] | None = None) -> Table:
    """The `randbp profile` table: one row per case, savings and ratios vs exact. `merged_from`: the
    reports `report` merges (`randbp report a.json b.json`): each row then names its file, and what
    differs between the runs (compile mode, savers, device, dtype, torch, commit) gets a column."""
    results = report.results
    model = report.model or {}
    origins = [source for source in merged_from or [] for _ in source.results]
    labels = _file_labels(merged_from or [])
    run_fields = [name for name, get in RUN_FIELDS.items() if len({get(o) for o in merged_from or []}) > 1]
    show_mode = len({r.compile for r in results}) > 1
    show_cuda = any(r.cuda for r in results)
    show_nvml = any(r.nvml is not None and r.nvml.available for r in results)
    show_peak = any(r.checkpointing for r in results)
    show_compiled = any(r.compiled for r in results)
    show_savers = any(r.savers for r in results)
    budget = next((r.budget for r in results if r.budget), None)
    title = (f"randbp profile: {model.get('name', '?')} ({model.get('weights', '?')} weights)"
             + (", interrupted: the cases measured before the stop"
                if report.status == "interrupted" and not merged_from else ""))
    caption = _merged_caption(merged_from) if merged_from else _profile_caption(report)
    identity = ["report"] * bool(origins) + ["method", "ρ", "sketch"] + ["savers"] * show_savers
    table = ReportTable(title=title, caption=caption, title_justify="left", keys=len(identity),
                        caption_justify="left" if merged_from else "center")
    columns = [*identity, *(["compile"] if show_mode else []), *run_fields, "batch", "seq", "activations MiB",
               "vs exact", *(["compiled MiB"] if show_compiled else [])]
    columns += ["act. peak MiB"] * show_peak + ["CUDA peak MiB"] * show_cuda + ["NVML peak MiB"] * show_nvml
    columns += ["step ms", "time × exact"]
    budget_bytes = budget.budget_bytes if budget else None
    over_seq = budget is not None and budget.over == "seq"
    searched = f"max seq (b={_fmt(budget.batch_size)})" if over_seq else "max batch"
    columns += [f"{searched} ≤ {'?' if budget_bytes is None else f'{budget_bytes / MiB:g}'} MiB"] if budget else []
    add_columns(table, columns, left=("report", "method", "sketch", "compile", *run_fields))
    for index, r in enumerate(results):
        saving = r.activation_saving_vs_exact
        baseline = r.method == "exact" and not r.savers
        row = [*([labels[id(origins[index])]] if origins else []), r.method, "—" if r.rho is None else f"{r.rho:g}",
               r.sketch or "—", *([", ".join(r.savers or []) or "—"] if show_savers else []),
               *([r.compile or "eager"] if show_mode else []), *[RUN_FIELDS[name](origins[index]) for name in run_fields],
               str(r.batch_size), str(r.seq_len),
               _mib(r.activation_bytes), "baseline" if baseline else ("—" if saving is None else f"{-100 * saving:+.1f}%")]
        if show_compiled:  # what the compiled graphs themselves save (activations MiB: the eager tree)
            row.append(_mib((r.compiled or {}).get("activation_bytes")))
        if show_peak:
            row.append(_mib(r.activation_bytes if r.activation_peak_bytes is None else r.activation_peak_bytes))
        if show_cuda:
            row.append(_mib(r.cuda and r.cuda.peak_allocated_bytes))
        if show_nvml:
            row.append(_mib(r.nvml and r.nvml.peak_used_bytes))
        median, ratio = r.step_time_s and r.step_time_s.median, r.time_ratio_vs_exact
        row += ["—" if median is None else f"{1000 * median:,.1f}", "—" if ratio is None else f"{ratio:.2f}×"]
        if budget:
            found = r.budget
            largest = found and (found.max_seq_len if over_seq else found.max_batch_size)
            row.append("" if not found else f"{_fmt(largest)}{'+' if found.capped else ''}")
        table.add_row(*row, style="bold" if baseline else None)
    return table


# A kind's column header: what the bytes are, for a reader who has not read the README
KIND_HEADERS = {"linear_inputs": "linear inputs", "linear_inputs_shared": "kept by another op too",
                "weight_copies": "weight copies", "attention_probs": "attention probs (saver)",
                "gelu_codes": "GELU codes (saver)", "dropout_seeds": "dropout seeds (saver)"}


def kinds_table(report: ProfileReport, merged_from: list[ProfileReport] | None = None) -> Table | None:
    """Where each case's activations go: MiB by kind (memory.py's kinds; the kinds no case saves
    are left out). None for reports made before the kinds were recorded."""
    results = [r for r in report.results if r.activation_bytes_by_kind]
    if not results:
        return None
    kinds = [kind for kind in dict.fromkeys(k for r in results for k in r.activation_bytes_by_kind)
             if any(r.activation_bytes_by_kind.get(kind) for r in results)]
    origins = {id(r): source for source in merged_from or [] for r in source.results}
    labels = _file_labels(merged_from or [])
    show_savers = any(r.savers for r in results)
    identity = ["report"] * bool(origins) + ["method", "ρ", "sketch"] + ["savers"] * show_savers + ["batch", "seq"]
    table = ReportTable(title="activations by kind, MiB", title_justify="left", keys=len(identity))
    add_columns(table, [*identity, *(KIND_HEADERS.get(kind, kind) for kind in kinds), "total"],
                left=("report", "method", "sketch", "savers"))
    for r in results:
        row = [*([labels[id(origins[id(r)])]] if origins else []), r.method, "—" if r.rho is None else f"{r.rho:g}",
               r.sketch or "—", *([", ".join(r.savers or []) or "—"] if show_savers else []),
               str(r.batch_size), str(r.seq_len)]
        row += [_mib(r.activation_bytes_by_kind.get(kind, 0)) for kind in kinds] + [_mib(r.activation_bytes)]
        table.add_row(*row, style="bold" if r.method == "exact" and not r.savers else None)
    return table


def _file_labels(reports: list[Report]) -> dict[int, str]:
    """Each report's file name, or its path as given where two share a name (a/p.json, b/p.json)."""
    names = [Path(r.source).name if r.source else "?" for r in reports]
    return {id(r): (str(r.source) if names.count(name) > 1 and r.source else name) for r, name in zip(reports, names)}


def _count(count, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _profile_caption(report: ProfileReport) -> str:
    config, env = report.config or {}, report.environment or {}
    parts = [f"device {config.get('device', '?')} ({env.get('device_name', '?')})",
             f"dtype {config.get('dtype', '?')}",
             f"median of {_count(config.get('steps', '?'), 'step')} after {config.get('warmup', '?')} warm-up"]
    modes = {r.compile for r in report.results if r.compile}
    if modes:
        parts.append(f"torch.compile mode {', '.join(sorted(modes))}: activations counted on the eager module "
                     "tree, compiled MiB saved by the compiled graphs")
    nvml = env.get("nvml") or {}
    if (config.get("device") or "cpu").startswith("cuda") and not nvml.get("available"):
        parts.append(f"NVML unavailable: {nvml.get('reason', 'unknown')}")
    return "; ".join(parts)


def _merged_caption(reports: list[ProfileReport]) -> str:
    """One line per merged file: its rows' run (each vs exact and time × exact is against its own file's exact)."""
    labels = _file_labels(reports)
    lines = [f"{labels[id(r)]} ({_count(len(r.results), 'row')}, commit {_commit(r.environment or {})}"
             f"{', interrupted' if r.status == 'interrupted' else ''}): {_profile_caption(r)}" for r in reports]
    return "\n".join(["vs exact and time × exact: against the exact case of the row's own report", *lines])


# ---------------------------------------------------------------------------- finetune


def finetune_table(report: FinetuneReport) -> Table:
    """The paper's kind of table: task metric, activation MiB, peak MiB, time/step, ratio to exact."""
    task, model, runs = report.task or {}, report.model or {}, report.runs
    metric = runs[0].metric if runs else "metric"
    title = (f"randbp finetune: {task.get('task', '?')} on {model.get('name', '?')} "
             f"({model.get('weights', '?')} weights), status {report.status or '?'}")
    table = ReportTable(title=title, title_justify="left", keys=1)
    show_cuda = any(r.memory is not None and r.memory.cuda is not None for r in runs)
    columns = ["run", "ρ", f"best {metric}", "epoch", f"last {metric}", "activations MiB", "vs exact"]
    columns += ["CUDA peak MiB"] * show_cuda + ["s/step", "tokens/s", "time × exact"]
    add_columns(table, columns, left=("run",))
    for r in runs:
        vs, memory, times = r.vs_exact or {}, r.memory or RunMemory(), r.time or {}
        best, last = r.best or {}, r.last or {}
        row = [r.name + (" (interrupted)" if r.status == "interrupted" else ""),
               "—" if r.rho is None else f"{r.rho:g}",
               _fmt(best.get("value")), _fmt(best.get("epoch")), _fmt(last.get("value")),
               _mib(memory.activation_bytes),
               "baseline" if r.method == "exact" else _pct(None if vs.get("activation_bytes") is None
                                                          else vs["activation_bytes"] - 1)]
        if show_cuda:
            row.append(_mib(memory.cuda and memory.cuda.peak_allocated_bytes))
        tokens_per_s = times.get("tokens_per_s")
        row += [_fmt(times.get("step_time_s"), 3), "—" if tokens_per_s is None else f"{tokens_per_s:,.0f}",
                "—" if vs.get("step_time") is None else f"{vs['step_time']:.2f}×"]
        table.add_row(*row, style="bold" if r.method == "exact" else None)
    return table


def epoch_table(run: FinetuneRun) -> Table:
    """One run's epochs: train loss and every evaluation metric per split."""
    table = ReportTable(title=f"{run.name}: per epoch", title_justify="left", keys=1)
    splits_metrics: list[tuple[str, str]] = []
    for entry in run.epochs:
        for split, metrics in (entry.get("eval") or {}).items():
            for name in metrics:
                if (split, name) not in splits_metrics:
                    splits_metrics.append((split, name))
    several = len({s for s, _ in splits_metrics}) > 1
    add_columns(table, ["epoch", "steps", "train loss", *[f"{s}:{m}" if several else m for s, m in splits_metrics],
                     "train s"], left=())
    for entry in run.epochs:
        evals = entry.get("eval") or {}
        table.add_row(_fmt(entry.get("epoch")) + (" (partial)" if entry.get("partial") else ""),
                      _fmt(entry.get("steps")), _fmt(entry.get("train_loss")),
                      *[_fmt((evals.get(s) or {}).get(m)) for s, m in splits_metrics],
                      _fmt(entry.get("train_time_s"), 1))
    return table


def finetune_tables(report: FinetuneReport) -> list[Table]:
    """Every run's epochs, then the runs side by side (what `randbp finetune` prints)."""
    return [*[epoch_table(run) for run in report.runs], finetune_table(report)]


# ---------------------------------------------------------------------------- variance


def variance_table(report: VarianceReport, max_rows: int = 40) -> Table:
    """Every (step, layer, sketch) record, or, for long runs, the per-(layer, sketch) summary."""
    config, records = report.config or {}, report.records
    title = (f"randbp variance: {config.get('task', '?')} on {config.get('model', '?')}, ρ = {config.get('rho', '?')}, "
             f"{config.get('repeats', '?')} repeats")
    detailed = len(records) <= max_rows
    table = ReportTable(title=title, title_justify="left", keys=3 if detailed else 2,
                        caption="ratio = (k/(B−1))·D²_RMM/D²_SGD (measured); bound = (α+1)/α (paper, Theorem 1)")
    if detailed:
        # k is drawn over all N rows the layer sees; B (the SGD samples) counts the real ones
        add_columns(table, ["step", "layer", "sketch", "k / N", "B", "α", "D²_SGD", "D²_RMM measured ± se",
                         "D²_RMM theory", "ratio", "bound"], left=("layer", "sketch"))
        for r in records:
            table.add_row(str(r.step), r.layer, r.sketch, f"{_fmt(r.k)} / {_fmt(r.rows)}", _fmt(r.real_rows), _fmt(r.alpha),
                          _sci(r.d2_sgd), f"{_sci(r.d2_rmm_measured)} ± {_sci(r.d2_rmm_se, 2)}", _sci(r.d2_rmm_theory),
                          _fmt(r.ratio, 3), _fmt(r.bound, 3))
    else:
        add_columns(table, ["layer", "sketch", "steps", "mean α", "ratio mean", "ratio min–max", "mean bound",
                         "within bound"], left=("layer", "sketch"))
        for s in report.summary:
            table.add_row(s.layer, s.sketch, _fmt(s.steps), _fmt(s.alpha_mean), _fmt(s.ratio_mean, 3),
                          f"{_fmt(s.ratio_min, 3)}–{_fmt(s.ratio_max, 3)}", _fmt(s.bound_mean, 3),
                          {True: "yes", False: "no"}.get(s.within_bound, "—"))
    return table


# ---------------------------------------------------------------------------- check


def check_table(result: CheckResult, show_all: bool = False) -> Table:
    """Every metric that moved (or all with `show_all`): baseline, now, delta, delta %, limit."""
    table = ReportTable(title=f"randbp check: {result.matched} case(s) compared", title_justify="left", keys=2)
    add_columns(table, ["case", "metric", "baseline", "now", "delta", "delta %", "limit", "status"],
             left=("case", "metric", "status"))

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


# ---------------------------------------------------------------------------- benchmark outputs


def _cell(value) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return {True: "yes", False: "no", None: "—"}.get(value, value) if not isinstance(value, str) else value
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4g}"
    return f"{int(value):,}" if isinstance(value, (int, float)) else "…"  # an object or list: not a cell


def benchmark_tables(output: BenchmarkOutput) -> list[Table]:
    """A benchmark's checks (PASS/FAIL), every report it embeds as its command prints it (titled by
    where it sits in the file), then each of its other lists of records as a plain table."""
    tables = []
    if output.checks:
        passed = sum(check.get("passed") is True for check in output.checks)
        title = f"{output.schema}: {passed} of {len(output.checks)} checks pass"
        table = ReportTable(title=title, title_justify="left", caption=output.command, keys=1)
        add_columns(table, ["result", "check"], left=("result", "check"))
        for check in output.checks:
            ok = check.get("passed")
            table.add_row({True: "PASS", False: "FAIL"}.get(ok, "—"), _cell(check.get("check")),
                          style=None if ok else "bold red")
        tables.append(table)
    for where, report in output.reports:
        for table in tables_for([report]):
            table.title = f"{where}: {table.title}"
            tables.append(table)
    for key, rows in output.tables:
        names = [name for name, _ in rows]
        columns = list(dict.fromkeys(k for _, row in rows for k, v in row.items() if not isinstance(v, (dict, list))))
        table = ReportTable(title=key, title_justify="left", keys=1)
        text = [c for c in columns if all(isinstance(row.get(c), (str, type(None))) for _, row in rows)]
        add_columns(table, ([""] if any(names) else []) + columns, left=("", *text))
        for name, row in rows:
            table.add_row(*([name or ""] if any(names) else []), *[_cell(row.get(c)) for c in columns])
        tables.append(table)
    return tables


# ---------------------------------------------------------------------------- any report


def tables_for(reports: list[Report | BenchmarkOutput]) -> list[Table]:
    """The same rich tables the commands print, for reports of one kind (profiles merged)."""
    kind = one_kind(reports)
    if kind == "profile":
        merged, sources = merge_profiles(reports), reports if len(reports) > 1 else None
        by_kind = kinds_table(merged, merged_from=sources)
        return [profile_table(merged, merged_from=sources)] + ([by_kind] if by_kind is not None else [])
    if kind == "finetune":
        return [table for report in reports for table in finetune_tables(report)]
    if kind == "benchmark":
        return [table for output in reports for table in benchmark_tables(output)]
    return [table for report in reports for table in variance_tables(report)]


def variance_tables(report: VarianceReport) -> list[Table]:
    """The variance table, and with a few-bit GELU the table of its gradient error beside it."""
    return [variance_table(report)] + ([gelu_error_table(report)] if report.gelu_errors else [])


def gelu_error_table(report: VarianceReport) -> Table:
    """Per few-bit GELU module, over the measured steps: the b-bit derivative's relative error."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for e in report.gelu_errors or []:
        groups.setdefault((e["layer"], e["bits"]), []).append(e)
    table = ReportTable(title="few-bit GELU: gradient error on the real GELU inputs", title_justify="left", keys=2,
                        caption="‖q(x) − GELU′(x)‖/‖GELU′(x)‖, weighted: of ∂L/∂x itself (upstream gradient ⊙); "
                                "N(0,1): what the levels were fitted to")
    add_columns(table, ["layer", "bits", "steps", "relative error", "weighted (∂L/∂x)", "expected for N(0,1)"],
             left=("layer",))
    for (layer, bits), rows in groups.items():
        weighted = [e["weighted_relative_error"] for e in rows if e["weighted_relative_error"] is not None]
        table.add_row(layer, str(bits), str(len(rows)), _fmt(sum(e["relative_error"] for e in rows) / len(rows), 4),
                      _fmt(sum(weighted) / len(weighted), 4) if weighted else "—",
                      _fmt(rows[0]["normal_relative_rms_error"], 4))
    return table
