"""The memory gate bites (randbp check, profile --check) and every report kind renders
(randbp report: tables, Markdown, plots), with bad input refused in one line."""

import copy
import json
import os
import stat
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from randbp_cli.cli.main import app
from randbp_cli.commands.finetune import run_finetune
from randbp_cli.run.plans import FinetuneConfig, VarianceConfig
from randbp_cli.commands.profile import ProfileConfig, run_profile
from randbp_cli.commands.variance import run_variance

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def profile_report():
    config = ProfileConfig(model="roberta-tiny", rhos=[0.5, 0.1], sketches=["countsketch"], batch_sizes=[2, 4],
                           seq_len=16, steps=1, warmup=0, device="cpu")
    return run_profile(config)


@pytest.fixture
def files(tmp_path, profile_report):
    def write(name, data):
        path = tmp_path / name
        path.write_text(data if isinstance(data, str) else json.dumps(data))
        return path

    return write


def test_identical_reports_pass(files, profile_report):
    base = files("base.json", profile_report)
    result = invoke("check", base, "--baseline", base)
    assert result.exit_code == 0, result.output
    assert "PASS: 6 case(s)" in result.stderr


def test_one_more_byte_fails_with_a_table(files, profile_report):
    current = copy.deepcopy(profile_report)
    current["results"][2]["activation_bytes"] += 1
    result = invoke("check", files("now.json", current), "--baseline", files("base.json", profile_report))
    assert result.exit_code == 1, result.output
    assert "FAIL: 1 metric(s) regressed" in result.stderr
    assert "activation_bytes" in result.stdout and "+1 B" in result.stdout and "regressed" in result.stdout


def test_missing_case_and_changed_schema_are_usage_errors(files, profile_report):
    base = files("base.json", profile_report)
    fewer = copy.deepcopy(profile_report)
    del fewer["results"][1]
    result = invoke("check", files("fewer.json", fewer), "--baseline", base)
    assert result.exit_code == 2 and "lacks baseline case" in result.stderr
    renamed = dict(profile_report, schema="randbp.profile/2")
    result = invoke("check", files("v2.json", renamed), "--baseline", base)
    assert result.exit_code == 2 and "randbp.profile/2" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_gate_exit_codes_1_2_2(files, profile_report):
    """The issue's proof that the gate bites: +1 byte, a missing case, a changed schema."""
    base = files("base.json", profile_report)
    plus_one = copy.deepcopy(profile_report)
    plus_one["results"][0]["activation_bytes"] += 1
    missing = copy.deepcopy(profile_report)
    missing["results"] = missing["results"][1:]
    changed = dict(profile_report, schema="randbp.finetune/1")
    codes = [invoke("check", files(f"{i}.json", r), "--baseline", base).exit_code
             for i, r in enumerate([plus_one, missing, changed])]
    assert codes == [1, 2, 2]


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not valid JSON"),
    ('{"hello": 1}', "not a randbp report"),
    ('{"schema": "randbp.profile/1"}', "corrupt or truncated"),
])
def test_unusable_reports(files, profile_report, content, needle):
    result = invoke("check", files("bad.json", content), "--baseline", files("base.json", profile_report))
    assert result.exit_code == 2 and needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = invoke("check", files("base2.json", profile_report), "--baseline", "/no/such/file.json")
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_no_case_in_common(files, profile_report):
    other = copy.deepcopy(profile_report)
    for r in other["results"]:
        r["seq_len"] = 999
    result = invoke("check", files("now.json", other), "--baseline", files("base.json", profile_report))
    assert result.exit_code == 2 and "no case in common" in result.stderr


def _with_cuda_peak(report, peak):
    report = copy.deepcopy(report)
    for r in report["results"]:
        r["cuda"] = {"peak_allocated_bytes": peak}
        r["nvml"] = {"available": True, "peak_used_bytes": peak * 2}
    return report


@pytest.mark.parametrize("growth, tolerance, code", [(1.04, None, 0), (1.06, None, 1), (1.06, "10%", 0),
                                                     (1.06, "0.05", 1)])
