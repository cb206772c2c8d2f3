"""`randbp variance`: train through the engine (exactly, or randomized with `--train-rho`) and,
every `--every` steps, measure how much noise each sketch adds next to SGD's own (the
estimators and their formulas: measure/variance.py, docs/method.md §2–3).

With a `gelu:B` saver, the few-bit GELU's gradient error is measured on the same steps, on the
real GELU inputs (and their upstream gradients) of real tokens: `gelu_errors`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..core.convert import name_matches
from ..core.sketches import Sketch, get_sketch, sketch_rows
from ..errors import ConfigError
from ..measure.environment import environment
from ..measure.variance import capture_linear_io, gradient_stats, measure_rmm_variance, real_rows
from ..reports.report import VarianceRecord, VarianceReport, VarianceSummary
from ..run.batches import load_model_and_task
from ..run.engine import Engine, TrainCallbacks, interruptible
from ..run.plans import VarianceConfig, VariancePlan
from ..savers.gelu import FewBitGELU, gelu_gradient_error


def variance_record(x: Tensor, y: Tensor, *, layer: str, step: int, sketch: str | Sketch, rho: float,
                    repeats: int, min_rows: int = 1, seed: int | None = None,
                    real: Tensor | None = None) -> VarianceRecord:
    """One (step, layer, sketch) record of the `randbp.variance/1` report; `real` marks the
    non-padding rows (all rows by default)."""
    sketch = get_sketch(sketch)
    stats = gradient_stats(x, y, real)
    rows = x.numel() // x.shape[-1]
    k = sketch_rows(rows, rho, min_rows)
    measured, se = measure_rmm_variance(x, y, sketch, k, repeats, seed)
    theory = sketch.variance(x, y, k)
    scale = k / (stats.rows - 1)
    return VarianceRecord(
        layer=layer, step=step, sketch=sketch.name, rho=rho, k=k, rows=rows, real_rows=stats.rows,
        grad_norm=stats.grad_norm, alpha=stats.alpha, d2_sgd=stats.d2_sgd,
        d2_rmm_measured=measured, d2_rmm_se=se, d2_rmm_theory=theory,
        ratio=scale * measured / stats.d2_sgd if stats.d2_sgd > 0 else None,
        ratio_theory=scale * theory / stats.d2_sgd if stats.d2_sgd > 0 else None,
        bound=(stats.alpha + 1) / stats.alpha if stats.alpha > 0 else None,
    )


def select_layers(model: nn.Module, patterns: Sequence[str] | None) -> list[str]:
    """Trained linear layers (plain or randomized; with LoRA the adapters) matching any pattern; all of
    them by default. A frozen layer has no weight gradient to measure."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight.requires_grad]
    if not patterns:
        return names
    for pattern in patterns:
        if not any(name_matches(n, pattern) for n in names):
            shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
            raise ConfigError(f"--layer {pattern!r} matches no linear layer; the layers are: {shown}")
    return [n for n in names if any(name_matches(n, p) for p in patterns)]


# ---------------------------------------------------------------------------- the command


def _measure_step(plan: VariancePlan, engine: Engine, batch: dict, step: int,
                  layers: list[str]) -> tuple[Tensor, list[VarianceRecord], list[dict]]:
    """A training forward and backward with every selected layer's X and Y captured and measured
    (and each few-bit GELU's input and upstream gradient)."""
    config = plan.config
    gelus = few_bit_gelus(engine.model)
    with capture_linear_io(engine.model, layers) as captured, capture_linear_io(engine.model, gelus) as gelu_io:
        loss = engine.forward(batch)
        engine.backward(loss)
    records = []
    for layer_index, name in enumerate(layers):
        x, y = captured.get(name, (None, None))
        if y is None:  # the layer did not run, does not reach the loss, or its weight is frozen
            continue
        for sketch_index, sketch in enumerate(plan.sketches):
            # its own seed stream: measuring never touches the RNG training draws from
            stream = ((config.seed * 1_000_003 + step) * 10_007 + layer_index) * 101 + sketch_index
            records.append(variance_record(x, y, layer=name, step=step, sketch=sketch, rho=plan.rho,
                                           repeats=config.repeats, seed=stream, real=real_rows(x, batch)))
    return loss, records, _gelu_errors(engine.model, gelus, gelu_io, batch, step)


def few_bit_gelus(model: nn.Module) -> list[str]:
    """Names of the few-bit GELU modules a `gelu:B` saver put in the model."""
    return [name for name, module in model.named_modules() if isinstance(module, FewBitGELU)]


def _gelu_errors(model: nn.Module, names: list[str], captured: dict, batch: dict, step: int) -> list[dict]:
    """The b-bit derivative's error on this step's real GELU inputs, per GELU module."""
    errors = []
    for name in names:
        x, grad = captured.get(name, (None, None))
        if x is None:
            continue
        real = real_rows(x, batch)
        x2, g2 = x.reshape(-1, x.shape[-1]), None if grad is None else grad.reshape(-1, grad.shape[-1])
        if real is not None:
            x2, g2 = x2[real], None if g2 is None else g2[real]
        module = model.get_submodule(name)
        errors.append({"step": step, "layer": name, **gelu_gradient_error(x2, module.bits, g2, module.approximate)})
    return errors


