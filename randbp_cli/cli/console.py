"""What the CLI shows and hears while a command runs, and at its end: progress, Ctrl-C, the report.

stdout carries the tables (or exactly one JSON document); everything else (progress, notes,
warnings, errors) goes to stderr, as plain lines when stderr is not a terminal. At the end of a
run `deliver` prints the report, then writes it (never the other way round), and `judge` gives
the memory gate's verdict.
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.console import Console
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..commands.check import compare_reports
from ..errors import OutputError, RandbpError, ReportWriteError
from ..reports.files import to_json, write_fallback, write_json_atomic
from ..reports.plots import plottable, write_plot
from ..reports.render import check_table, tables_for
from ..reports.report import ProfileReport, Report
from ..reports.tables import fit
from ..run.engine import TrainCallbacks, interruptible_now
from .common import command_line, note

err_console = Console(stderr=True)


def output_width() -> int | None:
    """Columns the tables may use: $COLUMNS when set, else the terminal's; None (any) in a pipe or a
    CI log, where nothing wraps lines and a cut number would be lost for good."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    return Console().width if sys.stdout.isatty() else None


def print_tables(tables) -> None:
    """The tables on stdout, each fitted to the width (tables.fit: no number is ever cut)."""
    width = output_width()
    console = Console(width=width or 1 << 16)  # a pipe: each table as wide as its widest row
    for table in tables:
        for part in fit(table, width):
            console.print(part, soft_wrap=isinstance(part, Text))




def _bar(*columns, disable: bool = False) -> Progress:
    """The one progress-bar style: what runs, the bar, done/total, elapsed (and any extra columns)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    *columns, console=err_console, transient=True, disable=disable)


@contextmanager
def phase_progress(total: int):
    """A bar on stderr; yields the engine's `progress(description, done)` callback.
    Not a terminal (a CI log): one plain line per phase instead of a bar."""
    if not err_console.is_terminal:
        yield lambda description, done: note(f"[{done}/{total} steps] {description}")
        return
    with _bar() as bar:
        task = bar.add_task("starting", total=total)

        def update(description: str, done: int) -> None:
            bar.update(task, description=description, completed=done)

        yield update


@contextmanager
def training_progress(should_stop, enabled: bool = True):
    """One bar per training run, a line per finished epoch; yields the engine's TrainCallbacks.
    Not a terminal (a CI log): a line when a run starts and every tenth of its steps instead of a bar."""
    if not enabled:  # other ranks of a torchrun job: quiet, but they still hear the stop signal
        yield TrainCallbacks(should_stop=should_stop)
        return
    bar = _bar(TimeRemainingColumn(), disable=not err_console.is_terminal)
    tasks: dict[str, int] = {}
    totals: dict[str, int] = {}

    def on_run_start(name, total):
        tasks[name], totals[name] = bar.add_task(name, total=total), total
        if not err_console.is_terminal:
            note(f"{name}: {total} steps" if total else f"{name}: measuring the first batch (no training steps)")

    def on_step(name, step, loss, lr):
        bar.update(tasks[name], completed=step, description=f"{name}  loss {loss:.4f}  lr {lr:.2e}")
        total = totals[name]
        if not err_console.is_terminal and (step == total or step % max(1, total // 10) == 0):
            note(f"{name}: step {step}/{total}, loss {loss:.4f}, lr {lr:.2e}")

    def on_epoch(name, entry):
        metrics = ", ".join(f"{split} {k} {v:.4f}" for split, m in (entry.get("eval") or {}).items()
                            for k, v in m.items() if k != "loss")
        line = f"{name}: epoch {entry['epoch']} train loss {entry['train_loss']:.4f}; {metrics}"
        if err_console.is_terminal:
            bar.console.print(line, highlight=False)  # above the live bar
        else:
            note(line)

    with bar:
        yield TrainCallbacks(on_run_start=on_run_start, on_step=on_step, on_epoch=on_epoch, should_stop=should_stop)


@contextmanager
def stop_on_signals():
    """SIGINT/SIGTERM ask the run to stop after the current step (it keeps what finished); a second
    SIGINT cuts the running step itself short (engine.interruptible), never the writing of the report."""
    state = {"stop": False}

    def handler(signum, frame):
        if state["stop"] and signum == signal.SIGINT and interruptible_now():
            raise KeyboardInterrupt  # cuts the running step short; its loop keeps what finished
        state["stop"] = True

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: state["stop"]
    finally:
        for sig, old in previous.items():
            # once asked to stop, the command is ending: a further Ctrl-C while it writes what it kept
            # (or in the interpreter's exit handlers) would only lose the report or print a traceback
            signal.signal(sig, signal.SIG_IGN if state["stop"] and sig == signal.SIGINT else old)


# ---------------------------------------------------------------------------- the end of a run


def deliver(report: Report, output: Optional[Path], json_output: bool, plot: Optional[Path] = None) -> None:
    """The end of every run: the command line into the report; the report printed (one JSON document,
    or the command's tables) *before* anything is written, so a failed write loses nothing on screen;
    then the report (and plot) written. A report that cannot be written where asked is saved in the
    working directory instead (said on stderr, and the command exits 1)."""
    report.command = command_line()
    data = report.to_dict()
    if json_output:
        typer.echo(to_json(data))
    else:
        print_tables(tables_for([report]))
    if output is not None:
        try:
            write_json_atomic(output, data)
        except (OutputError, ReportWriteError) as err:
            raise ReportWriteError(f"{err}; {_saved_elsewhere(data, report.KIND)}") from None
        note(f"report written to {output}")
    if plot is not None and plottable([report]):
        write_plot([report], plot)
        note(f"plot written to {plot}")
    elif plot is not None:
        note(f"nothing measured: no plot written to {plot}")


def _saved_elsewhere(data: dict, kind: str) -> str:
    try:
        return f"the report was saved to {write_fallback(data, kind)} instead"
    except RandbpError as err:
        return f"nor could it be saved in the working directory ({err})"


def judge(current: ProfileReport, baseline: ProfileReport, tolerances: dict, *, quiet: bool,
          show_all: bool = False, json_result: bool = False) -> NoReturn:
    """The gate: warnings and the verdict on stderr, what moved on stdout (unless quiet); exit 1 on a regression."""
    result = compare_reports(current, baseline, **tolerances)
    if json_result:
        typer.echo(to_json(result.to_dict()))
    for warning in result.warnings:
        note(f"warning: {warning}; numbers may differ for that reason alone")
    if not quiet and (result.regressions or result.improvements or show_all):
        print_tables([check_table(result, show_all=show_all)])
    if result.regressions:
        note(f"FAIL: {len(result.regressions)} metric(s) regressed across {result.matched} matched case(s)")
    else:
        improved = (f"; {len(result.improvements)} improvement(s): update the baseline to lock this in "
                    "(randbp check CURRENT --baseline BASELINE --update)") if result.improvements else ""
        note(f"PASS: {result.matched} case(s) match the baseline{improved}")
    for case in result.new_cases:
        note(f"note: case not in the baseline (not checked): {case}")
    raise typer.Exit(result.exit_code)
