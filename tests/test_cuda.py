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
from randbp_cli.core.sketches import get_sketch, sketch_names

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
    from randbp_cli.commands.profile import ProfileConfig, run_profile

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
    from randbp_cli.cli.main import app

    result = CliRunner().invoke(app, ["profile", "--model", "roberta-tiny", "--device", "cuda", "--seq-len", "32",
                                      "--steps", "2", "--warmup", "1", "--rho", "0.5", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for r in report["results"]:
        assert r["device"] == "cuda"
        assert r["cuda"]["peak_allocated_bytes"] >= r["cuda"]["resting_allocated_bytes"] > 0
        if r["nvml"]["available"]:  # the device's own counter covers at least what torch allocated
            assert r["nvml"]["peak_used_bytes"] >= r["cuda"]["peak_allocated_bytes"]
        else:
            assert r["nvml"]["reason"]


# ---------------------------------------------------------------------------- the fused balanced sketch on CUDA


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n_rows, cols, k", [(1, 8, 1), (1000, 768, 100), (4096, 3072, 2048), (333, 130, 333)])
def test_fused_kernel_matches_the_reference_on_the_gpu(dtype, n_rows, cols, k):
    """The same S on both devices (exactly: sketch the identity) and values to fp32 rounding."""
    from randbp_cli.kernels import balanced, balanced_triton

    seed = torch.tensor(2**62 - 987654321, dtype=torch.int64, device=CUDA)
    if n_rows <= 1000:
        eye = torch.eye(n_rows, dtype=torch.float64, device=CUDA)
        assert torch.equal(balanced_triton.sketch(eye, k, seed).cpu(), balanced.sketch_reference(eye.cpu(), k, int(seed)))
    a = torch.randn(n_rows, cols, device=CUDA).to(dtype)
    fused = balanced_triton.sketch(a, k, seed)
    reference = balanced.sketch_reference(a.cpu(), k, int(seed))
    assert fused.dtype == dtype
    scale = float(a.double().abs().max()) * max(1.0, math.sqrt(n_rows / k))
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert float((fused.cpu().double() - reference.double()).abs().max()) <= tolerance * scale


@requires_cuda
def test_balanced_runs_bit_for_bit_again_without_deterministic_algorithms():
    """Each output row is owned by one program (no atomics): a seed reproduces the gradient exactly."""
    layer = RandomizedLinear(256, 512, rho=0.1, sketch="balanced").to(CUDA)
    x = torch.randn(8, 512, 256, device=CUDA)

    def grad():
        torch.manual_seed(3)
        layer.zero_grad(set_to_none=True)
        layer(x).square().sum().backward()
        return layer.weight.grad.clone()

    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.equal(grad(), grad())


@requires_cuda
def test_every_cuda_graph_replay_sketches_with_a_fresh_seed():
    """A seed baked into a captured graph would repeat one S forever (the reference code's bug)."""
    layer = RandomizedLinear(64, 32, rho=0.25, sketch="balanced").to(CUDA)
    x = torch.randn(128, 64, device=CUDA)
    static_grad = torch.zeros_like(layer.weight)

    def step():
        layer.weight.grad = None
        layer(x).square().sum().backward()
        static_grad.copy_(layer.weight.grad)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    replays = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        replays.append(static_grad.clone())
    assert not torch.equal(replays[0], replays[1]) and not torch.equal(replays[1], replays[2])
    exact = 2 * layer(x).detach().T @ x  # the mean of many replays is the exact gradient
    many = torch.stack([replays[0]] + [(graph.replay(), static_grad.clone())[1] for _ in range(400)])
    se = many.std(0) / math.sqrt(len(many))
    assert float(((many.mean(0) - exact) / se.clamp_min(1e-6)).abs().max()) < 6


def _cuda_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8)).to(CUDA)


def _compiled_grads(model, x, mode, steps):
    compiled = torch.compile(model, mode=mode)
    grads = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        compiled(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    return grads


@requires_cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_on_cuda_rho_one_is_exact_and_below_it_unbiased_with_a_fresh_s_per_replay(mode):
    """Inductor, and Inductor with CUDA graphs: at ρ = 1 (balanced: a signed permutation) every
    gradient is nn.Linear's; at ρ = 0.25 each step (each graph replay) draws a new S and the mean
    of 300 steps' dW is the exact one (a backward that re-drew S would average to 0)."""
    import copy

    from randbp_cli import convert

    plain = _cuda_mlp()
    x = torch.randn(256, 64, device=CUDA)
    plain(x).square().sum().backward()
    exact = [p.grad.clone() for p in plain.parameters()]
    ones = _compiled_grads(convert(copy.deepcopy(plain), 1.0), x, mode, 4)
    for got in ones[-2:]:
        for a, b in zip(got, exact):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()
    grads = _compiled_grads(convert(copy.deepcopy(plain), 0.25), x, mode, 300)
    assert all(not torch.equal(a[0], b[0]) for a, b in zip(grads[2:], grads[3:]))
    for index in (0, 2):  # the two weights
        samples = torch.stack([g[index] for g in grads[3:]])
        se = samples.std(0) / math.sqrt(len(samples))
        z = float(((samples.mean(0) - exact[index]) / se.clamp_min(1e-6)).abs().max())
        assert z < 6, f"weight {index}: mean off by z = {z:.1f}"
    torch._dynamo.reset()
