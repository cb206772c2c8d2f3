"""Benchmark: a decoder's held-out loss under randomized backprop over several seeds, LoRA and full.

    python benchmarks/decoders_seeds.py [--seeds 0 1 2 3 4] [--rho 0.1] [-o results/finetune-synthetic-lm-seeds-cpu.json]

`--task synthetic-lm` on `llama-tiny` (CPU), for each seed: LoRA (r 8, PEFT) exact and at ρ, and
full fine-tuning exact and at ρ (`balanced`), each pair from the same initial weights on the same
data in the same order. One seed is one draw of initialisation, data and sketches (and of the
task: each seed's Markov chain is its own, with its own loss floor), so the question "does ρ = 0.1
train as well?" is judged against the spread of exact's own seeds: the randomized runs' mean final
held-out loss must lie within exact's range over the seeds (no worse than exact's worst seed).
Beside it, the paired difference (randomized − exact, seed by seed: the same chain, initial
weights and batches) says what the sketch itself costs, with its mean, standard deviation and
range. Every seed's numbers are kept. Exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from randbp_cli.commands.finetune import run_finetune  # noqa: E402
from randbp_cli.measure.environment import environment  # noqa: E402
from randbp_cli.reports.files import write_json_atomic  # noqa: E402
from randbp_cli.run.plans import FinetuneConfig  # noqa: E402


def _entry(seed: int, run: dict) -> dict:
    final = run["epochs"][-1]["eval"]["validation"]
    return {"seed": seed, "final_loss": final["loss"], "final_token_accuracy": final["token_accuracy"],
            "best_token_accuracy": run["best"]["value"], "steps": run["epochs"][-1]["steps"],
            "step_time_s": run["time"]["step_time_s"], "activation_bytes": run["memory"]["activation_bytes"]}


def _summary(entries: list[dict]) -> dict:
    losses = [e["final_loss"] for e in entries]
    accuracies = [e["final_token_accuracy"] for e in entries]
    return {"mean_final_loss": statistics.mean(losses), "sd_final_loss": statistics.stdev(losses),
            "min_final_loss": min(losses), "max_final_loss": max(losses),
            "mean_final_token_accuracy": statistics.mean(accuracies),
            "sd_final_token_accuracy": statistics.stdev(accuracies),
            "mean_activation_bytes": statistics.mean(e["activation_bytes"] for e in entries)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--model", default="llama-tiny")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--rho", type=float, default=0.1)
    parser.add_argument("--lora", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=None, help="default: the task's 2 epochs")
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args()
    if len(args.seeds) < 2:
        parser.error("give at least two --seeds: the check is against the spread over seeds")

    runs: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for setting, lora in (("lora", args.lora), ("full", None)):
            config = FinetuneConfig(task="synthetic-lm", model=args.model, rhos=[args.rho], compare=True, lora=lora,
                                    seed=seed, max_steps=args.max_steps, device="cpu", offline=True)
            for run in run_finetune(config)["runs"]:
                name = f"{setting} {'exact' if run['method'] == 'exact' else f'rho={args.rho:g}'}"
                entry = _entry(seed, run)
                runs.setdefault(name, []).append(entry)
                print(f"seed {seed} {name:>14}: final loss {entry['final_loss']:.4f}, token accuracy "
                      f"{entry['final_token_accuracy']:.4f} ({entry['steps']} steps)", flush=True)

    summary = {name: _summary(entries) for name, entries in runs.items()}
    print(f"\n{'run':>14} {'mean loss':>10} {'sd':>7} {'min':>7} {'max':>7} {'mean acc':>9} {'sd':>7} {'act. MiB':>9}")
    for name, s in summary.items():
        print(f"{name:>14} {s['mean_final_loss']:>10.4f} {s['sd_final_loss']:>7.4f} {s['min_final_loss']:>7.4f} "
              f"{s['max_final_loss']:>7.4f} {s['mean_final_token_accuracy']:>9.4f} {s['sd_final_token_accuracy']:>7.4f} "
              f"{s['mean_activation_bytes'] / 2**20:>9.2f}")
    paired = {}
    for setting in ("lora", "full"):
        differences = [r["final_loss"] - e["final_loss"]
                       for e, r in zip(runs[f"{setting} exact"], runs[f"{setting} rho={args.rho:g}"])]
        paired[setting] = {"mean_loss_difference": statistics.mean(differences),
                           "sd_loss_difference": statistics.stdev(differences),
                           "min_loss_difference": min(differences), "max_loss_difference": max(differences)}
        print(f"{setting}: rho={args.rho:g} − exact, seed by seed: final loss {paired[setting]['mean_loss_difference']:+.4f} "
              f"± {paired[setting]['sd_loss_difference']:.4f} (from {min(differences):+.4f} to {max(differences):+.4f})")
    checks = []
    for setting in ("lora", "full"):
        exact, randomized = summary[f"{setting} exact"], summary[f"{setting} rho={args.rho:g}"]
        gap = randomized["mean_final_loss"] - exact["mean_final_loss"]
        checks.append({"check": f"{setting} rho={args.rho:g}: mean final held-out loss {randomized['mean_final_loss']:.4f} "
                                f"({gap:+.4f} vs exact's mean, {gap / exact['sd_final_loss']:+.1f} sd) within exact's "
                                f"range over seeds [{exact['min_final_loss']:.4f}, {exact['max_final_loss']:.4f}]",
                       "passed": randomized["mean_final_loss"] <= exact["max_final_loss"]})
    for c in checks:
        print(("PASS " if c["passed"] else "FAIL ") + c["check"])
    if args.output:
        write_json_atomic(Path(args.output), {
            "schema": "randbp.finetune-seeds/1", "command": " ".join(["python", *sys.argv]),
            "environment": environment(), "config": vars(args), "runs": runs, "summary": summary, "paired": paired,
            "checks": checks})
        print(f"report written to {args.output}")
    return 0 if all(c["passed"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
