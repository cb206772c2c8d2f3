"""Reports made readable: the rich tables the commands print, Markdown, and matplotlib figures.

Only the CLI renders; every function here takes a typed report (report.py) and returns a
table or writes a figure. Plots are headless (Agg) and carry units on their axes.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from pathlib import Path

from rich.cells import cell_len
from rich.table import Table
from rich.text import Text

from .check import CheckResult
from .errors import ConfigError
from .files import atomic_path
from .methods import method_label
from .report import (BenchmarkOutput, FinetuneReport, FinetuneRun, ProfileReport, Report, VarianceReport, merge_profiles,
                     one_kind)

MiB = 1 << 20
IMAGE_FORMATS = ("png", "svg", "pdf", "jpg", "jpeg", "webp")


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


class ReportTable(Table):
    """A rich table whose first `keys` columns name a row (method, ρ, sketch …): when the table is too
    wide for the terminal, `fit` repeats them in every part it splits the other columns into."""

    def __init__(self, *args, keys: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.keys = keys


def _columns(table: Table, names: list[str], left: tuple[str, ...]) -> None:
    for name in names:
        table.add_column(name, justify="left" if name in left else "right", no_wrap=True)


# ---------------------------------------------------------------------------- fitting a width

# A cell is never cut: rich, given too little width, elides numbers ("912,605,2…"). `fit` instead
# lets headers wrap at spaces, then splits the columns over several tables (the row's key columns
# repeated), and, when even one value column beside the keys does not fit, prints each row as
# `header: value` lines. Widths here are rich's layout: one border per column plus one, and one
# space of padding either side of every cell.


def _cells(column) -> list[str]:
    return [str(cell) for cell in column.cells]


def _width(column, wrap_header: bool) -> int:
    header = str(column.header)
    header_width = max(map(cell_len, header.split() or [""])) if wrap_header else cell_len(header)
    return max([header_width, *map(cell_len, _cells(column))])


def _table_width(columns, wrap_header: bool) -> int:
    return 1 + sum(_width(c, wrap_header) + 3 for c in columns)


def _part(table: Table, columns: list, title: str | None, caption: str | None, wrap_header: bool) -> Table:
    """A copy of `table` with only `columns` (each at a fixed width when headers wrap)."""
    part = Table(title=title, caption=caption, title_justify=table.title_justify,
                 caption_justify=table.caption_justify)
    for column in columns:
        part.add_column(column.header, justify=column.justify, no_wrap=not wrap_header,
                        width=_width(column, True) if wrap_header else None)
    for index, row in enumerate(table.rows):
        part.add_row(*[column._cells[index] for column in columns], style=row.style)
    return part


def _records(table: Table) -> Text:
    """Each row as `header: value` lines (the narrowest form: every value whole, one per line)."""
    text = Text()
    if table.title:
        text.append(f"{table.title}\n", style="bold")
    headers = [" ".join(str(c.header).split()) for c in table.columns]
    for index, row in enumerate(table.rows):
        text.append("\n")
        for header, column in zip(headers, table.columns):
            text.append(f"{header}: ", style="dim")
            text.append(f"{column._cells[index]}\n", style=row.style or "")
    if table.caption:
        text.append(f"\n{table.caption}\n", style="italic")
    return text


def fit(table: Table, width: int | None) -> list:
    """`table` as renderables no wider than `width` (None: any width), every cell whole, and each
    title on one line where the width allows it."""
    return [_title_width(part, width) for part in _fit(table, width)]


def _title_width(part, width: int | None):
    if isinstance(part, Table) and part.title:
        part.min_width = min(cell_len(str(part.title)), width or 1 << 16)
    return part


def _fit(table: Table, width: int | None) -> list:
    columns = list(table.columns)
    if width is None or _table_width(columns, wrap_header=False) <= width:
        return [table]
    if _table_width(columns, wrap_header=True) <= width:
        return [_part(table, columns, table.title, table.caption, wrap_header=True)]
    keys, values = columns[:getattr(table, "keys", 1)], columns[getattr(table, "keys", 1):]
    groups: list[list] = []
    for column in values:
        if groups and _table_width(keys + groups[-1] + [column], wrap_header=True) <= width:
            groups[-1].append(column)
        elif _table_width(keys + [column], wrap_header=True) <= width:
            groups.append([column])
        else:
            return [_records(table)]
    return [_part(table, keys + group, f"{table.title} ({number}/{len(groups)})" if table.title else None,
                  table.caption if number == len(groups) else None, wrap_header=True)
            for number, group in enumerate(groups, 1)]


# ---------------------------------------------------------------------------- profile


# What a run was made under, per report file: where merged reports differ in one of these, the
# table gets a column for it, so two "exact" rows from two runs never look the same.
RUN_FIELDS = {
    "device": lambda report: f"{(report.config or {}).get('device', '?')}",
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
    run_fields = [name for name, get in RUN_FIELDS.items() if len({get(o) for o in merged_from or []}) > 1]
    show_mode = len({r.compile for r in results}) > 1
    show_cuda = any(r.cuda for r in results)
    show_nvml = any((r.nvml or {}).get("available") for r in results)
    show_peak = any(r.checkpointing for r in results)
    show_compiled = any(r.compiled for r in results)
    show_savers = any(r.savers for r in results)
    budget = next((r.budget for r in results if r.budget), None)
    title = (f"randbp profile: {model.get('name', '?')} ({model.get('weights', '?')} weights)"
             + (", interrupted: the cases measured before the stop" if report.status == "interrupted" else ""))
    caption = _merged_caption(merged_from) if merged_from else _profile_caption(report)
    identity = ["report"] * bool(origins) + ["method", "ρ", "sketch"] + ["savers"] * show_savers
    table = ReportTable(title=title, caption=caption, title_justify="left", keys=len(identity),
                        caption_justify="left" if merged_from else "center")
    columns = [*identity, *(["compile"] if show_mode else []), *run_fields, "batch", "seq", "activations MiB",
               "vs exact", *(["compiled MiB"] if show_compiled else [])]
    columns += ["act. peak MiB"] * show_peak + ["CUDA peak MiB"] * show_cuda + ["NVML peak MiB"] * show_nvml
    columns += ["step ms", "time × exact"]
    budget_bytes = (budget or {}).get("budget_bytes")
    columns += [f"max batch ≤ {'?' if budget_bytes is None else f'{budget_bytes / MiB:g}'} MiB"] if budget else []
    _columns(table, columns, left=("report", "method", "sketch", "compile", *run_fields))
    for index, r in enumerate(results):
        saving = r.activation_saving_vs_exact
        baseline = r.method == "exact" and not r.savers
        row = [*([_file_label(origins[index])] if origins else []), r.method, "—" if r.rho is None else f"{r.rho:g}",
               r.sketch or "—", *([", ".join(r.savers or []) or "—"] if show_savers else []),
               *([r.compile or "eager"] if show_mode else []), *[RUN_FIELDS[name](origins[index]) for name in run_fields],
               str(r.batch_size), str(r.seq_len),
               _mib(r.activation_bytes), "baseline" if baseline else ("—" if saving is None else f"{-100 * saving:+.1f}%")]
        if show_compiled:  # what the compiled graphs themselves save (activations MiB: the eager tree)
            row.append(_mib((r.compiled or {}).get("activation_bytes")))
        if show_peak:
            row.append(_mib(r.activation_bytes if r.activation_peak_bytes is None else r.activation_peak_bytes))
        if show_cuda:
            row.append(_mib((r.cuda or {}).get("peak_allocated_bytes")))
        if show_nvml:
            row.append(_mib((r.nvml or {}).get("peak_used_bytes")))
        median, ratio = (r.step_time_s or {}).get("median"), r.time_ratio_vs_exact
        row += ["—" if median is None else f"{1000 * median:,.1f}", "—" if ratio is None else f"{ratio:.2f}×"]
        if budget:
            found = r.budget
            row.append("" if not found else f"{_fmt(found.get('max_batch_size'))}{'+' if found.get('capped') else ''}")
        table.add_row(*row, style="bold" if baseline else None)
    return table


def _file_label(report: Report) -> str:
    return Path(report.source).name if report.source else "?"


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
    lines = [f"{_file_label(r)} ({_count(len(r.results), 'row')}, commit {_commit(r.environment or {})}): "
             f"{_profile_caption(r)}" for r in reports]
    return "\n".join(["vs exact and time × exact: against the exact case of the row's own report", *lines])


# ---------------------------------------------------------------------------- finetune


def finetune_table(report: FinetuneReport) -> Table:
    """The paper's kind of table: task metric, activation MiB, peak MiB, time/step, ratio to exact."""
    task, model, runs = report.task or {}, report.model or {}, report.runs
    metric = runs[0].metric if runs else "metric"
    title = (f"randbp finetune: {task.get('task', '?')} on {model.get('name', '?')} "
             f"({model.get('weights', '?')} weights), status {report.status or '?'}")
    table = ReportTable(title=title, title_justify="left", keys=1)
    show_cuda = any(((r.memory or {}).get("cuda") or {}) for r in runs)
    columns = ["run", "ρ", f"best {metric}", "epoch", f"last {metric}", "activations MiB", "vs exact"]
    columns += ["CUDA peak MiB"] * show_cuda + ["s/step", "tokens/s", "time × exact"]
    _columns(table, columns, left=("run",))
    for r in runs:
        vs, memory, times = r.vs_exact or {}, r.memory or {}, r.time or {}
        best, last = r.best or {}, r.last or {}
        row = [r.name + (" (interrupted)" if r.status == "interrupted" else ""),
               "—" if r.rho is None else f"{r.rho:g}",
               _fmt(best.get("value")), _fmt(best.get("epoch")), _fmt(last.get("value")),
               _mib(memory.get("activation_bytes")),
               "baseline" if r.method == "exact" else _pct(None if vs.get("activation_bytes") is None
                                                          else vs["activation_bytes"] - 1)]
        if show_cuda:
            row.append(_mib((memory.get("cuda") or {}).get("peak_allocated_bytes")))
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
    _columns(table, ["epoch", "steps", "train loss", *[f"{s}:{m}" if several else m for s, m in splits_metrics],
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
        _columns(table, ["step", "layer", "sketch", "k / N", "B", "α", "D²_SGD", "D²_RMM measured ± se",
                         "D²_RMM theory", "ratio", "bound"], left=("layer", "sketch"))
        for r in records:
            table.add_row(str(r.step), r.layer, r.sketch, f"{_fmt(r.k)} / {_fmt(r.rows)}", _fmt(r.real_rows), _fmt(r.alpha),
                          _sci(r.d2_sgd), f"{_sci(r.d2_rmm_measured)} ± {_sci(r.d2_rmm_se, 2)}", _sci(r.d2_rmm_theory),
                          _fmt(r.ratio, 3), _fmt(r.bound, 3))
    else:
        _columns(table, ["layer", "sketch", "steps", "mean α", "ratio mean", "ratio min–max", "mean bound",
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
    _columns(table, ["case", "metric", "baseline", "now", "delta", "delta %", "limit", "status"],
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
        _columns(table, ["result", "check"], left=("result", "check"))
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
        _columns(table, ([""] if any(names) else []) + columns, left=("", *text))
        for name, row in rows:
            table.add_row(*([name or ""] if any(names) else []), *[_cell(row.get(c)) for c in columns])
        tables.append(table)
    return tables


# ---------------------------------------------------------------------------- any report


def tables_for(reports: list[Report | BenchmarkOutput]) -> list[Table]:
    """The same rich tables the commands print, for reports of one kind (profiles merged)."""
    kind = one_kind(reports)
    if kind == "profile":
        return [profile_table(merge_profiles(reports), merged_from=reports if len(reports) > 1 else None)]
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
    _columns(table, ["layer", "bits", "steps", "relative error", "weighted (∂L/∂x)", "expected for N(0,1)"],
             left=("layer",))
    for (layer, bits), rows in groups.items():
        weighted = [e["weighted_relative_error"] for e in rows if e["weighted_relative_error"] is not None]
        table.add_row(layer, str(bits), str(len(rows)), _fmt(sum(e["relative_error"] for e in rows) / len(rows), 4),
                      _fmt(sum(weighted) / len(weighted), 4) if weighted else "—",
                      _fmt(rows[0]["normal_relative_rms_error"], 4))
    return table


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
    caption = "\n\n" + "  \n".join(f"_{line}_" for line in str(table.caption).splitlines()) if table.caption else ""
    return title + "\n".join(lines) + caption


# ---------------------------------------------------------------------------- plots


def check_image_path(path: Path) -> None:
    """Refuse, before any work, a --plot file whose suffix matplotlib cannot write."""
    suffix = path.suffix.lstrip(".").lower()
    if suffix and suffix not in IMAGE_FORMATS:
        raise ConfigError(f"--plot {str(path)!r}: cannot draw a .{suffix} file; use one of "
                          f"{', '.join('.' + f for f in IMAGE_FORMATS)}")


def plottable(reports: list[Report]) -> bool:
    """Whether `reports` hold anything to draw (a run interrupted before its first measurement does not)."""
    return any(getattr(report, report.MAIN) for report in reports)


def check_plottable(reports: list[Report | BenchmarkOutput], path: Path) -> None:
    """Refuse, before anything is printed or written, a --plot of reports that draw nothing."""
    if one_kind(reports) == "benchmark":
        raise ConfigError(f"--plot {str(path)!r}: a benchmark's output has no plot; render its tables without "
                          "--plot, or plot the profile or variance reports a randbp command wrote")
    if not plottable(reports):
        raise ConfigError(f"--plot {str(path)!r}: the report holds no {reports[0].MAIN} to draw")


def write_plot(reports: list[Report], path: Path) -> None:
    """The figure of `reports` (one kind; profiles merged), written atomically; format from the suffix."""
    check_plottable(reports, path)
    kind = one_kind(reports)
    image_format = path.suffix.lstrip(".").lower() or "png"
    with atomic_path(path) as tmp:
        if kind == "profile":
            plot_profile(merge_profiles(reports), tmp, image_format)
        elif kind == "finetune":
            plot_finetune(reports[0], tmp, image_format)
        else:
            plot_variance(reports[0], tmp, image_format)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, axes, path, image_format: str, legend_size: int) -> None:
    """Grid and legend on every axis (an axis with no line has no legend), then write the figure and free it."""
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, format=image_format)
    plt.close(fig)


def _per_mib(value) -> float:
    return float("nan") if value is None else value / MiB  # a gap in the line


def plot_profile(report: ProfileReport, path, image_format: str = "png") -> None:
    """The paper's memory figure: activation MiB vs batch size per method, and time ratio vs exact."""
    plt = _pyplot()
    series: dict[str, list] = defaultdict(list)
    for r in report.results:
        series[f"{method_label(r.method, r.rho, r.sketch)} (seq {r.seq_len})"].append(r)
    fig, (mem, tim) = plt.subplots(1, 2, figsize=(11, 4.8), dpi=100)
    for label, rows in series.items():
        rows = sorted(rows, key=lambda r: r.batch_size)
        batches = [r.batch_size for r in rows]
        style = {"linewidth": 2.5, "color": "black"} if label.startswith("exact") else {"marker": "o"}
        mem.plot(batches, [_per_mib(r.activation_bytes) for r in rows], label=label, **style)
        ratios = [r.time_ratio_vs_exact for r in rows]
        if any(v is not None for v in ratios):
            tim.plot(batches, ratios, label=label, **style)
    model = (report.model or {}).get("name", "?")
    mem.set(xlabel="batch size (sequences)", ylabel="activations saved for backward (MiB)",
            title=f"activation memory: {model}")
    tim.set(xlabel="batch size (sequences)", ylabel="step time / exact step time (×)", title="time vs exact")
    tim.axhline(1.0, color="grey", linewidth=0.8)
    _finish(plt, fig, (mem, tim), path, image_format, legend_size=7)


def plot_finetune(report: FinetuneReport, path, image_format: str = "png") -> None:
    """Training loss and the task metric per epoch, one line per run."""
    plt = _pyplot()
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(11, 4.8), dpi=100)
    metric = "metric"
    for run in report.runs:
        epochs = [e.get("epoch") for e in run.epochs]
        loss_ax.plot(epochs, [e.get("train_loss") for e in run.epochs], marker="o", label=run.name)
        evaluated = [e for e in run.epochs if e.get("eval")]
        metric = run.metric or metric
        values = [next(iter(e["eval"].values())).get(metric) for e in evaluated]  # the first evaluation split
        metric_ax.plot([e.get("epoch") for e in evaluated], values, marker="o", label=run.name)
    task = (report.task or {}).get("task", "?")
    loss_ax.set(xlabel="epoch", ylabel="mean training loss (nats)", title=f"training loss: {task}")
    metric_ax.set(xlabel="epoch", ylabel=f"{metric} (first evaluation split)", title=f"{metric}: {task}")
    _finish(plt, fig, (loss_ax, metric_ax), path, image_format, legend_size=8)


def plot_variance(report: VarianceReport, path, image_format: str = "png") -> None:
    """Ratio over training steps per layer and sketch, with the bound dashed; PNG, headless."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=100)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    series: dict[tuple[str, str], list] = {}
    for r in report.records:
        series.setdefault((r.layer, r.sketch), []).append(r)
    layers = list(dict.fromkeys(layer for layer, _ in series))
    markers = dict(zip(dict.fromkeys(s for _, s in series), itertools.cycle("os^Dvx*")))  # 7 sketches
    for (layer, sketch), rows in series.items():
        color = colors[layers.index(layer) % len(colors)]
        ax.plot([r.step for r in rows], [r.ratio for r in rows], marker=markers[sketch], color=color,
                label=f"{layer} · {sketch}")
    for layer in layers:
        rows = next(rows for (lay, _), rows in series.items() if lay == layer)
        color = colors[layers.index(layer) % len(colors)]
        ax.plot([r.step for r in rows], [r.bound for r in rows], linestyle="--", color=color, alpha=0.7,
                label=f"{layer} · bound (α+1)/α")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_yscale("log")  # the bound runs to thousands when α is small; the ratio sits near 1
    config = report.config or {}
    ax.set_xlabel("training step (optimizer steps)")
    ax.set_ylabel("(k/(B−1)) · D²_RMM / D²_SGD  (dimensionless, log scale)")
    ax.set_title(f"randomized vs SGD gradient variance: {config.get('task', '?')}, {config.get('model', '?')}, "
                 f"ρ = {config.get('rho', '?')}")
    _finish(plt, fig, (ax,), path, image_format, legend_size=7)
