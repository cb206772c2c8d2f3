"""Fine-tuning data: GLUE task specs, loaders for every source, metrics, and the synthetic task.

Sources, in the order `load_task` tries them:
  * `--train-file/--validation-file` (CSV, TSV, JSONL/JSON or parquet) with `--text-columns`
    and `--label-column`: a user's own classification or regression data (task "custom");
  * `--data-dir DIR`: GLUE's own TSV files as distributed (`DIR/MRPC/train.tsv` or
    `DIR/train.tsv`), or CSV/JSONL/parquet files named after the split (`train.csv`,
    `validation.jsonl`, `validation_matched.parquet` ...) with the `datasets` column names;
  * Hugging Face `datasets` (`nyu-mll/glue`), from the local cache or the Hub;
  * `--task synthetic`: generated from the seed; needs no tokenizer and no download.

Every loader returns a `TaskData`: the spec, raw `datasets.Dataset`s per split (text columns
and an integer or float `label`), and notes on where the data came from and what was skipped.
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConfigError, DataError, DataUnavailableError


@dataclass(frozen=True)
class TsvLayout:
    folder: str
    files: dict[str, str]  # split -> file name
    text_fields: tuple[str | int, ...]  # header names, or positions for header-less files
    label_field: str | int
    header: bool = True


@dataclass(frozen=True)
class TaskSpec:
    name: str
    text_columns: tuple[str, ...]
    num_labels: int  # 1 = regression
    label_names: tuple[str, ...] = ()
    eval_splits: tuple[str, ...] = ("validation",)
    metrics: tuple[str, ...] = ("accuracy",)
    batch_size: int = 16  # the paper's Fairseq setup (METHOD §5)
    lr: float = 1e-5
    epochs: int = 10
    tsv: TsvLayout | None = None
    description: str = ""

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


def task_names() -> list[str]:
    return [*GLUE_TASKS, "synthetic"]


def get_task(name: str) -> TaskSpec:
    key = name.lower().replace("-", "")
    if key == "synthetic":
        return SYNTHETIC
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


# ---------------------------------------------------------------------------- labels


def _label_from(value, spec: TaskSpec, where: str):
    """An integer class (or float score) from a raw label: names, '0'/'1', numbers."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise DataError(f"{where}: missing label")
    if spec.is_regression:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise DataError(f"{where}: label {value!r} is not a number (task {spec.name} is a regression)") from None
    text = str(value).strip()
    if text in spec.label_names:
        return spec.label_names.index(text)
    try:
        number = float(text)
    except ValueError:
        known = ", ".join(spec.label_names) or f"0..{spec.num_labels - 1}"
        raise DataError(f"{where}: unknown label {value!r} for task {spec.name} (expected {known})") from None
    if number == -1:
        raise DataError(f"{where}: label -1 means a hidden test label; evaluate on a split with labels")
    if not number.is_integer() or not 0 <= number < spec.num_labels:
        raise DataError(f"{where}: label {value!r} is out of range for task {spec.name} "
                        f"(expected an integer in 0..{spec.num_labels - 1})")
    return int(number)


def _dataset(columns: dict[str, list]):
    import datasets

    return datasets.Dataset.from_dict(columns)


# ---------------------------------------------------------------------------- GLUE TSV files


def read_glue_tsv(path: Path, spec: TaskSpec) -> tuple[object, int]:
    """Read one GLUE TSV file as distributed. Returns (dataset, skipped malformed rows)."""
    layout = spec.tsv
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as err:
        raise DataError(f"cannot read {str(path)!r}: {err.strerror}") from None
    columns: dict[str, list] = {name: [] for name in (*spec.text_columns, "label")}
    skipped = 0
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with handle:
        # Text fields contain quote characters: quoting must be off or rows merge silently.
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        if layout.header:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{str(path)!r} is empty")
            header = [h.strip() for h in header]
            missing = [f for f in (*layout.text_fields, layout.label_field) if f not in header]
            if missing:
                raise DataError(f"{str(path)!r} has no column(s) {', '.join(map(repr, missing))} needed for task "
                                f"{spec.name}; its header is: {', '.join(header)}")
            positions = [header.index(f) for f in layout.text_fields]
            label_position = header.index(layout.label_field)
            width = len(header)
        else:
            positions, label_position = list(layout.text_fields), layout.label_field
            width = None
        for line_number, row in enumerate(reader, start=2 if layout.header else 1):
            if not row or (width is not None and len(row) != width) or len(row) <= max(*positions, label_position):
                skipped += 1  # malformed rows exist in the original QQP/MNLI files
                continue
            label = _label_from(row[label_position], spec, f"{path}:{line_number}")
            for name, position in zip(spec.text_columns, positions):
                columns[name].append(row[position])
            columns["label"].append(label)
    if not columns["label"]:
        raise DataError(f"{str(path)!r} holds no usable rows for task {spec.name}")
    return _dataset(columns), skipped


