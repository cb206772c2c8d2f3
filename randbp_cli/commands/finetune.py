"""`randbp finetune` as a library call: fine-tune exactly and with randomized backprop, side by side.

`finetune_model(plan)` loads the task once, then trains one run per method (the exact baseline when
asked, and one per ρ) from the same initial weights, on the same data in the same order
(everything seeded from `seed`). Each run records per-epoch training loss and evaluation
metrics, the activation bytes saved for backward on the first real batch, CUDA and NVML peaks
on GPU, seconds per optimizer step and tokens per second.

Training follows the paper's Fairseq recipe (docs/method.md §5) unless overridden: AdamW (β
0.9/0.98, ε 1e-6, weight decay 0.1 on every parameter, as Fairseq applies it), 6% linear
warm-up then linear decay to 0, dynamic padding, fp32, per-task batch size and learning rate,
10 epochs.

Stopping: the caller passes `should_stop()`; it is checked after every optimizer step, and a
stop ends training there with `"status": "interrupted"` and everything finished kept.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..core.convert import describe_conversion
from ..data.models import LoadedModel, check_save_dir, hub_reachable, max_sequence_length, save_model
from ..data.tasks import TaskSpec, compute_metrics
from ..errors import ConfigError
from ..measure.environment import environment
from ..measure.memory import fold_layer_indices
from ..measure.meters import NvmlSampler, synchronize
from ..reports.record import RunMemory
from ..reports.report import FinetuneReport, FinetuneRun
from ..run.batches import TaskInputs, load_model_and_task, load_task_model
from ..run.devices import dtype_name
from ..run.distributed import SINGLE, Distributed, all_reduce_sum, gather_objects, shard
from ..run.engine import Engine, TrainCallbacks, interruptible
from ..run.lora import LORA_LR_SCALE
from ..run.methods import Method
from ..run.plans import FinetuneConfig, FinetunePlan


@torch.no_grad()
def evaluate(model, loader, spec, device, dist: Distributed = SINGLE) -> dict:
    """Metrics over the whole evaluation set (a language model's over every real next token: token
    accuracy, and the loss per token); with several ranks each evaluates its shard and the
    predictions are gathered, so every example counts exactly once."""
    model.eval()
    predictions, labels, loss_sum = [], [], 0.0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        if spec.is_language_modelling:  # each position predicts the next token; padding (-100) is no target
            targets = batch["labels"][:, 1:]
            real = targets != -100
            predictions.append(out.logits[:, :-1].argmax(-1)[real])
            labels.append(targets[real])
            loss_sum += float(out.loss) * int(real.sum())  # the loss is a mean over real targets
            continue
        logits = out.logits.float()
        predictions.append(logits.squeeze(-1) if spec.is_regression else logits.argmax(-1))
        labels.append(batch["labels"])
        loss_sum += float(out.loss) * len(batch["labels"])
    model.train()
    local = (torch.cat(predictions).cpu().numpy() if predictions else [],
             torch.cat(labels).cpu().numpy() if labels else [], loss_sum)
    shards = gather_objects(dist, local)
    import numpy as np

    all_predictions = np.concatenate([np.asarray(p) for p, _, _ in shards])
    all_labels = np.concatenate([np.asarray(lab) for _, lab, _ in shards])
    metrics = compute_metrics(spec, all_predictions, all_labels)
    metrics["loss"] = sum(loss for _, _, loss in shards) / max(len(all_labels), 1)
    return metrics


@dataclass
class _Run:
    """One run in progress: the engine, its loaders, and the counters the epochs advance."""

    name: str
    method: Method
    engine: Engine
    sampler: object  # DistributedSampler
    loader: object  # DataLoader
    eval_loaders: dict
    epochs: int
    total_steps: int
    grad_accum: int
    step: int = 0
    tokens: int = 0
    train_time: float = 0.0
    stopped: bool = False
    memory: dict | None = None


def _start_run(plan: FinetunePlan, method: Method, inputs: TaskInputs, loaded: LoadedModel,
               dist: Distributed) -> tuple[_Run, FinetuneRun]:
    """The engine in `method`, the loaders, the optimizer and schedule; the run's record so far."""
    from torch.utils.data import DataLoader, DistributedSampler

    config, spec = plan.config, inputs.data.spec
    engine = Engine(loaded.model, plan.device, include=config.include, exclude=config.exclude, dist=dist,
                    compile=plan.compile)
    if config.skip_kept:  # the probe forward: two training rows, the same on every rank
        rows = [inputs.train_set[i] for i in range(min(2, len(inputs.train_set)))]
        engine.leave_kept_inputs_exact(engine.to_device(inputs.collator(rows)))
    engine.apply(method)
    batch_size, epochs = config.batch_size or spec.batch_size, config.epochs or spec.epochs
    lr = config.lr or spec.lr * (LORA_LR_SCALE if plan.lora is not None else 1)
    # The same sampler for one process or many: rank r of W takes every W-th index of one seeded
    # permutation, so W ranks at batch B see exactly the examples one process sees at batch W·B.
    sampler = DistributedSampler(inputs.train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                 seed=config.seed)
    loader = DataLoader(inputs.train_set, batch_size=batch_size, sampler=sampler, collate_fn=inputs.collator)
    eval_loaders = {k: DataLoader(v.select(shard(len(v), dist)), batch_size=config.eval_batch_size or 2 * batch_size,
                                  collate_fn=inputs.collator) for k, v in inputs.eval_sets.items()}
    steps_per_epoch = math.ceil(len(loader) / config.grad_accum)
    total_steps = min(config.max_steps or epochs * steps_per_epoch, epochs * steps_per_epoch)
    epochs = min(epochs, math.ceil(total_steps / steps_per_epoch))
    optimizer = plan.optimizer(engine.model.parameters(), lr)
    engine.use_optimizer(optimizer, plan.scheduler(optimizer, total_steps))
    converted = engine.converted
    record = FinetuneRun(
        name=method.label, method=method.name, rho=method.rho, sketch=method.sketch_name,
        savers=method.saver_names or None, checkpointing=method.checkpoint, status="completed",
        converted_layers={"count": len(converted), "names": converted, **_left_exact(engine, method)},
        hyperparameters={"batch_size": batch_size, "global_batch_size": batch_size * dist.world_size
                         * config.grad_accum, "lr": lr, "epochs": epochs, "total_steps": total_steps,
                         "grad_accum": config.grad_accum, "warmup_steps": plan.warmup_steps(total_steps)})
    run = _Run(method.label, method, engine, sampler, loader, eval_loaders, epochs, total_steps, config.grad_accum,
               memory={"activation_bytes": None})
    return run, record