def _train_and_measure(plan: VariancePlan, engine: Engine, loader, layers: list[str],
                       callbacks: TrainCallbacks) -> tuple[list[VarianceRecord], list[dict], dict[int, float], str]:
    """`steps` training steps, measuring every `every` (the last one measured, not trained)."""
    config = plan.config
    measured_steps = set(range(0, config.steps + 1, config.every))
    records: list[VarianceRecord] = []
    gelu_errors: list[dict] = []
    losses: dict[int, float] = {}
    batches = iter(loader)
    torch.manual_seed(config.seed)
    try:
        with interruptible():
            for step in range(config.steps + 1):
                try:
                    batch = next(batches)
                except StopIteration:  # a new epoch, reshuffled
                    batches = iter(loader)
                    batch = next(batches)
                batch = engine.to_device(batch)
                if step in measured_steps:
                    loss, measured, gelu_measured = _measure_step(plan, engine, batch, step, layers)
                    records += measured
                    gelu_errors += gelu_measured
                    losses[step] = loss.item()
                else:
                    loss = engine.forward(batch)
                    engine.backward(loss)
                if step == config.steps:
                    break
                engine.optimizer_step()
                if callbacks.on_step:
                    callbacks.on_step("variance", step + 1, loss.item(), engine.scheduler.get_last_lr()[0])
                if callbacks.should_stop():
                    return records, gelu_errors, losses, "interrupted"
    except KeyboardInterrupt:  # Ctrl-C inside a step (a second one): the measurements before it are kept
        return records, gelu_errors, losses, "interrupted"
    return records, gelu_errors, losses, "completed"


def measure_variance(plan: VariancePlan, callbacks: TrainCallbacks | None = None) -> VarianceReport:
    """Measure every selected layer × sketch on real batches, optionally while fine-tuning."""
    from torch.utils.data import DataLoader

    callbacks = callbacks or TrainCallbacks()
    config = plan.config
    loaded, inputs = load_model_and_task(plan)
    spec = inputs.data.spec
    engine = Engine(loaded.model, plan.device, include=config.include, exclude=config.exclude,
                    compile=plan.compile)
    engine.apply(plan.train_method)
    layers = select_layers(engine.model, config.layers)
    batch_size, lr = config.batch_size or spec.batch_size, config.lr or spec.lr
    # full batches only: a last batch of one example would leave the classifier head one row (B − 1 = 0)
    loader = DataLoader(inputs.train_set, batch_size=batch_size, shuffle=True, collate_fn=inputs.collator,
                        generator=torch.Generator().manual_seed(config.seed),
                        drop_last=len(inputs.train_set) >= batch_size)
    optimizer = plan.optimizer(engine.model.parameters(), lr)
    engine.use_optimizer(optimizer, plan.scheduler(optimizer, max(config.steps, 1)))
    if callbacks.on_run_start:
        callbacks.on_run_start("variance", config.steps)
    records, gelu_errors, losses, status = _train_and_measure(plan, engine, loader, layers, callbacks)
    return VarianceReport(
        status=status, environment=environment(plan.device),
        config=plan.config_record(batch_size=batch_size, lr=lr), task=inputs.data.describe(),
        model={**loaded.describe(), "tokenizer": inputs.tokenizer_info, "trained_with": plan.train_method.label},
        layers=layers, train_loss={str(k): v for k, v in losses.items()}, records=records,
        summary=summarize(records), gelu_errors=gelu_errors or None)


def run_variance(config: VarianceConfig, callbacks: TrainCallbacks | None = None) -> dict:
    """`measure_variance(config.resolve())` as the JSON-ready report dict (for scripts)."""
    return measure_variance(config.resolve(), callbacks).to_dict()


def summarize(records: list[VarianceRecord]) -> list[VarianceSummary]:
    """Per (layer, sketch): how the ratio behaved over the measured steps."""
    groups: dict[tuple[str, str], list[VarianceRecord]] = {}
    for r in records:
        groups.setdefault((r.layer, r.sketch), []).append(r)
    out = []
    for (layer, sketch), rows in groups.items():
        ratios = [r.ratio for r in rows if r.ratio is not None]
        bounds = [r.bound for r in rows if r.bound is not None]
        out.append(VarianceSummary(
            layer=layer, sketch=sketch, steps=len(rows),
            ratio_mean=sum(ratios) / len(ratios) if ratios else None,
            ratio_min=min(ratios, default=None), ratio_max=max(ratios, default=None),
            bound_mean=sum(bounds) / len(bounds) if bounds else None,
            alpha_mean=sum(r.alpha for r in rows) / len(rows),
            within_bound=all(r.ratio is None or r.bound is None or r.ratio <= r.bound for r in rows)))
    return out
