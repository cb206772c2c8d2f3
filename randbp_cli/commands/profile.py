"""`randbp profile` as a library call: activation memory and step time, exact vs randomized.

`profile_model(plan)` loads the model once, builds one fixed batch per batch size from the
seed, and measures every case (the exact baseline and each method) on the same inputs:

  1. per case: `warmup` training steps, then one probed step (the exact bytes saved for
     backward, and the largest recompute when checkpointed), then, on CUDA, one step with
     allocator phases, with NVML sampling the device during the case's steps;
  2. timing: `steps` rounds; each round runs one full training step (forward, backward,
     AdamW step) of every case in turn, so slow drifts of a noisy machine hit all cases
     alike and the time ratios compare like with like;
  3. with a budget: per method, the largest batch (or longest sequence) whose activation peak
     fits, by measuring.
With `isolate=True` each case runs in a fresh process instead (same seed, same weights).
`run_profile(config)` does the same from a `ProfileConfig` and returns the report's JSON dict.
"""

from __future__ import annotations

import gc
import multiprocessing
import signal
import threading
from typing import Callable, Optional

import torch
from torch import nn

from ..core.convert import describe_conversion, select_linears
from ..data.heads import CAUSAL_LM, head_of
from ..data.models import LoadedModel, check_methods_supported, load_model, max_sequence_length
from ..errors import ConfigError
from ..measure.environment import environment
from ..measure.memory import fold_layer_indices
from ..measure.meters import NvmlSampler, summarize_times
from ..reports.record import BatchBudget, CudaMemory, NvmlMemory, StepTimes
from ..reports.report import ProfileReport, ProfileResult
from ..run.devices import dtype_name
from ..run.engine import Batch, Engine, Progress, interruptible
from ..run.lora import apply_lora
from ..run.methods import EXACT
from ..run.plans import ProfileCase, ProfileConfig, ProfilePlan

StopCheck = Optional[Callable[[], bool]]  # asked between steps: True ends the run, keeping what finished
CHECKPOINT_NOTE = ("each unit's input is kept; one unit at a time is recomputed in backward "
                   "(reentrant torch.utils.checkpoint)")
COMPILED_NOTE = ("activation_bytes (and by kind, by module) are counted on the eager module tree the compiled "
                 "graphs were made from; compiled.activation_bytes is what the compiled graphs themselves "
                 "save, counted the same way (saved-tensor hooks, each storage once), without attribution")


