"""Fine-tuning tasks: the GLUE task specs, the synthetic task, and every task's metrics.

A `TaskSpec` says what a task's rows hold (text columns, label names or a regression score),
how it is scored, and the paper's batch size and learning rate for it. A `TaskData` is a task
with its rows loaded: the spec, `datasets.Dataset`s per split (text columns and an integer or
float `label`), and notes on where the data came from and what was skipped. loaders.py reads
the rows from files, the cache or the Hub; run/batches.py turns them into batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError
from .heads import CAUSAL_LM, SEQUENCE_CLASSIFICATION


@dataclass(frozen=True)
class TsvLayout:
    """Where a GLUE task's rows sit in the TSV files GLUE distributes."""

    folder: str
    files: dict[str, str]  # split -> file name
    text_fields: tuple[str | int, ...]  # header names, or positions for header-less files
    label_field: str | int
    header: bool = True


@dataclass(frozen=True)
class TaskSpec:
    name: str
    text_columns: tuple[str, ...]
    num_labels: int  # 1 = regression; 0 for language modelling (no labels: the next tokens)
    label_names: tuple[str, ...] = ()
    eval_splits: tuple[str, ...] = ("validation",)
    metrics: tuple[str, ...] = ("accuracy",)
    batch_size: int = 16  # the paper's Fairseq setup (docs/method.md §5)
    lr: float = 1e-5
    epochs: int = 10
    tsv: TsvLayout | None = None
    description: str = ""
    head: str = SEQUENCE_CLASSIFICATION  # or CAUSAL_LM: next-token prediction (heads.py)

    @property
    def is_language_modelling(self) -> bool:
        return self.head == CAUSAL_LM

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def main_metric(self) -> str:
        return self.metrics[0]


def _tsv(folder, text, label, header=True, mnli=False):
    files = ({"train": "train.tsv", "validation_matched": "dev_matched.tsv",
              "validation_mismatched": "dev_mismatched.tsv"} if mnli
             else {"train": "train.tsv", "validation": "dev.tsv"})
    return TsvLayout(folder, files, text, label, header)


GLUE_TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in [
    TaskSpec("cola", ("sentence",), 2, ("unacceptable", "acceptable"), metrics=("matthews_correlation",),
             tsv=_tsv("CoLA", (3,), 1, header=False)),
    TaskSpec("sst2", ("sentence",), 2, ("negative", "positive"), batch_size=32, lr=2e-5,
             tsv=_tsv("SST-2", ("sentence",), "label")),
    TaskSpec("mrpc", ("sentence1", "sentence2"), 2, ("not_equivalent", "equivalent"), metrics=("accuracy", "f1"),
             tsv=_tsv("MRPC", ("#1 String", "#2 String"), "Quality")),
    TaskSpec("qqp", ("question1", "question2"), 2, ("not_duplicate", "duplicate"), metrics=("accuracy", "f1"),
             batch_size=32, tsv=_tsv("QQP", ("question1", "question2"), "is_duplicate")),
    TaskSpec("stsb", ("sentence1", "sentence2"), 1, metrics=("pearson", "spearmanr"),
             tsv=_tsv("STS-B", ("sentence1", "sentence2"), "score")),
    TaskSpec("mnli", ("premise", "hypothesis"), 3, ("entailment", "neutral", "contradiction"),
             eval_splits=("validation_matched", "validation_mismatched"),
             tsv=_tsv("MNLI", ("sentence1", "sentence2"), "gold_label", mnli=True)),
    TaskSpec("qnli", ("question", "sentence"), 2, ("entailment", "not_entailment"),
             tsv=_tsv("QNLI", ("question", "sentence"), "label")),
    TaskSpec("rte", ("sentence1", "sentence2"), 2, ("entailment", "not_entailment"), lr=2e-5,
             tsv=_tsv("RTE", ("sentence1", "sentence2"), "label")),
    TaskSpec("wnli", ("sentence1", "sentence2"), 2, ("not_entailment", "entailment"), batch_size=32,
             tsv=_tsv("WNLI", ("sentence1", "sentence2"), "label")),
]}