def test_peak_tolerance(files, profile_report, growth, tolerance, code):
    base = files("base.json", _with_cuda_peak(profile_report, 1_000_000))
    now = files("now.json", _with_cuda_peak(profile_report, int(1_000_000 * growth)))
    args = ["check", now, "--baseline", base] + (["--tolerance-peak", tolerance] if tolerance else [])
    result = invoke(*args)
    assert result.exit_code == code, result.output


def test_time_is_informational_unless_a_tolerance_is_given(files, profile_report):
    slower = copy.deepcopy(profile_report)
    for r in slower["results"]:
        r["step_time_s"]["median"] *= 1.5
    now, base = files("now.json", slower), files("base.json", profile_report)
    assert invoke("check", now, "--baseline", base).exit_code == 0
    assert invoke("check", now, "--baseline", base, "--tolerance-time", "20%").exit_code == 1


def test_improvement_passes_and_says_update(files, profile_report):
    smaller = copy.deepcopy(profile_report)
    smaller["results"][3]["activation_bytes"] -= 1024
    result = invoke("check", files("now.json", smaller), "--baseline", files("base.json", profile_report))
    assert result.exit_code == 0
    assert "update the baseline to lock this in" in result.stderr and "improved" in result.stdout


def test_environment_warning(files, profile_report):
    other_env = copy.deepcopy(profile_report)
    other_env["environment"]["torch"] = "9.9.9"
    result = invoke("check", files("now.json", other_env), "--baseline", files("base.json", profile_report))
    assert result.exit_code == 0
    assert "warning: torch version differs" in result.stderr


def test_update_round_trip(files, profile_report):
    bigger = copy.deepcopy(profile_report)
    bigger["results"][0]["activation_bytes"] += 4096
    now, base = files("now.json", bigger), files("base.json", profile_report)
    assert invoke("check", now, "--baseline", base).exit_code == 1
    assert invoke("check", now, "--baseline", base, "--update").exit_code == 0
    assert json.loads(base.read_text()) == bigger
    assert invoke("check", now, "--baseline", base).exit_code == 0


def test_check_json_output(files, profile_report):
    result = invoke("check", files("a.json", profile_report), "--baseline", files("b.json", profile_report), "--json")
    data = json.loads(result.stdout)
    assert data["passed"] and data["matched_cases"] == 6 and data["regressions"] == 0


def test_profile_with_check_in_one_step(tmp_path):
    baseline = tmp_path / "baseline.json"
    args = ["profile", "--model", "roberta-tiny", "--seq-len", "16", "-b", "2", "--rho", "0.5", "--sketch",
            "countsketch", "--steps", "1", "--warmup", "0", "--device", "cpu"]
    assert invoke(*args, "-o", baseline).exit_code == 0
    result = invoke(*args, "--check", baseline)
    assert result.exit_code == 0, result.output
    assert "PASS: 2 case(s)" in result.stderr
    doctored = json.loads(baseline.read_text())
    doctored["results"][1]["activation_bytes"] -= 1  # the code now "uses one byte more" than the baseline
    baseline.write_text(json.dumps(doctored))
    assert invoke(*args, "--check", baseline).exit_code == 1
    assert invoke(*args, "--check", tmp_path / "missing.json").exit_code == 2


# ---------------------------------------------------------------------------- randbp report


@pytest.fixture(scope="module")
def finetune_report():
    return run_finetune(FinetuneConfig(task="synthetic", rhos=[0.5], compare=True, epochs=2, max_train_samples=64,
                                       max_eval_samples=32, device="cpu"))


@pytest.fixture(scope="module")
def variance_report():
    return run_variance(VarianceConfig(task="synthetic", max_train_samples=64, batch_size=8, repeats=4, steps=2,
                                       every=1, layers=["output.dense"], sketches=["gaussian", "countsketch"],
                                       device="cpu"))


