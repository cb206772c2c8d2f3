"""Benchmark: randomized backprop on a decoder LM, with PEFT's LoRA and with full fine-tuning.

    python benchmarks/decoders_lora.py [--model smollm2-135m] [--seq-len 512] [-o results/bench-decoders-lora-cpu.json]

SmolLM2-135M's architecture (built in, random weights), fp32, batch 1 × 512 tokens, `balanced`:
  * LoRA r 16 on all seven projections, exact vs ρ 0.1: activations ≤ 0.79 × LoRA-exact and step
    time ≤ 1.05 × (cases interleaved round by round, one process);
  * full fine-tuning, exact vs ρ 0.1: activations ≤ 0.811 × exact (the limit: what only linear
    layers keep, at ρ of itself);
  * LoRA with PEFT's dropout (0.1) on the adapters' input, exact and ρ 0.1, each plain and with the
    seed-dropout saver: what dropout costs, and what the saver gets back (no target).
Layers whose input another op keeps anyway (o_proj's, SDPA keeps it) are left exact by default in
both. Prints the by-kind table and PASS/FAIL per target; exits 1 if any target fails.
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
KINDS = ("linear_inputs", "linear_inputs_shared", "sketches", "attention", "mlp", "norms", "logits", "other")


def _by_kind(name: str, report: dict) -> None:
    print(f"\n{name}: MiB by kind")
    print(f"{'method':<20} {'total':>8} " + " ".join(f"{kind:>{max(9, len(kind))}}" for kind in KINDS)
          + f" {'× exact':>8} {'time ×':>7}")
    for r in report["results"]:
        kinds = r["activation_bytes_by_kind"]
        ratio = 1 - r["activation_saving_vs_exact"]
        label = r["method"] + "".join(f" +{saver}" for saver in r.get("savers") or [])
        print(f"{label:<20} {r['activation_bytes'] / MiB:>8.1f} "
              + " ".join(f"{kinds.get(kind, 0) / MiB:>{max(9, len(kind))}.1f}" for kind in KINDS)
              + f" {ratio:>8.3f} {r['time_ratio_vs_exact']:>7.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lora", type=int, default=16)
    parser.add_argument("--rho", type=float, default=0.1)
    parser.add_argument("--lora-dropout", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args()

    reports, checks = {}, []
    cases = {"lora": (f"LoRA r {args.lora}", dict(lora=args.lora)),
             "full": ("full fine-tuning", dict(lora=None)),
             # PEFT's dropout on the adapters' input: a dropped copy of the input (and its mask) per
             # adapter, measured plain and with the seed-dropout saver
             "lora-dropout": (f"LoRA r {args.lora}, dropout {args.lora_dropout}",
                              dict(lora=args.lora, lora_dropout=args.lora_dropout, savers=["dropout"]))}
    for name, (title, options) in cases.items():
        config = ProfileConfig(model=args.model, rhos=[args.rho], batch_sizes=[1], seq_len=args.seq_len,
                               device=args.device, steps=args.steps, warmup=args.warmup, **options)
        print(f"profiling {args.model} 1 × {args.seq_len}, {title} ...", file=sys.stderr, flush=True)
        reports[name] = run_profile(config, progress=lambda what, done: print(f"  {what}", file=sys.stderr,
                                                                             flush=True))
        _by_kind(title, reports[name])

    lora = reports["lora"]["results"][1]
    ratio, time = 1 - lora["activation_saving_vs_exact"], lora["time_ratio_vs_exact"]
    checks.append((f"LoRA r {args.lora} rho={args.rho}: activations {ratio:.3f} × LoRA-exact ≤ 0.79", ratio <= 0.79))
    checks.append((f"LoRA r {args.lora} rho={args.rho}: step time {time:.2f} × LoRA-exact ≤ 1.05", time <= 1.05))
    full = reports["full"]["results"][1]
    ratio = 1 - full["activation_saving_vs_exact"]
    checks.append((f"full fine-tuning rho={args.rho}: activations {ratio:.3f} × exact ≤ 0.811", ratio <= 0.811))
    plain = reports["lora"]["results"][0]["activation_bytes"]
    print(f"\nLoRA dropout {args.lora_dropout}, MiB (LoRA without dropout, exact: {plain / MiB:.1f})")
    for r in reports["lora-dropout"]["results"]:
        print(f"  {r['method']:<11} {', '.join(r.get('savers') or []) or '—':<8} {r['activation_bytes'] / MiB:>7.1f}"
              f"  {r['activation_bytes'] / plain:.3f} × LoRA-exact without dropout")
    print()
    for name, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if args.output:
        write_json_atomic(args.output, {
            "schema": "randbp.benchmark/1",
            "command": " ".join(["python", *sys.argv]),
            "environment": environment(),
            "checks": [{"check": name, "passed": ok} for name, ok in checks],
            "reports": [reports["lora"], reports["full"], reports["lora-dropout"]],
        })
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
