"""Benchmark: at equal memory, which estimator is most accurate, what it costs, and how it
compares with activation checkpointing — one run, ratios measured side by side.

    python benchmarks/methods.py -o results/methods-roberta-base-cpu.json   [--reuse after a failure]

roberta-base (built-in architecture, random init when no checkpoint), fp32, CPU:
  1. memory and time: exact, every estimator at ρ = 0.5/0.2/0.1, checkpointing, and
     checkpointing + countsketch (ρ = 0.1), batch 8 at 128 tokens; the same without the
     combination at 512 tokens (ρ = 0.5/0.1). Cases interleaved round by round for timing.
     Target: the linear-cost estimators (balanced, countsketch, crs, wta-crs) at or under 1.00× exact
     time at ρ ≤ 0.5 at both lengths.
  2. budget: the largest batch (128 tokens) whose activation peak fits --budget-mib, found by
     measuring, for exact, each estimator at ρ = 0.1, checkpointing, and checkpointing +
     countsketch at ρ = 0.1.
  3. variance: every estimator at ρ = 0.5 and 0.1 on the same captured batch (synthetic task
     tokens, batch 16), four linear layers of block 6, 64 sketches per measurement.
Each part runs in a fresh process and is kept until the whole benchmark is written.
Exits 1 if the time target fails.
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
from randbp_cli.core.sketches import sketch_names  # noqa: E402

LINEAR_COST = ("balanced", "countsketch", "crs", "wta-crs")
LAYER_KINDS = ["attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def progress(what: str, done: int) -> None:
    log(f"  {what}")


def memory_and_time(args) -> dict[int, dict]:
    reports = {}
    short, long = args.seq_lens
    for seq_len, rhos, methods, steps, warmup in [
        (short, [0.5, 0.2, 0.1], ["randomized", "checkpoint"], args.steps, 1),
        (long, [0.5, 0.1], ["randomized", "checkpoint"], max(2, args.steps - 1), 0),
    ]:
        log(f"memory and time: seq {seq_len}")
        config = ProfileConfig(model=args.model, rhos=rhos, sketches=sketch_names(), methods=methods,
                               batch_sizes=[args.batch_size], seq_len=seq_len, device=args.device, steps=steps,
                               warmup=warmup)
        reports[seq_len] = run_profile(config, progress)
    log("memory and time: checkpoint + countsketch, seq 128")
    combined = run_profile(ProfileConfig(model=args.model, rhos=[0.1], sketches=["countsketch"],
                                         methods=["checkpoint", "checkpoint+randomized"],
                                         batch_sizes=[args.batch_size], seq_len=short, device=args.device,
                                         steps=args.steps, warmup=1), progress)
    reports[f"{short}-checkpoint+randomized"] = combined
    return reports


def budget(args) -> list[dict]:
    log(f"budget {args.budget_mib} MiB")
    found = []
    for sketches, methods in [(sketch_names(), ["randomized", "checkpoint"]),
                              (["countsketch"], ["checkpoint+randomized"])]:
        report = run_profile(ProfileConfig(model=args.model, rhos=[0.1], sketches=sketches, methods=methods,
                                           batch_sizes=[1], seq_len=args.seq_lens[0], device=args.device,
                                           steps=1, warmup=0,
                                           budget_mib=args.budget_mib, budget_max_batch=args.budget_max_batch),
                             progress)
        for r in report["results"]:
            if r["method"] == "exact" and found:
                continue
            found.append({"method": r["method"], "rho": r["rho"], "sketch": r["sketch"], **r["budget"]})
    return found


def variance(args) -> dict[float, dict]:
    from randbp_cli.data.models import load_model
    from randbp_cli.run.plans import VarianceConfig
    from randbp_cli.commands.variance import run_variance

    middle = load_model(args.model, offline=True).model.config.num_hidden_layers // 2  # block 6 of 12
    layers = [f"roberta.encoder.layer.{middle}.{kind}" for kind in LAYER_KINDS]
    out = {}
    for rho in (0.5, 0.1):
        log(f"variance at rho {rho}")
        out[rho] = run_variance(VarianceConfig(task="synthetic", model=args.model, batch_size=16, rho=rho,
                                               sketches=sketch_names(), layers=layers, repeats=64, steps=0,
                                               device=args.device, seed=0))
    return out


PARTS = ("time", "budget", "variance")


def run_part(name: str, args) -> dict:
    """One part of the benchmark, as a JSON-ready dict."""
    if name == "time":
        return {"profiles": {str(k): v for k, v in memory_and_time(args).items()}}
    if name == "budget":
        return {"budget": budget(args)}
    return {"variance": {str(k): v for k, v in variance(args).items()}}


def run_isolated(name: str, args, parts_dir: Path) -> dict:
    """Each part in a fresh process: CPU allocators keep the high-water mark of a part that
    profiled 512-token batches, and the budget search needs that memory back."""
    import json
    import subprocess

    path = parts_dir / f"{name}.json"
    if not (args.reuse and path.is_file()):
        cmd = [sys.executable, __file__, "--part", name, "--part-output", str(path), "--model", args.model,
               "--device", args.device, "--batch-size", str(args.batch_size), "--steps", str(args.steps),
               "--budget-mib", str(args.budget_mib), "--budget-max-batch", str(args.budget_max_batch),
               "--seq-lens", *map(str, args.seq_lens)]
        subprocess.run(cmd, check=True)
    return json.loads(path.read_text())


def report_time(result: dict) -> None:
    print(f"\n{'seq':>4} {'method':<22} {'sketch':<12} {'rho':>4} {'act × exact':>11} {'peak × exact':>12} "
          f"{'time × exact':>12}")
    for key, report in result["profiles"].items():
        for r in report["results"]:
            if key.endswith("checkpoint+randomized") and r["method"] != "checkpoint+randomized":
                continue
            print(f"{r['seq_len']:>4} {r['method']:<22} {r['sketch'] or '—':<12} {r['rho'] or '—':>4} "
                  f"{1 - r['activation_saving_vs_exact']:>11.3f} {1 - r['activation_peak_saving_vs_exact']:>12.3f} "
                  f"{r['time_ratio_vs_exact']:>12.2f}")
            if r["sketch"] in LINEAR_COST and r["method"] == "randomized" and r["rho"] <= 0.5:
                ok = r["time_ratio_vs_exact"] <= 1.0
                result["checks"].append({"check": f"{r['sketch']} rho={r['rho']} seq {r['seq_len']}: time "
                                                  f"{r['time_ratio_vs_exact']:.2f} × exact ≤ 1.00", "passed": ok})


def report_budget(result: dict, args) -> None:
    print(f"\nlargest batch (seq {args.seq_lens[0]}) whose activation peak fits {args.budget_mib:g} MiB")
    for b in result["budget"]:
        what = b["method"] if b["sketch"] is None else f"{b['method']} {b['sketch']} rho={b['rho']}"
        print(f"  {what:<40} {b['max_batch_size']:>5}{'+' if b['capped'] else ''}")


def report_variance(result: dict) -> None:
    print("\nvariance at equal rho, same captured batch (mean over the four layers)")
    for rho, report in result["variance"].items():
        gaussian = {r["layer"]: r["d2_rmm_measured"] for r in report["records"] if r["sketch"] == "gaussian"}
        for sketch in sketch_names():
            rows = [r for r in report["records"] if r["sketch"] == sketch]
            ratio = sum(r["ratio"] for r in rows) / len(rows)
            rel = sum(r["d2_rmm_measured"] / gaussian[r["layer"]] for r in rows) / len(rows)
            print(f"  rho {rho:<4} {sketch:<12} ratio {ratio:6.3f}   D²_RMM / gaussian's {rel:6.3f}")


def main() -> int:
    import json
    import shutil

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="roberta-base")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-lens", type=int, nargs=2, default=[128, 512])
    parser.add_argument("--budget-mib", type=float, default=1024)
    parser.add_argument("--budget-max-batch", type=int, default=512)
    parser.add_argument("--skip", nargs="*", default=[], choices=PARTS)
    parser.add_argument("--reuse", action="store_true", help="keep parts already measured (after a failure)")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    parser.add_argument("--part-output", help=argparse.SUPPRESS)
    parser.add_argument("-o", "--output", default="results/methods-roberta-base-cpu.json")
    args = parser.parse_args()

    if args.part:  # a child process: one part, written where the parent reads it
        write_json_atomic(args.part_output, run_part(args.part, args))
        return 0

    parts_dir = Path(args.output).with_suffix(".parts")
    parts_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"schema": "randbp.methods-benchmark/1", "command": " ".join(["python", *sys.argv]),
                    "environment": environment(), "checks": []}
    for name in PARTS:
        if name not in args.skip:
            result.update(run_isolated(name, args, parts_dir))
    if "profiles" in result:
        report_time(result)
    if "budget" in result:
        report_budget(result, args)
    if "variance" in result:
        report_variance(result)
    for check in result["checks"]:
        print(f"{'PASS' if check['passed'] else 'FAIL'}  {check['check']}")
    write_json_atomic(args.output, result)
    shutil.rmtree(parts_dir, ignore_errors=True)
    json.loads(Path(args.output).read_text())  # what was written reads back
    return 0 if all(c["passed"] for c in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
