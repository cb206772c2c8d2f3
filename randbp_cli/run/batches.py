"""From a training plan to batches: which source to read, the tokenizer, the collator.

`load_model_and_task(plan)` loads the model with the task's head and the task's rows (a task
knows its head; for the user's own files the model decides what they hold: text for a decoder to
model, labelled rows for an encoder to classify), checks the layer
patterns against the model, tokenizes (or truncates the synthetic task's token ids) and
returns the model beside a `TaskInputs`: everything `finetune` and `variance` feed batches from.

Tokenizer: the checkpoint's own when there is one (the cache, the Hub, a local directory);
otherwise, offline or for a built-in architecture, a byte-level BPE trained on the training
split, so a run never needs the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.convert import select_linears
from ..data.heads import CAUSAL_LM
from ..data.loaders import load_custom, load_glue_dir, load_glue_hub, load_lm_text
from ..data.models import (LoadedModel, builtin_config_path, check_methods_supported, check_model_type, hub_reachable,
                           load_model, max_sequence_length, model_head, refuse_head)
from ..data.tasks import CUSTOM_LM, TaskData, TaskSpec, synthetic_lm_task, synthetic_task
from ..errors import DataError
from .lora import apply_lora
from .plans import TrainingPlan


def load_task_data(plan: TrainingPlan, vocab_size: int, language_modelling: bool = False) -> TaskData:
    """The task's rows from the source the options name, cut to --max-train/eval-samples."""
    config = plan.config
    if plan.task is None and language_modelling:
        data = load_lm_text(config.train_file, config.validation_file, config.text_columns or [])
    elif plan.task is None:
        data = load_custom(config.train_file, config.validation_file, config.text_columns or [],
                           config.label_column)
    elif plan.task.name == "synthetic":
        data = synthetic_task(vocab_size, config.seed, config.synthetic_train_size, config.synthetic_eval_size)
    elif plan.task.name == "synthetic-lm":
        data = synthetic_lm_task(vocab_size, config.seed, config.synthetic_train_size, config.synthetic_eval_size)
    elif config.data_dir:
        data = load_glue_dir(config.data_dir, plan.task)
    else:
        data = load_glue_hub(plan.task, offline=config.offline)
    if config.max_train_samples and len(data.train) > config.max_train_samples:
        data.train = data.train.select(range(config.max_train_samples))
    if config.max_eval_samples:
        data.evals = {k: v.select(range(min(len(v), config.max_eval_samples))) for k, v in data.evals.items()}
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
    """Dynamic padding for rows that already hold `input_ids` (the synthetic tasks). A language
    model's labels are its input ids, -100 (ignored by the loss) at padding; a classifier's, the
    rows' labels."""

    def __init__(self, pad_id: int, regression: bool, language_modelling: bool = False) -> None:
        self.pad_id = pad_id
        self.label_dtype = torch.float32 if regression else torch.long
        self.language_modelling = language_modelling

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        from torch.nn.utils.rnn import pad_sequence

        ids = [torch.tensor(r["input_ids"], dtype=torch.long) for r in rows]
        input_ids = pad_sequence(ids, batch_first=True, padding_value=self.pad_id)
        mask = pad_sequence([torch.ones_like(i) for i in ids], batch_first=True, padding_value=0)
        if self.language_modelling:
            return {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)}
        labels = torch.tensor([r["label"] for r in rows], dtype=self.label_dtype)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


@dataclass
class TaskInputs:
    """A task ready to batch: its rows (tokenized, truncated), the collator, and the tokenizer."""

    data: TaskData
    train_set: object  # datasets.Dataset
    eval_sets: dict  # split -> datasets.Dataset
    collator: object
    tokenizer: object | None  # None for the synthetic task (token ids already)
    tokenizer_info: dict
    max_length: int


def _data_name(spec: TaskSpec) -> str:
    """What to call a task's data in a message."""
    return "the --train-file data" if spec.name in ("custom", CUSTOM_LM.name) else f"task {spec.name}"


def load_task_model(plan: TrainingPlan, spec: TaskSpec) -> LoadedModel:
    """The plan's model with the head `spec`'s data trains: the same initial weights on every call. A
    method the plan trains in that the model cannot run fails here, before any training."""
    loaded = load_model(plan.model_name, num_labels=max(spec.num_labels, 1), dtype=plan.dtype,
                        offline=plan.config.offline, seed=plan.config.seed)  # a language model has no labels
    if loaded.head != spec.head:  # a Hub or cached model, known once loaded
        refuse_head(plan.model_name, loaded.head, _data_name(spec))
    if plan.lora is not None:
        loaded.model = apply_lora(loaded.model, plan.lora)
    check_methods_supported(loaded.model, plan.trained_methods)
    return loaded


def load_model_and_task(plan: TrainingPlan) -> tuple[LoadedModel, TaskInputs]:
    """Load the model (with the task's head) and the data, tokenize, and build the collator."""
    config = plan.config
    if plan.task is None:  # your own files: text for a decoder to model, or a classifier's labelled rows
        head = model_head(plan.model_name, config.offline)
        data = load_task_data(plan, vocab_size=0, language_modelling=head == CAUSAL_LM)
        loaded = load_task_model(plan, data.spec)
    else:  # a local model that cannot train on the task fails before its data is read
        check_model_type(plan.model_name, (plan.task.head, _data_name(plan.task)))
        loaded = load_task_model(plan, plan.task)
        data = load_task_data(plan, loaded.model.config.vocab_size)
    max_length = min(config.max_length, max_sequence_length(loaded.model))
    if config.include or config.exclude:
        select_linears(loaded.model, config.include, config.exclude)  # a pattern that matches nothing fails now
    if data.pretokenized:
        train_set = _truncate_pretokenized(data.train, max_length)
        eval_sets = {k: _truncate_pretokenized(v, max_length) for k, v in data.evals.items()}
        collator = PadCollator(loaded.model.config.pad_token_id or 0, data.spec.is_regression,
                               data.spec.is_language_modelling)
        tokenizer, info = None, {"source": "none", "note": "synthetic task: token ids drawn from the vocabulary"}
    else:
        from transformers import DataCollatorWithPadding

        tokenizer, info = load_tokenizer(plan.model_name, loaded, data, config.offline)
        train_set, eval_sets = tokenize(data, tokenizer, max_length)
        if data.spec.is_language_modelling:  # labels: the ids, -100 at padding (many LM tokenizers have no pad)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
            collator = PadCollator(pad, regression=False, language_modelling=True)
        else:
            collator = DataCollatorWithPadding(tokenizer)
    return loaded, TaskInputs(data, train_set, eval_sets, collator, tokenizer, info, max_length)
