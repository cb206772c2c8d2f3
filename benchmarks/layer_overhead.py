"""Benchmark: what one randomized linear layer costs beyond nn.Linear, per sketch.

    python benchmarks/layer_overhead.py [--device cpu|cuda] [--dtype float32] [-o results/layer-overhead-cpu.json]
    TRITON_INTERPRET=1 python benchmarks/layer_overhead.py --fused-on-cpu   # count the fused kernel's path on a CPU

For two roberta-base layer shapes (768 → 3072 and 3072 → 768), exact nn.Linear and every sketch
at ρ = 0.1, at 1k / 4k / 16k tokens, one training step of the layer (forward, backward):
  * ops: torch ops dispatched (`ops`), and those that compute rather than re-view memory
    (`compute ops`: each launches a kernel on a GPU); `ops vs exact` is the issue's budget (≤ 3);
  * kernels: CUDA kernels launched (torch.profiler), on CUDA only;
  * time × exact: median step time over `--repeats` rounds, every case once per round
    (interleaved, so a noisy machine hits all alike); CUDA events on a GPU, wall clock on a CPU;
  * host µs: the same step at a tiny size (64 tokens, 64 → 64), where the arithmetic is
    negligible and what remains is dispatch: Python, autograd, launches.
`--fused-on-cpu` routes the balanced sketch through the Triton kernel in Triton's interpreter,
so the op count is that of the fused path; it times nothing (the interpreter is slow).
Prints the tables; with -o writes them as JSON with the command, the commit and the environment.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from randbp_cli import RandomizedLinear  # noqa: E402

from randbp_cli.kernels import balanced_triton
from randbp_cli.measure.environment import environment  # noqa: E402
from randbp_cli.reports.files import write_json_atomic  # noqa: E402
from randbp_cli.core.sketches import sketch_names  # noqa: E402

SHAPES = [(768, 3072), (3072, 768)]
VIEW_OPS = {"view", "t", "_unsafe_view", "permute", "detach", "reshape", "expand", "transpose", "slice", "select",
            "alias", "as_strided", "unsqueeze", "squeeze"}


# randbp's graph-safe custom ops, seen here as one op each, and the kernels each launches on a GPU:
# the draw writes a seed and then Sᵀx (randbp_cli/core/ops.py); the others launch one
KERNELS_PER_OP = {"sketch_draw": 2}


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = self.compute = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        weight = KERNELS_PER_OP.get(name, 1) if func.namespace == "randbp" else 1
        self.ops += weight
        self.compute += weight * (name not in VIEW_OPS)
        return func(*args, **(kwargs or {}))


def make_layers(d_in: int, d_out: int, rho: float, device, dtype) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    plain = nn.Linear(d_in, d_out).to(device, dtype)
    layers = {"exact": plain}
    layers.update({name: RandomizedLinear.from_linear(plain, rho=rho, sketch=name) for name in sketch_names()})
    return layers


def step_fn(layer: nn.Module, tokens: int, d_in: int, d_out: int, device, dtype):
    x = torch.randn(tokens, d_in, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, d_out, device=device, dtype=dtype)

    def step() -> None:
        layer(x).backward(grad)
    return step


def count_ops(step) -> tuple[int, int]:
    step()  # warm-up: lazy initialisation is not the layer's cost
    counter = OpCounter()
    with counter:
        step()
    return counter.ops, counter.compute


def count_kernels(step) -> int:
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)


def time_once(step, device, iterations: int) -> float:
    """Seconds per step, averaged over `iterations` back-to-back steps."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iterations):
            step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / iterations
    begin = time.perf_counter()
    for _ in range(iterations):
        step()
    return (time.perf_counter() - begin) / iterations


def interleaved_medians(steps: dict, device, repeats: int, iterations: int) -> dict[str, float]:
    for step in steps.values():  # warm-up
        time_once(step, device, 2)
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            samples[name].append(time_once(step, device, iterations))
    return {name: statistics.median(values) for name, values in samples.items()}


