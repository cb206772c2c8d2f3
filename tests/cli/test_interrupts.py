"""Runs are never lost: Ctrl-C (once or twice) keeps what finished, quietly; a report that cannot be
written where asked is printed first and saved in the working directory instead."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import randbp_cli.reports.files
from randbp_cli.cli.main import app

TINY_PROFILE = ["profile", "--model", "roberta-tiny", "--rho", "0.5", "--rho", "0.1", "-b", "2", "--seq-len", "16",
                "--warmup", "0", "--device", "cpu"]


def _start(args, out):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "randbp_cli", *args, "-o", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(proc, needle, timeout=180):
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    proc.kill()
    pytest.fail(f"never saw {needle!r}:\n{''.join(lines)}")


def _interrupt(proc, presses, gap=0.05):
    for press in range(presses):
        if press:
            time.sleep(gap)
        proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=180)
    return stdout, stderr


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_in_profile_keeps_the_measured_cases(tmp_path, presses):
    """Ctrl-C in `profile` exited 130 with no message and no file."""
    out = tmp_path / "p.json"
    proc = _start([*TINY_PROFILE, "--steps", "100000"], out)
    before = _wait_for(proc, "timing round 3/")
    stdout, stderr = _interrupt(proc, presses)
    assert proc.returncode == 130, "".join(before) + stderr
    assert "interrupted: the report holds the cases measured" in stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    report = json.loads(out.read_text())
    assert report["status"] == "interrupted"
    assert [(r["method"], r["rho"]) for r in report["results"]] == [("exact", None), ("randomized", 0.5),
                                                                   ("randomized", 0.1)]
    assert all(r["activation_bytes"] > 0 for r in report["results"])  # memory measured whole
    assert all(len(r["step_time_s"]["samples"]) >= 2 for r in report["results"])  # the rounds that finished
    assert "interrupted" in stdout  # the table says so too
    assert CliRunner().invoke(app, ["report", str(out)]).exit_code == 0  # and it reads back


def test_ctrl_c_twice_in_finetune_exits_quietly_with_the_report(tmp_path):
    """A second Ctrl-C printed an "Exception ignored in atexit callback … KeyboardInterrupt" traceback."""
    out = tmp_path / "f.json"
    proc = _start(["finetune", "--task", "synthetic", "--epochs", "50", "--max-train-samples", "512",
                   "--max-eval-samples", "64", "--rho", "0.5"], out)
    _wait_for(proc, "epoch 1 ")
    _, stderr = _interrupt(proc, 3, gap=0.3)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr and "KeyboardInterrupt" not in stderr
    report = json.loads(out.read_text())
    assert report["status"] == "interrupted" and report["runs"][0]["epochs"][0]["eval"]


def test_a_stop_before_anything_is_measured_writes_nothing(tmp_path, monkeypatch):
    """An empty report would only overwrite a good one (and, as a baseline, guard nothing)."""
    import contextlib

    import randbp_cli.cli.console

    @contextlib.contextmanager
    def stopped_at_once():
        yield lambda: True

    monkeypatch.setattr(randbp_cli.cli.console, "stop_on_signals", stopped_at_once)
    out = tmp_path / "p.json"
    out.write_text("a good report")
    result = CliRunner().invoke(app, [*TINY_PROFILE, "--steps", "1", "-o", str(out)])
    assert result.exit_code == 130, result.output
    assert "interrupted before anything was measured; nothing written" in result.stderr
    assert out.read_text() == "a good report"


def test_a_second_ctrl_c_cuts_only_a_step_short():
    """Outside a step (writing the report, building the next run) a second Ctrl-C only records the stop:
    it used to raise anywhere, and a press while the report was assembled lost the whole run."""
    from randbp_cli.cli.console import stop_on_signals
    from randbp_cli.run.engine import interruptible

    try:
        with stop_on_signals() as should_stop:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)  # outside a step: no KeyboardInterrupt
            assert should_stop()
            with pytest.raises(KeyboardInterrupt), interruptible():
                signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # the command is ending: presses ignored
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def disk_full_at(monkeypatch):
    """`os.replace` onto the given path fails as a full disk would, after the whole run."""
    real_replace = os.replace
    targets = []

    def replace(src, dst):
        if Path(dst).name in targets:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(randbp_cli.reports.files.os, "replace", replace)
    return targets.append


def test_a_failed_write_prints_the_table_and_saves_the_report_elsewhere(tmp_path, monkeypatch, disk_full_at):
    """`-o` failing at write time ran the whole profile, then exited 1 without even printing the table."""
    monkeypatch.chdir(tmp_path)
    disk_full_at("p.json")
    result = CliRunner().invoke(app, [*TINY_PROFILE, "--steps", "1", "-o", str(tmp_path / "p.json")])
    assert result.exit_code == 1, result.output
    assert "randbp profile: roberta-tiny" in result.stdout and "time × exact" in result.stdout
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert "No space left on device" in line and "the report was saved to randbp-profile-" in line
    (saved,) = tmp_path.glob("randbp-profile-*.json")
    assert line.endswith(f"{saved.name} instead") and not (tmp_path / "p.json").exists()
    assert [r["method"] for r in json.loads(saved.read_text())["results"]] == ["exact", "randomized", "randomized"]


def test_variance_says_where_it_wrote(tmp_path):
    out = tmp_path / "v.json"
    result = CliRunner().invoke(app, ["variance", "--model", "roberta-tiny", "--max-train-samples", "32",
                                      "--repeats", "2", "--layer", "output.dense", "--device", "cpu", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"report written to {out}" in result.stderr