def make_batch(model: nn.Module, batch_size: int, seq_len: int, seed: int, device: torch.device,
               num_labels: int) -> Batch:
    """A fixed batch of random token ids (memory does not depend on their values); a causal LM's
    labels are the ids themselves (the model shifts them), a classifier's one label per row."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + batch_size)
    vocab = model.config.vocab_size
    low = min(3, vocab - 1)  # skip <s>, <pad>, </s> so no token is padding
    ids = torch.randint(low, vocab, (batch_size, seq_len), generator=gen)
    if head_of(model) == CAUSAL_LM:
        labels = ids.clone()
    elif num_labels == 1:
        labels = torch.rand(batch_size, generator=gen)
    else:
        labels = torch.randint(0, num_labels, (batch_size,), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


class _Profiler:
    """One engine, the fixed batches, and what one case measures."""

    def __init__(self, model: nn.Module, plan: ProfilePlan) -> None:
        config = plan.config
        self.plan = plan
        self.engine = Engine(model, plan.device, include=config.include, exclude=config.exclude,
                             compile=plan.compile)
        # foreach=False keeps AdamW's transient buffers small and the same for every case
        self.engine.use_optimizer(torch.optim.AdamW(self.engine.model.parameters(), lr=config.lr, foreach=False))
        self.batches = {b: self.batch(b) for b in plan.batch_sizes}
        if plan.skip_kept:
            self.engine.leave_kept_inputs_exact(self.batches[plan.batch_sizes[0]])

    def batch(self, batch_size: int) -> Batch:
        config = self.plan.config
        return make_batch(self.engine.model, batch_size, config.seq_len, config.seed, self.plan.device,
                          config.num_labels)

    def probe(self, case: ProfileCase, batch: Batch, step: bool = True) -> dict:
        """Saved bytes of one forward on `batch` (and, when checkpointed, of each recompute)."""
        checkpointed = case.method.checkpoint
        _, probe = self.engine.probe(batch, backward=step or checkpointed)
        stats = probe.stats
        out = {"activation_bytes": stats.total_bytes, "activation_bytes_by_kind": dict(stats.by_kind),
               "activation_bytes_by_module": stats.by_module_folded(), "saved_storages": stats.storages}
        if checkpointed:
            out["checkpointing"] = {"units": probe.checkpoint_units,
                                    "recompute_unit_bytes": probe.recompute_unit_bytes, "note": CHECKPOINT_NOTE}
        out["activation_peak_bytes"] = probe.peak_bytes
        if step:
            self.engine.optimizer_step()
        else:
            self.engine.optimizer.zero_grad(set_to_none=True)
        return out

    def measure_memory(self, case: ProfileCase) -> dict:
        device, batch = self.plan.device, self.batches[case.batch_size]
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()  # so NVML sees this case, not the cache of the last one
        with NvmlSampler(device) as sampler:
            warmed = self.engine.warm_up(batch, self.plan.warmup_steps)
            counted = self.probe(case, batch)
            if self.plan.compile is not None:
                counted["compiled"] = {**self.engine.compiled_saved_bytes(batch), "warmup_steps": warmed,
                                       "note": COMPILED_NOTE}
                self.engine.optimizer.zero_grad(set_to_none=True)
            cuda = self.engine.cuda_step_memory(batch) if device.type == "cuda" else None
        left = {**self.engine.left_exact, **describe_conversion(self.engine.model).get("left_exact", {})}
        if case.method.randomized and left:
            counted["left_exact"] = {fold_layer_indices(name): why for name, why in left.items()}
        return {**counted, "randomized_layers": len(self.engine.converted), "cuda": CudaMemory.of(cuda),
                "nvml": NvmlMemory.of(sampler.result()) if device.type == "cuda" else None}

    def largest_within(self, case: ProfileCase, budget_bytes: float) -> BatchBudget:
        """The largest batch (at --seq-len), or with `--budget-over seq` the longest sequence (at the
        first batch size, up to what the model's positions allow), whose activation peak fits
        `budget_bytes`, found by measuring: two sizes predict it (saved bytes grow about linearly
        with either), then `largest_fitting` measures its way to the boundary, both sides measured."""
        config = self.plan.config
        over_seq = config.budget_over == "seq"
        batch_size = self.plan.batch_sizes[0]
        if over_seq:
            limit = min(config.budget_max_seq, max_sequence_length(self.engine.model))
            first, second = max(1, min(config.seq_len, limit) // 2), min(config.seq_len, limit)
        else:
            limit, first, second = config.budget_max_batch, 1, 2
        measured: dict[int, int] = {}

        def fits(size: int) -> bool:
            if size not in measured:
                batch = (make_batch(self.engine.model, batch_size, size, config.seed, self.plan.device,
                                    config.num_labels) if over_seq else self.batch(size))
                measured[size] = self.probe(case, batch, step=False)["activation_peak_bytes"]
            return measured[size] <= budget_bytes

        fits(first), fits(second)
        per_unit = max(measured[second] - measured[first], 1) / max(second - first, 1)
        guess = int(second + (budget_bytes - measured[second]) // per_unit)
        best = largest_fitting(fits, guess, limit)
        found = {"budget_bytes": budget_bytes, "activation_peak_bytes": measured.get(best), "capped": best == limit,
                 "measured": {str(k): v for k, v in sorted(measured.items())}}
        if over_seq:
            return BatchBudget.of({**found, "over": "seq", "max_seq_len": best, "batch_size": batch_size})
        return BatchBudget.of({**found, "max_batch_size": best})


def largest_fitting(fits: Callable[[int], bool], guess: int, limit: int) -> int:
    """The largest n in [1, limit] with `fits(n)` (0 if not even 1 fits), for `fits` that stays false
    once false: from `guess`, steps doubling until the boundary is bracketed, then bisection; every
    answer below `limit` has `fits(answer + 1)` measured false."""
    if not fits(1):
        return 0
    low, high = 1, None  # low fits; high, once known, does not
    guess = max(1, min(limit, guess))
    if fits(guess):
        low, step = guess, 1
        while high is None and low < limit:
            nxt = min(limit, low + step)
            if fits(nxt):
                low, step = nxt, 2 * step
            else:
                high = nxt
        if high is None:
            return low
    else:
        high, step = guess, 1
        while True:
            nxt = max(1, high - step)
            if fits(nxt):
                low = nxt
                break
            high, step = nxt, 2 * step
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


def _case_result(case: ProfileCase, plan: ProfilePlan, model_name: str, measured: dict) -> ProfileResult:
    method, seq_len = case.method, plan.config.seq_len
    return ProfileResult(model=model_name, method=method.name, rho=method.rho, sketch=method.sketch_name,
                         savers=method.saver_names or None, compile=plan.compile,
                         batch_size=case.batch_size, seq_len=seq_len, tokens=case.batch_size * seq_len,
                         dtype=dtype_name(plan.dtype), device=str(plan.device), **measured)


def _profile_in_process(model: nn.Module, model_name: str, plan: ProfilePlan, cases: tuple[ProfileCase, ...],
                        progress: Progress | None, should_stop: StopCheck = None) -> tuple[list[ProfileResult], bool]:
    """Every case of `cases` measured in this process; the results, and whether a stop request
    (`should_stop()` true between steps, or Ctrl-C inside one) cut the run short: then the results
    hold the cases whose memory was measured, timed by the rounds that finished."""
    progress = progress or (lambda description, done: None)
    should_stop = should_stop or (lambda: False)
    profiler, config = _Profiler(model, plan), plan.config
    engine = profiler.engine
    done, results = 0, []
    samples: list[list[float]] = [[] for _ in cases]
    try:
        for case in cases:
            if should_stop():
                raise KeyboardInterrupt
            progress(f"memory: {case.label}", done)
            with interruptible():
                engine.apply(case.method)
                measured = profiler.measure_memory(case)
            results.append(_case_result(case, plan, model_name, measured))
            done += plan.warmup_steps + 1 + (plan.device.type == "cuda")
        for round_index in range(config.steps):
            for case, case_samples in zip(cases, samples):
                if should_stop():
                    raise KeyboardInterrupt
                progress(f"timing round {round_index + 1}/{config.steps}: {case.label}", done)
                with interruptible():
                    engine.apply(case.method)
                    sample = engine.timed_step(profiler.batches[case.batch_size])
                case_samples.append(sample)
                done += 1
    except KeyboardInterrupt:  # keep what finished; the step that was cut off counts for nothing
        for result, case_samples in zip(results, samples):
            result.step_time_s = StepTimes.of(summarize_times(case_samples)) if case_samples else None
        return results, True
    for result, case_samples in zip(results, samples):
        result.step_time_s = StepTimes.of(summarize_times(case_samples))
    if plan.budget_bytes is not None:
        seen = set()
        try:
            for result, case in zip(results, cases):
                if case.method in seen:
                    continue
                if should_stop():
                    raise KeyboardInterrupt
                seen.add(case.method)
                progress(f"budget {config.budget_mib:g} MiB: {case.label}", done)
                with interruptible():
                    engine.apply(case.method)
                    result.budget = profiler.largest_within(case, plan.budget_bytes)
        except KeyboardInterrupt:
            return results, True
    engine.apply(EXACT)
    progress("done", done)
    return results, False


def _load(plan: ProfilePlan) -> LoadedModel:
    """The model, with LoRA's adapters when the plan has them."""
    config = plan.config
    loaded = load_model(config.model, num_labels=config.num_labels, dtype=plan.dtype,
                        attn_implementation=config.attn_implementation, offline=config.offline, seed=config.seed)
    if plan.lora is not None:
        loaded.model = apply_lora(loaded.model, plan.lora)
    return loaded


def _isolated_case(plan: ProfilePlan, case: ProfileCase) -> ProfileResult:
    """Entry point of a fresh process for one case (`isolate=True`)."""
    loaded = _load(plan)
    return _profile_in_process(loaded.model, loaded.name, plan, (case,), None)[0][0]


def _transformers_chatter() -> tuple[int, bool]:
    """This process's transformers log level and progress-bar switch, for a fresh process to take."""
    from transformers.utils import logging

    return logging.get_verbosity(), logging.is_progress_bar_enabled()


def _worker_init(verbosity: int, bars: bool) -> None:
    """A fresh process says as much as its parent (the CLI quiets transformers' loading report and
    bars) and leaves Ctrl-C to the parent, which stops between cases or, pressed twice, ends this one."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from transformers.utils import logging

    logging.set_verbosity(verbosity)
    if not bars:
        logging.disable_progress_bar()


def _profile_isolated(plan: ProfilePlan, progress: Progress | None,
                      should_stop: StopCheck = None) -> tuple[list[ProfileResult], bool]:
    context = multiprocessing.get_context("spawn")
    results = []
    per_case = plan.total_steps // len(plan.cases)
    for i, case in enumerate(plan.cases):
        if should_stop and should_stop():
            return results, True
        if progress:
            progress(f"isolated process: {case.label}", i * per_case)
        # the worker starts with Ctrl-C ignored (a disposition survives the exec), so a press while it
        # imports torch prints no traceback there; the parent's own handler is back at once
        main_thread = threading.current_thread() is threading.main_thread()  # signal.signal works there only
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None
        try:
            pool = context.Pool(1, initializer=_worker_init, initargs=_transformers_chatter())
        finally:
            if main_thread:
                signal.signal(signal.SIGINT, previous)
        with pool, interruptible():
            try:
                results.append(pool.apply(_isolated_case, (plan, case)))
            except KeyboardInterrupt:  # leaving the block terminates the worker
                return results, True
            pool.close()  # let the worker exit, rather than terminate() it: no leaked semaphores reported
            pool.join()
    if progress:
        progress("done", len(plan.cases) * per_case)
    return results, False


def profile_model(plan: ProfilePlan, progress: Progress | None = None,
                  should_stop: StopCheck = None) -> ProfileReport:
    """Measure every case of `plan`; the `randbp.profile/1` report. `should_stop()`, asked between
    steps, ends the run early (so does Ctrl-C): the report then holds the cases measured so far and
    `status` "interrupted"."""
    config = plan.config
    loaded = _load(plan)
    limit = max_sequence_length(loaded.model)
    if config.seq_len > limit:
        raise ConfigError(f"--seq-len {config.seq_len} is longer than the model's {limit} positions; "
                          f"use --seq-len {limit} or less")
    select_linears(loaded.model, config.include, config.exclude)  # a pattern that matches nothing fails now
    check_methods_supported(loaded.model, [case.method for case in plan.cases])
    if config.isolate:
        results, interrupted = _profile_isolated(plan, progress, should_stop)
    else:
        results, interrupted = _profile_in_process(loaded.model, loaded.name, plan, plan.cases, progress,
                                                   should_stop)
    _add_comparisons(results)
    return ProfileReport(status="interrupted" if interrupted else None, environment=environment(plan.device),
                         config=plan.config_record(), model={**loaded.describe(), "max_seq_len": limit},
                         results=results)


def run_profile(config: ProfileConfig, progress: Progress | None = None) -> dict:
    """`profile_model(config.resolve())` as the JSON-ready report dict (for scripts)."""
    return profile_model(config.resolve(), progress).to_dict()


def _add_comparisons(results: list[ProfileResult]) -> None:
    """Saving vs exact, the docs/method.md §5 limit, and time ratio, each against the same batch size."""
    exact = {r.batch_size: r for r in results if r.method == "exact" and not r.savers}
    for r in results:
        base = exact.get(r.batch_size)
        if base is None:
            continue
        r.activation_saving_vs_exact = 1 - r.activation_bytes / base.activation_bytes
        r.activation_peak_saving_vs_exact = 1 - r.activation_peak_bytes / base.activation_peak_bytes
        if r.method in ("exact", "randomized") and not r.savers:
            linear_only = base.activation_bytes_by_kind["linear_inputs"]
            rho = 1.0 if r.rho is None else r.rho
            # the most sketching can save: every input kept only by linear layers shrinks to ρ of itself
            r.activation_limit_bytes = base.activation_bytes - (1 - rho) * linear_only
        base_time, time = base.step_time_s and base.step_time_s.median, r.step_time_s and r.step_time_s.median
        r.time_ratio_vs_exact = time / base_time if base_time and time is not None else None
    # what each part of checkpoint+randomized contributed, against plain checkpointing
    checkpoint = {(r.batch_size, tuple(r.savers or ())): r for r in results if r.method == "checkpoint"}
    for r in results:
        ckpt, base = checkpoint.get((r.batch_size, tuple(r.savers or ()))), exact.get(r.batch_size)
        if r.method != "checkpoint+randomized" or ckpt is None or base is None:
            continue
        r.contributions = {
            "checkpointing_stored_bytes_saved": base.activation_bytes - ckpt.activation_bytes,
            "randomized_stored_bytes_saved": ckpt.activation_bytes - r.activation_bytes,
            "randomized_recompute_bytes_saved": ckpt.checkpointing["recompute_unit_bytes"]
                                                - r.checkpointing["recompute_unit_bytes"],
            "note": "checkpointing keeps only each layer's input between the passes; the randomized "
                    "layers shrink what one layer saves while it is recomputed in backward (and what "
                    "layers outside the checkpointed units keep)",
        }
