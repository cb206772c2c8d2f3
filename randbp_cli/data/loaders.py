"""Reading a task's rows from wherever they are, each source into a `TaskData` (tasks.py).

  * `--train-file/--validation-file` (CSV, TSV, JSONL/JSON or parquet) with `--text-columns`
    and `--label-column`: a user's own classification or regression data (task "custom");
    for a decoder, the same options read text to model (task "custom-lm"): a .txt file, one
    example per line, or a table's `text` column (or the one column `--text-columns` names);
  * `--data-dir DIR`: GLUE's own TSV files as distributed (`DIR/MRPC/train.tsv` or
    `DIR/train.tsv`), or CSV/JSONL/parquet files named after the split (`train.csv`,
    `validation.jsonl`, `validation_matched.parquet` ...) with the `datasets` column names;
  * Hugging Face `datasets` (`nyu-mll/glue`), from the local cache or the Hub.
The synthetic task needs no loader: tasks.py generates it from the seed.
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import ConfigError, DataError, DataUnavailableError
from .tasks import CUSTOM_LM, TaskData, TaskSpec, make_dataset

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
    return make_dataset(columns), skipped


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
    return make_dataset(columns)


def _load_file(path: Path):
    """A CSV/TSV/JSON(L)/parquet file as a datasets.Dataset, or one DataError line."""
    import logging

    import datasets

    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"cannot read {str(path)!r}: use a .csv, .tsv, .jsonl, .json or .parquet file")
    _refuse_empty(path)
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


_WHAT_A_FILE_HOLDS = {
    ".csv": "a CSV file needs a header row naming its columns (e.g. sentence,label), then one example per row",
    ".tsv": "a TSV file needs a header row naming its tab-separated columns, then one example per row",
    ".jsonl": 'a JSON Lines file needs one object per line, e.g. {"sentence": "a fine film", "label": 1}',
    ".json": 'a JSON Lines file needs one object per line, e.g. {"sentence": "a fine film", "label": 1}',
    ".parquet": "a parquet file holds a table with a schema (write it with pandas' or datasets' to_parquet)",
}


def _refuse_empty(path: Path) -> None:
    """An empty (or blank) data file, said with what the file should hold: datasets' own words for
    it are 'An error occurred while generating the dataset'."""
    try:
        with path.open("rb") as handle:
            head = handle.read(1 << 16)
    except OSError as err:
        raise DataError(f"cannot read {str(path)!r}: {err.strerror}") from None
    if not head.strip() and len(head) < 1 << 16:
        raise DataError(f"{str(path)!r} is empty: {_WHAT_A_FILE_HOLDS[path.suffix.lower()]}")


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

    from .models import no_hub, use_hub

    def from_datasets():
        return datasets.load_dataset("nyu-mll/glue", spec.name)

    data = None
    if not use_hub(offline):  # unreachable or --offline: the process is offline from here on
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
                f"GLUE task {spec.name} is not in the local datasets cache and {no_hub(offline)}: pass --data-dir "
                f"DIR holding GLUE's {folder}/train.tsv and dev files (or train/validation .csv/.jsonl/.parquet), "
                "or use --task synthetic")
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
    if Path(train_file).suffix.lower() == ".txt":
        raise ConfigError(f"{str(train_file)!r} is plain text, which trains a decoder language model (llama-tiny, "
                          "smollm2-135m, gpt2 ...); an encoder trains on a table with --text-columns and --label-column")
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


def _read_lines(path: Path) -> list[str]:
    """A .txt file's examples: one per line, blank lines skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"cannot read {str(path)!r} as UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise DataError(f"cannot read {str(path)!r}: {err.strerror}") from None
    return [line for line in text.splitlines() if line.strip()]


def _read_texts(path: Path, column: str, option: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"{option} {str(path)!r} does not exist")
    if path.suffix.lower() == ".txt":
        texts = _read_lines(path)
    else:
        if path.suffix.lower() not in _FORMATS:
            raise DataError(f"cannot read {str(path)!r}: for a language model use a .txt file (one example per "
                            "line) or a .csv, .tsv, .jsonl, .json or .parquet file with a text column")
        data = _load_file(path)
        if column not in data.column_names:
            raise DataError(f"{str(path)!r} has no text column {column!r} (name another with --text-columns); "
                            f"its columns are: {', '.join(data.column_names)}")
        texts = [str(t) for t in data[column] if t is not None and str(t).strip()]
    if not texts:
        raise DataError(f"{str(path)!r} holds no text")
    return texts


def load_lm_text(train_file: str | Path, validation_file: str | Path, text_columns: Sequence[str]) -> TaskData:
    """A user's own text for a decoder to model (task "custom-lm"): every line of a .txt file, or
    one column of a table (`text` unless `--text-columns` names another). Held out: the
    validation file's, reported as loss per token and next-token accuracy."""
    if len(text_columns) > 1:
        raise ConfigError(f"--text-columns takes one column for a language model (got {len(text_columns)})")
    column = text_columns[0] if text_columns else "text"
    train_path, eval_path = Path(train_file).expanduser(), Path(validation_file).expanduser()
    train = _read_texts(train_path, column, "--train-file")
    evaluation = _read_texts(eval_path, column, "--validation-file")
    return TaskData(CUSTOM_LM, make_dataset({"text": train}), {"validation": make_dataset({"text": evaluation})},
                    f"files:{train_path},{eval_path}", [f"text: {'lines' if train_path.suffix.lower() == '.txt' else column}"])