# ---------------------------------------------------------------------------- generic files

_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def read_table(path: Path, text_columns: Sequence[str], label_column: str, spec: TaskSpec) -> object:
    """CSV/TSV/JSONL/parquet with named columns -> dataset with text columns and `label`."""
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    data = _load_file(path)
    missing = [c for c in (*text_columns, label_column) if c not in data.column_names]
    if missing:
        raise DataError(f"{str(path)!r} has no column(s) {', '.join(map(repr, missing))}; "
                        f"its columns are: {', '.join(data.column_names)}")
    if len(data) == 0:
        raise DataError(f"{str(path)!r} holds no rows")
    labels = [_label_from(v, spec, f"{path} row {i + 1}") for i, v in enumerate(data[label_column])]
    columns = {name: [("" if t is None else str(t)) for t in data[src]]
               for name, src in zip(spec.text_columns, text_columns)}
    columns["label"] = labels
    return _dataset(columns)


def _load_file(path: Path):
    """A CSV/TSV/JSON(L)/parquet file as a datasets.Dataset, or one DataError line."""
    import logging

    import datasets

    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"cannot read {str(path)!r}: use a .csv, .tsv, .jsonl, .json or .parquet file")
    kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    # datasets logs its own ERROR line before raising; ours is the one line the user sees
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        return datasets.load_dataset(fmt, data_files={"data": str(path)}, split="data", **kwargs)
    except Exception as err:  # noqa: BLE001 - any parser error means an unreadable file
        if "corresponds to no data" in str(err) or "No columns to parse" in str(err):
            raise DataError(f"{str(path)!r} holds no rows") from None
        raise DataError(f"cannot read {str(path)!r} as {fmt}: {_first_line(err)}") from None
    finally:
        logger.setLevel(level)


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _find_task_dir(data_dir: Path, spec: TaskSpec) -> Path:
    """DIR itself if it holds the split files, else DIR/<GLUE folder> (any case)."""
    if (data_dir / "train.tsv").is_file() or any(data_dir.glob("train.*")):
        return data_dir
    wanted = {spec.name.lower(), (spec.tsv.folder if spec.tsv else spec.name).lower()}
    for child in sorted(data_dir.iterdir()) if data_dir.is_dir() else []:
        if child.is_dir() and child.name.lower().replace("-", "") in {w.replace("-", "") for w in wanted}:
            return child
    raise DataError(f"no training data for task {spec.name} in {str(data_dir)!r}: expected "
                    f"{spec.tsv.folder if spec.tsv else spec.name}/train.tsv (GLUE's layout) or train.csv/"
                    ".jsonl/.parquet")


def _split_file(folder: Path, split: str, spec: TaskSpec) -> Path | None:
    names = [split] + (["dev"] if split == "validation" else [])
    if split.startswith("validation_"):
        names.append("dev_" + split.removeprefix("validation_"))
    for name in names:
        for suffix in (".csv", ".jsonl", ".json", ".parquet"):
            if (folder / f"{name}{suffix}").is_file():
                return folder / f"{name}{suffix}"
    return None


def load_glue_dir(data_dir: str | Path, spec: TaskSpec) -> TaskData:
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise DataError(f"--data-dir {str(data_dir)!r} is not a directory")
    folder = _find_task_dir(data_dir, spec)
    splits = ("train", *spec.eval_splits)
    loaded, skipped = {}, {}
    if spec.tsv and (folder / spec.tsv.files["train"]).is_file():
        for split in splits:
            path = folder / spec.tsv.files[split]
            if not path.is_file():
                raise DataError(f"missing {str(path)!r}: GLUE's {spec.tsv.folder} folder has "
                                f"{', '.join(spec.tsv.files.values())}")
            loaded[split], skipped[split] = read_glue_tsv(path, spec)
        source = f"glue-tsv:{folder}"
    else:
        for split in splits:
            path = _split_file(folder, split, spec)
            if path is None:
                raise DataError(f"no {split} file for task {spec.name} in {str(folder)!r} "
                                f"(looked for {split}.csv/.jsonl/.parquet)")
            loaded[split] = read_table(path, spec.text_columns, "label", spec)
        source = f"files:{folder}"
    notes = [f"skipped {n} malformed rows in {s}" for s, n in skipped.items() if n]
    return TaskData(spec, loaded["train"], {s: loaded[s] for s in spec.eval_splits}, source, notes,
                    {s: n for s, n in skipped.items() if n})


# ---------------------------------------------------------------------------- Hugging Face datasets