def _png_size(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


@pytest.mark.parametrize("kind, size", [("profile", (1100, 480)), ("finetune", (1100, 480)),
                                        ("variance", (900, 550))])
def test_each_kind_renders_table_and_plot(tmp_path, files, kind, size, profile_report, finetune_report,
                                          variance_report):
    report = {"profile": profile_report, "finetune": finetune_report, "variance": variance_report}[kind]
    path = files(f"{kind}.json", report)
    png = tmp_path / f"{kind}.png"
    result = invoke("report", path, "--plot", png)
    assert result.exit_code == 0, result.output
    assert f"randbp {kind}" in result.stdout
    assert _png_size(png) == size


def _parse_markdown_tables(text):
    """Every table in the Markdown, as (header, rows): runs of lines starting with `|`."""
    blocks, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([cell.strip() for cell in line.strip("|").split("|")])
        elif block:
            blocks.append(block)
            block = []
    for rows in blocks:
        assert all(len(r) == len(rows[0]) for r in rows)
        assert all(set(cell) <= set("-:") for cell in rows[1])
    return [(rows[0], rows[2:]) for rows in blocks]


def test_markdown_table_parses(files, profile_report):
    result = invoke("report", files("p.json", profile_report), "--format", "markdown")
    assert result.exit_code == 0, result.output
    (header, rows), (kinds_header, kinds_rows) = _parse_markdown_tables(result.stdout)
    assert header[:3] == ["method", "ρ", "sketch"] and len(rows) == len(profile_report["results"])
    # the second table: MiB by kind, summing to each case's total
    assert kinds_header[:3] == ["method", "ρ", "sketch"] and kinds_header[-1] == "total"
    assert len(kinds_rows) == len(rows)
    for row in kinds_rows:
        parts = [float(cell.replace(",", "")) for cell in row[kinds_header.index("seq") + 1:-1]]
        assert abs(sum(parts) - float(row[-1].replace(",", ""))) <= 0.05 * len(parts)


def test_profiles_merge_into_one_comparison(files, profile_report):
    other = copy.deepcopy(profile_report)
    for r in other["results"]:
        r["seq_len"] = 32
    result = invoke("report", files("a.json", profile_report), files("b.json", other), "--format", "markdown")
    (_, rows), (kinds_header, kinds_rows) = _parse_markdown_tables(result.stdout)
    assert len(rows) == len(kinds_rows) == 2 * len(profile_report["results"]) and kinds_header[0] == "report"


@pytest.mark.parametrize("make, needle", [
    (lambda files, p, f: ["/no/such.json"], "does not exist"),
    (lambda files, p, f: [files("x.json", "]]")], "not valid JSON"),
    (lambda files, p, f: [files("x.json", '{"a": 1}')], "not a randbp report"),
    (lambda files, p, f: [files("p.json", p), files("f.json", f)], "different kinds"),
])
def test_report_bad_input(files, profile_report, finetune_report, make, needle):
    result = invoke("report", *make(files, profile_report, finetune_report))
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_checkpoint_cases_check_and_plot(tmp_path, files):
    report = run_profile(ProfileConfig(model="roberta-tiny", rhos=[0.5], sketches=["crs"], batch_sizes=[2],
                                       seq_len=16, steps=1, warmup=0, device="cpu",
                                       methods=["randomized", "checkpoint", "checkpoint+randomized"]))
    path = files("ckpt.json", report)
    result = invoke("check", path, "--baseline", path, "--show-all")
    assert result.exit_code == 0, result.output
    assert "checkpoint+crs rho=0.5" in result.stdout and "tiny checkpoint b=2" in result.stdout
    result = invoke("report", path, "--plot", tmp_path / "p.png")
    assert result.exit_code == 0, result.output


def test_plot_with_an_unknown_image_suffix(files, profile_report, tmp_path):
    result = invoke("report", files("p.json", profile_report), "--plot", tmp_path / "plot.txt")
    assert result.exit_code == 2 and "cannot draw a .txt file" in result.stderr
    assert not (tmp_path / "plot.txt").exists()


# ---------------------------------------------------------------------------- never pass on nothing, never a traceback


def _without(report, key, where=lambda r: True):
    report = copy.deepcopy(report)
    for r in report["results"]:
        if where(r):
            r.pop(key, None)
    return report


def _one_error_line(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "PASS" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("randbp: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("lacking", ["baseline", "current"])
def test_gate_never_passes_without_activation_bytes(files, profile_report, lacking):
    """A baseline whose cases lack the guarded metric used to PASS, comparing only step time."""
    stripped = files(f"{lacking}.json", _without(profile_report, "activation_bytes"))
    complete = files("complete.json", profile_report)
    current, baseline = (complete, stripped) if lacking == "baseline" else (stripped, complete)
    _one_error_line(invoke("check", current, "--baseline", baseline), f"{lacking}.json: results[0]",
                    "has no activation_bytes")


def test_gate_needs_the_cuda_peak_where_the_baseline_has_one(files, profile_report):
    baseline = files("baseline.json", _with_cuda_peak(profile_report, 1_000_000))
    current = files("current.json", profile_report)  # no cuda block: nothing to judge the peak by
    _one_error_line(invoke("check", current, "--baseline", baseline), "current.json: results[0]",
                    "cuda.peak_allocated_bytes")
    on_cuda = copy.deepcopy(profile_report)
    for r in on_cuda["results"]:
        r["device"] = "cuda"
    baseline = files("cuda-base.json", on_cuda)  # a CUDA case without its peak
    _one_error_line(invoke("check", baseline, "--baseline", baseline), "cuda-base.json: results[0]",
                    "cuda.peak_allocated_bytes")


def test_gate_needs_step_time_only_when_it_judges_it(files, profile_report):
    base = files("base.json", profile_report)
    untimed = files("untimed.json", _without(profile_report, "step_time_s"))
    assert invoke("check", untimed, "--baseline", base).exit_code == 0  # informational: shown when there
    _one_error_line(invoke("check", untimed, "--baseline", base, "--tolerance-time", "10%"),
                    "untimed.json: results[0]", "step_time_s.median")


def test_update_refuses_a_baseline_the_gate_could_not_use(files, profile_report):
    base = files("base.json", profile_report)
    before = base.read_text()
    _one_error_line(invoke("check", files("now.json", _without(profile_report, "activation_bytes")), "--baseline",
                           base, "--update"), "now.json: results[0]", "activation_bytes")
    assert base.read_text() == before


def _doctored(report, change):
    report = copy.deepcopy(report)
    change(report)
    return report


MALFORMED = {  # the files, as hand edits and truncating tools make them
    "results-ints": (lambda d: d.__setitem__("results", [1, 2, 3]), "results[0] must be an object (got 1)"),
    "bytes-text": (lambda d: d["results"][2].__setitem__("activation_bytes", "912MB"),
                   'results[2].activation_bytes must be an integer (got "912MB")'),
    "environment-text": (lambda d: d.__setitem__("environment", "cpu"), 'environment must be an object (got "cpu")'),
    "environment-list": (lambda d: d.__setitem__("environment", []), "environment must be an object (got [])"),
    "batch-list": (lambda d: d["results"][1].__setitem__("batch_size", [2]),
                   "results[1].batch_size must be an integer (got [2])"),
    "no-method": (lambda d: d["results"][0].pop("method"), 'results[0] has no "method"'),
    "cuda-text": (lambda d: d["results"][0].__setitem__("cuda", "n/a"), 'results[0].cuda must be an object'),
    "peak-text": (lambda d: d["results"][0].__setitem__("cuda", {"peak_allocated_bytes": "1 GB"}),
                  "results[0].cuda.peak_allocated_bytes must be an integer"),
    "median-bool": (lambda d: d["results"][0]["step_time_s"].__setitem__("median", True),
                    "results[0].step_time_s.median must be a number (got true)"),
}


@pytest.mark.parametrize("which", ["baseline", "current"])
@pytest.mark.parametrize("name", list(MALFORMED))
def test_check_names_the_file_and_key_of_a_malformed_report(files, profile_report, name, which):
    change, message = MALFORMED[name]
    bad = files(f"{which}.json", _doctored(profile_report, change))
    good = files("good.json", profile_report)
    current, baseline = (good, bad) if which == "baseline" else (bad, good)
    _one_error_line(invoke("check", current, "--baseline", baseline), f"{which}.json: {message}")


def test_profile_check_refuses_a_malformed_baseline_before_profiling(files, profile_report):
    bad = files("baseline.json", _doctored(profile_report, MALFORMED["bytes-text"][0]))
    result = invoke("profile", "--model", "no-such-model-dir/", "--check", bad)  # fails before the model is looked up
    _one_error_line(result, "baseline.json: results[2].activation_bytes")


@pytest.mark.parametrize("name", ["results-ints", "bytes-text", "environment-text", "environment-list", "batch-list"])
def test_report_names_the_file_and_key_of_a_malformed_profile(files, profile_report, name):
    change, message = MALFORMED[name]
    _one_error_line(invoke("report", files("p.json", _doctored(profile_report, change))), f"p.json: {message}")


def test_report_names_a_malformed_finetune_or_variance_report(files, finetune_report, variance_report):
    _one_error_line(invoke("report", files("f.json", {"schema": "randbp.finetune/1", "runs": [{}]})),
                    'f.json: runs[0] has no "name"')
    epochs = _doctored(finetune_report, lambda d: d["runs"][0]["epochs"][0].__setitem__("train_loss", "low"))
    _one_error_line(invoke("report", files("f.json", epochs)), "f.json: runs[0].epochs[0].train_loss must be a number")
    records = _doctored(variance_report, lambda d: d["records"].__setitem__(0, "x"))
    _one_error_line(invoke("report", files("v.json", records)), 'v.json: records[0] must be an object (got "x")')
    environment = _doctored(variance_report, lambda d: d.__setitem__("environment", []))
    _one_error_line(invoke("report", files("v.json", environment)), "v.json: environment must be an object")


def test_report_renders_what_a_report_lacks_as_a_dash(tmp_path, files, profile_report, finetune_report,
                                                      variance_report):
    """Measurements a report does not have (an older version, a hand-trimmed file) show as "—"."""
    profile = _doctored(profile_report, lambda d: [r.pop(k) for r in d["results"]
                                                   for k in ("rho", "activation_bytes", "step_time_s")])
    finetune = _doctored(finetune_report, lambda d: [r.pop(k) for r in d["runs"]
                                                     for k in ("memory", "time", "best", "vs_exact")])
    for run in finetune["runs"]:
        for epoch in run["epochs"]:
            epoch.pop("train_loss")
    variance = _doctored(variance_report, lambda d: [r.pop(k) for r in d["records"]
                                                     for k in ("rho", "alpha", "d2_rmm_measured", "ratio")])
    for kind, report in (("profile", profile), ("finetune", finetune), ("variance", variance)):
        result = invoke("report", files(f"{kind}.json", report), "--plot", tmp_path / f"{kind}.png")
        assert result.exit_code == 0, (kind, result.output)
        assert f"randbp {kind}" in result.stdout and "—" in result.stdout
        assert result.stderr.strip() == f"plot written to {tmp_path / f'{kind}.png'}"  # no third-party warning


def test_plot_of_a_report_with_nothing_to_draw_is_refused(files, profile_report, tmp_path):
    empty = files("empty.json", dict(profile_report, results=[]))
    _one_error_line(invoke("report", empty, "--plot", tmp_path / "p.png"), "no results to draw")
    assert not (tmp_path / "p.png").exists()


def test_every_committed_report_loads_and_writes_back_unchanged():
    """The checks refuse no report randbp wrote: results/ and the golden files, read and written back."""
    from randbp_cli.reports.load import load_report
    from randbp_cli.reports.report import REPORTS

    root = Path(__file__).resolve().parents[2]
    paths = [p for p in [*root.glob("results/**/*.json"), *root.glob("tests/golden/*.json")]
             if json.loads(p.read_text()).get("schema") in REPORTS]
    assert len(paths) >= 12
    for path in paths:
        assert load_report(path).to_dict() == json.loads(path.read_text()), path


# ---------------------------------------------------------------------------- file permissions


@pytest.fixture
def umask():
    """Set the process umask for one test, then put the old one back."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_written_files_honour_the_umask(files, profile_report, tmp_path, umask, mask):
    """Reports, baselines and plots were -rw------- whatever the umask (mkstemp's mode, renamed into place)."""
    umask(mask)
    current = files("now.json", profile_report)
    assert invoke("check", current, "--baseline", tmp_path / "base.json", "--update").exit_code == 0
    assert invoke("report", current, "--plot", tmp_path / "plot.png").exit_code == 0
    for name in ("base.json", "plot.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name


def test_a_replaced_file_keeps_its_mode(files, profile_report, tmp_path, umask):
    """Rewriting a file in place keeps its permissions, as writing into it would."""
    baseline = files("base.json", profile_report)
    baseline.chmod(0o640)
    assert invoke("check", files("now.json", profile_report), "--baseline", baseline, "--update").exit_code == 0
    assert stat.S_IMODE(baseline.stat().st_mode) == 0o640


# ---------------------------------------------------------------------------- benchmark outputs


ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name, titles", [
    ("bench-profile-targets-cpu.json", ["reports[0]: randbp profile", "reports[1]: randbp profile"]),
    ("methods-roberta-base-cpu.json", ["profiles.128: randbp profile", "variance.0.1: randbp variance", "budget"]),
    ("finetune-synthetic-seeds-cpu.json", ["summary"]),
    ("bench-savers-cpu.json", ["reports.both_8x128: randbp profile", "reports.both_8x512: randbp profile"]),
])
def test_benchmark_outputs_render(name, titles):
    """`randbp report` refused results/bench-*.json and methods-*.json, which the README said it renders."""
    data = json.loads((ROOT / "results" / name).read_text())
    passed = sum(check["passed"] is True for check in data["checks"])  # the file's own count, re-runs included
    titles = [f"{data['schema']}: {passed} of {len(data['checks'])} checks pass", *titles]
    result = invoke("report", ROOT / "results" / name, "--format", "markdown")
    assert result.exit_code == 0, result.output
    shown = [line.strip("*") for line in result.stdout.splitlines() if line.startswith("**")]
    for title in titles:
        assert any(line.startswith(title) for line in shown), (title, shown)
    assert "| PASS |" in result.stdout


def test_benchmark_output_names_a_bad_embedded_report_and_has_no_plot(files, profile_report, tmp_path):
    bench = {"schema": "randbp.benchmark/1", "checks": [{"check": "it holds", "passed": False}],
             "reports": [profile_report, _doctored(profile_report, MALFORMED["bytes-text"][0])]}
    _one_error_line(invoke("report", files("bench.json", bench)),
                    'bench.json: reports[1].results[2].activation_bytes must be an integer (got "912MB")')
    bench["reports"] = bench["reports"][:1]
    result = invoke("report", files("bench.json", bench))
    assert result.exit_code == 0 and "0 of 1 checks pass" in result.stdout and "FAIL" in result.stdout
    _one_error_line(invoke("report", files("bench.json", bench), "--plot", tmp_path / "b.png"),
                    "a benchmark's output has no plot")
    assert not (tmp_path / "b.png").exists()
    _one_error_line(invoke("report", files("other.json", {"schema": "randbp.other/1", "x": 1})),
                    "'randbp.other/1', which this randbp does not read")
    _one_error_line(invoke("check", files("bench.json", bench), "--baseline", files("p.json", profile_report)),
                    "is a randbp.benchmark/1 report; expected randbp.profile/1")


def test_a_baseline_from_one_gpu_judges_a_run_on_another(files, profile_report):
    """Cases match on the device type: recording cuda:3 (not "cuda") must not break the gate."""
    def on(index):
        report = _with_cuda_peak(profile_report, 1_000_000)
        report["environment"]["device"] = f"cuda:{index}"
        for r in report["results"]:
            r["device"] = f"cuda:{index}"
        return report

    result = invoke("check", files("now.json", on(3)), "--baseline", files("base.json", on(0)))
    assert result.exit_code == 0, result.output
    assert "PASS: 6 case(s)" in result.stderr and "device type differs" not in result.stderr


def test_a_missing_baseline_says_how_to_create_it(files, profile_report, tmp_path):
    current = files("now.json", profile_report)
    _one_error_line(invoke("check", current, "--baseline", tmp_path / "base.json"), "base.json' does not exist",
                    f"randbp check {current} --baseline {tmp_path / 'base.json'} --update")
    _one_error_line(invoke("profile", "--model", "roberta-tiny", "--check", tmp_path / "base.json"),
                    "base.json' does not exist", f"-o {tmp_path / 'base.json'}", "--update")


def test_readme_check_block_runs_top_to_bottom(tmp_path, monkeypatch):
    """The README's `randbp check` block checked against a baseline only its last line created.
    Run as written, on the tiny model (roberta-base's minute per profile swapped out), in a fresh folder."""
    import shlex

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Guarding memory in CI", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line.split(" #", 1)[0] for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    commands = [shlex.split(line) for line in lines]
    assert [c[:2] for c in commands] == [["randbp", "profile"], ["randbp", "check"], ["randbp", "check"],
                                         ["randbp", "profile"]]
    tiny = ["--model", "roberta-tiny", "--seq-len", "16", "--steps", "1", "--warmup", "0"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results" / "baselines").mkdir(parents=True)
    for command in commands:
        args = command[1:]
        if args[0] == "profile":
            args = [a for i, a in enumerate(args) if a != "--model" and (i == 0 or args[i - 1] != "--model")]
            args = [args[0], *tiny, *args[1:]]
        result = invoke(*args)
        assert result.exit_code == 0, (command, result.output)


def test_odd_but_valid_reports_render(tmp_path, files, profile_report, variance_report):
    """Null where a key may be null, an object without the keys a table reads, more sketches than
    plot markers: each rendered, none a traceback."""
    profile = _doctored(profile_report, lambda d: d["config"].__setitem__("device", None))
    profile["results"][0]["budget"] = {"capped": True}  # no budget_bytes, no max_batch_size
    result = invoke("report", files("p.json", profile))
    assert result.exit_code == 0, result.output
    assert "max batch ≤ ? MiB" in result.stdout
    names = ["balanced", "gaussian", "rademacher", "countsketch", "srht", "crs", "wta-crs"]
    variance = copy.deepcopy(variance_report)
    variance["records"] = [dict(variance["records"][0], sketch=name) for name in names]
    result = invoke("report", files("v.json", variance), "--plot", tmp_path / "v.png")
    assert result.exit_code == 0, result.output


def test_a_variance_plot_of_many_layers_draws_a_band_per_sketch(tmp_path, variance_report, monkeypatch):
    """28 LoRA layers × 2 sketches were 56 lines and a legend over the plot: beyond a few layers
    each sketch is one median line with a band, unmeasured ratios (None) left out."""
    from randbp_cli.reports import plots
    from randbp_cli.reports.report import VarianceReport

    variance = copy.deepcopy(variance_report)
    record = variance["records"][0]
    variance["records"] = [dict(record, layer=f"layers.{i}.q_proj", sketch=sketch, step=step,
                                ratio=None if (i, step) == (0, 0) else 0.5 + i / 10, bound=100.0 + i)
                           for i in range(6) for sketch in ("balanced", "countsketch") for step in (0, 10)]
    drawn = {}
    monkeypatch.setattr(plots, "_finish", lambda plt, fig, axes, *args, **kwargs: drawn.update(axes=axes))
    plots.plot_variance(VarianceReport.from_dict(variance), tmp_path / "v.png")
    (ax,) = drawn["axes"]
    labels = [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert labels == ["balanced: median of 6 layers (band: lowest to highest)",
                      "countsketch: median of 6 layers (band: lowest to highest)",
                      "bound (α+1)/α: median of 6 layers"]
    balanced = ax.get_lines()[0]
    # step 0: the median of layers 1-5 (layer 0's ratio is None), step 10: of all six
    assert list(balanced.get_ydata()) == pytest.approx([0.8, 0.75])


def test_savers_and_compile_mode_tell_cases_apart():
    from randbp_cli.commands.check import case_key, describe_key
    from randbp_cli.reports.report import ProfileReport, ProfileResult

    report = ProfileReport(model={"name": "m"})
    plain = ProfileResult(method="randomized", rho=0.1, sketch="balanced", batch_size=8, seq_len=128, dtype="float32",
                          device="cpu")
    saved = ProfileResult(**{**plain.to_dict(), "savers": ["dropout"]})
    compiled = ProfileResult(**{**plain.to_dict(), "compile": "default"})
    keys = {case_key(report, r) for r in (plain, saved, compiled)}
    assert len(keys) == 3
    assert describe_key(case_key(report, saved)) == "m balanced rho=0.1 +dropout b=8 seq=128 float32 cpu"
    assert "compiled (default)" in describe_key(case_key(report, compiled))
