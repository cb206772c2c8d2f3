"""The small things a user reads: every message says what happened, whole and in plain words."""

import copy
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from randbp_cli.cli.main import app
from randbp_cli.run.plans import FinetuneConfig, VarianceConfig
from randbp_cli.errors import ConfigError

RESULTS = Path(__file__).resolve().parents[2] / "results"
BASELINE = RESULTS / "baselines" / "profile-roberta-base-ci-cpu.json"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result, code=2):
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_update_says_created_or_rewritten(tmp_path):
    """`check --update` said "rewritten" when it created the baseline."""
    new = tmp_path / "base.json"
    created = invoke("check", BASELINE, "--baseline", new, "--update")
    assert created.exit_code == 0 and f"baseline {new} created from" in created.stderr, created.output
    again = invoke("check", BASELINE, "--baseline", new, "--update")
    assert again.exit_code == 0 and f"baseline {new} rewritten from" in again.stderr, again.output


def test_invalid_json_names_line_and_column_once(tmp_path):
    """"Unterminated string starting at at line 168": a doubled "at"."""
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "randbp.profile/1", "x": "unterminated')
    line = one_error_line(invoke("report", bad))
    assert "at at" not in line and "line 1, column" in line


def test_a_comma_list_hints_to_repeat_the_option():
    line = one_error_line(invoke("profile", "--rho", "0.5,0.1"))
    assert "--rho" in line and "repeat the option" in line and "--rho 0.5 --rho 0.1" in line


def test_an_unknown_attention_kernel_lists_the_valid_ones_whole():
    line = one_error_line(invoke("profile", "--model", "roberta-tiny", "--attn-implementation", "flash"))
    assert "'flash' is not one of eager," in line and "sdpa" in line and "flash_attention_2" in line
    assert line.rstrip().endswith("a GPU")  # not cut mid-word


@pytest.mark.parametrize("option, value", [("text_columns", ["a"]), ("label_column", "y"), ("data_dir", "/tmp")])
def test_data_options_the_task_never_reads_are_refused(option, value):
    """`finetune --task synthetic --text-columns a` was silently ignored."""
    for config in (FinetuneConfig, VarianceConfig):
        with pytest.raises(ConfigError, match=f"--{option.replace('_', '-')} applies to"):
            config(task="synthetic", device="cpu", **{option: value}).resolve()
    if option != "data_dir":  # a GLUE task has its own columns too (its --data-dir is where its files are)
        with pytest.raises(ConfigError, match="--task mrpc has its own columns"):
            FinetuneConfig(task="mrpc", device="cpu", **{option: value}).resolve()
    line = one_error_line(invoke("finetune", "--task", "synthetic", f"--{option.replace('_', '-')}",
                                 value[0] if isinstance(value, list) else value))
    assert "leave it out" in line


def test_no_case_in_common_lists_every_field_of_a_case(tmp_path):
    current = json.loads(BASELINE.read_text())
    for case in current["results"]:
        case["savers"] = ["gelu:2"]  # a saver no baseline case has
    (tmp_path / "now.json").write_text(json.dumps(current))
    line = one_error_line(invoke("check", tmp_path / "now.json", "--baseline", BASELINE))
    assert "savers, compile mode" in line and "the baseline's first: roberta-base exact" in line


def test_profile_check_takes_the_activation_tolerance(tmp_path):
    """`profile --check` lacked --tolerance-activation, which `check` has: the README calls them one gate."""
    help_text = invoke("profile", "--help").stdout
    assert "--tolerance-activation" in help_text
    report = tmp_path / "p.json"
    args = ["profile", "--model", "roberta-tiny", "-b", "2", "--seq-len", "16", "--steps", "1", "--warmup", "0",
            "--device", "cpu"]
    assert invoke(*args, "-o", report).exit_code == 0
    base = json.loads(report.read_text())
    shrunk = copy.deepcopy(base)
    for case in shrunk["results"]:
        case["activation_bytes"] = int(case["activation_bytes"] / 1.02)  # now is 2% above this baseline
    (tmp_path / "base.json").write_text(json.dumps(shrunk))
    assert invoke(*args, "--check", tmp_path / "base.json").exit_code == 1
    passed = invoke(*args, "--check", tmp_path / "base.json", "--tolerance-activation", "3%")
    assert passed.exit_code == 0, passed.output


def test_progress_lines_count_steps(tmp_path):
    """In a log the progress numbering jumped 0 → 2 → 4 with nothing saying what it counted."""
    result = invoke("profile", "--model", "roberta-tiny", "-b", "2", "--seq-len", "16", "--steps", "2",
                    "--warmup", "1", "--device", "cpu")
    lines = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert lines and all(" steps] " in line for line in lines), lines


def test_variance_without_training_says_what_it_measures():
    result = invoke("variance", "--model", "roberta-tiny", "--max-train-samples", "32", "--repeats", "2",
                    "--layer", "output.dense", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "variance: measuring the first batch" in result.stderr


def test_median_of_one_step_is_singular():
    from randbp_cli.reports.render import _profile_caption
    from randbp_cli.reports.load import load_report

    report = load_report(BASELINE)
    report.config = {**report.config, "steps": 1}
    assert "median of 1 step after" in _profile_caption(report)


def test_an_empty_or_interrupted_report_is_no_baseline(tmp_path):
    report = json.loads(BASELINE.read_text())
    interrupted = {**report, "status": "interrupted", "results": report["results"][:2]}
    empty = {**report, "status": "interrupted", "results": []}
    for name, data, needle in (("i.json", interrupted, "is an interrupted run"), ("e.json", empty, "is empty")):
        (tmp_path / name).write_text(json.dumps(data))
        line = one_error_line(invoke("check", tmp_path / name, "--baseline", tmp_path / "new.json", "--update"))
        assert needle in line and not (tmp_path / "new.json").exists()
    # a baseline made empty by an older randbp: one line, not a StopIteration traceback
    line = one_error_line(invoke("check", BASELINE, "--baseline", tmp_path / "e.json"))
    assert "the baseline holds no case" in line
