"""`randbp finetune` as a library call: fine-tune exactly and with randomized backprop, side by side.

`run_finetune(FinetuneConfig(...))` loads the task once, then trains one run per method (the
exact baseline when asked, and one per ρ) from the same initial weights, on the same data in
the same order (everything seeded from `seed`). Each run records per-epoch training loss and
evaluation metrics, the activation bytes saved for backward on the first real batch, CUDA and
NVML peaks on GPU, seconds per optimizer step and tokens per second.

Training follows the paper's Fairseq recipe (METHOD §5) unless overridden: AdamW (β 0.9/0.98,
ε 1e-6, weight decay 0.1 on every parameter, as Fairseq applies it), 6% linear warm-up then
linear decay to 0, dynamic padding, fp32, per-task batch size and learning rate, 10 epochs.

Stopping: the caller passes `should_stop()`; it is checked after every optimizer step, and a
stop ends training there with `"status": "interrupted"` and everything finished kept.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .convert import convert, converted_names, restore
from .errors import ConfigError
from .distributed import SINGLE, Distributed, all_reduce_sum, gather_objects, shard
from .memory import NvmlSampler, RecomputeCounter, SavedTensorCounter, checkpoint_units, synchronize
from .models import LoadedModel, load_model, max_sequence_length
from .profiling import dtype_name, method_label, resolve_device, resolve_dtype, set_checkpointing
from .sketches import check_rho, get_sketch
from .loaders import load_custom, load_glue_dir, load_glue_hub
from .tasks import TaskData, compute_metrics, get_task, synthetic_task

SCHEMA = "randbp.finetune/1"
DEFAULT_MODEL = "roberta-base"
SYNTHETIC_DEFAULT_MODEL = "roberta-tiny"


@dataclass
class FinetuneConfig:
    task: str = "mrpc"
    model: str | None = None  # roberta-base; roberta-tiny for the synthetic task
    rhos: list[float] = field(default_factory=list)  # empty: exact training only
    compare: bool = False  # add an exact run beside the randomized ones
    methods: list[str] | None = None  # explicit: exact, randomized, checkpoint, checkpoint+randomized
    sketch: str = "gaussian"
    include: list[str] | None = None
    exclude: list[str] | None = None
    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    eval_batch_size: int | None = None
    lr: float | None = None
    max_length: int = 512
    grad_accum: int = 1
    warmup_ratio: float = 0.06
    weight_decay: float = 0.1
    adam_betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-6
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    data_dir: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    text_columns: list[str] | None = None
    label_column: str = "label"
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    synthetic_train_size: int = 4000
    synthetic_eval_size: int = 1000
    offline: bool = False
    save_model: str | None = None

    def validate(self) -> None:
        from .profiling import METHODS

        for method in self.methods or []:
            if method not in METHODS:
                raise ConfigError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
            if method.endswith("randomized") and not self.rhos:
                raise ConfigError(f"--method {method} needs at least one --rho")
        for rho in self.rhos:
            check_rho(rho)
        get_sketch(self.sketch)
        resolve_dtype(self.dtype)
        positive = {"--epochs": self.epochs, "--max-steps": self.max_steps, "--batch-size": self.batch_size,
                    "--eval-batch-size": self.eval_batch_size, "--max-length": self.max_length,
                    "--grad-accum": self.grad_accum, "--max-train-samples": self.max_train_samples,
                    "--max-eval-samples": self.max_eval_samples}
        for option, value in positive.items():
            if value is not None and value < 1:
                raise ConfigError(f"{option} must be a positive integer (got {value})")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"--lr must be positive (got {self.lr})")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warm-up ratio must be in [0, 1) (got {self.warmup_ratio})")
        if (self.train_file is None) != (self.validation_file is None):
            raise ConfigError("give both --train-file and --validation-file")
        if self.train_file is None:
            get_task(self.task)

    @property
    def custom_data(self) -> bool:
        return self.train_file is not None

    def model_name(self) -> str:
        if self.model:
            return self.model
        return SYNTHETIC_DEFAULT_MODEL if self.task == "synthetic" and not self.custom_data else DEFAULT_MODEL

    def runs(self) -> list[tuple[str, float | None]]:
        """(method, ρ) per run: --method when given, else exact and/or one randomized run per ρ."""
        rhos = [float(rho) for rho in dict.fromkeys(self.rhos)]
        if self.methods:
            from .profiling import METHODS

            chosen = [m for m in METHODS if m in self.methods or (m == "exact" and self.compare)]
        else:
            chosen = (["exact"] if not rhos or self.compare else []) + (["randomized"] if rhos else [])
        runs: list[tuple[str, float | None]] = []
        for method in chosen:
            runs += [(method, rho) for rho in rhos] if method.endswith("randomized") else [(method, None)]
        return runs


@dataclass
class TrainCallbacks:
    """How the caller hears about progress and asks to stop (the library never prints)."""

    on_run_start: Callable[[str, int], None] | None = None  # (run name, total optimizer steps)
    on_step: Callable[[str, int, float, float], None] | None = None  # (run, step, loss, lr)
    on_epoch: Callable[[str, dict], None] | None = None  # (run, epoch record)
    should_stop: Callable[[], bool] = lambda: False


# ---------------------------------------------------------------------------- data


def load_task_data(config: FinetuneConfig, vocab_size: int) -> TaskData:
    if config.custom_data:
        data = load_custom(config.train_file, config.validation_file, config.text_columns or [],
                           config.label_column)
    elif config.task == "synthetic":
        data = synthetic_task(vocab_size, config.seed, config.synthetic_train_size, config.synthetic_eval_size)
    elif config.data_dir:
        data = load_glue_dir(config.data_dir, get_task(config.task))
    else:
        data = load_glue_hub(get_task(config.task), offline=config.offline)
    if config.max_train_samples and len(data.train) > config.max_train_samples:
        data.train = data.train.select(range(config.max_train_samples))
    if config.max_eval_samples:
        data.evals = {k: v.select(range(min(len(v), config.max_eval_samples))) for k, v in data.evals.items()}
    from .errors import DataError

    if len(data.train) == 0:
        raise DataError("the training set is empty")
    for split, dataset in data.evals.items():
        if len(dataset) == 0:
            raise DataError(f"the evaluation split {split} is empty")
    return data


def _train_bpe(texts, vocab_size: int, pad_id: int):
    """A byte-level BPE tokenizer trained on the training texts (offline fallback)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    if pad_id == 0:
        specials = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.RobertaProcessing(("</s>", eos), ("<s>", bos))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>", cls_token="<s>", sep_token="</s>",
                                   model_input_names=["input_ids", "attention_mask"])


