"""The Typer app itself: what its help says."""

import typer.main
from typer.testing import CliRunner

from randbp_cli.cli.main import app


def test_help_says_repeat_the_option_not_list_types():
    """`--rho <list[float]>` read as 'give a list'; a repeatable option says to repeat it."""
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        result = CliRunner().invoke(app, [name, "--help"])
        assert result.exit_code == 0, result.output
        options = [line for line in result.output.splitlines() if line.lstrip().startswith("-")]
        assert not [line for line in options if "<list[" in line], (name, result.output)
        for param in command.params:
            if getattr(param, "multiple", False):
                assert "repeat the option" in param.help.lower(), (name, param.opts, param.help)
                assert param.metavar and param.metavar.isupper(), (name, param.opts, param.metavar)