def measure(args, device, dtype) -> dict:
    rows, host = [], []
    for d_in, d_out in SHAPES:
        layers = make_layers(d_in, d_out, args.rho, device, dtype)
        for tokens in args.tokens:
            steps = {name: step_fn(layer, tokens, d_in, d_out, device, dtype) for name, layer in layers.items()}
            counts = {name: count_ops(step) for name, step in steps.items()}
            kernels = {name: count_kernels(step) for name, step in steps.items()} if device.type == "cuda" else {}
            times = {} if args.fused_on_cpu else interleaved_medians(steps, device, args.repeats, args.iterations)
            for name in steps:
                rows.append({"shape": f"{d_in}->{d_out}", "tokens": tokens, "layer": name,
                             "ops": counts[name][0], "compute_ops": counts[name][1],
                             "compute_ops_vs_exact": counts[name][1] - counts["exact"][1],
                             "kernels": kernels.get(name),
                             "kernels_vs_exact": kernels[name] - kernels["exact"] if kernels else None,
                             "step_time_s": times.get(name),
                             "time_vs_exact": times[name] / times["exact"] if times else None})
            print_rows(rows[-len(steps):])
    if not args.fused_on_cpu:
        tiny = make_layers(64, 64, args.rho, device, dtype)
        steps = {name: step_fn(layer, 64, 64, 64, device, dtype) for name, layer in tiny.items()}
        medians = interleaved_medians(steps, device, args.repeats, args.host_iterations)
        host = [{"layer": name, "host_us": 1e6 * seconds, "host_us_vs_exact": 1e6 * (seconds - medians["exact"])}
                for name, seconds in medians.items()]
        print(f"\nhost µs per step at 64 tokens, 64 -> 64 ({device.type}):")
        for row in host:
            print(f"  {row['layer']:<12} {row['host_us']:8.1f} µs  ({row['host_us_vs_exact']:+.1f} vs exact)")
    return {"rows": rows, "host": host}


def print_rows(rows: list[dict]) -> None:
    first = rows[0]
    print(f"\n{first['shape']}, {first['tokens']} tokens")
    print(f"  {'layer':<12} {'ops':>4} {'compute':>7} {'vs exact':>8} {'kernels':>7} {'time × exact':>12}")
    for r in rows:
        kernels = "—" if r["kernels"] is None else str(r["kernels"])
        ratio = "—" if r["time_vs_exact"] is None else f"{r['time_vs_exact']:.2f}×"
        print(f"  {r['layer']:<12} {r['ops']:>4} {r['compute_ops']:>7} {r['compute_ops_vs_exact']:>+8} "
              f"{kernels:>7} {ratio:>12}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rho", type=float, default=0.1)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--iterations", type=int, default=5, help="steps per timing sample")
    parser.add_argument("--host-iterations", type=int, default=200, help="steps per host-µs sample")
    parser.add_argument("--fused-on-cpu", action="store_true", help="op counts of the fused kernel's path "
                        "(needs TRITON_INTERPRET=1); no timing")
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.fused_on_cpu and device.type != "cpu":
        parser.error("--fused-on-cpu is for --device cpu")
    fused = balanced_triton.kernel_on_cpu() if args.fused_on_cpu else contextlib.nullcontext()
    with fused:
        measured = measure(args, device, dtype)
    budget = [r for r in measured["rows"] if r["layer"] == "balanced"]
    worst = max(r["compute_ops_vs_exact"] for r in budget)
    print(f"\nbalanced: at most {worst:+d} compute ops per layer step vs exact (budget +3): "
          f"{'PASS' if worst <= 3 else 'FAIL'}")
    if args.output:
        report = {"schema": "randbp.bench.layer-overhead/1", "command": shlex.join(["python", *sys.argv]),
                  "environment": environment(device), "config": vars(args), **measured}
        write_json_atomic(args.output, report)
        print(f"written to {args.output}", file=sys.stderr)
    return 0 if worst <= 3 else 1


if __name__ == "__main__":
    sys.exit(main())
