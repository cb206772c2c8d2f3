"""Benchmark: the decoder savers (swiglu, lm-head) with LoRA, beside randomized backprop and checkpointing.

    python benchmarks/decoder_savers.py [--model smollm2-135m] [--seq-len 512] [-o results/bench-decoder-savers-cpu.json]

SmolLM2-135M's architecture (built in, random weights), fp32, batch 1 × 512 tokens, LoRA r 16 on
all seven projections, `balanced` ρ 0.1, one `randbp profile` run (cases interleaved round by
round): exact, randomized, checkpoint and checkpoint+randomized, each plain and with `--saver swiglu
--saver lm-head`; then a second run, exact and randomized only, for the budget search (checkpointed
cases fit sequences of thousands of tokens, each probe minutes of CPU time). Targets:
  * ρ 0.1 + swiglu + lm-head: activations ≤ 0.55 × LoRA-exact, step time ≤ 1.10 ×;
  * `--budget-mib 1024 --budget-over seq`: the longest sequence (batch 1) whose activation peak
    fits 1 GiB, ρ 0.1 + savers ≥ 2 × LoRA-exact's (a goal).
The checkpointed cases (peak activations: what is kept plus the largest recompute) are reported
beside them, no target: the README says when to combine. Prints the tables and PASS/FAIL per
target; exits 1 if any target fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from randbp_cli.commands.profile import run_profile  # noqa: E402
from randbp_cli.measure.environment import environment  # noqa: E402
from randbp_cli.reports.files import write_json_atomic  # noqa: E402
from randbp_cli.run.plans import ProfileConfig  # noqa: E402

MiB = 2**20
SAVERS = ["swiglu", "lm-head"]
KINDS = {"linear_inputs": "lin. inputs", "linear_inputs_shared": "lin. shared", "sketches": "sketches",
         "attention": "attention", "mlp": "mlp", "norms": "norms", "logits": "logits", "swiglu_inputs": "swiglu",
         "lm_head_loss": "lm-head", "other": "other"}


def _label(r: dict) -> str:
    return r["method"] + "".join(f" +{saver}" for saver in r.get("savers") or [])


def _table(report: dict, budgets: dict, budget_mib: float) -> None:
    found = {_label(r): r["budget"] for r in budgets["results"]}
    print(f"{'case':<40} {'MiB':>7} {'peak':>7} {'× exact':>8} {'time ×':>7} "
          f"{f'longest seq ≤ {budget_mib:g} MiB':>24}")
    for r in report["results"]:
        peak = r.get("activation_peak_bytes") or r["activation_bytes"]
        budget = found.get(_label(r)) or {}
        longest = f"{budget.get('max_seq_len')}{'+' if budget.get('capped') else ''}" if budget else "—"
        print(f"{_label(r):<40} {r['activation_bytes'] / MiB:>7.1f} {peak / MiB:>7.1f} "
              f"{1 - r['activation_saving_vs_exact']:>8.3f} {r['time_ratio_vs_exact']:>7.2f} {longest:>24}")
    print(f"\nMiB by kind\n{'case':<40} " + " ".join(f"{header:>11}" for header in KINDS.values()))
    for r in report["results"]:
        kinds = r["activation_bytes_by_kind"]
        print(f"{_label(r):<40} " + " ".join(f"{kinds.get(kind, 0) / MiB:>11.1f}" for kind in KINDS))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lora", type=int, default=16)
    parser.add_argument("--rho", type=float, default=0.1)
    parser.add_argument("--budget-mib", type=float, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args()

    common = dict(model=args.model, rhos=[args.rho], batch_sizes=[1], seq_len=args.seq_len, device=args.device,
                  lora=args.lora, savers=SAVERS)
    progress = lambda what, done: print(f"  {what}", file=sys.stderr, flush=True)  # noqa: E731
    print(f"profiling {args.model} 1 × {args.seq_len}, LoRA r {args.lora}, savers {', '.join(SAVERS)} ...",
          file=sys.stderr, flush=True)
    report = run_profile(ProfileConfig(**common, steps=args.steps, warmup=args.warmup,
                                       methods=["randomized", "checkpoint", "checkpoint+randomized"]), progress)
    print(f"the longest sequence within {args.budget_mib:g} MiB ...", file=sys.stderr, flush=True)
    budgets = run_profile(ProfileConfig(**common, steps=1, warmup=0, methods=["randomized"],
                                        budget_mib=args.budget_mib, budget_over="seq"), progress)
    _table(report, budgets, args.budget_mib)

    cases = {(r["method"], tuple(r.get("savers") or ())): r for r in report["results"]}
    found = {(r["method"], tuple(r.get("savers") or ())): r["budget"] for r in budgets["results"]}
    saved = cases[("randomized", tuple(SAVERS))]
    ratio, time = 1 - saved["activation_saving_vs_exact"], saved["time_ratio_vs_exact"]
    longest, baseline = found[("randomized", tuple(SAVERS))]["max_seq_len"], found[("exact", ())]["max_seq_len"]
    label = f"LoRA r {args.lora} rho={args.rho} + {' + '.join(SAVERS)}"
    checks = [(f"{label}: activations {ratio:.3f} × LoRA-exact ≤ 0.55", ratio <= 0.55),
              (f"{label}: step time {time:.2f} × LoRA-exact ≤ 1.10", time <= 1.10),
              (f"{label}: longest sequence within {args.budget_mib:g} MiB {longest} = {longest / baseline:.2f} × "
               f"LoRA-exact's {baseline} ≥ 2", longest >= 2 * baseline)]
    print()
    for name, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if args.output:
        write_json_atomic(args.output, {
            "schema": "randbp.benchmark/1",
            "command": " ".join(["python", *sys.argv]),
            "environment": environment(),
            "checks": [{"check": name, "passed": ok} for name, ok in checks],
            "reports": [report, budgets],
        })
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
