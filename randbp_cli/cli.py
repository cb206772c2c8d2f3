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
                typer.echo(f"{where}: error: {_one_line(err.format_message())}", err=True)
            code = err.exit_code
        except typer.Abort:
            typer.echo("randbp: aborted", err=True)
            code = 1
        except RandbpError as err:
            typer.echo(f"randbp: error: {_one_line(str(err))}", err=True)
            code = err.exit_code
        if standalone_mode:
            sys.exit(code)
        return code


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


def _command_line() -> str:
    return shlex.join(["randbp", *sys.argv[1:]])


@contextmanager
def _progress(total: int, enabled: bool = True):
    """A rich progress bar on stderr; yields the library's `progress(description, done)` callback."""
    if not enabled:
        yield None
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
    json_output: JsonOption = False,
    output: OutputOption = None,
) -> None:
    """Activation memory and step time of exact vs randomized backprop on a model."""
    from .profiling import ProfileConfig, resolve_device, run_profile, total_steps
    from .report import check_writable, profile_table, to_json, write_json_atomic

    config = ProfileConfig(model=model, rhos=rho or [0.5], sketches=sketch or ["gaussian"],
                           batch_sizes=batch_size or [8], seq_len=seq_len, device=device, dtype=dtype,
                           steps=steps, warmup=warmup, seed=seed, isolate=isolate, include=include,
                           exclude=exclude, attn_implementation=attn_implementation, offline=offline)
    config.validate()
    if output is not None:
        check_writable(output)
    total = total_steps(config, resolve_device(device))
    with _progress(total) as progress:
        report = run_profile(config, progress=progress)
    report["command"] = _command_line()
    if output is not None:
        write_json_atomic(output, report)
    if json_output:
        typer.echo(to_json(report))
    else:
        out_console.print(profile_table(report))
        if output is not None:
            err_console.print(f"report written to {output}")


def main() -> None:
    app()
