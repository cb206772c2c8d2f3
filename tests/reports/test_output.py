"""What the CLI prints is whole at any width: no table cell is ever cut ("912,605,2…"), in a
terminal of 60, 80 or 120 columns ($COLUMNS) or in a pipe / CI log (full width)."""

import copy
import json
from pathlib import Path

import pytest
from rich.cells import cell_len
from typer.testing import CliRunner

from randbp_cli.cli.main import app
from randbp_cli.reports.render import tables_for
from randbp_cli.reports.tables import ReportTable, fit
from randbp_cli.reports.load import load_report

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results"
GOLDEN = Path(__file__).parents[1] / "golden"
WIDTHS = [60, 80, 120, None]  # None: a pipe, $COLUMNS unset
BOX = set("┃│┏┓┗┛┡┩└┘━─╇┳┻╋┣┫")

# One report of every kind and shape the CLI renders: profiles (eager, compiled with savers, the
# CI baseline), finetune runs, variance (per record and summarised), every benchmark output.
REPORTS = [RESULTS / "profile-roberta-base-cpu.json", RESULTS / "profile-roberta-base-cpu-compiled.json",
           RESULTS / "baselines" / "profile-roberta-base-ci-cpu.json", RESULTS / "finetune-synthetic-balanced-cpu.json",
           GOLDEN / "finetune-methods.json", GOLDEN / "variance.json", RESULTS / "variance-synthetic-cpu.json",
           RESULTS / "bench-profile-targets-cpu.json", RESULTS / "bench-savers-cpu.json",
           RESULTS / "finetune-synthetic-seeds-cpu.json", RESULTS / "methods-roberta-base-cpu.json"]


