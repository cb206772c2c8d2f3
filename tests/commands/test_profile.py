"""`randbp profile`: the library call and the CLI, happy paths and every bad input."""

import json

import pytest
import torch
from typer.testing import CliRunner

from randbp_cli.cli.main import app
from randbp_cli.commands.profile import ProfileConfig, run_profile
from randbp_cli.errors import ConfigError

runner = CliRunner()
TINY = ["--model", "roberta-tiny", "--seq-len", "16", "--steps", "1", "--warmup", "0"]


def _invoke(args):
    return runner.invoke(app, args)


@pytest.fixture(scope="module")
def tiny_report():
    config = ProfileConfig(model="roberta-tiny", rhos=[0.5, 0.1], sketches=["gaussian", "countsketch"],
                           batch_sizes=[2, 4], seq_len=16, steps=2, warmup=1, device="cpu")
    return run_profile(config)


def test_report_schema_and_cases(tiny_report):
    report = tiny_report
    assert report["schema"] == "randbp.profile/1"
    assert report["model"]["weights"] == "random-init" and report["model"]["source"] == "builtin-config"
    env = report["environment"]
    for key in ("randbp", "torch", "transformers", "python", "cpu_count", "device_name", "nvml"):
        assert key in env
    assert env["nvml"]["available"] is False and env["nvml"]["reason"]  # a CPU-only run: no NVML, and why
    results = report["results"]
    assert len(results) == 2 * (1 + 2 * 2)
    keys = [(r["method"], r["rho"], r["sketch"], r["batch_size"]) for r in results]
    assert ("exact", None, None, 2) in keys and ("randomized", 0.1, "countsketch", 4) in keys
    for r in results:
        assert r["seq_len"] == 16 and r["dtype"] == "float32" and r["device"] == "cpu"
        assert r["activation_bytes"] == sum(r["activation_bytes_by_kind"].values())
        assert set(r["step_time_s"]) >= {"median", "min", "max"} and len(r["step_time_s"]["samples"]) == 2
        assert r["cuda"] is None and r["nvml"] is None  # not measured on CPU


def test_savings_follow_rho_and_meet_the_limit(tiny_report):
    for r in tiny_report["results"]:
        if r["method"] == "exact":
            assert r["activation_saving_vs_exact"] == 0 and r["time_ratio_vs_exact"] == 1
            assert r["activation_bytes_by_kind"]["linear_inputs"] > 0
            continue
        assert r["randomized_layers"] == 14  # 2 layers × 6 linear + the 2 in the head
        assert r["activation_bytes_by_kind"]["linear_inputs"] == 0
        assert r["activation_bytes"] == pytest.approx(r["activation_limit_bytes"], rel=0.01)
    by_rho = {(r["rho"], r["batch_size"]): r["activation_bytes"] for r in tiny_report["results"]
              if r["sketch"] == "gaussian"}
    assert by_rho[(0.1, 4)] < by_rho[(0.5, 4)]


def test_same_sketch_bytes_for_every_data_independent_sketch(tiny_report):
    sizes = {}
    for r in tiny_report["results"]:
        if r["method"] == "randomized":
            sizes.setdefault((r["rho"], r["batch_size"]), set()).add(r["activation_bytes"])
    assert all(len(v) == 1 for v in sizes.values())


