"""Each default exists once (options.py): the CLI's defaults are the library configs' defaults, so
`randbp variance` and `VarianceConfig()` make the same run (the CLI measured the synthetic task
while the library's config defaulted to mrpc)."""

import inspect
from dataclasses import fields
from pathlib import Path

import pytest
import typer.main

from randbp_cli import options
from randbp_cli.commands.check import compare_reports, parse_tolerance
from randbp_cli.cli.main import _listed, app
from randbp_cli.run.plans import FinetuneConfig, ProfileConfig, VarianceConfig

COMMANDS = typer.main.get_command(app).commands

# CLI parameter -> config field, where the names differ (a repeated option is one value per use)
RENAMED = {"rho": "rhos", "sketch": "sketches", "method": "methods", "batch_size": "batch_sizes", "saver": "savers",
           "compile_model": "compile"}
VARIANCE_RENAMED = {"sketch": "sketches", "layer": "layers", "train_sketch": "sketch", "saver": "savers",
                    "compile_model": "compile"}
FINETUNE_RENAMED = {"rho": "rhos", "method": "methods", "saver": "savers", "compile_model": "compile"}
CASES = [("profile", options.ProfileOptions, RENAMED), ("finetune", options.FinetuneOptions, FINETUNE_RENAMED),
         ("variance", options.VarianceOptions, VARIANCE_RENAMED), ("check", options.CheckOptions, {})]


def _default(option_class, name):
    return getattr(option_class(), name)


@pytest.mark.parametrize("command, option_class, renamed", CASES, ids=[c[0] for c in CASES])
def test_every_cli_default_is_the_librarys(command, option_class, renamed):
    names = {f.name for f in fields(option_class)}
    compared = 0
    for param in COMMANDS[command].params:
        name = renamed.get(param.name, param.name)
        if name not in names:
            continue
        library = _default(option_class, name)
        if param.multiple and param.default in (None, ()):  # a repeated option: its default is said in --help
            if library:
                assert f"[default: {_listed(library)}]" in (param.help or ""), (command, param.name, param.help)
                compared += 1
            continue
        cli = str(param.default) if isinstance(param.default, Path) else param.default
        assert cli == library, f"randbp {command} --{param.name.replace('_', '-')}: CLI {cli!r}, library {library!r}"
        compared += 1
    assert compared >= 3, f"{command}: only {compared} options compared"


def test_the_configs_take_their_defaults_from_options():
    """The configs the library resolves are the option classes plus resolve(): no field of their own."""
    for config, option_class in ((ProfileConfig, options.ProfileOptions), (FinetuneConfig, options.FinetuneOptions),
                                 (VarianceConfig, options.VarianceOptions)):
        assert issubclass(config, option_class)
        assert [(f.name, f.default) for f in fields(config)] == [(f.name, f.default) for f in fields(option_class)]
    assert VarianceConfig().task == "synthetic" == COMMANDS["variance"].params[0].default


def test_the_gates_tolerances_are_the_librarys():
    signature = inspect.signature(compare_reports).parameters
    defaults = options.CheckOptions()
    for name in ("tolerance_peak", "tolerance_time", "tolerance_activation"):
        assert parse_tolerance(getattr(defaults, name), "--" + name) == signature[name].default, name


def test_the_sketch_names_options_spells_out_are_the_librarys():
    from randbp_cli.run import methods
    from randbp_cli.core import sketches

    assert options.DEFAULT_SKETCH == methods.DEFAULT_SKETCH == sketches.DEFAULT_SKETCH
    assert list(options.SKETCH_NAMES) == sketches.sketch_names()
