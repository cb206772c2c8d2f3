"""Loaders against small files in GLUE's own layouts, custom files, the Hub's absence, and bad data."""

import json

import pytest

from randbp_cli.errors import DataError, DataUnavailableError
from randbp_cli.loaders import load_custom, load_glue_dir, load_glue_hub
from randbp_cli.tasks import GLUE_TASKS, get_task

# (header or None, rows) per task, as in GLUE's distributed TSV files (GLUE.md). Quotes inside
# text fields are deliberate: the reader must not treat them as CSV quoting.
GLUE_FILES = {
    "cola": (None, [["gj04", "1", "", 'The "sailors" rode the breeze clear of the rocks.'],
                    ["gj04", "0", "*", "The weights made the rope stretch over the pulley."],
                    ["gj04", "1", "", "The mechanical doll wriggled itself loose."]]),
    "sst2": (["sentence", "label"], [["it 's a charming and often affecting journey . ", "1"],
                                     ['unflinchingly bleak and " desperate ', "0"]]),
    "mrpc": (["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
             [["1", "702876", "702977", 'Amrozi accused his brother , whom he called " the witness " .',
               "Referring to him as only \" the witness \" , Amrozi accused his brother ."],
              ["0", "2108705", "2108831", "Yucaipa owned Dominick 's before selling .",
               "Yucaipa bought Dominick 's in 1995 ."]]),
    "qqp": (["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
            [["133273", "213221", "213222", "How is the life of a math student?", "Which level of prepration?", "0"],
             ["402555", "536040", "536041", "How do I control my horny emotions?", "How do you control your horniness?",
              "1"],
             ["1", "2", "this row is malformed"]]),
    "stsb": (["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
              "score"],
             [["0", "main-captions", "MSRvid", "2012test", "0001", "none", "none", "A plane is taking off.",
               "An air plane is taking off.", "5.000"],
              ["1", "main-captions", "MSRvid", "2012test", "0004", "none", "none", "A man is playing a flute.",
               "A man is playing a bamboo flute.", "3.800"]]),
    "mnli": (["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"],
             [["0", "31193", "31193n", "government", "( ( x ) )", "( y )", "(ROOT x)", "(ROOT y)",
               "Conceptually cream skimming has two basic dimensions.",
               "Product and geography are what make cream skimming work.", "neutral", "neutral"],
              ["1", "101457", "101457e", "telephone", "( a )", "( b )", "(ROOT a)", "(ROOT b)",
               "you know during the season", "You lose the things to the following level.", "entailment",
               "entailment"],
              ["2", "1", "1c", "fiction", "(a)", "(b)", "(a)", "(b)", "One of our number will carry out.",
               "A member of my team will execute your orders.", "contradiction", "contradiction"]]),
    "qnli": (["index", "question", "sentence", "label"],
             [["0", "When did the third Digimon series begin?", "Unlike the two seasons before it.",
               "not_entailment"],
              ["1", "Which missile batteries often have individual launchers?", "When MANPADS is operated.",
               "entailment"]]),
    "rte": (["index", "sentence1", "sentence2", "label"],
            [["0", "No Weapons of Mass Destruction Found in Iraq Yet.", "Weapons of Mass Destruction Found in Iraq.",
              "not_entailment"],
             ["1", "A place of sorrow, after Pope John Paul II died.", "Pope Benedict XVI is the new leader.",
              "entailment"]]),
    "wnli": (["index", "sentence1", "sentence2", "label"],
             [["0", "I stuck a pin through a carrot.", "The carrot had a hole.", "1"],
              ["1", "John couldn't see the stage with Billy in front of him.", "John is so short.", "0"]]),
}

EXPECTED_LABELS = {"cola": [1, 0, 1], "sst2": [1, 0], "mrpc": [1, 0], "qqp": [0, 1], "stsb": [5.0, 3.8],
                   "mnli": [1, 0, 2], "qnli": [1, 0], "rte": [1, 0], "wnli": [1, 0]}


def write_glue_task(root, task):
    spec = GLUE_TASKS[task]
    folder = root / spec.tsv.folder
    folder.mkdir(parents=True, exist_ok=True)
    header, rows = GLUE_FILES[task]
    lines = (["\t".join(header)] if header else []) + ["\t".join(r) for r in rows]
    for name in spec.tsv.files.values():
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


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
