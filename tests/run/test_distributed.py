"""`randbp finetune` under torchrun with DDP on CPUs (gloo): matches one process, ranks draw
their own sketch seeds, rank 0 alone reports, bad launches are refused."""

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from randbp_cli.cli.main import app
from randbp_cli.run.distributed import Distributed, shard
from randbp_cli.data.models import builtin_config_path

runner = CliRunner()
COMMON = ["--task", "synthetic", "--max-train-samples", "96", "--max-eval-samples", "40", "--max-steps", "4",
          "--device", "cpu", "--lr", "1e-3"]


def torchrun(args, nproc=2, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
           "-m", "randbp_cli", "finetune", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def no_dropout_model(tmp_path_factory):
    """roberta-tiny without dropout, as a config-only directory: runs are then deterministic."""
    directory = tmp_path_factory.mktemp("tiny-no-dropout")
    config = dict(json.loads(builtin_config_path("roberta-tiny").read_text()), hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory)


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, no_dropout_model):
    out = tmp_path / "ddp.json"
    proc = torchrun([*COMMON, "--model", no_dropout_model, "--batch-size", "8", "-o", str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    single = runner.invoke(app, ["finetune", *COMMON, "--model", no_dropout_model, "--batch-size", "16", "--json"])
    assert single.exit_code == 0, single.output
    ddp, one = json.loads(out.read_text()), json.loads(single.stdout)
    assert ddp["distributed"] == {"world_size": 2, "backend": "gloo", "global_batch_size": 16}
    assert one["distributed"]["world_size"] == 1 and one["distributed"]["global_batch_size"] == 16
    (run_ddp,), (run_one,) = ddp["runs"], one["runs"]
    assert run_ddp["time"]["steps"] == run_one["time"]["steps"] == 4
    assert run_ddp["epochs"][0]["train_loss"] == pytest.approx(run_one["epochs"][0]["train_loss"], abs=1e-5)
    eval_ddp, eval_one = run_ddp["epochs"][0]["eval"]["validation"], run_one["epochs"][0]["eval"]["validation"]
    assert eval_ddp["loss"] == pytest.approx(eval_one["loss"], abs=1e-5)  # every example counted once
    assert eval_ddp["accuracy"] == eval_one["accuracy"]
    assert ddp["model"]["source"] == "local-config"


def test_randomized_ranks_draw_their_own_sketch_seeds(tmp_path):
    out = tmp_path / "ddp.json"
    proc = torchrun([*COMMON, "--batch-size", "8", "--rho", "0.5", "--sketch", "countsketch", "-o", str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    (run,) = report["runs"]
    per_rank = run["distributed"]["per_rank"]
    assert [r["rank"] for r in per_rank] == [0, 1]
    seeds = [r["rng_seed"] for r in per_rank]
    assert seeds[0] == 0 and len(set(seeds)) == 2  # rank 0 = the single-process stream, rank 1 its own
    assert all(r["memory"]["activation_bytes"] > 0 for r in per_rank)
    assert run["converted_layers"]["count"] == 14 and run["status"] == "completed"
    assert proc.stdout.count("report written to") == 0 and proc.stderr.count("report written to") == 1


def test_world_larger_than_the_data_is_refused_once(tmp_path):
    proc = torchrun([*COMMON, "--batch-size", "8", "--max-train-samples", "1", "-o", str(tmp_path / "r.json")])
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("randbp: error:")]
    assert lines == ["randbp: error: 2 processes but only 1 training examples: start fewer processes "
                     "(--nproc-per-node) or give more data"]
    assert "exitcode  : 2" in proc.stderr or "exitcode: 2" in proc.stderr.replace(" ", "")
    assert not (tmp_path / "r.json").exists()


def test_nccl_without_gpus_is_a_usage_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = runner.invoke(app, ["finetune", *COMMON, "--backend", "nccl"])
    assert result.exit_code == 2
    assert "--backend nccl needs GPUs" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_shards_cover_every_example_once():
    for world in (1, 2, 3):
        parts = [shard(10, Distributed(world, rank)) for rank in range(world)]
        assert sorted(i for part in parts for i in part) == list(range(10))
    assert Distributed(2, 0).rank_seed(5) == 5 and Distributed(2, 1).rank_seed(5) != 5


def test_ctrl_c_on_torchrun_stops_every_rank_and_rank_0_reports(tmp_path):
    import signal
    import time

    out = tmp_path / "r.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                             "-m", "randbp_cli", "finetune", "--task", "synthetic", "--epochs", "40", "--device", "cpu",
                             "--max-train-samples", "256", "--max-eval-samples", "32", "--rho", "0.5", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:  # rank 0 prints a line per finished epoch
        if "epoch 1 " in proc.stdout.readline():
            break
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to torchrun; it passes a signal on to every rank
    proc.communicate(timeout=120)
    report = json.loads(out.read_text())
    assert report["status"] == "interrupted" and report["runs"][0]["status"] == "interrupted"
    assert 1 <= len([e for e in report["runs"][0]["epochs"] if e.get("eval")]) < 40


def test_errors_every_rank_hits_are_said_once_by_rank_0(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    result = runner.invoke(app, ["finetune", *COMMON, "--rho", "7"])
    assert result.exit_code == 2 and result.stderr == ""  # rank 0 says it
    monkeypatch.setenv("RANK", "0")
    result = runner.invoke(app, ["finetune", *COMMON, "--rho", "7"])
    assert result.exit_code == 2 and "rho must be in (0, 1]" in result.stderr


def test_an_error_only_one_rank_hits_is_said_by_that_rank(monkeypatch):
    from randbp_cli.cli import main as cli
    from randbp_cli.errors import DeviceError

    error = DeviceError("no GPU for this rank")
    error.rank_local = True
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr("randbp_cli.run.distributed.init_distributed", fail)
    result = runner.invoke(cli.app, ["finetune", *COMMON])
    assert result.exit_code == 2 and result.stderr.strip() == "rank 1: randbp: error: no GPU for this rank"


def test_a_decoder_with_lora_trains_randomized_under_torchrun(tmp_path):
    """llama-tiny, LoRA r 4, synthetic-lm, two gloo ranks: the adapters sketched on every rank."""
    out = tmp_path / "ddp.json"
    proc = torchrun(["--task", "synthetic-lm", "--lora", "4", "--rho", "0.5", "--max-train-samples", "64",
                     "--max-eval-samples", "16", "--max-steps", "3", "--batch-size", "4", "--device", "cpu",
                     "-o", str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    (run,) = report["runs"]
    assert report["distributed"]["world_size"] == 2 and run["status"] == "completed"
    assert run["converted_layers"]["count"] == 13 * 2 and report["config"]["lora"]["r"] == 4
    assert all(rank["memory"]["activation_bytes_by_kind"]["sketches"] > 0 for rank in run["distributed"]["per_rank"])