def test_cli_json_and_output_file(tmp_path):
    out = tmp_path / "report.json"
    result = _invoke(["profile", *TINY, "--rho", "0.5", "--sketch", "countsketch", "-b", "2", "--json",
                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # only JSON on stdout
    assert report == json.loads(out.read_text())
    assert report["command"].startswith("randbp ")
    assert [r["method"] for r in report["results"]] == ["exact", "randomized"]
    assert list(tmp_path.iterdir()) == [out]  # no temp files left behind


def test_cli_table():
    result = _invoke(["profile", *TINY, "--rho", "0.5", "-b", "2"])
    assert result.exit_code == 0, result.output
    assert "randomized" in result.stdout and "activations MiB" in result.stdout
    assert "random-init" in result.stdout


def test_cli_isolate(tmp_path):
    """Each case in a fresh process, from a checkpoint without a classifier head: the fresh processes
    printed transformers' loading report and bars (and, now and then, leaked-semaphore warnings)."""
    import subprocess
    import sys

    from transformers import AutoConfig, AutoModel

    from randbp_cli.data.models import builtin_config_path

    AutoModel.from_config(AutoConfig.from_pretrained(builtin_config_path("roberta-tiny"))).save_pretrained(tmp_path)
    args = [arg if arg != "roberta-tiny" else str(tmp_path) for arg in TINY]
    proc = subprocess.run([sys.executable, "-m", "randbp_cli", "profile", *args, "--rho", "0.5", "-b", "2", "--isolate",
                           "--device", "cpu", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)["results"]
    assert results[1]["activation_saving_vs_exact"] > 0
    assert [line for line in proc.stderr.splitlines() if not line.startswith("[")] == []  # progress lines only


@pytest.mark.parametrize("args, code, needle", [
    (["--rho", "0"], 2, "rho must be in (0, 1]"),
    (["--rho", "1.5"], 2, "rho must be in (0, 1]"),
    (["--rho", "abc"], 2, "--rho"),
    (["-b", "0"], 2, "--batch-size"),
    (["--seq-len", "0"], 2, "--seq-len"),
    (["--seq-len", "4096"], 2, "positions"),
    (["--sketch", "dft"], 2, "unknown sketch"),
    (["--model", "no-such-org/no-such-model"], 2, "unknown model"),
    (["--dtype", "int8"], 2, "unknown dtype"),
    (["--steps", "0"], 2, "--steps"),
    (["--include", "nothing_matches"], 2, "matches no nn.Linear"),
    (["--device", "tpu"], 2, "device"),
])
def test_cli_bad_input_one_line_no_traceback(args, code, needle):
    base = ["profile", "--model", "roberta-tiny", "--steps", "1", "--warmup", "0", "--seq-len", "8"]
    result = _invoke(base + args)
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cli_cuda_without_cuda():
    result = _invoke(["profile", *TINY, "--device", "cuda"])
    assert result.exit_code == 2
    assert "CUDA is not available" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("target", ["missing-dir/report.json", "."])
def test_cli_unwritable_output_fails_before_running(tmp_path, target):
    path = tmp_path / target
    result = _invoke(["profile", *TINY, "-o", str(path)])
    assert result.exit_code == 2
    assert "cannot write" in result.stderr or "is a directory" in result.stderr
    assert not (tmp_path / "missing-dir").exists()


def test_cli_read_only_directory(tmp_path):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        result = _invoke(["profile", *TINY, "-o", str(locked / "r.json")])
        assert result.exit_code == 2 and "permission denied" in result.stderr
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_module_entry_point():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "randbp_cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("randbp ")


def test_checkpoint_methods_and_budget():
    config = ProfileConfig(model="roberta-tiny", rhos=[0.1], sketches=["crs"], batch_sizes=[4], seq_len=16, steps=1,
                           warmup=0, device="cpu", methods=["checkpoint", "checkpoint+randomized"], budget_mib=4)
    report = run_profile(config)
    by_method = {r["method"]: r for r in report["results"]}
    assert list(by_method) == ["exact", "checkpoint", "checkpoint+randomized"]  # exact is always there
    exact, ckpt, both = by_method["exact"], by_method["checkpoint"], by_method["checkpoint+randomized"]
    assert ckpt["checkpointing"]["units"] == 2
    assert ckpt["activation_bytes"] < exact["activation_bytes"] / 4  # only each layer's input is kept
    assert ckpt["activation_peak_bytes"] == ckpt["activation_bytes"] + ckpt["checkpointing"]["recompute_unit_bytes"]
    assert both["checkpointing"]["recompute_unit_bytes"] < ckpt["checkpointing"]["recompute_unit_bytes"]
    parts = both["contributions"]
    assert parts["checkpointing_stored_bytes_saved"] == exact["activation_bytes"] - ckpt["activation_bytes"]
    assert parts["randomized_recompute_bytes_saved"] > 0
    budgets = {m: r["budget"]["max_batch_size"] for m, r in by_method.items()}
    assert budgets["exact"] < budgets["checkpoint"] < budgets["checkpoint+randomized"]
    for r in by_method.values():  # the boundary was measured on both sides
        found = r["budget"]
        assert found["measured"][str(found["max_batch_size"])] <= found["budget_bytes"]
        assert found["measured"][str(found["max_batch_size"] + 1)] > found["budget_bytes"]


def test_unknown_method():
    result = _invoke(["profile", *TINY, "--method", "offload"])
    assert result.exit_code == 2 and "unknown method" in result.stderr


@pytest.mark.parametrize("sketch", ["balanced", "countsketch"])
def test_checkpointing_with_randomized_layers_is_sound(tiny_roberta, sketch):
    """HF activation checkpointing + randomized layers: bit for bit the gradients of the same run
    without checkpointing (same dropout masks and sketch seeds in the recompute), for the default
    sketch (its seed drawn inside its op) and a host-seeded one."""
    from conftest import tiny_batch
    from randbp_cli import convert
    from randbp_cli.run.methods import set_checkpointing

    model = convert(tiny_roberta, 0.5, sketch=sketch)
    batch = tiny_batch(model, batch_size=4)

    def grads(checkpointed):
        set_checkpointing(model, checkpointed)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 20
    assert all(torch.equal(plain[n], checkpointed[n]) for n in plain)


@pytest.mark.parametrize("config, needle", [
    ({"model_type": "no-such-architecture"}, "cannot build"),
    ({"model_type": "roberta", "hidden_size": 30, "num_attention_heads": 4}, "cannot build"),
])
def test_unusable_config_directory(tmp_path, config, needle):
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = _invoke(["profile", "--model", str(tmp_path), "--steps", "1", "--warmup", "0", "--seq-len", "8"])
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_unknown_attention_implementation():
    result = _invoke(["profile", *TINY, "--attn-implementation", "warp-speed"])
    assert result.exit_code == 2, result.output
    assert "warp-speed" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_savers_measured_alone_and_with_the_sketch():
    result = _invoke(["profile", *TINY, "-b", "2", "--rho", "0.5", "--sketch", "countsketch", "--attn-implementation",
                      "eager", "--saver", "dropout", "--saver", "gelu:2", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["config"]["savers"] == ["dropout", "gelu:2"]
    cases = [(r["method"], r["sketch"], r.get("savers")) for r in report["results"]]
    assert cases == [("exact", None, None), ("exact", None, ["dropout", "gelu:2"]), ("randomized", "countsketch", None),
                     ("randomized", "countsketch", ["dropout", "gelu:2"])]
    exact, alone, sketched, both = report["results"]
    assert exact["activation_saving_vs_exact"] == 0.0
    assert 0 < alone["activation_saving_vs_exact"] < both["activation_saving_vs_exact"]
    assert 0 < sketched["activation_saving_vs_exact"] < both["activation_saving_vs_exact"]
    assert "activation_limit_bytes" in sketched
    for kind in ("dropout_seeds", "gelu_codes", "attention_probs"):
        assert kind in both["activation_bytes_by_kind"] and kind not in exact["activation_bytes_by_kind"]
    assert both["activation_bytes_by_kind"]["gelu_codes"] > 0 and both["activation_bytes_by_kind"]["sketches"] > 0
    assert "activation_limit_bytes" not in both  # the sketch-only limit says nothing about savers
    table = _invoke(["profile", *TINY, "-b", "2", "--rho", "0.5", "--saver", "gelu:1", "--device", "cpu"])
    assert table.exit_code == 0 and "gelu:1" in table.stdout


def test_compile_runs_every_case_compiled_and_says_so(monkeypatch):
    real, modes = torch.compile, []

    def quick(module, mode=None, **kwargs):  # Dynamo and AOTAutograd as inductor would see them, no codegen
        modes.append(mode)
        return real(module, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", quick)
    from randbp_cli.run import engine
    from randbp_cli.measure import meters

    compiled_while_timed = []
    real_time_call = engine.time_call

    def time_call(fn, device):  # what each timing sample saw torch.compile do
        before = meters.compile_events()
        seconds = real_time_call(fn, device)
        compiled_while_timed.append(meters.compile_events() != before)
        return seconds

    monkeypatch.setattr(engine, "time_call", time_call)
    try:
        result = _invoke(["profile", *TINY, "-b", "2", "--rho", "0.5", "--rho", "0.1", "--steps", "2", "--warmup", "0",
                          "--compile", "--device", "cpu", "--json"])
    finally:
        torch._dynamo.reset()
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert modes == ["default"] * 3  # exact and each ρ (two ρ: one function compiled at two values), once each
    assert report["config"]["compile"] is True and all(r["compile"] == "default" for r in report["results"])
    exact, half, tenth = report["results"]
    assert tenth["activation_bytes"] < half["activation_bytes"] < exact["activation_bytes"]  # the eager tree
    # the compiled graphs' own bytes, measured on them; warmed up until a step compiled nothing
    assert tenth["compiled"]["activation_bytes"] < half["compiled"]["activation_bytes"] < exact["compiled"]["activation_bytes"]
    assert all(r["compiled"]["warmup_steps"] >= 3 and "eager module tree" in r["compiled"]["note"]
               for r in report["results"])
    # no sample that is reported was a step during which anything compiled
    kept = [s for r in report["results"] for s in r["step_time_s"]["samples"]]
    assert len(kept) == 6 and len(compiled_while_timed) >= 6
    assert compiled_while_timed.count(False) == 6  # each kept sample is an attempt that compiled nothing
    assert _invoke(["profile", "--compile-mode", "default", "--device", "cpu"]).exit_code == 2


def test_device_index_is_recorded_wherever_the_device_is(monkeypatch):
    """`--device cuda:3` was recorded as "cuda" in every result and in the environment."""
    from randbp_cli.measure import meters
    from randbp_cli.measure.environment import environment
    from randbp_cli.run.plans import ProfileConfig as Config
    from randbp_cli.commands.profile import _case_result

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"GPU {torch.device(device).index}")
    monkeypatch.setattr(meters, "nvml_info", lambda device: {"available": False, "reason": "a test"})
    plan = Config(model="roberta-tiny", rhos=[0.5], sketches=["countsketch"], device="cuda:3").resolve()
    assert plan.config_record()["device"] == "cuda:3"
    assert _case_result(plan.cases[0], plan, "roberta-tiny", {}).device == "cuda:3"
    env = environment(plan.device)
    assert env["device"] == "cuda:3" and env["device_name"] == "GPU 3"


def test_offline_says_offline_mode_was_asked_for():
    """--offline said 'the Hub is unreachable', as if the network had failed."""
    result = _invoke(["profile", *TINY, "-b", "2", "--device", "cpu", "--offline", "--json"])
    assert result.exit_code == 0, result.output
    note = json.loads(result.stdout)["model"]["note"]
    assert "unreachable" not in note and "--offline" in note
    result = _invoke(["profile", "--model", "nobody/unknown-model", "--offline"])
    assert result.exit_code == 2 and "unreachable" not in result.stderr and "--offline" in result.stderr


def test_budget_over_the_sequence():
    """`--budget-over seq`: the longest sequence at batch 1 whose activations fit, measured on both
    sides of the boundary; the lm-head and swiglu savers make it longer. And the search itself."""
    from randbp_cli.commands.profile import largest_fitting

    report = run_profile(ProfileConfig(model="llama-tiny", rhos=[0.5], batch_sizes=[1], seq_len=32, steps=1,
                                       warmup=0, device="cpu", offline=True, budget_mib=0.5, budget_over="seq",
                                       savers=["swiglu", "lm-head"]))
    found = {(r["method"], tuple(r.get("savers") or ())): r["budget"] for r in report["results"]}
    exact, saved = found[("exact", ())], found[("exact", ("swiglu", "lm-head"))]
    for budget in found.values():
        assert budget["over"] == "seq" and budget["batch_size"] == 1 and "max_batch_size" not in budget
        longest = budget["max_seq_len"]
        assert budget["measured"][str(longest)] <= budget["budget_bytes"] < budget["measured"][str(longest + 1)]
    assert saved["max_seq_len"] > 1.5 * exact["max_seq_len"]
    calls = []
    for boundary, guess in [(37, 5), (37, 90), (37, 37), (1, 10), (0, 10), (200, 150)]:
        calls.clear()
        assert largest_fitting(lambda n: calls.append(n) or n <= boundary, guess, 100) == min(boundary, 100)
        assert len(calls) <= 16
    with pytest.raises(ConfigError, match="--budget-over must be one of batch, seq"):
        ProfileConfig(model="llama-tiny", budget_over="tokens").resolve()
