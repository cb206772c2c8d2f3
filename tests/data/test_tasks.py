"""Task specs, metrics against hand-computed values, and the synthetic task."""

import numpy as np
import pytest

from randbp_cli.errors import ConfigError
from randbp_cli.data.tasks import compute_metrics, get_task, synthetic_task


def test_specs_match_glue():
    assert get_task("stsb").num_labels == 1 and get_task("stsb").metrics == ("pearson", "spearmanr")
    assert get_task("mnli").eval_splits == ("validation_matched", "validation_mismatched")
    assert get_task("cola").metrics == ("matthews_correlation",)
    assert get_task("mrpc").metrics == ("accuracy", "f1") and get_task("qqp").metrics == ("accuracy", "f1")
    assert get_task("SST-2").name == "sst2"
    assert (get_task("rte").batch_size, get_task("rte").lr) == (16, 2e-5)  # docs/method.md §5
    assert (get_task("qqp").batch_size, get_task("qqp").lr) == (32, 1e-5)


def test_unknown_task():
    with pytest.raises(ConfigError, match="unknown task"):
        get_task("squad")


def test_metrics_against_hand_computed_values():
    labels = [1, 0, 1, 1, 0, 0]
    preds = [1, 0, 0, 1, 1, 0]
    # tp = 2, tn = 2, fp = 1, fn = 1
    mrpc = compute_metrics(get_task("mrpc"), preds, labels)
    assert mrpc["accuracy"] == pytest.approx(4 / 6)
    assert mrpc["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    mcc = (2 * 2 - 1 * 1) / np.sqrt((2 + 1) * (2 + 1) * (2 + 1) * (2 + 1))
    assert compute_metrics(get_task("cola"), preds, labels)["matthews_correlation"] == pytest.approx(mcc)
    scores = compute_metrics(get_task("stsb"), [1.0, 2.0, 3.0, 4.5], [1.5, 2.0, 2.5, 5.0])
    x, y = np.array([1.0, 2.0, 3.0, 4.5]), np.array([1.5, 2.0, 2.5, 5.0])
    pearson = ((x - x.mean()) * (y - y.mean())).sum() / np.sqrt(((x - x.mean()) ** 2).sum() * ((y - y.mean()) ** 2).sum())
    assert scores["pearson"] == pytest.approx(pearson)
    assert scores["spearmanr"] == pytest.approx(1.0)  # same order
    assert compute_metrics(get_task("mnli"), [0, 1, 2, 2], [0, 1, 1, 2]) == {"accuracy": 0.75}


def test_synthetic_task_is_deterministic_and_balanced():
    a = synthetic_task(1000, seed=3, train_size=500, eval_size=200)
    b = synthetic_task(1000, seed=3, train_size=500, eval_size=200)
    assert a.train["input_ids"] == b.train["input_ids"] and a.train["label"] == b.train["label"]
    assert synthetic_task(1000, seed=4, train_size=500, eval_size=200).train["label"] != a.train["label"]
    labels = np.array(a.evals["validation"]["label"])
    assert 0.35 < labels.mean() < 0.65
    ids = a.train["input_ids"]
    assert all(row[0] == 0 and row[-1] == 2 and 1 not in row for row in ids)  # <s> ... </s>, no padding id
    assert max(max(row) for row in ids) < 1000
