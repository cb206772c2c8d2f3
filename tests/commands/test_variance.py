"""Variance estimators on fixed X, Y; the capture hooks; `randbp variance` end to end offline."""

import json
import re
import struct

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from randbp_cli import RandomizedLinear
from randbp_cli.cli.main import app
from randbp_cli.errors import ConfigError
from randbp_cli.core.sketches import DEFAULT_SKETCH, get_sketch, sketch_names
from randbp_cli.commands.variance import variance_record
from randbp_cli.measure.variance import capture_linear_io, gradient_stats, measure_rmm_variance, real_rows

runner = CliRunner()


def d2_sgd_brute_force(x, y) -> float:
    """D²_SGD straight from its definition: B² · Var of the per-row gradients gᵢ = yᵢxᵢᵀ
    around their mean, with the unbiased (B − 1) normaliser: Σᵢ‖B·gᵢ − G‖² / (B − 1) / B."""
    x = x.reshape(-1, x.shape[-1]).double()
    y = y.reshape(-1, y.shape[-1]).double()
    rows = x.shape[0]
    per_row = torch.einsum("bi,bj->bij", y, x)  # (B, d_out, d_in)
    total = per_row.sum(0)
    return float((rows * per_row - total).square().sum() / (rows - 1) / rows)


def _xy(rows=24, d_in=6, d_out=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d_in, generator=gen, dtype=torch.float64)
    y = torch.randn(rows, d_out, generator=gen, dtype=torch.float64) + 0.3 * x[:, :1]  # correlated: α > 0
    return x, y


@pytest.mark.parametrize("name", sketch_names())
def test_measured_rmm_variance_matches_closed_form(name):
    x, y = _xy()
    k = 8
    measured, se = measure_rmm_variance(x, y, name, k, repeats=4000, generator_seed=1)
    theory = get_sketch(name).variance(x, y, k)
    assert abs(measured - theory) < 5 * se
    assert se < 0.05 * theory


def test_d2_sgd_matches_brute_force_per_row_gradients():
    x, y = _xy(rows=13)
    assert gradient_stats(x, y).d2_sgd == pytest.approx(d2_sgd_brute_force(x, y), rel=1e-10)


def test_alpha_in_unit_interval_and_extremes():
    x, y = _xy()
    assert 0 <= gradient_stats(x, y).alpha <= 1
    rank_one_x = torch.ones(10, 1, dtype=torch.float64) @ torch.randn(1, 4, dtype=torch.float64)
    rank_one_y = torch.ones(10, 1, dtype=torch.float64) @ torch.randn(1, 3, dtype=torch.float64)
    assert gradient_stats(rank_one_x, rank_one_y).alpha == pytest.approx(1.0)  # all rows aligned
    cancelling_x = torch.tensor([[1.0, 2.0], [1.0, 2.0]], dtype=torch.float64)
    cancelling_y = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)  # the two row gradients cancel: XᵀY = 0
    assert gradient_stats(cancelling_x, cancelling_y).alpha == 0.0


def test_record_fields_and_ratio_definition():
    x, y = _xy()
    r = variance_record(x, y, layer="fc", step=3, sketch="gaussian", rho=0.5, repeats=64, seed=0).to_dict()
    for key in ("layer", "step", "sketch", "rho", "k", "rows", "alpha", "d2_sgd", "d2_rmm_measured", "d2_rmm_se",
                "d2_rmm_theory", "ratio", "bound"):
        assert key in r
    assert (r["k"], r["rows"]) == (12, 24)
    assert r["ratio"] == pytest.approx(r["k"] / (r["rows"] - 1) * r["d2_rmm_measured"] / r["d2_sgd"])
    assert r["bound"] == pytest.approx((r["alpha"] + 1) / r["alpha"])


def test_bad_inputs_raise_config_errors():
    x, y = _xy()
    with pytest.raises(ConfigError, match="repeats"):
        measure_rmm_variance(x, y, "gaussian", 4, repeats=1)
    with pytest.raises(ConfigError, match="one row"):
        gradient_stats(x[:1], y[:1])


def test_capture_records_input_and_output_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), RandomizedLinear(6, 2, rho=0.5))
    x = torch.randn(5, 4)
    with capture_linear_io(model, ["0", "2"]) as captured:
        out = model(x)
        out.square().sum().backward()
    x0, y0 = captured["0"]
    assert torch.equal(x0, x) and y0.shape == (5, 6)
    h = torch.tanh(model[0](x))
    assert torch.allclose(captured["2"][0], h)
    assert torch.allclose(captured["2"][1], 2 * model(x))  # ∂(Σ out²)/∂out
    # hooks are gone afterwards: nothing more is captured
    model(x).sum().backward()
    assert torch.equal(captured["0"][0], x0)


TINY = ["--task", "synthetic", "--max-train-samples", "256", "--max-eval-samples", "32", "--batch-size", "8"]


