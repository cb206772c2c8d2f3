"""The `randbp` command: parse options, call the library, render. Nothing else lives here.

Every user mistake becomes one line on stderr and an exit code (2 usage, 1 runtime failure);
`--json` puts exactly one JSON document on stdout; progress goes to stderr.
"""

from __future__ import annotations

import shlex
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from typer.core import TyperGroup

try:  # typer >= 0.29 vendors click and raises its own exception types
    from typer import TyperException as _UsageError
except ImportError:  # older typer: plain click
    from click import ClickException as _UsageError

from . import __version__
from .errors import RandbpError
from .sketches import sketch_names

err_console = Console(stderr=True)
# Not a terminal (a CI log, a pipe): rich would assume 80 columns and squeeze the tables.
out_console = Console(width=None if sys.stdout.isatty() else 160)


class _OneLineErrors(TyperGroup):
    """Turns usage errors and RandbpError into one stderr line and an exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            result = super().main(args=args, prog_name=prog_name or "randbp", complete_var=complete_var,
                                  standalone_mode=False, **extra)
            code = result if isinstance(result, int) else 0
        except _UsageError as err:  # usage errors: bad option values, unknown commands
            ctx = getattr(err, "ctx", None)
            if type(err).__name__ == "NoArgsIsHelpError" and ctx is not None:
                typer.echo(ctx.get_help(), err=True)
            else:
                where = ctx.command_path if ctx is not None else "randbp"
                self._say(f"{where}: error: {_one_line(err.format_message())}")
            code = err.exit_code
        except typer.Abort:
            typer.echo("randbp: aborted", err=True)
            code = 1
        except RandbpError as err:
            self._say(f"randbp: error: {_one_line(str(err))}", rank_local=err.rank_local)
            code = err.exit_code
        if standalone_mode:
            sys.exit(code)
        return code

    @staticmethod
    def _say(message: str, rank_local: bool = False) -> None:
        """Under torchrun every rank usually hits the same error: rank 0 says it, once. An error
        only one rank hit is said by that rank, with its number."""
        rank = _secondary_rank()
        if rank is None:
            typer.echo(message, err=True)
        elif rank_local:
            typer.echo(f"rank {rank}: {message}", err=True)


def _note(message: str) -> None:
    """A plain line on stderr (never wrapped or styled: logs and tests read it)."""
    typer.echo(message, err=True)


def _one_line(message: str) -> str:
    return " ".join(message.split())


app = typer.Typer(cls=_OneLineErrors, no_args_is_help=True, add_completion=False,
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
    _quiet_libraries()


def _quiet_libraries() -> None:
    """Keep third-party chatter (weight-init warnings, download bars) off our stderr."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:  # a declared dependency, but `profile` and `report` do not need it
        import datasets
    except ImportError:
        return
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def _command_line() -> str:
    """The command as the user would retype it (torchrun's launch reconstructed from its variables)."""
    import os

    local = os.environ.get("LOCAL_WORLD_SIZE")
    world = os.environ.get("WORLD_SIZE")
    if local and world and int(world) > 1:
        nodes = max(1, int(world) // max(1, int(local)))
        return shlex.join(["torchrun", "--nnodes", str(nodes), "--nproc-per-node", local, "-m", "randbp_cli",
                           *sys.argv[1:]])
    return shlex.join(["randbp", *sys.argv[1:]])


@contextmanager
def _progress(total: int, enabled: bool = True):
    """A rich progress bar on stderr; yields the library's `progress(description, done)` callback.
    Not a terminal (a CI log): one plain line per phase instead of a bar."""
    if not enabled:
        yield None
        return
    if not err_console.is_terminal:
        yield lambda description, done: _note(f"[{done}/{total}] {description}")
        return
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=err_console, transient=True)
    with bar:
        task = bar.add_task("starting", total=total)

        def update(description: str, done: int) -> None:
            bar.update(task, description=description, completed=done)

        yield update


SKETCH_HELP = f"Sketch: {', '.join(sketch_names())}. Repeat for several."
OutputOption = Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the JSON report to this file "
                                                      "(atomically, only once the run succeeded).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print only the JSON report on stdout.")]


