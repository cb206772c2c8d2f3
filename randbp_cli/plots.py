"""Headless matplotlib figures for every report kind (PNG by default), with units on the axes."""

from __future__ import annotations

from collections import defaultdict

MiB = 1 << 20


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, axes, path, image_format: str, legend_size: int) -> None:
    """Grid and legend on every axis, then write the figure and free it."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, format=image_format)
    plt.close(fig)


def plot_profile(report: dict, path, image_format: str = "png") -> None:
    """The paper's memory figure: activation MiB vs batch size per method, and time ratio vs exact."""
    plt = _pyplot()
    from .profiling import method_label

    series: dict[str, list[dict]] = defaultdict(list)
    for r in report["results"]:
        series[f"{method_label(r['method'], r['rho'], r['sketch'])} (seq {r['seq_len']})"].append(r)
    fig, (mem, tim) = plt.subplots(1, 2, figsize=(11, 4.8), dpi=100)
    for label, rows in series.items():
        rows = sorted(rows, key=lambda r: r["batch_size"])
        batches = [r["batch_size"] for r in rows]
        style = {"linewidth": 2.5, "color": "black"} if label.startswith("exact") else {"marker": "o"}
        mem.plot(batches, [r["activation_bytes"] / MiB for r in rows], label=label, **style)
        ratios = [r.get("time_ratio_vs_exact") for r in rows]
        if any(v is not None for v in ratios):
            tim.plot(batches, ratios, label=label, **style)
    model = (report.get("model") or {}).get("name", "?")
    mem.set(xlabel="batch size (sequences)", ylabel="activations saved for backward (MiB)",
            title=f"activation memory: {model}")
    tim.set(xlabel="batch size (sequences)", ylabel="step time / exact step time (×)", title="time vs exact")
    tim.axhline(1.0, color="grey", linewidth=0.8)
    _finish(plt, fig, (mem, tim), path, image_format, legend_size=7)


def plot_finetune(report: dict, path, image_format: str = "png") -> None:
    """Training loss and the task metric per epoch, one line per run."""
    plt = _pyplot()
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(11, 4.8), dpi=100)
    metric = "metric"
    for run in report["runs"]:
        epochs = [e["epoch"] for e in run["epochs"]]
        loss_ax.plot(epochs, [e["train_loss"] for e in run["epochs"]], marker="o", label=run["name"])
        evaluated = [e for e in run["epochs"] if e.get("eval")]
        metric = run.get("metric", metric)
        values = []
        for e in evaluated:
            split = next(iter(e["eval"]))
            values.append(e["eval"][split].get(metric))
        metric_ax.plot([e["epoch"] for e in evaluated], values, marker="o", label=run["name"])
    task = (report.get("task") or {}).get("task", "?")
    loss_ax.set(xlabel="epoch", ylabel="mean training loss (nats)", title=f"training loss: {task}")
    metric_ax.set(xlabel="epoch", ylabel=f"{metric} (first evaluation split)", title=f"{metric}: {task}")
    _finish(plt, fig, (loss_ax, metric_ax), path, image_format, legend_size=8)


def plot_variance(report: dict, path, image_format: str = "png") -> None:
    """Ratio over training steps per layer and sketch, with the bound dashed; PNG, headless."""
    plt = _pyplot()
    records = report["records"]
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=100)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    series: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        series.setdefault((r["layer"], r["sketch"]), []).append(r)
    layers = list(dict.fromkeys(layer for layer, _ in series))
    markers = dict(zip(dict.fromkeys(s for _, s in series), "os^Dvx"))
    for (layer, sketch), rows in series.items():
        color = colors[layers.index(layer) % len(colors)]
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["ratio"] for r in rows], marker=markers[sketch], color=color, label=f"{layer} · {sketch}")
    for layer in layers:
        rows = next(rows for (lay, _), rows in series.items() if lay == layer)
        color = colors[layers.index(layer) % len(colors)]
        ax.plot([r["step"] for r in rows], [r["bound"] for r in rows], linestyle="--", color=color, alpha=0.7,
                label=f"{layer} · bound (α+1)/α")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_yscale("log")  # the bound runs to thousands when α is small; the ratio sits near 1
    config = report.get("config", {})
    ax.set_xlabel("training step (optimizer steps)")
    ax.set_ylabel("(k/(B−1)) · D²_RMM / D²_SGD  (dimensionless, log scale)")
    ax.set_title(f"randomized vs SGD gradient variance: {config.get('task', '?')}, {config.get('model', '?')}, "
                 f"ρ = {config.get('rho', '?')}")
    _finish(plt, fig, (ax,), path, image_format, legend_size=7)
