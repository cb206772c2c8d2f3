"""The `randbp` command: parse options, resolve them into a plan, run it, render. Nothing else.

Every user mistake becomes one line on stderr and an exit code (2 usage, 1 runtime failure);
`--json` puts exactly one JSON document on stdout; progress goes to stderr.
"""

from __future__ import annotations

import shlex
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from .. import __version__
from ..errors import ConfigError
from ..options import CheckOptions, FinetuneOptions, ProfileOptions, VarianceOptions
from ..reports.load import load_report
from ..reports.report import PROFILE_SCHEMA, FinetuneReport
from .common import (SKETCHES_HELP, SKETCH_HELP, BatchOpt, CompileModeOpt, CompileOpt, DataDirOpt, DeviceOpt,
                     DtypeOpt, ExcludeOpt, IncludeOpt, JsonOpt, LabelColumnOpt, LoraAlphaOpt, LoraDropoutOpt,
                     LoraOpt, LoraTargetsOpt, LrOpt, MaxEvalOpt, MaxLengthOpt, MaxTrainOpt, ModelOpt, OfflineOpt,
                     OutputOpt, SaverOpt, SeedOpt, SkipKeptOpt, TaskOpt, TextColumnsOpt, ToleranceActivationOpt,
                     TolerancePeakOpt, ToleranceTimeOpt, TrainFileOpt, ValidationFileOpt, data_options, note,
                     parse_tolerances, quiet_libraries, torchrun_environment)
from .usage import OneLineErrors

if TYPE_CHECKING:
    from ..run.distributed import Distributed
    from ..run.plans import FinetunePlan

# The commands import what they run (torch, transformers, rich's progress bars: seconds) inside
# their bodies, so that `randbp --help`, `--version` and usage errors start in a fraction of a
# second (tests/data/test_offline.py holds that). Only this light layer is imported at the top.


# Every option's default is the library's (options.py), so `randbp X` and `XConfig()` run alike.
PROFILE, FINETUNE, VARIANCE, CHECK = ProfileOptions(), FinetuneOptions(), VarianceOptions(), CheckOptions()


def _listed(values) -> str:
    """A list default as --help shows it: 0.5, or 8 32."""
    return " ".join(f"{value:g}" if isinstance(value, float) else str(value) for value in values)


def _nothing_measured() -> None:
    """A stop before the first measurement: an empty report would only overwrite a good one."""
    note("interrupted before anything was measured; nothing written")
    raise typer.Exit(130)


app = typer.Typer(cls=OneLineErrors, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="randbp: measure and use randomized backpropagation through linear layers "
                       "(memory-efficient fine-tuning, arXiv 2201.13195).")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"randbp {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    quiet_libraries()