@app.command()
def profile(
    model: Annotated[str, typer.Option(help="Built-in architecture (roberta-base, roberta-tiny), hub id, "
                                            "or local checkpoint / config directory.")] = "roberta-base",
    rho: Annotated[Optional[list[float]], typer.Option("--rho", help="Compression rate in (0, 1]. "
                                                       "Repeat for a sweep. [default: 0.5]")] = None,
    sketch: Annotated[Optional[list[str]], typer.Option("--sketch", help=SKETCH_HELP + " [default: gaussian]")] = None,
    method: Annotated[Optional[list[str]], typer.Option("--method", help="Besides the exact baseline: randomized, "
                                                        "checkpoint (Hugging Face activation checkpointing), "
                                                        "checkpoint+randomized. Repeatable. [default: randomized]")] = None,
    budget_mib: Annotated[Optional[float], typer.Option(help="Also find, by measuring, the largest batch whose "
                                                        "activations fit this many MiB, per method.")] = None,
    batch_size: Annotated[Optional[list[int]], typer.Option("--batch-size", "-b",
                                                            help="Batch size; repeat for several. [default: 8]")] = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 128,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Model dtype: float32, bfloat16, float16, float64.")] = "float32",
    steps: Annotated[int, typer.Option(help="Timed training steps per case.")] = 3,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up steps per case.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed for weights, inputs and sketches.")] = 0,
    isolate: Annotated[bool, typer.Option(help="Run each case in a fresh process.")] = False,
    include: Annotated[Optional[list[str]], typer.Option(help="Only convert linear layers matching this name "
                                                        "pattern (suffix, glob or re:REGEX); repeatable.")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(help="Do not convert layers matching this pattern; "
                                                        "repeatable.")] = None,
    attn_implementation: Annotated[Optional[str], typer.Option(help="Attention kernel for transformers "
                                                               "(eager, sdpa).")] = None,
    offline: Annotated[bool, typer.Option(help="Never contact the Hugging Face Hub.")] = False,
    check: Annotated[Optional[Path], typer.Option("--check", help="Then compare against this baseline report "
                                                  "(as `randbp check`): exit 1 on a regression.")] = None,
    tolerance_peak: Annotated[str, typer.Option(help="With --check: allowed CUDA peak growth.")] = "5%",
    tolerance_time: Annotated[Optional[str], typer.Option(help="With --check: allowed step-time growth "
                                                          "(default: time is informational).")] = None,
    json_output: JsonOption = False,
    output: OutputOption = None,
) -> None:
    """Activation memory and step time of exact vs randomized backprop on a model."""
    from .profiling import ProfileConfig, resolve_device, run_profile, total_steps
    from .render import profile_table
    from .report import ProfileReport, check_writable, to_json, write_json_atomic

    config = ProfileConfig(model=model, rhos=rho or [0.5], sketches=sketch or ["gaussian"],
                           methods=method or ["randomized"], budget_mib=budget_mib,
                           batch_sizes=batch_size or [8], seq_len=seq_len, device=device, dtype=dtype,
                           steps=steps, warmup=warmup, seed=seed, isolate=isolate, include=include,
                           exclude=exclude, attn_implementation=attn_implementation, offline=offline)
    config.validate()
    if output is not None:
        check_writable(output)
    if check is not None:  # a bad baseline should fail before minutes of profiling, not after
        from .check import parse_tolerance
        from .report import PROFILE_SCHEMA, load_report

        baseline = load_report(check, PROFILE_SCHEMA)
        tolerances = {"tolerance_peak": parse_tolerance(tolerance_peak, "--tolerance-peak"),
                      "tolerance_time": parse_tolerance(tolerance_time, "--tolerance-time")}
    total = total_steps(config, resolve_device(device))
    with _progress(total) as progress:
        report = ProfileReport.from_dict(run_profile(config, progress=progress))
    report.command = _command_line()
    if output is not None:
        write_json_atomic(output, report.to_dict())
    if json_output:
        typer.echo(to_json(report.to_dict()))
    else:
        out_console.print(profile_table(report))
        if output is not None:
            _note(f"report written to {output}")
    if check is not None:
        from .check import compare_reports

        result = compare_reports(report, baseline, **tolerances)
        _print_check(result, quiet=json_output)
        raise typer.Exit(result.exit_code)