def load_tokenizer(model_name: str, loaded: LoadedModel, data: TaskData, offline: bool):
    """The checkpoint's tokenizer when there is one; else BPE trained on the training texts."""
    from transformers import AutoTokenizer

    from .models import builtin_config_path, hub_reachable

    attempts = [{"local_files_only": True}]
    if not offline and builtin_config_path(model_name) is None and not Path(model_name).exists() and hub_reachable():
        attempts.append({})
    elif not offline and loaded.source == "hub":
        attempts.append({})
    for kwargs in attempts:
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_name, **kwargs)
            return tokenizer, {"source": "pretrained", "name": model_name, "vocab_size": len(tokenizer)}
        except (OSError, ValueError, TypeError):
            continue
    config = loaded.model.config
    vocab = min(config.vocab_size, 8000)
    texts = (" ".join(str(row[c]) for c in data.spec.text_columns) for row in data.train)
    tokenizer = _train_bpe(texts, vocab, config.pad_token_id or 0)
    return tokenizer, {"source": "trained-bpe", "vocab_size": len(tokenizer),
                       "note": "no tokenizer for this model here: byte-level BPE trained on the training split"}


def tokenize(data: TaskData, tokenizer, max_length: int):
    def encode(batch):
        texts = [batch[c] for c in data.spec.text_columns]
        return tokenizer(*texts, truncation=True, max_length=max_length)

    remove = list(data.spec.text_columns)
    train = data.train.map(encode, batched=True, remove_columns=remove, desc=None)
    evals = {k: v.map(encode, batched=True, remove_columns=remove, desc=None) for k, v in data.evals.items()}
    return train, evals


def _truncate_pretokenized(dataset, max_length: int):
    return dataset.map(lambda row: {"input_ids": row["input_ids"][:max_length]})


class PadCollator:
    """Dynamic padding for rows that already hold `input_ids` (the synthetic task)."""

    def __init__(self, pad_id: int, regression: bool) -> None:
        self.pad_id = pad_id
        self.label_dtype = torch.float32 if regression else torch.long

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        from torch.nn.utils.rnn import pad_sequence

        ids = [torch.tensor(r["input_ids"], dtype=torch.long) for r in rows]
        input_ids = pad_sequence(ids, batch_first=True, padding_value=self.pad_id)
        mask = pad_sequence([torch.ones_like(i) for i in ids], batch_first=True, padding_value=0)
        labels = torch.tensor([r["label"] for r in rows], dtype=self.label_dtype)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------------------- one run


