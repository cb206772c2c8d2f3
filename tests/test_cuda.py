"""The same contracts on a CUDA device: exact paths, unbiased sketches built on the GPU, autocast,
device-independent byte accounting, and the CLI's CUDA measurements. Skipped without CUDA."""

import json
import math

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from conftest import requires_cuda
from randbp_cli import RandomizedLinear
from randbp_cli.sketches import get_sketch, sketch_names

CUDA = torch.device("cuda")


@requires_cuda
@pytest.mark.parametrize("sketch", sketch_names())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_paths_and_sketch_on_the_gpu(sketch, dtype):
    torch.manual_seed(0)
    plain = nn.Linear(64, 48).to(CUDA, dtype)
    randomized = RandomizedLinear.from_linear(plain, rho=0.25, sketch=sketch)
    x = torch.randn(4, 33, 64, device=CUDA, dtype=dtype)
    grad_out = torch.randn(4, 33, 48, device=CUDA, dtype=dtype)
    grads = []
    for layer in (plain, randomized):
        xi = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        out = layer(xi)
        out.backward(grad_out)
        grads.append((out, xi.grad, layer.bias.grad, layer.weight.grad))
    (out_p, gx_p, gb_p, gw_p), (out_r, gx_r, gb_r, gw_r) = grads
    assert torch.equal(out_p, out_r)
    torch.testing.assert_close(gx_r, gx_p)
    torch.testing.assert_close(gb_r, gb_p)
    assert gw_r.device.type == CUDA.type and gw_r.dtype == dtype and torch.isfinite(gw_r).all()
    saved = get_sketch(sketch).compress(x.reshape(-1, 64), 33, 7)
    assert all(t.device.type == CUDA.type for t in saved)
    assert saved[0].dtype == dtype


@requires_cuda
@pytest.mark.parametrize("sketch", sketch_names())
def test_unbiased_weight_gradient_on_the_gpu(sketch):
    """Mean of many sketched gradients within 5 Monte-Carlo standard errors of the exact one."""
    gen = torch.Generator(device=CUDA).manual_seed(0)
    x = torch.randn(40, 6, device=CUDA, dtype=torch.float64, generator=gen)
    y = torch.randn(40, 5, device=CUDA, dtype=torch.float64, generator=gen)
    x[0] *= 4
    impl = get_sketch(sketch)
    estimates = []
    for seed in range(3000):
        saved = impl.compress(x, 10, seed)
        estimates.append(impl.compress_grad(y, 10, seed, saved).T @ saved[0])
    estimates = torch.stack(estimates)
    exact = y.T @ x
    se = estimates.std(0) / math.sqrt(len(estimates))
    z = ((estimates.mean(0) - exact) / se.clamp_min(1e-12)).abs()
    assert z.max() < 5, f"{sketch}: max z = {z.max():.2f}"


@requires_cuda
def test_autocast_on_the_gpu():
    layer = RandomizedLinear(64, 32, rho=0.5, sketch="countsketch").to(CUDA)
    x = torch.randn(128, 64, device=CUDA, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


@requires_cuda
def test_linear_bytes_are_the_same_on_cpu_and_gpu():
    """The sketches' bytes, and the bytes of all linear-layer inputs, match across devices. How the
    inputs split between "kept only by a linear layer" and "shared" does not: CUDA's fused attention
    also saves its output, the attention output projection's input, which CPU attention does not."""
    from randbp_cli.profiling import ProfileConfig, run_profile

    by_device = {}
    for device in ("cpu", "cuda"):
        config = ProfileConfig(model="roberta-tiny", rhos=[0.5], sketches=["countsketch", "crs"],
                               batch_sizes=[4], seq_len=32, steps=1, warmup=1, device=device)
        by_device[device] = {(r["method"], r["sketch"]): r["activation_bytes_by_kind"]
                             for r in run_profile(config)["results"]}
    for case, kinds in by_device["cpu"].items():
        gpu = by_device["cuda"][case]
        assert gpu["sketches"] == kinds["sketches"], case
        assert (gpu["linear_inputs"] + gpu["linear_inputs_shared"]
                == kinds["linear_inputs"] + kinds["linear_inputs_shared"]), case


@requires_cuda
def test_profile_cli_reports_allocator_and_nvml_numbers():
    from randbp_cli.cli import app

    result = CliRunner().invoke(app, ["profile", "--model", "roberta-tiny", "--device", "cuda", "--seq-len", "32",
                                      "--steps", "2", "--warmup", "1", "--rho", "0.5", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for r in report["results"]:
        assert r["device"] == "cuda"
        assert r["cuda"]["peak_allocated_bytes"] >= r["cuda"]["resting_allocated_bytes"] > 0
        assert r["nvml"]["available"] in (True, False)
        if not r["nvml"]["available"]:
            assert r["nvml"]["reason"]
