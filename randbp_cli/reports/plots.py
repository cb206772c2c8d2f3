"""Figures of reports: matplotlib, headless (Agg), units on every axis, written atomically."""

from __future__ import annotations

import itertools
from collections import defaultdict
from pathlib import Path

from ..errors import ConfigError
from ..run.methods import method_label
from .files import atomic_path
from .load import BenchmarkOutput, merge_profiles, one_kind
from .report import FinetuneReport, ProfileReport, Report, VarianceReport

MiB = 1 << 20
IMAGE_FORMATS = ("png", "svg", "pdf", "jpg", "jpeg", "webp")


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


def _variance_lines(ax, series, layers, markers, colors) -> None:
    for (layer, sketch), rows in series.items():
        color = colors[layers.index(layer) % len(colors)]
        ax.plot([r.step for r in rows], [r.ratio for r in rows], marker=markers[sketch], color=color,
                label=f"{layer} · {sketch}")
    for layer in layers:
        rows = next(rows for (lay, _), rows in series.items() if lay == layer)
        color = colors[layers.index(layer) % len(colors)]
        ax.plot([r.step for r in rows], [r.bound for r in rows], linestyle="--", color=color, alpha=0.7,
                label=f"{layer} · bound (α+1)/α")


def _variance_bands(ax, series, sketches, markers, colors, n_layers: int) -> None:
    import statistics

    def band(rows, value):
        """Steps, and per step the median, lowest and highest `value` over the layers (None: unmeasured)."""
        by_step: dict[int, list[float]] = {}
        for r in rows:
            if (v := value(r)) is not None:
                by_step.setdefault(r.step, []).append(v)
        steps = sorted(by_step)
        return (steps, [statistics.median(by_step[s]) for s in steps], [min(by_step[s]) for s in steps],
                [max(by_step[s]) for s in steps])

    rows_of: dict[str, list] = {}
    for (_, sketch), layer_rows in series.items():
        rows_of.setdefault(sketch, []).extend(layer_rows)
    for index, sketch in enumerate(sketches):
        steps, median, low, high = band(rows_of[sketch], lambda r: r.ratio)
        color = colors[index % len(colors)]
        ax.plot(steps, median, marker=markers[sketch], color=color,
                label=f"{sketch}: median of {n_layers} layers (band: lowest to highest)")
        ax.fill_between(steps, low, high, color=color, alpha=0.2)
    # the bound is the layer's, whatever the sketch: one sketch's records hold every layer's
    steps, median, low, high = band(rows_of[sketches[0]], lambda r: r.bound)
    ax.plot(steps, median, linestyle="--", color="grey", label=f"bound (α+1)/α: median of {n_layers} layers")
    ax.fill_between(steps, low, high, color="grey", alpha=0.1)


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


MAX_LAYER_LINES = 4  # more layers than this are drawn as one band per sketch: 56 lines are no figure


def plot_variance(report: VarianceReport, path, image_format: str = "png") -> None:
    """Ratio over training steps per layer and sketch, with the bound dashed; PNG, headless. Beyond
    MAX_LAYER_LINES layers, each sketch is one line (the median over the layers at each step) in a
    band from the lowest to the highest layer, and the bound likewise."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=100)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    series: dict[tuple[str, str], list] = {}
    for r in report.records:
        series.setdefault((r.layer, r.sketch), []).append(r)
    layers = list(dict.fromkeys(layer for layer, _ in series))
    sketches = list(dict.fromkeys(s for _, s in series))
    markers = dict(zip(sketches, itertools.cycle("os^Dvx*")))  # 7 sketches
    if len(layers) > MAX_LAYER_LINES:
        _variance_bands(ax, series, sketches, markers, colors, len(layers))
    else:
        _variance_lines(ax, series, layers, markers, colors)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_yscale("log")  # the bound runs to thousands when α is small; the ratio sits near 1
    config = report.config or {}
    ax.set_xlabel("training step (optimizer steps)")
    ax.set_ylabel("(k/(B−1)) · D²_RMM / D²_SGD  (dimensionless, log scale)")
    ax.set_title(f"randomized vs SGD gradient variance: {config.get('task', '?')}, {config.get('model', '?')}, "
                 f"ρ = {config.get('rho', '?')}")
    _finish(plt, fig, (ax,), path, image_format, legend_size=7)
