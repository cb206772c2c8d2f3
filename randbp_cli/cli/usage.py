"""How the `randbp` command ends on a mistake: one line on stderr and an exit code, never a traceback.

A usage error (a bad option value, an unknown command) is exit 2, with a hint where the line alone
would not say how to fix it; a RandbpError exits with its own code (errors.py); Ctrl-C before a run
kept anything is exit 130. Under torchrun, an error every rank hits is said once, by rank 0.
"""

from __future__ import annotations

import signal
import sys

import typer
from typer.core import TyperGroup

try:  # typer >= 0.29 vendors click and raises its own exception types
    from typer import TyperException as _UsageError
except ImportError:  # older typer: plain click
    from click import ClickException as _UsageError

from ..errors import RandbpError
from .common import one_line, torchrun_environment


class OneLineErrors(TyperGroup):
    """Turns usage errors and RandbpError into one stderr line and an exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        sigint = signal.getsignal(signal.SIGINT)
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
                hint = _repeat_hint(err, list(sys.argv[1:] if args is None else args))
                self._say(f"{where}: error: {one_line(err.format_message())}{hint}")
            code = err.exit_code
        except typer.Abort:  # Ctrl-C where nothing could be kept (before a run had measured anything)
            typer.echo("randbp: aborted", err=True)
            code = 130
        except RandbpError as err:
            self._say(f"randbp: error: {one_line(str(err))}", rank_local=err.rank_local)
            code = err.exit_code
        if standalone_mode:
            if code == 130:  # interrupted: a further Ctrl-C must not break the exit handlers into tracebacks
                signal.signal(signal.SIGINT, signal.SIG_IGN)
            sys.exit(code)
        signal.signal(signal.SIGINT, sigint)  # called from Python (a notebook): Ctrl-C works there again
        return code

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # Ctrl-C outside the loops that keep what finished (e.g. loading a model)
            self._say("randbp: interrupted; nothing written")
            raise typer.Exit(130) from None

    @staticmethod
    def _say(message: str, rank_local: bool = False) -> None:
        """Under torchrun every rank usually hits the same error: rank 0 says it, once. An error
        only one rank hit is said by that rank, with its number."""
        torchrun = torchrun_environment(strict=False)
        if not torchrun.secondary:
            typer.echo(message, err=True)
        elif rank_local:
            typer.echo(f"rank {torchrun.rank}: {message}", err=True)


def _repeat_hint(err, args: list[str]) -> str:
    """For `--rho 0.5,0.1` on an option that repeats: say how to give several values."""
    param = getattr(err, "param", None)
    if param is None or not getattr(param, "multiple", False):
        return ""
    for index, token in enumerate(args):
        option, _, value = token.partition("=")
        if option in param.opts and not value and index + 1 < len(args):
            value = args[index + 1]
        if option in param.opts and "," in value:
            return "; repeat the option for several values (" + " ".join(
                f"{option} {part.strip()}" for part in value.split(",") if part.strip()) + ")"
    return ""