def test_cli_offline_tiny_model_with_plot(tmp_path):
    out, png = tmp_path / "v.json", tmp_path / "v.png"
    result = runner.invoke(app, ["variance", *TINY, "--layer", "intermediate.dense", "--sketch", "gaussian",
                                 "--sketch", "countsketch", "--repeats", "16", "--steps", "4", "--every", "2",
                                 "--train-rho", "0.5", "-o", str(out), "--plot", str(png), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report == json.loads(out.read_text())
    assert report["schema"] == "randbp.variance/1"
    assert report["layers"] == ["roberta.encoder.layer.0.intermediate.dense", "roberta.encoder.layer.1.intermediate.dense"]
    records = report["records"]
    assert len(records) == 3 * 2 * 2  # steps 0, 2, 4 × 2 layers × 2 sketches
    assert {r["step"] for r in records} == {0, 2, 4}
    for r in records:  # the ratio is (k / (B − 1)) · D²_RMM / D²_SGD, both measured, and positive at ρ < 1
        assert 0 <= r["alpha"] <= 1 and r["d2_rmm_measured"] > 0 and r["d2_sgd"] > 0
        assert r["ratio"] == pytest.approx(r["k"] / (r["real_rows"] - 1) * r["d2_rmm_measured"] / r["d2_sgd"])
    assert report["model"]["trained_with"] == f"{DEFAULT_SKETCH} rho=0.5"  # --train-sketch's default
    header = png.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    assert (width, height) == (900, 550)


def test_cli_table():
    result = runner.invoke(app, ["variance", *TINY, "--layer", "roberta.encoder.layer.0.output.dense",
                                 "--repeats", "8"])
    assert result.exit_code == 0, result.output
    assert "D²_RMM" in result.stdout and "bound" in result.stdout


def test_table_shows_k_over_all_rows_and_the_real_rows_apart():
    """k is drawn over all N rows (padding included); B, the SGD samples, is the real rows."""
    from rich.console import Console
    from randbp_cli.reports.render import variance_table
    from randbp_cli.reports.report import VarianceRecord, VarianceReport

    record = VarianceRecord(layer="l", step=0, sketch="gaussian", rho=0.5, k=8, rows=16, real_rows=11,
                            alpha=0.5, d2_sgd=1.0, d2_rmm_measured=1.0, d2_rmm_se=0.1, d2_rmm_theory=1.0,
                            ratio=0.8, bound=3.0)
    console = Console(width=200, record=True)
    console.print(variance_table(VarianceReport(config={"rho": 0.5}, records=[record])))
    text = console.export_text()
    assert "k / N" in text and "k / B" not in text
    header = next(line for line in text.splitlines() if "k / N" in line)
    row = next(line for line in text.splitlines() if "gaussian" in line)
    assert "8 / 16" in row
    columns = [c.strip() for c in re.split("[│┃]", header)]
    cells = [c.strip() for c in re.split("[│┃]", row)]
    assert cells[columns.index("B")] == "11"


@pytest.mark.parametrize("args, needle", [
    (["--repeats", "1"], "--repeats"),
    (["--layer", "no_such_layer"], "matches no linear layer"),
    (["--rho", "0"], "rho must be in (0, 1]"),
    (["--rho", "1.5"], "rho must be in (0, 1]"),
    (["--layer", "classifier.out_proj", "--batch-size", "1"], "one row"),
    (["--every", "0"], "--every"),
])
def test_cli_bad_input(args, needle):
    result = runner.invoke(app, ["variance", *TINY, *[a for a in args]])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    if needle == "matches no linear layer":
        assert "roberta.encoder.layer.0.attention.self.query" in lines[0]


def test_measuring_does_not_change_the_training_it_measures():
    """Measurement draws from its own seed stream: more repeats, same training losses."""
    from randbp_cli.run.plans import VarianceConfig
    from randbp_cli.commands.variance import run_variance

    def losses(repeats):
        report = run_variance(VarianceConfig(task="synthetic", max_train_samples=64, batch_size=8, repeats=repeats,
                                             steps=4, every=2, train_rho=0.5, layers=["output.dense"],
                                             device="cpu"))
        return report["train_loss"], [r["d2_rmm_measured"] for r in report["records"]]

    (few, measured_few), (many, _) = losses(2), losses(6)
    assert few == many
    assert measured_few == losses(2)[1]  # and the measurement itself is reproducible


def test_padding_rows_are_not_sgd_samples():
    """Padding rows have a zero output gradient: D²_SGD and α run over the real rows only, while
    the sketch (and D²_RMM) sees every row, as training does."""
    x, y = _xy(rows=12)
    mask = torch.tensor([[1] * 5 + [0] * 1, [1] * 3 + [0] * 3])  # 2 sequences × 6 tokens, 4 padding
    y = y * mask.reshape(-1, 1)  # what a real model gives: nothing reads a padding row
    x3, y3 = x.reshape(2, 6, -1), y.reshape(2, 6, -1)
    real = real_rows(x3, {"attention_mask": mask})
    assert real.tolist() == mask.reshape(-1).bool().tolist()
    record = variance_record(x3, y3, layer="fc", step=0, sketch="countsketch", rho=0.5, repeats=8, seed=0, real=real)
    assert (record.rows, record.real_rows, record.k) == (12, 8, 6)
    assert record.d2_sgd == pytest.approx(d2_sgd_brute_force(x[real], y[real]), rel=1e-10)
    assert record.d2_rmm_theory == pytest.approx(get_sketch("countsketch").variance(x, y, 6), rel=1e-12)
    assert record.ratio_theory == pytest.approx(6 / 7 * record.d2_rmm_theory / record.d2_sgd, rel=1e-12)
    assert real_rows(torch.zeros(2, 5), {"attention_mask": mask}) is None  # pooled rows: all real


def test_few_bit_gelu_error_is_reported_next_to_the_variance(tmp_path):
    result = runner.invoke(app, ["variance", *TINY, "--layer", "intermediate.dense", "--sketch", "countsketch",
                                 "--repeats", "4", "--steps", "1", "--saver", "gelu:2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    errors = report["gelu_errors"]
    assert {e["layer"] for e in errors} == {"roberta.encoder.layer.0.intermediate.intermediate_act_fn",
                                           "roberta.encoder.layer.1.intermediate.intermediate_act_fn"}
    assert {e["step"] for e in errors} == {0, 1} and all(e["bits"] == 2 for e in errors)
    assert all(0 < e["relative_error"] < 0.5 and 0 < e["weighted_relative_error"] < 1 for e in errors)
    assert report["model"]["trained_with"] == "exact +gelu:2"
    table = runner.invoke(app, ["variance", *TINY, "--layer", "intermediate.dense", "--repeats", "4",
                                "--saver", "gelu:1"])
    assert table.exit_code == 0 and "few-bit GELU: gradient error" in table.stdout


@pytest.mark.parametrize("bad, message", [("gelu:0", "bit count"), ("gelu:9", "bit count"), ("swish", "unknown saver")])
def test_bad_saver_names_are_one_line_and_exit_2(bad, message):
    for command in (["variance", *TINY], ["finetune", *TINY], ["profile", "--model", "roberta-tiny"]):
        result = runner.invoke(app, [*command, "--saver", bad, "--device", "cpu"])
        assert result.exit_code == 2, result.output
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_batch_size_one_fails_before_anything_is_loaded(monkeypatch):
    """`--batch-size 1` ran 73 s (data, model, training) before failing at the first measurement."""
    import randbp_cli.commands.variance

    def never(plan):
        raise AssertionError("loaded data and model for a batch size that cannot be measured")

    monkeypatch.setattr(randbp_cli.commands.variance, "load_model_and_task", never)
    result = runner.invoke(app, ["variance", "--task", "synthetic", "--batch-size", "1"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--batch-size 1" in lines[0] and "at least 2" in lines[0], result.stderr


def test_a_short_last_batch_is_not_measured():
    """9 examples at batch 8 left a last batch of one sequence: the classifier head saw one row and
    the run failed mid-way. Partial batches are dropped; every measured batch is a full one."""
    result = runner.invoke(app, ["variance", "--task", "synthetic", "--max-train-samples", "9", "--batch-size", "8",
                                 "--layer", "classifier.out_proj", "--steps", "2", "--every", "1", "--repeats", "2",
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert [r["rows"] for r in json.loads(result.stdout)["records"]] == [8, 8, 8]


def test_progress_lines_when_stderr_is_not_a_terminal():
    """variance printed nothing for minutes in a CI log; like profile it now says where it is, in plain lines."""
    result = runner.invoke(app, ["variance", *TINY, "--layer", "roberta.encoder.layer.0.output.dense", "--repeats",
                                 "2", "--steps", "20", "--every", "10", "--json"])
    assert result.exit_code == 0, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "variance: 20 steps"
    assert [line.split(",")[0] for line in lines[1:]] == [f"variance: step {s}/20" for s in (2, 4, 6, 8, 10, 12, 14,
                                                                                            16, 18, 20)]
    assert "\x1b" not in result.stderr  # no bar, no colour codes


def test_variance_of_lora_adapters_on_a_decoder():
    """`randbp variance --task synthetic-lm --lora 4` on llama-tiny measures the trained layers only
    (the adapters, not the frozen base layers), each against SGD's noise, on real tokens."""
    result = runner.invoke(app, ["variance", "--task", "synthetic-lm", "--lora", "4", "--rho", "0.5", "--steps", "1",
                                 "--repeats", "4", "--batch-size", "4", "--max-train-samples", "16",
                                 "--device", "cpu", "--offline", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["config"]["lora"]["r"] == 4
    layers = report["layers"]
    assert layers and all(".lora_A." in name or ".lora_B." in name for name in layers)
    # lora_B starts at zero, so lora_A has no gradient on the first batch; after one step it has
    assert all(record["ratio"] is None for record in report["records"] if record["step"] == 0
               and ".lora_A." in record["layer"])
    assert all(record["ratio"] > 0 for record in report["records"] if record["step"] == 1)