SYNTHETIC = TaskSpec("synthetic", ("input_ids",), 2, ("more_b", "more_a"), metrics=("accuracy",),
                     batch_size=32, lr=1e-3, epochs=4,
                     description="count task: is the marker set A more frequent than set B?")


SYNTHETIC_LM = TaskSpec("synthetic-lm", ("input_ids",), 0, metrics=("token_accuracy",), batch_size=16, lr=1e-3,
                        epochs=2, head=CAUSAL_LM,
                        description="next-token prediction on a fixed random Markov chain")


CUSTOM_LM = TaskSpec("custom-lm", ("text",), 0, metrics=("token_accuracy",), head=CAUSAL_LM,
                     description="your own text: next-token prediction")


def task_names() -> list[str]:
    return [*GLUE_TASKS, "synthetic", "synthetic-lm"]


def get_task(name: str) -> TaskSpec:
    key = name.lower().replace("-", "")
    if key == "synthetic":
        return SYNTHETIC
    if key == "syntheticlm":
        return SYNTHETIC_LM
    if key in GLUE_TASKS:
        return GLUE_TASKS[key]
    raise ConfigError(f"unknown task {name!r}: choose one of {', '.join(task_names())}, or give your own "
                      "data with --train-file/--validation-file")


@dataclass
class TaskData:
    spec: TaskSpec
    train: object  # datasets.Dataset
    evals: dict[str, object]  # split name -> datasets.Dataset
    source: str
    notes: list[str] = field(default_factory=list)
    skipped_rows: dict[str, int] = field(default_factory=dict)
    pretokenized: bool = False  # synthetic data carries input_ids already

    def describe(self) -> dict:
        return {"task": self.spec.name, "source": self.source, "num_labels": self.spec.num_labels,
                "text_columns": list(self.spec.text_columns), "metrics": list(self.spec.metrics),
                "train_examples": len(self.train),
                "eval_examples": {k: len(v) for k, v in self.evals.items()},
                "skipped_rows": dict(self.skipped_rows), "notes": list(self.notes)}


def make_dataset(columns: dict[str, list]):
    """A `datasets.Dataset` from {column: values}."""
    import datasets

    return datasets.Dataset.from_dict(columns)


# ---------------------------------------------------------------------------- synthetic task


def synthetic_task(vocab_size: int, seed: int, train_size: int = 4000, eval_size: int = 1000,
                   min_len: int = 24, max_len: int = 64, markers: int = 8, max_count: int = 6,
                   max_margin: int = 2, label_noise: float = 0.1) -> TaskData:
    """A counting task a small Transformer learns in minutes, with real gradient noise.

    Two disjoint sets A and B of `markers` token ids are drawn from the vocabulary. Each example
    is a random sequence of filler tokens with some A and some B tokens mixed in at random
    positions; the label is 1 if A tokens outnumber B tokens. The counts differ by only 1 to
    `max_margin`, so the model must find the markers among the filler and compare two counts
    across positions: it needs attention and several epochs. `label_noise` of the training
    labels are flipped, so a model cannot reach 100% on them and noisy gradients cost accuracy,
    as on real data. Evaluation labels are clean. Token ids 0-3 are never used as filler or
    markers (RoBERTa's <s>, <pad>, </s>, <unk>); each sequence starts with 0 and ends with 2.
    """
    if vocab_size < 4 + 2 * markers + 10:
        raise ConfigError(f"the model's vocabulary ({vocab_size}) is too small for the synthetic task")
    rng = np.random.default_rng(seed)
    pool = rng.permutation(np.arange(4, vocab_size))
    set_a, set_b, filler = pool[:markers], pool[markers:2 * markers], pool[2 * markers:]

    def make(n: int, noisy: bool) -> dict[str, list]:
        ids, labels = [], []
        for _ in range(n):
            length = int(rng.integers(min_len, max_len + 1)) - 2  # room for <s> and </s>
            minority = int(rng.integers(1, max_count + 1))
            majority = minority + int(rng.integers(1, max_margin + 1))
            a_wins = bool(rng.random() < 0.5)
            count_a, count_b = (majority, minority) if a_wins else (minority, majority)
            body = rng.choice(filler, size=length)
            slots = rng.choice(length, size=count_a + count_b, replace=False)
            body[slots] = np.concatenate([rng.choice(set_a, size=count_a), rng.choice(set_b, size=count_b)])
            label = int(a_wins)
            if noisy and rng.random() < label_noise:
                label = 1 - label
            ids.append([0, *body.tolist(), 2])
            labels.append(label)
        return {"input_ids": ids, "label": labels}

    if min_len - 2 < 2 * max_count + max_margin:
        raise ConfigError("synthetic task: sequences too short for the marker counts")
    train = make_dataset(make(train_size, noisy=True))
    evaluation = make_dataset(make(eval_size, noisy=False))
    return TaskData(SYNTHETIC, train, {"validation": evaluation}, f"synthetic(seed={seed})",
                    [f"{SYNTHETIC.description}; counts differ by 1-{max_margin}; {label_noise:.0%} of training "
                     f"labels flipped; {markers} marker tokens per set; lengths {min_len}-{max_len}"],
                    pretokenized=True)


