"""Benchmark: accuracy of randomized fine-tuning over several seeds, next to exact.

    python benchmarks/finetune_seeds.py [--seeds 0 1 2 3 4] [--rho 0.1] [-o results/finetune-synthetic-seeds-cpu.json]

One seed is one draw of initialisation, data order, dropout and sketches; on a small task a
single run's accuracy moves by points from seed to seed, so "ρ = 0.1 is within 3 points of exact"
is judged on the mean over seeds (the same seeds for every method), with each seed's numbers kept.
For each seed: exact and each sketch at ρ, on the built-in synthetic task (roberta-tiny, CPU).
Exits 1 if a sketch's mean best accuracy is more than --max-gap points below exact's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from randbp_cli.report import write_json_atomic  # noqa: E402
from randbp_cli.finetune import run_finetune  # noqa: E402
from randbp_cli.plans import FinetuneConfig  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--task", default="synthetic")
    parser.add_argument("--model", default="roberta-tiny")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--rho", type=float, default=0.1)
    parser.add_argument("--sketches", nargs="+", default=["gaussian", "countsketch"])
    parser.add_argument("--max-gap", type=float, default=3.0, help="points of accuracy")
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args()

    per_seed: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for i, sketch in enumerate(args.sketches):
            config = FinetuneConfig(task=args.task, model=args.model, rhos=[args.rho], compare=(i == 0),
                                    sketch=sketch, seed=seed)
            for run in run_finetune(config)["runs"]:
                name = "exact" if run["method"] == "exact" else sketch
                entry = {"seed": seed, "best": run["best"]["value"], "best_epoch": run["best"]["epoch"],
                         "last": run["last"]["value"], "step_time_s": run["time"]["step_time_s"]}
                per_seed.setdefault(name, []).append(entry)
                print(f"seed {seed} {name:>12}: best {entry['best']:.3f} (epoch {entry['best_epoch']}), "
                      f"last {entry['last']:.3f}", flush=True)

    summary, checks = {}, []
    for name, entries in per_seed.items():
        best = [e["best"] for e in entries]
        summary[name] = {"mean_best": statistics.mean(best), "sd_best": statistics.stdev(best) if len(best) > 1 else 0.0,
                         "min_best": min(best), "max_best": max(best),
                         "mean_last": statistics.mean(e["last"] for e in entries)}
    exact = summary["exact"]["mean_best"]
    print(f"\n{'run':>12} {'mean best':>10} {'sd':>6} {'min':>6} {'max':>6} {'gap (points)':>13}")
    for name, s in summary.items():
        gap = 100 * (exact - s["mean_best"])
        s["gap_points_vs_exact"] = gap
        print(f"{name:>12} {s['mean_best']:>10.4f} {s['sd_best']:>6.3f} {s['min_best']:>6.3f} {s['max_best']:>6.3f} "
              f"{gap:>13.2f}")
        if name != "exact":
            passed = gap <= args.max_gap
            checks.append({"check": f"{name} rho={args.rho:g}: mean best accuracy {gap:.2f} points below exact "
                                    f"≤ {args.max_gap:g}", "passed": passed})
    for c in checks:
        print(("PASS " if c["passed"] else "FAIL ") + c["check"])
    if args.output:
        write_json_atomic(Path(args.output), {
            "schema": "randbp.finetune-seeds/1", "command": " ".join(["python", *sys.argv]),
            "config": vars(args), "runs": per_seed, "summary": summary, "checks": checks})
        print(f"report written to {args.output}")
    return 0 if all(c["passed"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