def _left_exact(engine: Engine, method: Method) -> dict:
    """The selected layers a randomized run left exact, by folded name, and why (none: nothing)."""
    left = {**engine.left_exact, **describe_conversion(engine.model).get("left_exact", {})}
    return {"left_exact": {fold_layer_indices(name): why for name, why in left.items()}} if method.randomized and left else {}


def _probe_memory(run: _Run, batch: dict) -> torch.Tensor:
    """The first real batch: forward and backward with the bytes saved for backward counted."""
    loss, probe = run.engine.probe(batch, scale=run.grad_accum)
    stats = probe.stats
    run.memory.update(activation_bytes=stats.total_bytes, activation_bytes_by_kind=dict(stats.by_kind),
                      probe_batch_shape=list(batch["input_ids"].shape))
    run.memory["activation_peak_bytes"] = probe.peak_bytes
    if run.method.checkpoint:
        run.memory["recompute_unit_bytes"] = probe.recompute_unit_bytes
    return loss


def _train_epoch(run: _Run, epoch: int, callbacks: TrainCallbacks, dist: Distributed) -> dict:
    """One pass over the training data, cut short at the last step or a stop; the epoch's entry."""
    engine = run.engine
    run.sampler.set_epoch(epoch)
    epoch_loss, epoch_batches, epoch_start = 0.0, 0, time.perf_counter()
    try:
        with interruptible():
            for micro, batch in enumerate(run.loader):
                batch = engine.to_device(batch)
                if run.memory["activation_bytes"] is None:
                    loss = _probe_memory(run, batch)
                else:
                    loss = engine.forward(batch)
                    engine.backward(loss, run.grad_accum)
                # one collective per batch: the mean loss over ranks, and whether any rank was asked
                # to stop (all ranks must stop at the same step, or the next collective would hang)
                loss_sum, stops = all_reduce_sum(dist, [loss.item(), float(callbacks.should_stop())], engine.device)
                epoch_loss += loss_sum / dist.world_size
                epoch_batches += 1
                run.tokens += int(batch["attention_mask"].sum())
                if (micro + 1) % run.grad_accum and micro + 1 != len(run.loader):
                    continue
                engine.optimizer_step()
                run.step += 1
                if callbacks.on_step:
                    callbacks.on_step(run.name, run.step, loss_sum / dist.world_size, engine.scheduler.get_last_lr()[0])
                if run.step >= run.total_steps or stops > 0:
                    run.stopped = run.step < run.total_steps  # a stop after the last step changes nothing
                    break
    except KeyboardInterrupt:  # Ctrl-C inside a step (a second one): the steps before it are kept
        if dist.enabled:  # ranks cannot agree on where to stop now: the launcher ends the job
            raise
        run.stopped = run.step < run.total_steps  # cut short after the last step: the run is complete
    synchronize(engine.device)
    run.train_time += time.perf_counter() - epoch_start
    return {"epoch": epoch, "steps": run.step, "train_loss": epoch_loss / max(epoch_batches, 1),
            "train_time_s": time.perf_counter() - epoch_start}