def synthetic_lm_task(vocab_size: int, seed: int, train_size: int = 4000, eval_size: int = 1000,
                      length: int = 64, states: int = 48, stay: float = 0.75) -> TaskData:
    """Next-token prediction a tiny decoder learns in a minute, with a known ceiling.

    A fixed random Markov chain over `states` token ids drawn from the vocabulary: from each state
    the chain moves to its own successor with probability `stay`, else to a state drawn at
    random. So the best any model can do is predict the successor: held-out token accuracy at
    most about `stay` (and a loss floor of the chain's entropy rate), against 1/`states` for a
    model that has learnt nothing. Sequences of `length` tokens start at a random state; token ids
    0-3 are never used. Labels are the input ids (the model shifts them); there is no padding.
    """
    if vocab_size < 4 + states:
        raise ConfigError(f"the model's vocabulary ({vocab_size}) is too small for the synthetic-lm task")
    rng = np.random.default_rng(seed)
    tokens = rng.permutation(np.arange(4, vocab_size))[:states]
    successor = rng.permutation(states)

    def make(n: int) -> dict[str, list]:
        rows = np.empty((n, length), dtype=np.int64)
        rows[:, 0] = rng.integers(0, states, size=n)
        for position in range(1, length):
            jump = rng.random(n) >= stay
            rows[:, position] = np.where(jump, rng.integers(0, states, size=n), successor[rows[:, position - 1]])
        return {"input_ids": tokens[rows].tolist()}

    return TaskData(SYNTHETIC_LM, make_dataset(make(train_size)), {"validation": make_dataset(make(eval_size))},
                    f"synthetic-lm(seed={seed})",
                    [f"{SYNTHETIC_LM.description}: {states} states, the successor with p={stay:g}; "
                     f"{length} tokens per sequence"], pretokenized=True)


# ---------------------------------------------------------------------------- metrics


def compute_metrics(spec: TaskSpec, predictions, labels) -> dict[str, float]:
    """The task's metrics under their usual names (scikit-learn / scipy)."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, mean_squared_error

    predictions, labels = np.asarray(predictions), np.asarray(labels)
    out: dict[str, float] = {}
    for name in spec.metrics:
        if name in ("accuracy", "token_accuracy"):
            out[name] = float(accuracy_score(labels, predictions))
        elif name == "f1":
            out[name] = float(f1_score(labels, predictions, zero_division=0))
        elif name == "f1_macro":
            out[name] = float(f1_score(labels, predictions, average="macro", zero_division=0))
        elif name == "matthews_correlation":
            out[name] = float(matthews_corrcoef(labels, predictions))
        elif name == "pearson":
            out[name] = _nan_safe(lambda: pearsonr(predictions, labels)[0])
        elif name == "spearmanr":
            out[name] = _nan_safe(lambda: spearmanr(predictions, labels)[0])
        elif name == "mse":
            out[name] = float(mean_squared_error(labels, predictions))
    return out


def _nan_safe(fn) -> float:
    """Correlations of a constant prediction are undefined: report 0.0 rather than NaN."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(fn())
    return 0.0 if math.isnan(value) else value
