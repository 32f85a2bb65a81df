"""POPE: prompt, yes/no reading and precision/recall/F1 arithmetic, against hand-computed values and
lmms-eval.

``pope_llava`` (LLaVA's eval_pope.py rule) has no importable oracle: it is checked by hand-computed values.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from eval_fixtures import lmms_eval_metrics, png_bytes, write_parquet

from llavakit.errors import DataError
from llavakit.evaluation import score
from llavakit.evaluation.pope import METRICS, parse_llava
from llavakit.evaluation.registry import get_benchmark
from llavakit.evaluation.sources import load_benchmark_data

CATEGORIES = ("adversarial", "popular", "random")
TASKS = {"pope": None, "pope_adv": "adversarial", "pope_pop": "popular", "pope_random": "random"}


def _rows(per_category: int = 4) -> list[dict]:
    """``per_category`` questions per category, answers alternating yes/no; ids restart per category."""
    rows = []
    for category in CATEGORIES:
        for number in range(per_category):
            rows.append(
                {
                    "id": str(len(rows)),
                    "question_id": str(number + 1),
                    "question": f" Is there a thing {number} in the image? ",
                    "answer": "yes" if number % 2 == 0 else "no",
                    "image_source": f"COCO_val2014_{number:012d}",
                    "image": png_bytes(),
                    "category": category,
                }
            )
    return rows


def _with(rows: list[dict], predictions: list[str | None]) -> list[dict]:
    return [{**row, "prediction": p} for row, p in zip(rows, predictions)]


def _lmms_yaml(name: str) -> dict:
    """An lmms-eval POPE yaml without its ``!function`` lines."""
    folder = Path(importlib.import_module("lmms_eval.tasks.pope.utils").__file__).parent
    lines = (folder / name).read_text(encoding="utf-8").splitlines()
    return yaml.safe_load("\n".join(line for line in lines if "!function" not in line))


def _lmms_eval_scores(utils, rows: list[dict], predictions: list[str]) -> dict:
    aggregations = {
        "pope_accuracy": utils.pope_aggregate_accuracy,
        "pope_precision": utils.pope_aggregate_precision,
        "pope_recall": utils.pope_aggregate_recall,
        "pope_f1_score": utils.pope_aggregate_f1_score,
        "pope_yes_ratio": utils.pope_aggregate_yes_ratio,
    }
    # lmms-eval strips every generated answer before the task's process_results.
    return lmms_eval_metrics(utils.pope_process_results, aggregations, rows, [p.strip() for p in predictions])


@pytest.mark.parametrize("task", list(TASKS))
def test_settings_follow_lmms_eval_yaml(task):
    bench, config = get_benchmark(task), _lmms_yaml(f"{task}.yaml")
    assert (bench.dataset, bench.subset, bench.split) == (
        config["dataset_path"],
        config.get("dataset_name"),
        config["test_split"].strip(),
    )
    assert bench.max_new_tokens == config["generation_kwargs"]["max_new_tokens"]
    assert bench.post_prompt == config["lmms_eval_specific_kwargs"]["default"]["post_prompt"]
    assert bench.headline == tuple(m["metric"] for m in config["metric_list"]) == METRICS
    assert bench.id_column is None  # question_id restarts per category


def test_prompt_matches_lmms_eval(lmms_eval_task):
    row = _rows()[0]
    kwargs = {"pre_prompt": "", "post_prompt": get_benchmark("pope").post_prompt}
    expected = "Is there a thing 0 in the image?\nAnswer the question using a single word or phrase."
    assert (
        get_benchmark("pope").doc_to_text(row)
        == expected
        == lmms_eval_task("pope").pope_doc_to_text(row, kwargs)
    )
    assert get_benchmark("pope_llava").doc_to_text(row) == expected


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("Yes", "yes"), ("no", "no"), ("  NO \n", "no"), ("Yes, there is.", "other"), ("no.", "other"),
     ("Yes.", "other"), ("", "other"), ("y", "other"), ("There is no dog", "other"), ("(B) cat", "other")],
)  # fmt: skip
def test_lmms_eval_reading(text, parsed, lmms_eval_task):
    bench = get_benchmark("pope")
    row = _rows()[0]
    assert bench.parse(row, text) == parsed
    theirs = lmms_eval_task("pope").pope_process_results(row, [text.strip()])["pope_accuracy"]["prediction"]
    assert (theirs if theirs in ("yes", "no") else "other") == parsed


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("Yes", "yes"), ("No", "no"), ("no.", "no"), ("Yes, there is.", "yes"), ("Yes. There is no dog.", "yes"),
     ("There is no dog", "no"), ("It is not there", "no"), ("No, there is not.", "no"), ("NO", "yes"),
     ("Nope", "yes"), ("", "yes"), ("nothing", "yes"), ("no,", "no"), ("There is\nno dog", "yes"),
     ("  No  ", "no"), ("two", "yes")],
)  # fmt: skip
def test_llava_reading(text, parsed):
    assert parse_llava(text) == parsed
    assert get_benchmark("pope_llava").parse(_rows()[0], text) == parsed


def test_lmms_eval_scores_by_hand():
    rows = _rows()  # truths per category: yes no yes no
    predictions = [
        "yes", "no", "yes", "yes",   # adversarial: TP TN TP FP
        "Yes.", "no", "no", "No",    # popular: neither(yes-truth) TN FN TN
        "maybe", "maybe", "", "",    # random: nothing read
    ]  # fmt: skip
    metrics = score("pope", _with(rows, predictions))
    # Pooled: TP 2, FP 1, FN 1 ("Yes." is neither a TP nor an FN); right: 3 + 2 + 0 = 5 of 12.
    assert metrics["pope_accuracy"] == pytest.approx(5 / 12)
    assert metrics["pope_precision"] == pytest.approx(2 / 3)
    assert metrics["pope_recall"] == pytest.approx(2 / 3)
    assert metrics["pope_f1_score"] == pytest.approx(2 / 3)
    assert metrics["pope_yes_ratio"] == 0.5  # the ground truth's share of yes, whatever was answered
    assert metrics["pope_accuracy/adversarial"] == 0.75 and metrics[
        "pope_precision/adversarial"
    ] == pytest.approx(2 / 3)
    assert metrics["pope_recall/adversarial"] == 1.0
    # popular: no predicted yes (precision 0 by the zero-division rule), TP 0 / (0 + 1 FN): recall 0, F1 0.
    assert metrics["pope_precision/popular"] == 0.0 and metrics["pope_recall/popular"] == 0.0
    assert metrics["pope_f1_score/popular"] == 0.0 and metrics["pope_accuracy/popular"] == 0.5
    assert metrics["pope_accuracy/random"] == 0.0 and metrics["pope_f1_score/random"] == 0.0


def test_equals_lmms_eval_overall_and_per_category(lmms_eval_task):
    utils = lmms_eval_task("pope")
    rows = _rows(6)
    answers = ["Yes", "no", " yes ", "No", "yes.", "YES", "no", "no", "Yes, there is", "yes", "no", "Not",
               "yes", "yes", "yes", "no", "", "yes"]  # fmt: skip
    ours = score("pope", _with(rows, answers))
    assert {k: ours[k] for k in METRICS} == pytest.approx(_lmms_eval_scores(utils, rows, answers), abs=1e-12)
    for category in CATEGORIES:
        picked = [i for i, row in enumerate(rows) if row["category"] == category]
        theirs = _lmms_eval_scores(utils, [rows[i] for i in picked], [answers[i] for i in picked])
        assert {k: ours[f"{k}/{category}"] for k in METRICS} == pytest.approx(theirs, abs=1e-12)


def test_no_answer_is_scored_as_empty(lmms_eval_task):
    rows = _rows(2)
    predictions = [None, "yes", "no", None, "yes", "no"]
    ours = score("pope", _with(rows, predictions))
    theirs = _lmms_eval_scores(lmms_eval_task("pope"), rows, [p or "" for p in predictions])
    assert {k: ours[k] for k in METRICS} == pytest.approx(theirs)


def test_llava_scores_by_hand():
    rows = _rows()  # truths per category: yes no yes no
    predictions = [
        "Yes, there is.", "No.", "Yes", "Yes",       # adversarial: TP TN TP FP
        "There is no dog.", "no", "I do not know", "NO",  # popular: FN TN FN FP ("NO" reads yes)
        "", "", "", "",                              # random: all read yes: TP FP TP FP
    ]  # fmt: skip
    metrics = score("pope_llava", _with(rows, predictions))
    assert metrics["pope_accuracy/adversarial"] == 0.75
    assert metrics["pope_precision/adversarial"] == pytest.approx(2 / 3)
    assert metrics["pope_recall/adversarial"] == 1.0
    assert metrics["pope_f1_score/adversarial"] == pytest.approx(0.8)
    assert metrics["pope_yes_ratio/adversarial"] == 0.75  # predicted yes: 3 of 4
    assert metrics["pope_accuracy/popular"] == 0.25 and metrics["pope_precision/popular"] == 0.0
    assert metrics["pope_recall/popular"] == 0.0 and metrics["pope_f1_score/popular"] == 0.0
    assert metrics["pope_yes_ratio/popular"] == 0.25
    assert metrics["pope_accuracy/random"] == 0.5 and metrics["pope_precision/random"] == 0.5
    assert metrics["pope_recall/random"] == 1.0 and metrics["pope_yes_ratio/random"] == 1.0
    assert metrics["pope_f1_score/random"] == pytest.approx(2 / 3)
    # Headline: the unweighted mean over the three categories.
    assert metrics["pope_accuracy"] == pytest.approx((0.75 + 0.25 + 0.5) / 3)
    assert metrics["pope_f1_score"] == pytest.approx((0.8 + 0.0 + 2 / 3) / 3)
    assert metrics["pope_yes_ratio"] == pytest.approx((0.75 + 0.25 + 1.0) / 3)


def test_bad_ground_truth_is_refused():
    rows = _rows(2)
    rows[1]["answer"] = "maybe"
    with pytest.raises(DataError, match=r"answer 'maybe' is not yes/no"):
        score("pope", _with(rows, ["yes"] * len(rows)))


def test_reads_the_default_config_of_a_snapshot(tmp_path):
    rows = _rows()
    snapshot = tmp_path / "POPE"
    write_parquet(snapshot / "data" / "test-00000-of-00001.parquet", rows)
    for category in CATEGORIES:
        in_category = [row for row in rows if row["category"] == category]
        write_parquet(snapshot / "Full" / f"{category}-00000-of-00001.parquet", in_category)
    data = load_benchmark_data(get_benchmark("pope"), snapshot)
    assert len(data) == 12 and isinstance(data.row(0)["image"], bytes)
    assert "image" not in data.rows_without_images()[0]
    for task, category in TASKS.items():
        if category is not None:
            split = load_benchmark_data(get_benchmark(task), snapshot).rows_without_images()
            assert [row["category"] for row in split] == [category] * 4


def test_missing_columns_are_named(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "category"} for row in _rows()]
    path = write_parquet(tmp_path / "test.parquet", rows)
    with pytest.raises(DataError, match=r"missing column\(s\) \['category'\]"):
        load_benchmark_data(get_benchmark("pope"), path)