def load_glue_hub(spec: TaskSpec, offline: bool = False) -> TaskData:
    import datasets

    from .models import hub_reachable

    def from_datasets():
        return datasets.load_dataset("nyu-mll/glue", spec.name)

    data = None
    if offline or not hub_reachable():
        previous = datasets.config.HF_HUB_OFFLINE
        datasets.config.HF_HUB_OFFLINE = True  # the local cache only: no retries against a dead network
        try:
            data = from_datasets()
        except Exception:  # noqa: BLE001 - not cached
            data = None
        finally:
            datasets.config.HF_HUB_OFFLINE = previous
        if data is None:
            folder = spec.tsv.folder if spec.tsv else spec.name
            raise DataUnavailableError(
                f"GLUE task {spec.name} is not in the local datasets cache and the Hugging Face Hub is "
                f"unreachable: pass --data-dir DIR holding GLUE's {folder}/train.tsv and dev files (or "
                "train/validation .csv/.jsonl/.parquet), or use --task synthetic")
        source = "datasets-cache:nyu-mll/glue"
    else:
        try:
            data = from_datasets()
        except Exception as err:  # noqa: BLE001 - download or parse failures
            raise DataUnavailableError(f"could not load nyu-mll/glue/{spec.name}: {_first_line(err)}") from None
        source = "hub:nyu-mll/glue"
    keep = [*spec.text_columns, "label"]
    splits = {s: data[s].select_columns(keep) for s in ("train", *spec.eval_splits)}
    for split in spec.eval_splits:
        if any(label == -1 for label in splits[split]["label"]):
            raise DataError(f"split {split} of {spec.name} has hidden labels (-1)")
    return TaskData(spec, splits["train"], {s: splits[s] for s in spec.eval_splits}, source)


# ---------------------------------------------------------------------------- custom files


def custom_spec(train, label_column: str, text_columns: Sequence[str], num_labels: int | None) -> TaskSpec:
    """Infer classification vs regression from the training labels."""
    values = train[label_column]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if num_labels == 1 or (numeric and any(isinstance(v, float) and not float(v).is_integer() for v in values)):
        return TaskSpec("custom", tuple(text_columns), 1, metrics=("pearson", "spearmanr", "mse"))
    if numeric:
        classes = sorted({int(v) for v in values})
        if classes[0] < 0:
            raise DataError(f"label column {label_column!r} has negative labels; classes must be 0..K-1 or names")
        n = num_labels or classes[-1] + 1
        names = tuple(str(i) for i in range(n))
    else:
        names = tuple(sorted({str(v).strip() for v in values}))
        n = len(names)
    metrics = ("accuracy", "f1") if n == 2 else ("accuracy", "f1_macro")
    return TaskSpec("custom", tuple(text_columns), n, names, metrics=metrics)


def load_custom(train_file: str | Path, validation_file: str | Path, text_columns: Sequence[str],
                label_column: str, num_labels: int | None = None) -> TaskData:
    """A user's own train/validation files; classification or regression decided by the labels."""
    if not text_columns:
        raise ConfigError("--text-columns is required with --train-file (e.g. --text-columns sentence1,sentence2)")
    if len(text_columns) > 2:
        raise ConfigError(f"--text-columns takes one or two columns (got {len(text_columns)})")
    train_path, eval_path = Path(train_file).expanduser(), Path(validation_file).expanduser()
    for path, option in ((train_path, "--train-file"), (eval_path, "--validation-file")):
        if not path.is_file():
            raise DataError(f"{option} {str(path)!r} does not exist")
    raw = _load_file(train_path)
    if label_column not in raw.column_names:
        raise DataError(f"{str(train_path)!r} has no label column {label_column!r}; its columns are: "
                        f"{', '.join(raw.column_names)}")
    if len(raw) == 0:
        raise DataError(f"{str(train_path)!r} holds no rows")
    spec = custom_spec(raw, label_column, text_columns, num_labels)
    train = read_table(train_path, text_columns, label_column, spec)
    evaluation = read_table(eval_path, text_columns, label_column, spec)
    return TaskData(spec, train, {"validation": evaluation}, f"files:{train_path},{eval_path}",
                    [f"columns {', '.join(text_columns)} -> label {label_column}"])


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
    train = _dataset(make(train_size, noisy=True))
    evaluation = _dataset(make(eval_size, noisy=False))
    return TaskData(SYNTHETIC, train, {"validation": evaluation}, f"synthetic(seed={seed})",
                    [f"{SYNTHETIC.description}; counts differ by 1-{max_margin}; {label_noise:.0%} of training "
                     f"labels flipped; {markers} marker tokens per set; lengths {min_len}-{max_len}"],
                    pretokenized=True)


# ---------------------------------------------------------------------------- metrics


def compute_metrics(spec: TaskSpec, predictions, labels) -> dict[str, float]:
    """The task's metrics under their usual names (scikit-learn / scipy)."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, mean_squared_error

    predictions, labels = np.asarray(predictions), np.asarray(labels)
    out: dict[str, float] = {}
    for name in spec.metrics:
        if name == "accuracy":
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