def _train_epochs(run: _Run, record: FinetuneRun, spec: TaskSpec, callbacks: TrainCallbacks,
                  dist: Distributed) -> None:
    """Train and evaluate epoch by epoch until the last step or a stop."""
    for epoch in range(1, run.epochs + 1):
        entry = _train_epoch(run, epoch, callbacks, dist)
        if run.stopped:
            entry["partial"] = True
            record.epochs.append(entry)
            return
        eval_start = time.perf_counter()
        try:
            # the plain module, not the DDP wrapper: ranks hold different numbers of evaluation
            # batches, and DDP's forward would start a buffer broadcast on each of them
            with interruptible():
                entry["eval"] = {split: evaluate(run.engine.model, loader, spec, run.engine.device, dist)
                                 for split, loader in run.eval_loaders.items()}
        except KeyboardInterrupt:  # the epoch's training is kept, without its evaluation
            if dist.enabled:
                raise
            run.stopped = True
            record.epochs.append(entry)
            return
        entry["eval_time_s"] = time.perf_counter() - eval_start
        record.epochs.append(entry)
        if callbacks.on_epoch:
            callbacks.on_epoch(run.name, entry)
        if run.step >= run.total_steps:
            return


def train_run(plan: FinetunePlan, method: Method, inputs: TaskInputs, loaded: LoadedModel,
              callbacks: TrainCallbacks, dist: Distributed = SINGLE) -> tuple[FinetuneRun, nn.Module]:
    """Fine-tune `loaded` (a freshly initialised model) in `method`; its record, and the trained model.

    With several ranks the model is wrapped in DistributedDataParallel and each rank trains on
    its share of every global batch (see distributed.py for what is seeded how).
    """
    device = plan.device
    run, record = _start_run(plan, method, inputs, loaded, dist)
    if callbacks.on_run_start:
        callbacks.on_run_start(run.name, run.total_steps)
    run_start = time.perf_counter()
    # dropout and sketch seeds start from the same state in every run; each rank has its own stream
    rank_seed = dist.rank_seed(plan.config.seed)
    torch.manual_seed(rank_seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with NvmlSampler(device) as sampler:
        _train_epochs(run, record, inputs.data.spec, callbacks, dist)
    memory = run.memory
    if device.type == "cuda":
        memory["cuda"] = {"peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
                          "peak_reserved_bytes": torch.cuda.max_memory_reserved(device)}
        memory["nvml"] = sampler.result()
    else:
        memory["cuda"] = memory["nvml"] = None
    local_time = {"rank": dist.rank, "rng_seed": rank_seed, "train_time_s": run.train_time, "tokens": run.tokens}
    per_rank = gather_objects(dist, {**local_time, "memory": dict(memory)})
    total_tokens = sum(r["tokens"] for r in per_rank)
    record.memory = RunMemory.of(memory)  # this rank's (rank 0's in the report); every rank's below
    if dist.enabled:
        record.distributed = {"world_size": dist.world_size, "backend": dist.backend, "per_rank": per_rank}
    record.time = {"steps": run.step, "train_time_s": run.train_time,
                   "step_time_s": run.train_time / run.step if run.step else None,
                   "tokens_per_s": total_tokens / run.train_time if run.train_time else None,
                   "tokens": total_tokens, "total_time_s": time.perf_counter() - run_start}
    if run.stopped:
        record.status = "interrupted"
    _summarize(record, inputs.data.spec)
    return record, run.engine.model


def _main_value(entry: dict, spec: TaskSpec) -> float | None:
    evals = entry.get("eval")
    if not evals:
        return None
    split = spec.eval_splits[0] if spec.eval_splits[0] in evals else next(iter(evals))
    return evals[split].get(spec.main_metric)


def _summarize(record: FinetuneRun, spec: TaskSpec) -> None:
    evaluated = [e for e in record.epochs if e.get("eval")]
    record.metric = spec.main_metric
    if not evaluated:
        record.best = record.last = None
        return
    best = max(evaluated, key=lambda e: _main_value(e, spec))
    record.best = {"epoch": best["epoch"], "value": _main_value(best, spec), "eval": best["eval"]}
    last = evaluated[-1]
    record.last = {"epoch": last["epoch"], "value": _main_value(last, spec), "eval": last["eval"]}


def _compare_to_exact(runs: list[FinetuneRun]) -> None:
    exact = next((r for r in runs if r.method == "exact" and not r.savers), None)
    if exact is None:
        return
    for run in runs:
        ratio: dict = {}
        base, now = exact.memory or RunMemory(), run.memory or RunMemory()
        if base.activation_bytes and now.activation_bytes is not None:
            ratio["activation_bytes"] = now.activation_bytes / base.activation_bytes
        if base.cuda and now.cuda:
            ratio["cuda_peak"] = now.cuda.peak_allocated_bytes / base.cuda.peak_allocated_bytes
        if exact.time["step_time_s"] and run.time["step_time_s"]:
            ratio["step_time"] = run.time["step_time_s"] / exact.time["step_time_s"]
        if exact.best and run.best:
            ratio["metric_delta"] = run.best["value"] - exact.best["value"]
        run.vs_exact = ratio


def _save(plan: FinetunePlan, run: FinetuneRun, model: nn.Module, tokenizer) -> None:
    """Write the trained model (one directory per run when there are several); a failure is recorded."""
    target = Path(plan.config.save_model)
    if len(plan.methods) > 1:
        target = target / run.name.replace(" ", "_").replace("=", "")
    try:
        save_model(model, tokenizer, target)
        run.saved_to = str(target)
    except OSError as err:  # keep the finished runs: the report says what failed
        run.save_error = f"could not save the model to {str(target)!r}: {err.strerror or err}"


def _train_every_method(plan: FinetunePlan, loaded: LoadedModel, inputs: TaskInputs, callbacks: TrainCallbacks,
                        dist: Distributed) -> tuple[list[FinetuneRun], str]:
    """One run per method, each from the same initial weights; the runs and the report's status."""
    runs: list[FinetuneRun] = []
    first_model = [loaded]  # the first run trains the model loaded already; later runs load it again
    for method in plan.methods:
        if all_reduce_sum(dist, [float(callbacks.should_stop())], plan.device)[0] > 0:
            return runs, "interrupted"
        fresh = first_model.pop() if first_model else load_task_model(plan, inputs.data.spec)
        run, model = train_run(plan, method, inputs, fresh, callbacks, dist)
        if plan.config.save_model and run.status == "completed" and dist.is_main:
            _save(plan, run, model, inputs.tokenizer)
        runs.append(run)
        if run.status == "interrupted":
            return runs, "interrupted"
    return runs, "completed"


def finetune_model(plan: FinetunePlan, callbacks: TrainCallbacks | None = None,
                   dist: Distributed = SINGLE) -> FinetuneReport:
    """Every run of `plan`; the `randbp.finetune/1` report (status completed or interrupted).

    With several ranks (`dist`, from `init_distributed`) every rank calls this and gets the
    same report; the caller writes it from rank 0 only.
    """
    callbacks = callbacks or TrainCallbacks()
    config = plan.config
    if config.save_model and dist.is_main:  # rank 0 alone saves
        check_save_dir(Path(config.save_model))
    if dist.enabled and not config.offline:
        # every rank must load the same model and tokenizer: rank 0 decides whether the Hub is up
        reachable = gather_objects(dist, hub_reachable() if dist.is_main else None)[0]
        plan = replace(plan, config=replace(config, offline=not reachable))
    loaded, inputs = load_model_and_task(plan)
    if dist.world_size > len(inputs.train_set):
        raise ConfigError(f"{dist.world_size} processes but only {len(inputs.train_set)} training examples: "
                          "start fewer processes (--nproc-per-node) or give more data")
    runs, status = _train_every_method(plan, loaded, inputs, callbacks, dist)
    _compare_to_exact(runs)
    data, config = inputs.data, plan.config
    return FinetuneReport(
        status=status, environment=environment(plan.device),
        distributed={**dist.describe(), "global_batch_size": (config.batch_size or data.spec.batch_size)
                     * dist.world_size * config.grad_accum},
        config=plan.config_record(dtype=dtype_name(plan.dtype), max_length=inputs.max_length),
        task=data.describe(),
        model={**loaded.describe(), "tokenizer": inputs.tokenizer_info,
               "max_seq_len": max_sequence_length(loaded.model)},
        runs=runs)


def run_finetune(config: FinetuneConfig, callbacks: TrainCallbacks | None = None, dist: Distributed = SINGLE) -> dict:
    """`finetune_model(config.resolve())` as the JSON-ready report dict (for scripts)."""
    return finetune_model(config.resolve(), callbacks, dist).to_dict()
