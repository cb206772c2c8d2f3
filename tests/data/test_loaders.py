"""Loaders against small files in GLUE's own layouts, custom files, the Hub's absence, and bad data."""

import json

import pytest

from randbp_cli.errors import DataError, DataUnavailableError
from randbp_cli.data.loaders import load_custom, load_glue_dir, load_glue_hub
from randbp_cli.data.tasks import GLUE_TASKS, get_task

from glue_files import EXPECTED_LABELS, write_glue_task

@pytest.mark.parametrize("task", list(GLUE_TASKS))
def test_every_glue_task_reads_its_original_tsv_layout(tmp_path, task):
    write_glue_task(tmp_path, task)
    data = load_glue_dir(tmp_path, get_task(task))
    spec = data.spec
    assert list(data.evals) == list(spec.eval_splits)
    assert data.train.column_names == [*spec.text_columns, "label"]
    assert data.train["label"] == pytest.approx(EXPECTED_LABELS[task])
    first_text = data.train[0][spec.text_columns[0]]
    assert first_text and "\t" not in first_text
    if task == "mrpc":
        assert '" the witness "' in first_text  # quotes kept, rows not merged
    if task == "qqp":
        assert data.skipped_rows == {"train": 1, "validation": 1} and "malformed" in data.notes[0]


def test_task_folder_given_directly_and_mnli_dev_files(tmp_path):
    folder = write_glue_task(tmp_path, "mnli")
    data = load_glue_dir(folder, get_task("mnli"))
    assert set(data.evals) == {"validation_matched", "validation_mismatched"}


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_datasets_column_names_in_csv_jsonl_parquet(tmp_path, fmt):
    import pandas as pd

    frame = pd.DataFrame({"sentence1": ["a b", "c d", "e f"], "sentence2": ["x", "y", "z"], "label": [0, 1, 1],
                          "idx": [0, 1, 2]})
    for split in ("train", "validation"):
        path = tmp_path / f"{split}.{fmt}"
        if fmt == "csv":
            frame.to_csv(path, index=False)
        elif fmt == "jsonl":
            frame.to_json(path, orient="records", lines=True)
        else:
            frame.to_parquet(path)
    data = load_glue_dir(tmp_path, get_task("rte"))
    assert data.train["label"] == [0, 1, 1] and data.train["sentence2"] == ["x", "y", "z"]


def test_custom_files_classification_and_regression(tmp_path):
    (tmp_path / "train.csv").write_text("text,topic\nhello world,sports\nbuy now,ads\ngoal!,sports\n")
    (tmp_path / "dev.csv").write_text("text,topic\nscore,sports\nsale,ads\n")
    data = load_custom(tmp_path / "train.csv", tmp_path / "dev.csv", ["text"], "topic")
    assert data.spec.num_labels == 2 and data.spec.label_names == ("ads", "sports")
    assert data.train["label"] == [1, 0, 1] and data.evals["validation"]["label"] == [1, 0]
    rows = [{"a": "x y", "b": "z", "score": s} for s in (0.5, 2.25, 4.0)]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = load_custom(tmp_path / "r.jsonl", tmp_path / "r.jsonl", ["a", "b"], "score")
    assert data.spec.is_regression and data.spec.metrics == ("pearson", "spearmanr", "mse")


@pytest.mark.parametrize("problem, match", [
    ("missing-file", "missing .*dev.tsv"),
    ("no-column", "no column"),
    ("bad-label", "out of range"),
    ("unknown-label", "unknown label"),
    ("hidden-label", "hidden test label"),
    ("empty", "no usable rows"),
])
def test_bad_glue_data(tmp_path, problem, match):
    folder = write_glue_task(tmp_path, "rte")
    header = "index\tsentence1\tsentence2\tlabel\n"
    if problem == "missing-file":
        (folder / "dev.tsv").unlink()
    elif problem == "no-column":
        (folder / "train.tsv").write_text("index\tsentence1\tsentence2\tgold\n0\ta\tb\tentailment\n")
    elif problem == "bad-label":
        (folder / "train.tsv").write_text(header + "0\ta\tb\t7\n")
    elif problem == "unknown-label":
        (folder / "train.tsv").write_text(header + "0\ta\tb\tmaybe\n")
    elif problem == "hidden-label":
        (folder / "dev.tsv").write_text(header + "0\ta\tb\t-1\n")
    elif problem == "empty":
        (folder / "train.tsv").write_text(header)
    with pytest.raises(DataError, match=match):
        load_glue_dir(tmp_path, get_task("rte"))


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        load_glue_dir(tmp_path / "nope", get_task("rte"))
    with pytest.raises(DataError, match="no training data"):
        load_glue_dir(tmp_path, get_task("rte"))


def test_hub_unreachable_says_how_to_supply_data():
    with pytest.raises(DataUnavailableError, match="--data-dir"):
        load_glue_hub(get_task("mrpc"), offline=True)