def _print_check(result, quiet: bool = False, show_all: bool = False) -> None:
    """Warnings and the verdict on stderr; the table of what moved on stdout (unless quiet)."""
    from .render import check_table

    for warning in result.warnings:
        _note(f"warning: {warning}; numbers may differ for that reason alone")
    if not quiet and (result.regressions or result.improvements or show_all):
        out_console.print(check_table(result, show_all=show_all))
    if result.regressions:
        _note(f"FAIL: {len(result.regressions)} metric(s) regressed across {result.matched} matched case(s)")
    else:
        improved = (f"; {len(result.improvements)} improvement(s): update the baseline to lock this in "
                    "(randbp check CURRENT --baseline BASELINE --update)") if result.improvements else ""
        _note(f"PASS: {result.matched} case(s) match the baseline{improved}")
    for case in result.new_cases:
        _note(f"note: case not in the baseline (not checked): {case}")


@app.command()
def check(
    current: Annotated[Path, typer.Argument(help="The profile report to judge (randbp profile -o ...).")],
    baseline: Annotated[Path, typer.Option("--baseline", help="The committed baseline profile report.")],
    tolerance_peak: Annotated[str, typer.Option(help="Allowed CUDA peak growth, e.g. 5% or 0.05.")] = "5%",
    tolerance_time: Annotated[Optional[str], typer.Option(help="Allowed step-time growth; without it "
                                                          "time is informational.")] = None,
    tolerance_activation: Annotated[str, typer.Option(help="Allowed activation-byte growth (exact by "
                                                      "default: the number is deterministic).")] = "0",
    update: Annotated[bool, typer.Option(help="Rewrite the baseline from CURRENT (on purpose only).")] = False,
    show_all: Annotated[bool, typer.Option(help="List every compared metric, not only what moved.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Compare a profile report with a baseline: exit 1 if memory regressed, 2 on usage problems."""
    from .check import compare_reports, parse_tolerance
    from .report import PROFILE_SCHEMA, load_report, to_json, write_json_atomic

    tolerances = {"tolerance_peak": parse_tolerance(tolerance_peak, "--tolerance-peak"),
                  "tolerance_time": parse_tolerance(tolerance_time, "--tolerance-time"),
                  "tolerance_activation": parse_tolerance(tolerance_activation, "--tolerance-activation")}
    report = load_report(current, PROFILE_SCHEMA)
    if update:
        write_json_atomic(baseline, report.to_dict())
        _note(f"baseline {baseline} rewritten from {current} ({len(report.results)} cases)")
        return
    result = compare_reports(report, load_report(baseline, PROFILE_SCHEMA), **tolerances)
    if json_output:
        typer.echo(to_json(result.to_dict()))
    _print_check(result, quiet=json_output, show_all=show_all)
    raise typer.Exit(result.exit_code)


@app.command()
def report(
    files: Annotated[list[Path], typer.Argument(help="randbp JSON reports (profile, finetune or variance); "
                                                "several profile reports merge into one comparison.")],
    plot: Annotated[Optional[Path], typer.Option(help="Also write a PNG: memory and time vs batch size "
                                                      "(profile), loss and metric per epoch (finetune), "
                                                      "ratio over steps (variance).")] = None,
    output_format: Annotated[str, typer.Option("--format", help="table (rich) or markdown.")] = "table",
) -> None:
    """Render saved reports as the commands' tables, as Markdown, or as a plot."""
    from .errors import ConfigError
    from .render import check_image_path, table_to_markdown, tables_for, write_plot
    from .report import check_writable, load_report

    if output_format not in ("table", "markdown"):
        raise ConfigError(f"--format must be table or markdown (got {output_format!r})")
    reports = [load_report(path) for path in files]
    tables = tables_for(reports)
    if plot is not None:
        check_writable(plot)
        check_image_path(plot)
    if output_format == "markdown":
        typer.echo("\n\n".join(table_to_markdown(t) for t in tables))
    else:
        for table in tables:
            out_console.print(table)
    if plot is not None:
        write_plot(reports, plot)
        _note(f"plot written to {plot}")


def _split_columns(value: Optional[str]) -> Optional[list[str]]:
    if value is None:
        return None
    return [c.strip() for c in value.split(",") if c.strip()]


# Options shared by finetune and variance (same data and model sources), defined once.
TaskOpt = Annotated[str, typer.Option(help="GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli) or "
                                           "'synthetic' (offline, generated from --seed).")]
ModelOpt = Annotated[Optional[str], typer.Option(help="Built-in architecture, hub id, checkpoint directory, or a "
                                                      "directory with only config.json. [default: roberta-base; "
                                                      "roberta-tiny for --task synthetic]")]
IncludeOpt = Annotated[Optional[list[str]], typer.Option(help="Only randomize layers matching this pattern.")]
ExcludeOpt = Annotated[Optional[list[str]], typer.Option(help="Never randomize layers matching this pattern.")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Batch size per step. "
                                                 "[default: the task's, 16 or 32]")]
LrOpt = Annotated[Optional[float], typer.Option(help="Peak learning rate. [default: the task's]")]
MaxLengthOpt = Annotated[int, typer.Option(help="Truncate inputs to this many tokens.")]
SeedOpt = Annotated[int, typer.Option(help="Seed for weights, data order, dropout and sketches.")]
DtypeOpt = Annotated[str, typer.Option(help="Model dtype: float32, bfloat16, float16.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
DataDirOpt = Annotated[Optional[Path], typer.Option(help="GLUE TSV files as distributed (DIR/MRPC/train.tsv), or "
                                                         "train/validation .csv/.jsonl/.parquet.")]
TrainFileOpt = Annotated[Optional[Path], typer.Option(help="Your own training file (.csv/.tsv/.jsonl/.parquet).")]
ValidationFileOpt = Annotated[Optional[Path], typer.Option(help="Your own evaluation file.")]
TextColumnsOpt = Annotated[Optional[str], typer.Option(help="With --train-file: one or two text columns, "
                                                            "comma-separated.")]
LabelColumnOpt = Annotated[str, typer.Option(help="With --train-file: the label column.")]
MaxTrainOpt = Annotated[Optional[int], typer.Option(help="Use only the first N training examples.")]
MaxEvalOpt = Annotated[Optional[int], typer.Option(help="Use only the first N evaluation examples.")]
OfflineOpt = Annotated[bool, typer.Option(help="Never contact the Hugging Face Hub.")]


def _data_options(task, model, data_dir, train_file, validation_file, text_columns, label_column,
                  max_train_samples, max_eval_samples, offline) -> dict:
    """The FinetuneConfig fields both commands fill the same way."""
    return dict(task=task.lower(), model=model, data_dir=None if data_dir is None else str(data_dir),
                train_file=None if train_file is None else str(train_file),
                validation_file=None if validation_file is None else str(validation_file),
                text_columns=_split_columns(text_columns), label_column=label_column,
                max_train_samples=max_train_samples, max_eval_samples=max_eval_samples, offline=offline)


@app.command()
def finetune(
    task: TaskOpt = "mrpc",
    model: ModelOpt = None,
    rho: Annotated[Optional[list[float]], typer.Option("--rho", help="Randomize every linear layer at this "
                                                       "compression rate; repeat for several runs. Without it: "
                                                       "exact training.")] = None,
    compare: Annotated[bool, typer.Option(help="Add an exact run beside the --rho runs (same data, same seed).")] = False,
    method: Annotated[Optional[list[str]], typer.Option("--method", help="Runs to make: exact, randomized (one per "
                                                        "--rho), checkpoint, checkpoint+randomized. Repeatable. "
                                                        "[default: exact and/or randomized from --rho]")] = None,
    sketch: Annotated[str, typer.Option(help=f"Sketch: {', '.join(sketch_names())}.")] = "gaussian",
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs. [default: the task's, 10 for GLUE]")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many optimizer steps.")] = None,
    batch_size: BatchOpt = None,
    eval_batch_size: Annotated[Optional[int], typer.Option(help="Evaluation batch size. [default: 2 × batch]")] = None,
    lr: LrOpt = None,
    max_length: MaxLengthOpt = 512,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
    train_file: TrainFileOpt = None,
    validation_file: ValidationFileOpt = None,
    text_columns: TextColumnsOpt = None,
    label_column: LabelColumnOpt = "label",
    max_train_samples: MaxTrainOpt = None,
    max_eval_samples: MaxEvalOpt = None,
    offline: OfflineOpt = False,
    save_model: Annotated[Optional[Path], typer.Option(help="Write the fine-tuned model (safetensors) here.")] = None,
    backend: Annotated[str, typer.Option(help="Under torchrun: auto (NCCL on GPUs, gloo on CPUs), nccl or "
                                              "gloo.")] = "auto",
    json_output: JsonOption = False,
    output: OutputOption = None,
) -> None:
    """Fine-tune with randomized backprop (and exactly, with --compare): accuracy, memory, time.

    Several GPUs or machines: launch it with torchrun (torchrun --nproc-per-node N -m randbp_cli
    finetune ...); --batch-size is per process.
    """
    from .render import finetune_tables
    from .report import FinetuneReport, check_writable, to_json, write_json_atomic
    from .train import FinetuneConfig, run_finetune

    config = FinetuneConfig(
        **_data_options(task, model, data_dir, train_file, validation_file, text_columns, label_column,
                        max_train_samples, max_eval_samples, offline),
        rhos=list(rho or []), compare=compare, methods=method, sketch=sketch, include=include, exclude=exclude,
        epochs=epochs,
        max_steps=max_steps, batch_size=batch_size, eval_batch_size=eval_batch_size, lr=lr, max_length=max_length,
        grad_accum=grad_accum, seed=seed, dtype=dtype, device=device,
        save_model=None if save_model is None else str(save_model))
    config.validate()
    from .distributed import init_distributed, shutdown

    world_size, rank, local_rank, local_world_size = _torchrun_environment()
    if output is not None and rank == 0:  # rank 0 alone writes the report
        check_writable(output)
    dist, rank_device = init_distributed(world_size, rank, local_rank, backend, device, local_world_size)
    try:
        with _stop_on_signals() as stop, _training_progress(stop, enabled=dist.is_main) as callbacks:
            report = FinetuneReport.from_dict(run_finetune(config, callbacks, dist, rank_device))
    finally:
        shutdown(dist)
    interrupted = report.status == "interrupted"
    if not dist.is_main:  # rank 0 alone prints and writes
        raise typer.Exit(130 if interrupted else 0)
    report.command = _command_line()
    if output is not None:
        write_json_atomic(output, report.to_dict())
    if json_output:
        typer.echo(to_json(report.to_dict()))
    else:
        for table in finetune_tables(report):
            out_console.print(table)
        if output is not None:
            _note(f"report written to {output}")
    save_errors = [run.save_error for run in report.runs if run.save_error]
    for message in save_errors:
        _note(f"randbp: error: {message} (the report keeps the finished runs)")
    if interrupted:
        _note("interrupted: the report holds what finished")
        raise typer.Exit(130)
    if save_errors:
        raise typer.Exit(1)


def _torchrun_environment() -> tuple[int, int, int, int | None]:
    """(world size, rank, local rank, local world size) as torchrun sets them; (1, 0, 0, None)
    for a plain launch."""
    import os

    def read(name: str, default):
        try:
            value = os.environ.get(name)
            return default if value in (None, "") else int(value)
        except ValueError:
            raise RandbpError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None

    return read("WORLD_SIZE", 1), read("RANK", 0), read("LOCAL_RANK", 0), read("LOCAL_WORLD_SIZE", None)


def _secondary_rank() -> int | None:
    """This process's rank when it is a torchrun worker other than rank 0, else None."""
    import os

    try:
        world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    except ValueError:
        return None
    return rank if world_size > 1 and rank != 0 else None


@app.command()
def variance(
    task: TaskOpt = "synthetic",
    model: ModelOpt = None,
    rho: Annotated[float, typer.Option(help="Compression rate whose variance is measured.")] = 0.5,
    sketch: Annotated[Optional[list[str]], typer.Option("--sketch", help=SKETCH_HELP + " [default: gaussian]")] = None,
    layer: Annotated[Optional[list[str]], typer.Option("--layer", help="Measure linear layers matching this "
                                                       "pattern (suffix, glob, re:REGEX); repeatable. "
                                                       "[default: every linear layer]")] = None,
    repeats: Annotated[int, typer.Option(help="Sketches drawn per measurement for the empirical D²_RMM.")] = 64,
    steps: Annotated[int, typer.Option(help="Fine-tune this many steps, measuring every --every steps "
                                            "(0: measure the first batch only).")] = 0,
    every: Annotated[int, typer.Option(help="Measure every this many steps.")] = 1,
    train_rho: Annotated[Optional[float], typer.Option(help="Train randomized at this rate (with --train-sketch); "
                                                            "default: exact training.")] = None,
    train_sketch: Annotated[str, typer.Option(help="Sketch used for training with --train-rho.")] = "gaussian",
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    max_length: MaxLengthOpt = 512,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
    train_file: TrainFileOpt = None,
    validation_file: ValidationFileOpt = None,
    text_columns: TextColumnsOpt = None,
    label_column: LabelColumnOpt = "label",
    max_train_samples: MaxTrainOpt = None,
    max_eval_samples: MaxEvalOpt = None,
    offline: OfflineOpt = False,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG of the ratio over steps with the bound.")] = None,
    json_output: JsonOption = False,
    output: OutputOption = None,
) -> None:
    """Randomized vs mini-batch (SGD) gradient variance, per layer and sketch, on real batches."""
    from .render import check_image_path, variance_table, write_plot
    from .report import VarianceReport, check_writable, to_json, write_json_atomic
    from .train import VarianceConfig
    from .variance import run_variance

    config = VarianceConfig(
        **_data_options(task, model, data_dir, train_file, validation_file, text_columns, label_column,
                        max_train_samples, max_eval_samples, offline),
        sketch=train_sketch, sketches=list(sketch or ["gaussian"]), rho=rho, repeats=repeats, layers=layer,
        steps=steps, every=every, train_rho=train_rho, include=include, exclude=exclude, batch_size=batch_size,
        lr=lr, max_length=max_length, seed=seed, dtype=dtype, device=device)
    config.validate()
    for path in (output, plot):
        if path is not None:
            check_writable(path)
    if plot is not None:
        check_image_path(plot)
    with _stop_on_signals() as stop, _training_progress(stop) as callbacks:
        report = VarianceReport.from_dict(run_variance(config, callbacks))
    report.command = _command_line()
    if output is not None:
        write_json_atomic(output, report.to_dict())
    if plot is not None:
        write_plot([report], plot)
    if json_output:
        typer.echo(to_json(report.to_dict()))
    else:
        out_console.print(variance_table(report))
    if report.status == "interrupted":
        _note("interrupted: the report holds what finished")
        raise typer.Exit(130)


@contextmanager
def _stop_on_signals():
    """SIGINT/SIGTERM ask training to stop after the current step; a second SIGINT aborts at once."""
    import signal

    state = {"stop": False}

    def handler(signum, frame):
        if state["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        state["stop"] = True

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: state["stop"]
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def _training_progress(should_stop, enabled: bool = True):
    from rich.progress import TimeRemainingColumn

    from .train import TrainCallbacks

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=err_console, transient=True, disable=not err_console.is_terminal)
    tasks: dict[str, int] = {}

    def on_run_start(name, total):
        tasks[name] = bar.add_task(name, total=total)

    def on_step(name, step, loss, lr):
        bar.update(tasks[name], completed=step, description=f"{name}  loss {loss:.4f}  lr {lr:.2e}")

    def on_epoch(name, entry):
        metrics = ", ".join(f"{split} {k} {v:.4f}" for split, m in (entry.get("eval") or {}).items()
                            for k, v in m.items() if k != "loss")
        line = f"{name}: epoch {entry['epoch']} train loss {entry['train_loss']:.4f}; {metrics}"
        if err_console.is_terminal:
            bar.console.print(line, highlight=False)  # above the live bar
        else:
            _note(line)

    if not enabled:  # other ranks of a torchrun job: quiet, but they still hear the stop signal
        yield TrainCallbacks(should_stop=should_stop)
        return
    with bar:
        yield TrainCallbacks(on_run_start=on_run_start, on_step=on_step, on_epoch=on_epoch, should_stop=should_stop)


def main() -> None:
    app()
