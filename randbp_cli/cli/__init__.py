"""The `randbp` command, a thin layer: Typer options (common.py); consoles, progress, Ctrl-C and
the end of a run (console.py); one line and an exit code for every mistake (usage.py); and the
app (main.py): parse, resolve, call a command, render. The only package that imports typer;
nothing imports it.
"""