def invoke(width, *args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": None if width is None else str(width)})


def cells(tables):
    return {str(cell).strip() for table in tables for column in table.columns for cell in column.cells} - {""}


def assert_whole(stdout, expected_cells, width):
    assert "…" not in stdout, "a cell was elided"
    missing = [cell for cell in expected_cells if cell not in stdout]
    assert not missing, f"cells not shown whole at width {width}: {missing[:5]}"
    if width is not None:
        too_wide = [line for line in stdout.splitlines() if BOX & set(line) and cell_len(line.rstrip()) > width]
        assert not too_wide, f"table lines wider than {width}: {too_wide[0]!r}"


@pytest.mark.parametrize("width", WIDTHS, ids=lambda w: f"cols{w}" if w else "pipe")
@pytest.mark.parametrize("path", REPORTS, ids=lambda p: p.name)
def test_report_tables_are_whole_at_any_width(path, width):
    result = invoke(width, "report", path)
    assert result.exit_code == 0, result.output
    assert_whole(result.stdout, cells(tables_for([load_report(path)])), width)


@pytest.mark.parametrize("width", WIDTHS, ids=lambda w: f"cols{w}" if w else "pipe")
def test_a_failing_gate_shows_its_numbers_whole(tmp_path, width):
    """The numbers the gate exists to show were cut in a CI log: "+11.1…", "regress…", "912,605,252…"."""
    baseline = RESULTS / "baselines" / "profile-roberta-base-ci-cpu.json"
    current = json.loads(baseline.read_text())
    for case in current["results"]:
        case["activation_bytes"] = int(case["activation_bytes"] * 1.111)
    (tmp_path / "now.json").write_text(json.dumps(current))
    result = invoke(width, "check", tmp_path / "now.json", "--baseline", baseline)
    assert result.exit_code == 1, result.output
    assert "regressed" in result.stdout and "+11.1" in result.stdout
    for case in json.loads(baseline.read_text())["results"]:
        assert f"{case['activation_bytes']:,} B" in result.stdout
    for case in current["results"]:
        assert f"{case['activation_bytes']:,} B" in result.stdout


def test_profile_command_fits_a_narrow_terminal(tmp_path):
    """The main job itself (not only `report`) prints through the fitting: ρ and the saving survive 80 columns."""
    out = tmp_path / "p.json"
    result = invoke(80, "profile", "--model", "roberta-tiny", "--rho", "0.5", "-b", "2", "--seq-len", "16",
                    "--steps", "1", "--warmup", "0", "--device", "cpu", "-o", out)
    assert result.exit_code == 0, result.output
    assert_whole(result.stdout, cells(tables_for([load_report(out)])), 80)
    assert "ρ" in result.stdout and "0.5" in result.stdout


def _wide_table(rows=3, columns=8):
    table = ReportTable(title="t", caption="c", keys=2)
    for name in ["case", "metric", *[f"value column {i}" for i in range(columns)]]:
        table.add_column(name, no_wrap=True)
    for row in range(rows):
        table.add_row(f"case-{row}", "activation_bytes", *[f"{(row + 1) * 912_605_252 + i:,} B" for i in range(columns)])
    return table


def _render(parts, width):
    from io import StringIO

    from rich.console import Console

    console = Console(width=width, file=StringIO())
    for part in parts:
        console.print(part, soft_wrap=not hasattr(part, "columns"))
    return console.file.getvalue()


@pytest.mark.parametrize("width, shape", [(400, "one table"), (60, "split"), (30, "records")])
def test_fit_wraps_headers_then_splits_then_lists_records(width, shape):
    table = _wide_table()
    parts = fit(table, width)
    out = _render(parts, width)
    assert_whole(out, cells([table]), width)
    if shape == "one table":
        assert parts == [table]
    elif shape == "split":
        assert len(parts) > 1 and all(p.columns[0].header == "case" for p in parts)  # keys repeated
        assert "(1/" in out
    else:
        assert "value column 3: " in out and "case: case-2" in out


def test_fit_keeps_row_styles_when_split():
    table = _wide_table()
    table.rows[1].style = "bold red"
    parts = fit(copy.copy(table), 60)
    assert all(part.rows[1].style == "bold red" for part in parts)


def test_merged_reports_name_their_files_and_what_differs(tmp_path):
    """`report eager.json compiled.json` showed two identical-looking "exact" rows and one footer."""
    eager = json.loads((RESULTS / "profile-roberta-base-cpu.json").read_text())
    compiled = json.loads((RESULTS / "profile-roberta-base-cpu-compiled.json").read_text())
    compiled["config"]["dtype"] = "bfloat16"  # as if run in another dtype, too
    (tmp_path / "eager.json").write_text(json.dumps(eager))
    (tmp_path / "compiled.json").write_text(json.dumps(compiled))
    result = invoke(None, "report", tmp_path / "eager.json", tmp_path / "compiled.json", "--format", "markdown")
    assert result.exit_code == 0, result.output
    main, by_kind = result.stdout.split("activations by kind, MiB")  # the second table: MiB by kind
    kinds_header = next(line for line in by_kind.splitlines() if line.startswith("|"))
    assert kinds_header.split("|")[1].strip() == "report" and "linear inputs" in kinds_header
    lines = [line for line in main.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[:2] == ["report", "method"] and {"compile", "dtype", "commit"} <= set(header)
    assert "device" not in header  # the same in both: no column
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
    exact = [row for row in rows if row["method"] == "exact" and row["savers"] == "—" and row["batch"] == "8"]
    assert {(r["report"], r["compile"], r["dtype"]) for r in exact} == {("eager.json", "eager", "float32"),
                                                                        ("compiled.json", "default", "bfloat16")}
    footer = main.split(lines[-1])[1]
    assert f"eager.json ({len(eager['results'])} rows, commit {eager['environment']['git']['commit'][:7]}" in footer
    assert f"compiled.json ({len(compiled['results'])} rows" in footer and "median of 5 steps" in footer


def test_one_report_has_no_file_column():
    result = invoke(None, "report", RESULTS / "profile-roberta-base-cpu.json", "--format", "markdown")
    assert result.exit_code == 0, result.output
    assert "| method |" in result.stdout and "report |" not in result.stdout.splitlines()[2]


def test_merged_files_of_one_name_are_told_apart_by_path(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "p.json").write_text((RESULTS / "profile-roberta-base-cpu.json").read_text())
    result = invoke(None, "report", tmp_path / "a" / "p.json", tmp_path / "b" / "p.json")
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "a" / "p.json") in result.stdout and str(tmp_path / "b" / "p.json") in result.stdout


@pytest.mark.parametrize("keys", [1, 2])
def test_a_table_of_keys_only_is_never_dropped(keys):
    """A table with nothing beside its key columns, too wide for the terminal, printed nothing."""
    table = ReportTable(title="t", keys=keys)
    for name in ["a long key column header"] * keys:
        table.add_column(name, no_wrap=True)
    table.add_row(*["912,605,252 and more"] * keys)
    out = _render(fit(table, 10), 10)
    assert "912,605,252 and more" in out