@app.command()
def profile(
    model: Annotated[str, typer.Option(help="Built-in architecture (roberta-base, roberta-tiny), hub id, "
                                            "or local checkpoint / config directory.")] = PROFILE.model,
    rho: Annotated[Optional[list[float]], typer.Option("--rho", metavar="RHO", help="Compression rate in (0, 1]. "
                                                       "Repeat the option for a sweep (--rho 0.5 --rho 0.1). "
                                                       f"[default: {_listed(PROFILE.rhos)}]")] = None,
    sketch: Annotated[Optional[list[str]], typer.Option("--sketch", metavar="SKETCH", help=SKETCHES_HELP)] = None,
    method: Annotated[Optional[list[str]], typer.Option(
        "--method", metavar="METHOD", help="Besides the exact baseline: randomized, checkpoint (Hugging Face "
                                           "activation checkpointing), checkpoint+randomized. Repeat the option "
                                           f"for several. [default: {_listed(PROFILE.methods)}]")] = None,
    budget_mib: Annotated[Optional[float], typer.Option(help="Also find, by measuring, the largest batch (or "
                                                        "with --budget-over seq the longest sequence) whose "
                                                        "activations fit this many MiB, per method.")] = None,
    budget_over: Annotated[str, typer.Option(help="What --budget-mib grows: batch (at --seq-len) or seq (at the "
                                                  "first --batch-size, up to the model's longest).")]
    = PROFILE.budget_over,
    batch_size: Annotated[Optional[list[int]], typer.Option(
        "--batch-size", "-b", metavar="N", help="Batch size. Repeat the option for several (-b 8 -b 32). "
                                                f"[default: {_listed(PROFILE.batch_sizes)}]")] = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = PROFILE.seq_len,
    device: DeviceOpt = PROFILE.device,
    dtype: DtypeOpt = PROFILE.dtype,
    steps: Annotated[int, typer.Option(help="Timed training steps per case.")] = PROFILE.steps,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up steps per case.")] = PROFILE.warmup,
    seed: SeedOpt = PROFILE.seed,
    isolate: Annotated[bool, typer.Option(help="Run each case in a fresh process.")] = PROFILE.isolate,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    attn_implementation: Annotated[Optional[str], typer.Option(help="Attention kernel for transformers "
                                                               "(eager, sdpa).")] = None,
    saver: SaverOpt = None,
    lora: LoraOpt = PROFILE.lora,
    lora_alpha: LoraAlphaOpt = PROFILE.lora_alpha,
    lora_dropout: LoraDropoutOpt = PROFILE.lora_dropout,
    lora_targets: LoraTargetsOpt = PROFILE.lora_targets,
    skip_kept: SkipKeptOpt = PROFILE.skip_kept,
    compile_model: CompileOpt = PROFILE.compile,
    compile_mode: CompileModeOpt = None,
    offline: OfflineOpt = PROFILE.offline,
    check: Annotated[Optional[Path], typer.Option("--check", help="Then compare against this baseline report "
                                                  "(as `randbp check`): exit 1 on a regression.")] = None,
    tolerance_peak: TolerancePeakOpt = CHECK.tolerance_peak,
    tolerance_time: ToleranceTimeOpt = CHECK.tolerance_time,
    tolerance_activation: ToleranceActivationOpt = CHECK.tolerance_activation,
    json_output: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Activation memory and step time of exact vs randomized backprop on a model."""
    from ..commands.profile import profile_model
    from ..reports.files import check_writable
    from ..run.plans import ProfileConfig
    from .console import deliver, judge, phase_progress, stop_on_signals

    plan = ProfileConfig(model=model, rhos=rho or list(PROFILE.rhos), sketches=sketch or list(PROFILE.sketches),
                         methods=method or list(PROFILE.methods), budget_mib=budget_mib, budget_over=budget_over,
                         batch_sizes=batch_size or list(PROFILE.batch_sizes),
                         seq_len=seq_len, device=device, dtype=dtype, steps=steps, warmup=warmup, seed=seed,
                         isolate=isolate, include=include, exclude=exclude, attn_implementation=attn_implementation,
                         offline=offline, savers=list(saver or []), compile=compile_model,
                         compile_mode=compile_mode, lora=lora, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         lora_targets=lora_targets, skip_kept=skip_kept).resolve()
    if output is not None:
        check_writable(output)
    if check is not None:  # a bad baseline should fail before minutes of profiling, not after
        baseline = load_report(check, PROFILE_SCHEMA, if_missing=(
            f"create it on purpose, with -o {shlex.quote(str(check))} instead of --check, or with randbp check "
            f"CURRENT --baseline {shlex.quote(str(check))} --update"))
        tolerances = parse_tolerances(tolerance_peak, tolerance_time, tolerance_activation)
    with stop_on_signals() as stop, phase_progress(plan.total_steps) as progress:
        report = profile_model(plan, progress, stop)
    if report.status == "interrupted" and not report.results:
        _nothing_measured()
    deliver(report, output, json_output)
    if report.status == "interrupted":
        note("interrupted: the report holds the cases measured before the stop"
             + ("; not judged against the baseline" if check is not None else ""))
        raise typer.Exit(130)
    if check is not None:
        judge(report, baseline, tolerances, quiet=json_output)


@app.command()
def check(
    current: Annotated[Path, typer.Argument(help="The profile report to judge (randbp profile -o ...).")],
    baseline: Annotated[Path, typer.Option("--baseline", help="The committed baseline profile report.")],
    tolerance_peak: TolerancePeakOpt = CHECK.tolerance_peak,
    tolerance_time: ToleranceTimeOpt = CHECK.tolerance_time,
    tolerance_activation: ToleranceActivationOpt = CHECK.tolerance_activation,
    update: Annotated[bool, typer.Option(help="Rewrite the baseline from CURRENT (on purpose only).")] = False,
    show_all: Annotated[bool, typer.Option(help="List every compared metric, not only what moved.")] = False,
    json_output: JsonOpt = False,
) -> None:
    """Compare a profile report with a baseline: exit 1 if memory regressed, 2 on usage problems."""
    from ..commands.check import require_judgeable
    from ..reports.files import write_json_atomic
    from .console import judge

    tolerances = parse_tolerances(tolerance_peak, tolerance_time, tolerance_activation)
    report = load_report(current, PROFILE_SCHEMA)
    if update:
        require_judgeable(report)  # a baseline without the guarded numbers would fail every later check
        existed = baseline.exists()
        write_json_atomic(baseline, report.to_dict())
        note(f"baseline {baseline} {'rewritten' if existed else 'created'} from {current} "
             f"({len(report.results)} cases)")
        return
    create = f"randbp check {shlex.quote(str(current))} --baseline {shlex.quote(str(baseline))} --update"
    judge(report, load_report(baseline, PROFILE_SCHEMA, if_missing=f"create it on purpose with: {create}"), tolerances,
           quiet=json_output, show_all=show_all, json_result=json_output)


@app.command()
def report(
    files: Annotated[list[Path], typer.Argument(metavar="FILE.json", help="One or more randbp JSON reports "
                                                "(profile, finetune or variance) or a benchmark's output (its "
                                                "checks, embedded reports and tables); several profile reports "
                                                "merge into one comparison.")],
    plot: Annotated[Optional[Path], typer.Option(help="Also write a PNG: memory and time vs batch size "
                                                      "(profile), loss and metric per epoch (finetune), "
                                                      "ratio over steps (variance).")] = None,
    output_format: Annotated[str, typer.Option("--format", help="table (rich) or markdown.")] = "table",
) -> None:
    """Render saved reports as the commands' tables, as Markdown, or as a plot."""
    from ..reports.files import check_writable
    from ..reports.plots import check_image_path, check_plottable, write_plot
    from ..reports.render import tables_for
    from ..reports.tables import table_to_markdown
    from .console import print_tables

    if output_format not in ("table", "markdown"):
        raise ConfigError(f"--format must be table or markdown (got {output_format!r})")
    reports = [load_report(path) for path in files]
    tables = tables_for(reports)
    if plot is not None:
        check_writable(plot)
        check_image_path(plot)
        check_plottable(reports, plot)
    if output_format == "markdown":
        typer.echo("\n\n".join(table_to_markdown(t) for t in tables))
    else:
        print_tables(tables)
    if plot is not None:
        write_plot(reports, plot)
        note(f"plot written to {plot}")


@app.command()
def finetune(
    task: TaskOpt = FINETUNE.task,
    model: ModelOpt = None,
    rho: Annotated[Optional[list[float]], typer.Option("--rho", metavar="RHO", help="Randomize every linear layer "
                                                       "at this compression rate. Repeat the option for several "
                                                       "runs. Without it: exact training.")] = None,
    compare: Annotated[bool, typer.Option(help="Add an exact run beside the --rho runs (same data, same "
                                               "seed).")] = FINETUNE.compare,
    method: Annotated[Optional[list[str]], typer.Option("--method", metavar="METHOD", help="Runs to make: exact, "
                                                        "randomized (one per --rho), checkpoint, "
                                                        "checkpoint+randomized. Repeat the option for several. "
                                                        "[default: exact and/or randomized from --rho]")] = None,
    sketch: Annotated[str, typer.Option(help=SKETCH_HELP)] = FINETUNE.sketch,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs. [default: the task's, 10 for GLUE]")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many optimizer steps.")] = None,
    batch_size: BatchOpt = None,
    eval_batch_size: Annotated[Optional[int], typer.Option(help="Evaluation batch size. [default: 2 × batch]")] = None,
    lr: LrOpt = None,
    max_length: MaxLengthOpt = FINETUNE.max_length,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = FINETUNE.grad_accum,
    seed: SeedOpt = FINETUNE.seed,
    dtype: DtypeOpt = FINETUNE.dtype,
    device: DeviceOpt = FINETUNE.device,
    data_dir: DataDirOpt = None,
    train_file: TrainFileOpt = None,
    validation_file: ValidationFileOpt = None,
    text_columns: TextColumnsOpt = None,
    label_column: LabelColumnOpt = FINETUNE.label_column,
    max_train_samples: MaxTrainOpt = None,
    max_eval_samples: MaxEvalOpt = None,
    saver: SaverOpt = None,
    lora: LoraOpt = FINETUNE.lora,
    lora_alpha: LoraAlphaOpt = FINETUNE.lora_alpha,
    lora_dropout: LoraDropoutOpt = FINETUNE.lora_dropout,
    lora_targets: LoraTargetsOpt = FINETUNE.lora_targets,
    skip_kept: SkipKeptOpt = FINETUNE.skip_kept,
    compile_model: CompileOpt = FINETUNE.compile,
    compile_mode: CompileModeOpt = None,
    offline: OfflineOpt = FINETUNE.offline,
    save_model: Annotated[Optional[Path], typer.Option(help="Write the fine-tuned model (safetensors) here.")] = None,
    backend: Annotated[str, typer.Option(help="Under torchrun: auto (NCCL on GPUs, gloo on CPUs), nccl or "
                                              "gloo.")] = "auto",
    json_output: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Fine-tune with randomized backprop (and exactly, with --compare): accuracy, memory, time.

    Several GPUs or machines: launch it with torchrun (torchrun --nproc-per-node N -m randbp_cli
    finetune ...); --batch-size is per process.
    """
    from ..run.plans import FinetuneConfig
    from .console import deliver

    plan = FinetuneConfig(
        **data_options(task, model, data_dir, train_file, validation_file, text_columns, label_column,
                       max_train_samples, max_eval_samples, offline),
        rhos=list(rho or []), compare=compare, methods=method, sketch=sketch, include=include, exclude=exclude,
        epochs=epochs, max_steps=max_steps, batch_size=batch_size, eval_batch_size=eval_batch_size, lr=lr,
        max_length=max_length, grad_accum=grad_accum, seed=seed, dtype=dtype, device=device,
        save_model=None if save_model is None else str(save_model), savers=list(saver or []), compile=compile_model,
        compile_mode=compile_mode, lora=lora, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        lora_targets=lora_targets, skip_kept=skip_kept).resolve()
    report, dist = _finetune_on_this_rank(plan, backend, output)
    interrupted = report.status == "interrupted"
    if interrupted and not any(run.epochs for run in report.runs):
        _nothing_measured()
    if not dist.is_main:  # rank 0 alone prints and writes
        raise typer.Exit(130 if interrupted else 0)
    deliver(report, output, json_output)
    save_errors = [run.save_error for run in report.runs if run.save_error]
    for message in save_errors:
        note(f"randbp: error: {message} (the report keeps the finished runs)")
    if interrupted:
        note("interrupted: the report holds what finished")
        raise typer.Exit(130)
    if save_errors:
        raise typer.Exit(1)


def _finetune_on_this_rank(plan: FinetunePlan, backend: str,
                           output: Optional[Path]) -> tuple[FinetuneReport, Distributed]:
    """Join torchrun's process group when torchrun launched us, fine-tune on this rank, leave the group."""
    from ..commands.finetune import finetune_model
    from ..reports.files import check_writable
    from ..run import distributed
    from .console import stop_on_signals, training_progress

    torchrun = torchrun_environment()
    if output is not None and torchrun.rank == 0:  # rank 0 alone writes the report
        check_writable(output)
    # through the module, so a test can stand in for the process group
    dist, rank_device = distributed.init_distributed(torchrun.world_size, torchrun.rank, torchrun.local_rank,
                                                     backend, plan.device, torchrun.local_world_size)
    try:
        with stop_on_signals() as stop, training_progress(stop, enabled=dist.is_main) as callbacks:
            return finetune_model(replace(plan, device=rank_device), callbacks, dist), dist
    finally:
        distributed.shutdown(dist)


@app.command()
def variance(
    task: TaskOpt = VARIANCE.task,
    model: ModelOpt = None,
    rho: Annotated[float, typer.Option(help="Compression rate whose variance is measured.")] = VARIANCE.rho,
    sketch: Annotated[Optional[list[str]], typer.Option("--sketch", metavar="SKETCH", help=SKETCHES_HELP)] = None,
    layer: Annotated[Optional[list[str]], typer.Option("--layer", metavar="PATTERN", help="Measure linear layers "
                                                       "matching this pattern (suffix, glob, re:REGEX). Repeat the "
                                                       "option for several. [default: every linear layer]")] = None,
    repeats: Annotated[int, typer.Option(help="Sketches drawn per measurement for the empirical D²_RMM.")] = VARIANCE.repeats,
    steps: Annotated[int, typer.Option(help="Fine-tune this many steps, measuring every --every steps "
                                            "(0: measure the first batch only).")] = VARIANCE.steps,
    every: Annotated[int, typer.Option(help="Measure every this many steps.")] = VARIANCE.every,
    train_rho: Annotated[Optional[float], typer.Option(help="Train randomized at this rate (with --train-sketch); "
                                                            "default: exact training.")] = None,
    train_sketch: Annotated[str, typer.Option(help="Sketch used for training with --train-rho.")] = VARIANCE.sketch,
    saver: Annotated[Optional[list[str]], typer.Option(
        "--saver", metavar="NAME", help="Train with these activation savers (dropout, gelu:B, gelu-new, swiglu, lm-head); for gelu:B, "
                                        "also measure its gradient error on the real GELU inputs. Repeat the option "
                                        "for several.")] = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    max_length: MaxLengthOpt = VARIANCE.max_length,
    seed: SeedOpt = VARIANCE.seed,
    dtype: DtypeOpt = VARIANCE.dtype,
    device: DeviceOpt = VARIANCE.device,
    data_dir: DataDirOpt = None,
    train_file: TrainFileOpt = None,
    validation_file: ValidationFileOpt = None,
    text_columns: TextColumnsOpt = None,
    label_column: LabelColumnOpt = VARIANCE.label_column,
    max_train_samples: MaxTrainOpt = None,
    max_eval_samples: MaxEvalOpt = None,
    lora: LoraOpt = VARIANCE.lora,
    lora_alpha: LoraAlphaOpt = VARIANCE.lora_alpha,
    lora_dropout: LoraDropoutOpt = VARIANCE.lora_dropout,
    lora_targets: LoraTargetsOpt = VARIANCE.lora_targets,
    offline: OfflineOpt = VARIANCE.offline,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG of the ratio over steps with the bound.")] = None,
    json_output: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Randomized vs mini-batch (SGD) gradient variance, per layer and sketch, on real batches."""
    from ..commands.variance import measure_variance
    from ..reports.files import check_writable
    from ..reports.plots import check_image_path
    from ..run.plans import VarianceConfig
    from .console import deliver, stop_on_signals, training_progress

    plan = VarianceConfig(
        **data_options(task, model, data_dir, train_file, validation_file, text_columns, label_column,
                       max_train_samples, max_eval_samples, offline),
        sketch=train_sketch, sketches=list(sketch or VARIANCE.sketches), rho=rho, repeats=repeats, layers=layer,
        steps=steps, every=every, train_rho=train_rho, include=include, exclude=exclude, batch_size=batch_size,
        lr=lr, max_length=max_length, seed=seed, dtype=dtype, device=device, savers=list(saver or []), lora=lora,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_targets=lora_targets).resolve()
    for path in (output, plot):
        if path is not None:
            check_writable(path)
    if plot is not None:
        check_image_path(plot)
    with stop_on_signals() as stop, training_progress(stop) as callbacks:
        report = measure_variance(plan, callbacks)
    if report.status == "interrupted" and not report.records:
        _nothing_measured()
    deliver(report, output, json_output, plot=plot)
    if report.status == "interrupted":
        note("interrupted: the report holds what finished")
        raise typer.Exit(130)


def main() -> None:
    app()
