"""Benchmark: how far the savers take roberta-base beyond sketching, measured side by side.

    python benchmarks/savers.py [--device cpu] [--sketch countsketch] [-o results/bench-savers-cpu.json]

roberta-base (built-in architecture, random init), fp32, eager attention (so the attention
probabilities' dropout is covered), ρ = 0.1 with `--sketch`, savers `dropout` and `gelu:2`:
  * activations at batch 8 × 128 for exact, each saver alone, both, ρ alone and ρ with both
    (one `randbp profile` run per saver set), and the bytes by kind: what each saver keeps;
  * the same ratio at batch 32 × 128 and at 8 × 512 tokens;
  * step time of ρ with both savers against ρ alone (and exact), median of `--steps` rounds,
    every case once per round (interleaved);
  * with `--budget-mib`: the largest batch of 128 tokens whose activation peak fits, per case.
Targets (issue 14): ρ + savers ≤ 0.45 × exact at 8 × 128, within 0.05 of that at the other two
sizes; step time with the savers ≤ 1.05 × ρ alone; the largest batch within 1 GiB ≥ 2 × exact's.
Prints the tables and PASS/FAIL per target; exits 1 if one fails.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from randbp_cli.run.plans import ProfileConfig  # noqa: E402
from randbp_cli.commands.profile import run_profile  # noqa: E402
from randbp_cli.measure.environment import environment  # noqa: E402
from randbp_cli.reports.files import write_json_atomic  # noqa: E402

MiB = 2**20
SAVERS = ["dropout", "gelu:2"]


def profile(args, batch: int, seq_len: int, savers: list[str], steps: int, budget: float | None = None) -> dict:
    config = ProfileConfig(model="roberta-base", rhos=[args.rho], sketches=[args.sketch], batch_sizes=[batch],
                           seq_len=seq_len, device=args.device, steps=steps, warmup=args.warmup if steps > 1 else 0,
                           attn_implementation="eager", savers=savers, budget_mib=budget)
    print(f"profiling batch {batch} × {seq_len}, savers {savers or 'none'} ...", file=sys.stderr, flush=True)
    return run_profile(config, progress=lambda what, done: print(f"  {what}", file=sys.stderr, flush=True))


def label(r: dict) -> str:
    what = "exact" if r["method"] == "exact" else f"{r['sketch']} ρ={r['rho']:g}"
    return " + ".join([what, *(r.get("savers") or [])])


def print_bytes(report: dict) -> None:
    rows = report["results"]
    exact = rows[0]["activation_bytes"]
    kinds = sorted({k for r in rows for k in r["activation_bytes_by_kind"]})
    widths = [max(len(k), 8) for k in kinds]  # whole kind names: a cut header hides what a column is
    case_width = max(34, *(len(label(r)) for r in rows))
    print(f"\n{'case':<{case_width}} {'MiB':>8} {'× exact':>8}  " + "  ".join(f"{k:>{w}}" for k, w in zip(kinds, widths)))
    for r in rows:
        by_kind = r["activation_bytes_by_kind"]
        print(f"{label(r):<{case_width}} {r['activation_bytes'] / MiB:>8.1f} {r['activation_bytes'] / exact:>8.3f}  "
              + "  ".join(f"{by_kind.get(k, 0) / MiB:>{w}.1f}" for k, w in zip(kinds, widths)))


def ratio_of(report: dict, savers: bool) -> float:
    rows = report["results"]
    case = next(r for r in rows if r["method"] == "randomized" and bool(r.get("savers")) == savers)
    return case["activation_bytes"] / rows[0]["activation_bytes"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sketch", default="countsketch")
    parser.add_argument("--rho", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=5, help="interleaved timing rounds at 8 × 128")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--budget-mib", type=float, default=1024)
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args()

    reports = {"both_8x128": profile(args, 8, 128, SAVERS, args.steps, args.budget_mib)}
    for saver in SAVERS:
        reports[f"{saver}_8x128"] = profile(args, 8, 128, [saver], 1)
    reports["both_32x128"] = profile(args, 32, 128, SAVERS, 1)
    reports["both_8x512"] = profile(args, 8, 512, SAVERS, 1)

    checks = []
    main_ratio = ratio_of(reports["both_8x128"], savers=True)
    for name, report in reports.items():
        print(f"\n== {name}")
        print_bytes(report)
    checks.append((f"ρ={args.rho:g} + {' + '.join(SAVERS)}: activations {main_ratio:.3f} × exact ≤ 0.45 (8 × 128)",
                   main_ratio <= 0.45))
    for size in ("32x128", "8x512"):
        ratio = ratio_of(reports[f"both_{size}"], savers=True)
        checks.append((f"same at {size.replace('x', ' × ')}: {ratio:.3f} × exact, within 0.05 of {main_ratio:.3f}",
                       abs(ratio - main_ratio) <= 0.05))

    timed = {label(r): r for r in reports["both_8x128"]["results"]}
    alone, both = timed[f"{args.sketch} ρ={args.rho:g}"], timed[f"{args.sketch} ρ={args.rho:g} + " + " + ".join(SAVERS)]
    print(f"\nstep time at 8 × 128 (median of {args.steps} interleaved rounds):")
    for name, r in timed.items():
        print(f"  {name:<34} {r['step_time_s']['median']:8.3f} s  {r['time_ratio_vs_exact']:.2f} × exact")
    time_ratio = both["step_time_s"]["median"] / alone["step_time_s"]["median"]
    checks.append((f"step time with the savers {time_ratio:.3f} × ρ alone ≤ 1.05", time_ratio <= 1.05))

    budgets = {name: r["budget"]["max_batch_size"] for name, r in timed.items()}
    print(f"\nlargest batch of 128 tokens within {args.budget_mib:g} MiB: {budgets}")
    batch_ratio = budgets[label(both)] / budgets["exact"]
    checks.append((f"largest batch within {args.budget_mib:g} MiB: {budgets[label(both)]} vs exact "
                   f"{budgets['exact']} ({batch_ratio:.2f}×) ≥ 2×", batch_ratio >= 2))

    print()
    for name, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if args.output:
        write_json_atomic(args.output, {
            "schema": "randbp.bench.savers/1", "command": shlex.join(["python", *sys.argv]),
            "environment": environment(), "config": vars(args),
            "checks": [{"check": name, "passed": ok} for name, ok in checks], "reports": reports})
        print(f"written to {args.output}", file=sys.stderr)
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
