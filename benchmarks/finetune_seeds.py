"""Benchmark: accuracy of randomized fine-tuning over several seeds, next to exact.

    python benchmarks/finetune_seeds.py [--seeds 0 1 2 3 4] [--rho 0.1] [-o results/finetune-synthetic-seeds-cpu.json]

One seed is one draw of initialisation, data order, dropout and sketches; on a small task a
single run's accuracy moves by points from seed to seed, so "ρ = 0.1 is within 3 points of exact"
is judged on the mean over seeds (the same seeds for every method), with each seed's numbers kept.
For each seed, on the built-in synthetic task (roberta-tiny, CPU): exact; each sketch at ρ; the
first sketch at ρ with `--savers`; and exact with `dropout` alone (a seed instead of each mask:
exact gradients, a different random stream, so its accuracy must match exact's within noise).
Exits 1 if a sketch's mean best accuracy is more than --max-gap points below exact's (--max-gap-savers
with the savers), or if dropout alone differs from exact by more than two standard errors and half a point.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from randbp_cli.measure.environment import environment  # noqa: E402
from randbp_cli.reports.files import write_json_atomic  # noqa: E402
from randbp_cli.commands.finetune import run_finetune  # noqa: E402
from randbp_cli.run.plans import FinetuneConfig  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--task", default="synthetic")
    parser.add_argument("--model", default="roberta-tiny")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--rho", type=float, default=0.1)
    parser.add_argument("--sketches", nargs="+", default=["balanced", "countsketch"])
    parser.add_argument("--savers", nargs="*", default=["dropout", "gelu:2"])
    parser.add_argument("--max-gap", type=float, default=3.0, help="points of accuracy")
    parser.add_argument("--max-gap-savers", type=float, default=1.5, help="points of accuracy")
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args()

    per_seed: dict[str, list[dict]] = {}
    saver_run = f"{args.sketches[0]}+{'+'.join(args.savers)}" if args.savers else None
    for seed in args.seeds:
        configs = [(sketch, FinetuneConfig(task=args.task, model=args.model, rhos=[args.rho], compare=(i == 0),
                                           sketch=sketch, seed=seed)) for i, sketch in enumerate(args.sketches)]
        if args.savers:
            configs.append((saver_run, FinetuneConfig(task=args.task, model=args.model, rhos=[args.rho],
                                                      sketch=args.sketches[0], savers=args.savers, seed=seed)))
            configs.append(("exact+dropout", FinetuneConfig(task=args.task, model=args.model, methods=["exact"],
                                                            savers=["dropout"], seed=seed)))
        for name, config in configs:
            for run in run_finetune(config)["runs"]:
                run_name = "exact" if run["method"] == "exact" and not run.get("savers") else name
                entry = {"seed": seed, "best": run["best"]["value"], "best_epoch": run["best"]["epoch"],
                         "last": run["last"]["value"], "step_time_s": run["time"]["step_time_s"],
                         "activation_bytes": run["memory"]["activation_bytes"]}
                per_seed.setdefault(run_name, []).append(entry)
                print(f"seed {seed} {run_name:>24}: best {entry['best']:.3f} (epoch {entry['best_epoch']}), "
                      f"last {entry['last']:.3f}", flush=True)

    summary, checks = {}, []
    for name, entries in per_seed.items():
        best = [e["best"] for e in entries]
        summary[name] = {"mean_best": statistics.mean(best), "sd_best": statistics.stdev(best) if len(best) > 1 else 0.0,
                         "min_best": min(best), "max_best": max(best),
                         "mean_last": statistics.mean(e["last"] for e in entries)}
    exact = summary["exact"]
    print(f"\n{'run':>24} {'mean best':>10} {'sd':>6} {'min':>6} {'max':>6} {'gap (points)':>13}")
    for name, s in summary.items():
        gap = 100 * (exact["mean_best"] - s["mean_best"])
        s["gap_points_vs_exact"] = gap
        print(f"{name:>24} {s['mean_best']:>10.4f} {s['sd_best']:>6.3f} {s['min_best']:>6.3f} {s['max_best']:>6.3f} "
              f"{gap:>13.2f}")
        if name == "exact+dropout":
            # the same distribution: the gap within two standard errors of a difference of means, or half a point
            se = 100 * (s["sd_best"] ** 2 / len(args.seeds) + exact["sd_best"] ** 2 / len(args.seeds)) ** 0.5
            checks.append({"check": f"dropout alone: mean best accuracy {gap:+.2f} points vs exact, within "
                                    f"max(2 × {se:.2f}, 0.5)", "passed": abs(gap) <= max(2 * se, 0.5)})
        elif name != "exact":
            limit = args.max_gap_savers if name == saver_run else args.max_gap
            checks.append({"check": f"{name} rho={args.rho:g}: mean best accuracy {gap:.2f} points below exact "
                                    f"≤ {limit:g}", "passed": gap <= limit})
    for c in checks:
        print(("PASS " if c["passed"] else "FAIL ") + c["check"])
    if args.output:
        write_json_atomic(Path(args.output), {
            "schema": "randbp.finetune-seeds/1", "command": " ".join(["python", *sys.argv]),
            "environment": environment(), "config": vars(args), "runs": per_seed, "summary": summary,
            "checks": checks})
        print(f"report written to {args.output}")
    return 0 if all(c["passed"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