def make_optimizer(model, config: FinetuneConfig, lr: float):
    """AdamW as Fairseq configures it for GLUE (METHOD §5): decay on every parameter."""
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=config.adam_betas, eps=config.adam_eps,
                             weight_decay=config.weight_decay)


@torch.no_grad()
def evaluate(model, loader, spec, device, dist: Distributed = SINGLE) -> dict:
    """Metrics over the whole evaluation set; with several ranks each evaluates its shard and
    the predictions are gathered, so every example counts exactly once."""
    model.eval()
    predictions, labels, loss_sum = [], [], 0.0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
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


def _run_name(method: str, rho: float | None, sketch: str) -> str:
    return method_label(method, rho, sketch if method.endswith("randomized") else None)


def _batch_tokens(batch) -> int:
    return int(batch["attention_mask"].sum())


def train_run(config: FinetuneConfig, method: str, rho: float | None, data: TaskData, train_set, eval_sets,
              collator, callbacks: TrainCallbacks, device: torch.device, loaded: LoadedModel | None = None,
              dist: Distributed = SINGLE) -> dict:
    """Fine-tune one model (exact, or randomized at `rho`) and return its run record.

    `loaded` is a freshly initialised model to train; without it the model is loaded again
    (with the same seed, so every run starts from the same weights). With several ranks the
    model is wrapped in DistributedDataParallel and each rank trains on its share of every
    global batch (see distributed.py for what is seeded how).
    """
    from torch.utils.data import DataLoader, DistributedSampler
    from transformers import get_linear_schedule_with_warmup

    spec = data.spec
    name = _run_name(method, rho, get_sketch(config.sketch).name)
    if loaded is None:
        loaded = load_model(config.model_name(), num_labels=spec.num_labels, dtype=resolve_dtype(config.dtype),
                            offline=config.offline, seed=config.seed)
    model = loaded.model.to(device)
    model.train()
    checkpointed = method.startswith("checkpoint")
    set_checkpointing(model, checkpointed)
    if method.endswith("randomized"):
        model = convert(model, rho, sketch=config.sketch, include=config.include, exclude=config.exclude)
    converted = converted_names(model)
    runner = model  # what forward/backward go through; `model` stays the plain module (hooks, saving)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        # static_graph: reentrant checkpointing re-runs each layer in backward, which DDP's
        # default gradient bookkeeping would see as the same parameter becoming ready twice
        runner = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                         static_graph=checkpointed)

    batch_size = config.batch_size or spec.batch_size
    lr = config.lr or spec.lr
    epochs = config.epochs or spec.epochs
    # The same sampler for one process or many: rank r of W takes every W-th index of one seeded
    # permutation, so W ranks at batch B see exactly the examples one process sees at batch W·B.
    train_sampler = DistributedSampler(train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                       seed=config.seed)
    train_loader = DataLoader(train_set, batch_size=batch_size, sampler=train_sampler, collate_fn=collator)
    eval_loaders = {k: DataLoader(v.select(shard(len(v), dist)), batch_size=config.eval_batch_size or 2 * batch_size,
                                  collate_fn=collator) for k, v in eval_sets.items()}
    steps_per_epoch = math.ceil(len(train_loader) / config.grad_accum)
    total_steps = min(config.max_steps or epochs * steps_per_epoch, epochs * steps_per_epoch)
    epochs = min(epochs, math.ceil(total_steps / steps_per_epoch))
    optimizer = make_optimizer(model, config, lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(config.warmup_ratio * total_steps), total_steps)
    if callbacks.on_run_start:
        callbacks.on_run_start(name, total_steps)

    record: dict = {"name": name, "method": method, "rho": rho,
                    "sketch": get_sketch(config.sketch).name if method.endswith("randomized") else None,
                    "checkpointing": checkpointed,
                    "status": "completed",
                    "converted_layers": {"count": len(converted), "names": converted},
                    "hyperparameters": {"batch_size": batch_size, "global_batch_size": batch_size * dist.world_size
                                        * config.grad_accum, "lr": lr, "epochs": epochs,
                                        "total_steps": total_steps, "grad_accum": config.grad_accum,
                                        "warmup_steps": round(config.warmup_ratio * total_steps)},
                    "epochs": []}
    memory: dict = {"activation_bytes": None}
    step, tokens, train_time = 0, 0, 0.0
    run_start = time.perf_counter()
    # dropout and sketch seeds start from the same state in every run; each rank has its own stream
    rank_seed = dist.rank_seed(config.seed)
    torch.manual_seed(rank_seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stopped = False
    with NvmlSampler(device) as sampler:
        for epoch in range(1, epochs + 1):
            train_sampler.set_epoch(epoch)
            epoch_loss, epoch_batches, epoch_start = 0.0, 0, time.perf_counter()
            stop_requested = False
            for micro, batch in enumerate(train_loader):
                batch = {k: v.to(device) for k, v in batch.items()}
                if memory["activation_bytes"] is None:  # the first real batch: count saved bytes
                    with SavedTensorCounter(model, exclude=batch.values()) as counter:
                        loss = runner(**batch).loss
                    stats = counter.stats()
                    memory.update(activation_bytes=stats.total_bytes,
                                  activation_bytes_by_kind=dict(stats.by_kind),
                                  probe_batch_shape=list(batch["input_ids"].shape))
                    with RecomputeCounter(model, checkpoint_units(model)) as recompute:
                        (loss / config.grad_accum).backward()
                    largest = max(recompute.unit_bytes().values(), default=0)
                    memory["activation_peak_bytes"] = stats.total_bytes + largest
                    if checkpointed:
                        memory["recompute_unit_bytes"] = largest
                else:
                    loss = runner(**batch).loss
                    (loss / config.grad_accum).backward()
                # one collective per batch: the mean loss over ranks, and whether any rank was asked
                # to stop (all ranks must stop at the same step, or the next collective would hang)
                loss_sum, stops = all_reduce_sum(dist, [loss.item(), float(callbacks.should_stop())], device)
                epoch_loss += loss_sum / dist.world_size
                stop_requested = stops > 0
                epoch_batches += 1
                tokens += _batch_tokens(batch)
                if (micro + 1) % config.grad_accum and micro + 1 != len(train_loader):
                    continue
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if callbacks.on_step:
                    callbacks.on_step(name, step, loss_sum / dist.world_size, scheduler.get_last_lr()[0])
                if step >= total_steps or stop_requested:
                    stopped = step < total_steps  # a stop after the last step changes nothing
                    break
            synchronize(device)
            train_time += time.perf_counter() - epoch_start
            entry = {"epoch": epoch, "steps": step, "train_loss": epoch_loss / max(epoch_batches, 1),
                     "train_time_s": time.perf_counter() - epoch_start}
            if stopped:
                entry["partial"] = True
                record["epochs"].append(entry)
                break
            eval_start = time.perf_counter()
            # the plain module, not the DDP wrapper: ranks hold different numbers of evaluation
            # batches, and DDP's forward would start a buffer broadcast on each of them
            entry["eval"] = {split: evaluate(model, loader, spec, device, dist)
                             for split, loader in eval_loaders.items()}
            entry["eval_time_s"] = time.perf_counter() - eval_start
            record["epochs"].append(entry)
            if callbacks.on_epoch:
                callbacks.on_epoch(name, entry)
            if step >= total_steps:
                break
    if device.type == "cuda":
        memory["cuda"] = {"peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
                          "peak_reserved_bytes": torch.cuda.max_memory_reserved(device)}
        memory["nvml"] = sampler.result()
    else:
        memory["cuda"] = memory["nvml"] = None
    local_time = {"rank": dist.rank, "rng_seed": rank_seed, "train_time_s": train_time, "tokens": tokens}
    per_rank = gather_objects(dist, {**local_time, "memory": dict(memory)})
    total_tokens = sum(r["tokens"] for r in per_rank)
    record["memory"] = memory  # this rank's (rank 0's in the report); every rank's below
    if dist.enabled:
        record["distributed"] = {"world_size": dist.world_size, "backend": dist.backend, "per_rank": per_rank}
    record["time"] = {"steps": step, "train_time_s": train_time,
                      "step_time_s": train_time / step if step else None,
                      "tokens_per_s": total_tokens / train_time if train_time else None, "tokens": total_tokens,
                      "total_time_s": time.perf_counter() - run_start}
    if stopped:
        record["status"] = "interrupted"
    _summarize(record, spec)
    record["_model"] = model  # taken off by run_finetune (for --save-model), never serialised
    return record


def _main_value(entry: dict, spec) -> float | None:
    evals = entry.get("eval")
    if not evals:
        return None
    split = spec.eval_splits[0] if spec.eval_splits[0] in evals else next(iter(evals))
    return evals[split].get(spec.main_metric)


def _summarize(record: dict, spec) -> None:
    evaluated = [e for e in record["epochs"] if e.get("eval")]
    record["metric"] = spec.main_metric
    if not evaluated:
        record["best"] = record["last"] = None
        return
    best = max(evaluated, key=lambda e: _main_value(e, spec))
    record["best"] = {"epoch": best["epoch"], "value": _main_value(best, spec), "eval": best["eval"]}
    last = evaluated[-1]
    record["last"] = {"epoch": last["epoch"], "value": _main_value(last, spec), "eval": last["eval"]}


def _compare_to_exact(runs: list[dict]) -> None:
    exact = next((r for r in runs if r["method"] == "exact"), None)
    if exact is None:
        return
    for run in runs:
        ratio: dict = {}
        base_bytes, bytes_ = exact["memory"].get("activation_bytes"), run["memory"].get("activation_bytes")
        if base_bytes and bytes_ is not None:
            ratio["activation_bytes"] = bytes_ / base_bytes
        base_cuda, cuda = exact["memory"].get("cuda"), run["memory"].get("cuda")
        if base_cuda and cuda:
            ratio["cuda_peak"] = cuda["peak_allocated_bytes"] / base_cuda["peak_allocated_bytes"]
        if exact["time"]["step_time_s"] and run["time"]["step_time_s"]:
            ratio["step_time"] = run["time"]["step_time_s"] / exact["time"]["step_time_s"]
        if exact.get("best") and run.get("best"):
            ratio["metric_delta"] = run["best"]["value"] - exact["best"]["value"]
        run["vs_exact"] = ratio


def _check_save_dir(directory: Path) -> None:
    """Fail before training if --save-model cannot be written."""
    import os

    from .errors import OutputError

    parent = directory.expanduser().resolve().parent
    if not parent.is_dir():
        raise OutputError(f"cannot save the model to {str(directory)!r}: {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot save the model to {str(directory)!r}: permission denied")
    if directory.exists() and not directory.is_dir():
        raise OutputError(f"cannot save the model to {str(directory)!r}: it is a file")


def save_model(model, tokenizer, directory: Path) -> None:
    """safetensors checkpoint (plain nn.Linear again), written to a temp dir then renamed."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        restore(model).save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        old = None
        if directory.exists():  # moved aside, not deleted, until the new one is in place
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            directory.rename(old / directory.name)
        tmp.rename(directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass
class Prepared:
    """Everything a run needs that does not depend on the method: data, tokenizer, a fresh model."""

    device: torch.device
    loaded: LoadedModel
    data: TaskData
    train_set: object
    eval_sets: dict
    collator: object
    tokenizer: object
    tokenizer_info: dict
    max_length: int


def prepare(config: FinetuneConfig, device: torch.device | None = None) -> Prepared:
    """Load the model (with the task's head) and the data, tokenize, and build the collator."""
    device = device or resolve_device(config.device)
    model_name = config.model_name()
    dtype = resolve_dtype(config.dtype)
    if config.custom_data:  # the labels decide the head: read the data first
        data = load_task_data(config, vocab_size=0)
        loaded = load_model(model_name, num_labels=data.spec.num_labels, dtype=dtype, offline=config.offline,
                            seed=config.seed)
    else:
        loaded = load_model(model_name, num_labels=get_task(config.task).num_labels, dtype=dtype,
                            offline=config.offline, seed=config.seed)
        data = load_task_data(config, loaded.model.config.vocab_size)
    max_length = min(config.max_length, max_sequence_length(loaded.model))
    if config.include or config.exclude:
        restore(convert(loaded.model, 0.5, include=config.include, exclude=config.exclude))  # check patterns now
    tokenizer, tokenizer_info = None, {"source": "none", "note": "synthetic task: token ids drawn from the vocabulary"}
    if data.pretokenized:
        train_set = _truncate_pretokenized(data.train, max_length)
        eval_sets = {k: _truncate_pretokenized(v, max_length) for k, v in data.evals.items()}
        collator = PadCollator(loaded.model.config.pad_token_id or 0, data.spec.is_regression)
    else:
        from transformers import DataCollatorWithPadding

        tokenizer, tokenizer_info = load_tokenizer(model_name, loaded, data, config.offline)
        train_set, eval_sets = tokenize(data, tokenizer, max_length)
        collator = DataCollatorWithPadding(tokenizer)
    return Prepared(device, loaded, data, train_set, eval_sets, collator, tokenizer, tokenizer_info, max_length)


def run_finetune(config: FinetuneConfig, callbacks: TrainCallbacks | None = None, dist: Distributed = SINGLE,
                 device: torch.device | None = None) -> dict:
    """Every run of `config`; returns the `randbp.finetune/1` report (status completed/interrupted).

    With several ranks (`dist`, from `init_distributed`) every rank calls this and gets the
    same report; the caller writes it from rank 0 only. `device` overrides `config.device`.
    """
    from .report import environment

    callbacks = callbacks or TrainCallbacks()
    config.validate()
    if config.save_model and dist.is_main:  # rank 0 alone saves
        _check_save_dir(Path(config.save_model))
    if dist.enabled and not config.offline:
        # every rank must load the same model and tokenizer: rank 0 decides whether the Hub is up
        from dataclasses import replace

        from .models import hub_reachable

        reachable = gather_objects(dist, hub_reachable() if dist.is_main else None)[0]
        config = replace(config, offline=not reachable)
    p = prepare(config, device)
    if dist.world_size > len(p.train_set):
        raise ConfigError(f"{dist.world_size} processes but only {len(p.train_set)} training examples: "
                          "start fewer processes (--nproc-per-node) or give more data")
    device, data, loaded, tokenizer = p.device, p.data, p.loaded, p.tokenizer
    model_name = config.model_name()
    runs: list[dict] = []
    status = "completed"
    first_model = [loaded]  # the first run trains the model loaded above; later runs reload it
    for method, rho in config.runs():
        if all_reduce_sum(dist, [float(callbacks.should_stop())], device)[0] > 0:
            status = "interrupted"
            break
        fresh = first_model.pop() if first_model else None
        run = train_run(config, method, rho, data, p.train_set, p.eval_sets, p.collator, callbacks, device, fresh,
                        dist)
        model = run.pop("_model")
        if config.save_model and run["status"] == "completed" and dist.is_main:
            target = Path(config.save_model)
            if len(config.runs()) > 1:
                target = target / run["name"].replace(" ", "_").replace("=", "")
            try:
                save_model(model, tokenizer, target)
                run["saved_to"] = str(target)
            except OSError as err:  # keep the finished runs: the report says what failed
                run["save_error"] = f"could not save the model to {str(target)!r}: {err.strerror or err}"
        runs.append(run)
        if run["status"] == "interrupted":
            status = "interrupted"
            break
    _compare_to_exact(runs)
    return {
        "schema": SCHEMA,
        "status": status,
        "environment": environment(device),
        "distributed": {**dist.describe(), "global_batch_size": (config.batch_size or data.spec.batch_size)
                        * dist.world_size * config.grad_accum},
        "config": {**asdict(config), "model": model_name, "device": str(device),
                   "dtype": dtype_name(resolve_dtype(config.dtype)), "max_length": p.max_length},
        "task": data.describe(),
        "model": {**loaded.describe(), "tokenizer": p.tokenizer_info, "max_seq_len": max_sequence_length(loaded.model)},
        "runs": runs,
    }


@dataclass
class VarianceConfig(FinetuneConfig):
    """`randbp variance`: the data and model options of finetune, plus what to measure."""

    sketches: list[str] = field(default_factory=lambda: ["gaussian"])
    rho: float = 0.5  # the compression rate measured
    repeats: int = 64
    layers: list[str] | None = None
    steps: int = 0  # fine-tune this many steps (0: measure the first batch only)
    every: int = 1
    train_rho: float | None = None  # train randomized at this rate (with `sketch`); None: exact

    def validate(self) -> None:
        super().validate()
        check_rho(self.rho)
        if self.train_rho is not None:
            check_rho(self.train_rho)
        if not self.sketches:
            raise ConfigError("give at least one --sketch")
        for sketch in self.sketches:
            get_sketch(sketch)
        if self.repeats < 2:
            raise ConfigError(f"--repeats must be at least 2 to give a standard error (got {self.repeats})")
        if self.steps < 0:
            raise ConfigError(f"--steps must be 0 or more (got {self.steps})")
        if self.every < 1:
            raise ConfigError(f"--every must be at least 1 (got {self.every})")
