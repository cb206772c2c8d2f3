"""Benchmark: the core's numbers to reach, measured side by side in one run.

    python benchmarks/profile_targets.py [--device cpu] [--steps 3] [-o results/bench-profile-targets-cpu.json]

roberta-base (built-in architecture when no checkpoint is cached), fp32, batch 8:
  * seq 128, exact and {balanced, gaussian, countsketch} × ρ {0.5, 0.2, 0.1}: activation bytes
    at ρ = 0.1 must be ≤ 0.75 × exact, and every ρ within 1% of exact − (1 − ρ) × (inputs kept
    only by linear layers);
  * seq 128 and 512: step-time ratio vs exact (cases interleaved round by round, so machine
    noise hits all alike); the linear-cost sketches (balanced, the default, and countsketch) at
    ρ ≤ 0.5 must be ≤ 1.00 × exact at both lengths.
Prints a table of ratios and PASS/FAIL per target; exits 1 if any target fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from randbp_cli.run.plans import ProfileConfig  # noqa: E402
from randbp_cli.commands.profile import run_profile  # noqa: E402
from randbp_cli.measure.environment import environment  # noqa: E402
from randbp_cli.reports.files import write_json_atomic  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="roberta-base")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--sketches", nargs="+", default=["balanced", "gaussian", "countsketch"])
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args()

    reports, checks = {}, []
    for seq_len in args.seq_lens:
        rhos = [0.5, 0.2, 0.1] if seq_len == args.seq_lens[0] else [0.5, 0.1]
        config = ProfileConfig(model=args.model, rhos=rhos, sketches=args.sketches,
                               batch_sizes=[args.batch_size], seq_len=seq_len, device=args.device,
                               steps=args.steps, warmup=args.warmup)
        print(f"profiling {args.model} batch {args.batch_size} seq {seq_len} ...", file=sys.stderr, flush=True)
        reports[seq_len] = run_profile(config, progress=lambda what, done: print(f"  {what}", file=sys.stderr,
                                                                                  flush=True))

    first = reports[args.seq_lens[0]]["results"]
    exact = next(r for r in first if r["method"] == "exact")
    print(f"\nactivation memory, seq {args.seq_lens[0]}: exact {exact['activation_bytes'] / 2**20:.1f} MiB, "
          f"of which {exact['activation_bytes_by_kind']['linear_inputs'] / 2**20:.1f} MiB kept only by linear layers")
    print(f"{'sketch':<12} {'rho':>5} {'MiB':>8} {'× exact':>8} {'× limit':>8}")
    for r in first:
        if r["method"] == "randomized":
            to_limit = r["activation_bytes"] / r["activation_limit_bytes"]
            print(f"{r['sketch']:<12} {r['rho']:>5} {r['activation_bytes'] / 2**20:>8.1f} "
                  f"{r['activation_bytes'] / exact['activation_bytes']:>8.3f} {to_limit:>8.4f}")
            checks.append((f"{r['sketch']} rho={r['rho']}: within 1% of the limit", abs(to_limit - 1) <= 0.01))
            if r["rho"] == 0.1:
                ratio = r["activation_bytes"] / exact["activation_bytes"]
                checks.append((f"{r['sketch']} rho=0.1: activations {ratio:.3f} × exact ≤ 0.75", ratio <= 0.75))

    print(f"\nstep time vs exact (median of {args.steps} interleaved rounds)")
    print(f"{'seq':>5} {'sketch':<12} {'rho':>5} {'step s':>8} {'× exact':>8}")
    for seq_len, report in reports.items():
        for r in report["results"]:
            print(f"{seq_len:>5} {r['sketch'] or 'exact':<12} {r['rho'] or '':>5} "
                  f"{r['step_time_s']['median']:>8.3f} {r['time_ratio_vs_exact']:>8.2f}")
            if r["sketch"] in ("balanced", "countsketch") and r["rho"] <= 0.5:
                checks.append((f"{r['sketch']} rho={r['rho']} seq {seq_len}: time {r['time_ratio_vs_exact']:.2f}"
                               " × exact ≤ 1.00", r["time_ratio_vs_exact"] <= 1.0))

    print()
    for name, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if args.output:
        write_json_atomic(args.output, {
            "schema": "randbp.benchmark/1",
            "command": " ".join(["python", *sys.argv]),
            "environment": environment(),
            "checks": [{"check": name, "passed": ok} for name, ok in checks],
            "reports": [reports[s] for s in args.seq_lens],
        })
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
