"""Benchmark: the loss over an LM head, unfused vs randbp's blocks vs torch's chunked `F.linear_cross_entropy`.

    python benchmarks/lm_head.py [--tokens 512 --hidden 576 --vocab 49152] [-o results/bench-lm-head-cpu.json]

One training step of the head alone (forward and backward of linear → float32 → cross-entropy) on
N × H hidden states and a V × H weight (SmolLM2-135M's head at 1 × 512 by default), for a frozen
head (LoRA) and a trained one, three ways:
  reference   F.linear, .float(), F.cross_entropy (what transformers' loss does);
  randbp      savers/lm_head.py `linear_cross_entropy` (its default block size, and --rows);
  torch       F.linear_cross_entropy with LinearCrossEntropyOptions() (torch 2.13's chunked path).
For each: the bytes held from forward to backward, exactly: what passes through the saved-tensor
hooks (the hidden states included: in a model only the head keeps them) plus the tensors a backward
node holds as plain attributes, which the hooks do not see (torch's chunked path keeps its
precomputed gradients so: the hidden states' N × H and, for a trained head, the weight's V × H in
float32); and the step time (median of --rounds rounds, the cases interleaved in each round).
Prints the table; exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from randbp_cli.measure.environment import environment  # noqa: E402
from randbp_cli.measure.memory import SavedTensorCounter  # noqa: E402
from randbp_cli.reports.files import write_json_atomic  # noqa: E402
from randbp_cli.savers.lm_head import block_rows, linear_cross_entropy, reference_linear_cross_entropy  # noqa: E402

MiB = 2**20


def _attribute_bytes(loss: torch.Tensor) -> int:
    """Bytes of the tensors the backward graph of `loss` holds as node attributes (not saved tensors)."""
    seen, storages, todo = set(), {}, [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for value in getattr(node, "__dict__", {}).values():
            if isinstance(value, torch.Tensor):
                storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
        todo.extend(next_node for next_node, _ in node.next_functions)
    return sum(storages.values())


def _cases(rows: list[int]) -> dict:
    cases = {"reference": lambda h, w, t: reference_linear_cross_entropy(h, w, None, t),
             "randbp": lambda h, w, t: linear_cross_entropy(h, w, None, t)}
    for r in rows:
        cases[f"randbp rows={r}"] = lambda h, w, t, r=r: linear_cross_entropy(h, w, None, t, rows=r)
    if hasattr(F, "linear_cross_entropy"):
        options = torch.nn.LinearCrossEntropyOptions()
        cases["torch chunked"] = lambda h, w, t: F.linear_cross_entropy(h, w, t, options=options)
    return cases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--rows", type=int, action="append", default=None, help="also these block sizes")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden)
    weight = torch.randn(args.vocab, args.hidden) * args.hidden ** -0.5
    targets = torch.randint(0, args.vocab, (args.tokens,))
    targets[-1] = -100  # the last position predicts nothing
    cases = _cases(args.rows or [])
    results = []
    for trained in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(trained)

        def step(fn):
            h.grad = w.grad = None
            fn(h, w, targets).backward()

        measured = {}
        for name, fn in cases.items():
            step(fn)  # warm-up (and torch's one-time warnings)
            with SavedTensorCounter(exclude=[w, targets]) as counter:
                loss = fn(h, w, targets)
            held = counter.stats().total_bytes + _attribute_bytes(loss)
            loss.backward()
            grads = (h.grad.clone(), None if w.grad is None else w.grad.clone())
            measured[name] = {"held_bytes": held, "times": [], "grads": grads, "loss": float(loss.detach())}
        for _ in range(args.rounds):
            for name, fn in cases.items():
                start = time.perf_counter()
                step(fn)
                measured[name]["times"].append(time.perf_counter() - start)
        base = measured["reference"]
        head = "trained head" if trained else "frozen head"
        print(f"\n{head}: {args.tokens} × {args.hidden} hidden, vocab {args.vocab}")
        print(f"{'case':<18} {'held MiB':>10} {'step ms':>9} {'time ×':>7} {'max rel. grad error':>20}")
        for name, m in measured.items():
            median = statistics.median(m["times"])
            errors = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(m["grads"], base["grads"])
                      if a is not None]
            ratio = median / statistics.median(base["times"])
            print(f"{name:<18} {m['held_bytes'] / MiB:>10.2f} {1000 * median:>9.1f} {ratio:>6.2f}× "
                  f"{max(errors):>20.2e}")
            results.append({"case": name, "head": "trained" if trained else "frozen",
                            "held_bytes": m["held_bytes"], "step_time_s": m["times"], "median_s": median,
                            "time_ratio_vs_reference": ratio, "max_rel_grad_error": max(errors),
                            "loss": m["loss"]})
    if args.output:
        write_json_atomic(Path(args.output), {
            "schema": "randbp.benchmark/1", "command": "python " + " ".join(sys.argv),
            "shape": {"tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab,
                      "default_rows": block_rows(args.tokens, args.vocab)},
            "results": results, "environment": environment(torch.device("cpu"))})
        print(f"\nwrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
