"""ChartQA: the prompt, relaxed accuracy and its human/augmented splits, against hand-computed values and
lmms-eval's own task (its YAML config, ConfigurableTask.process_results and chartqa_process_results)."""

from __future__ import annotations

import importlib
from collections import defaultdict
from pathlib import Path

import pytest
from eval_fixtures import lmms_eval_metrics, png_bytes, write_parquet

from llavakit.errors import DataError
from llavakit.evaluation import score
from llavakit.evaluation.chartqa import relaxed_correct
from llavakit.evaluation.registry import get_benchmark
from llavakit.evaluation.sources import load_benchmark_data

# (prediction, reference, relaxed-correct by hand)
CASES = [
    ("105", "100", True),  # 5% exactly: the bound is included
    ("95", "100", True),
    ("105.1", "100", False),
    ("94.9", "100", False),
    ("21", "20", True),  # 1 / 20 == 0.05 in floats
    ("0.21", "0.2", True),
    ("0.211", "0.2", False),
    ("-5.2", "-5", True),
    ("50%", "50", False),  # a trailing % divides by 100: 0.5 vs 50
    ("50", "50%", False),
    ("0.5", "50%", True),
    ("51%", "50%", True),
    ("5%%", "0.05", True),  # every trailing % goes, divided once
    ("%", "%", True),  # not a number: compared as strings
    ("1,000", "1000", False),  # commas are not read as numbers
    ("1,000", "1,000", True),
    ("1e2", "100", True),
    ("1_000", "1000", True),  # float() reads underscores
    ("0.0", "0", False),  # a zero reference: string match only
    ("0", "0", True),
    ("0.04", "0", False),
    ("inf", "inf", False),  # inf - inf is nan
    ("nan", "nan", False),
    ("Yes", "yes", True),  # case-insensitive exact match
    (" yes \n", "yes", True),  # lmms-eval strips the prediction
    ("yes.", "yes", False),
    ("Republicans", "republican", False),
    ("12", "twelve", False),
    ("twelve", "12", False),
    ("", "0", False),
    ("5 ", "5", True),
    ("17 %", "17%", True),
    ("US$ 17", "17", False),
]


def _rows(n: int) -> list[dict]:
    return [
        {
            "type": "human_test" if i % 3 else "augmented_test",
            "question": f"What is the value of bar {i}? ",
            "answer": CASES[i % len(CASES)][1],
            "image": png_bytes(),
        }
        for i in range(n)
    ]


def _lmms_config(name: str = "chartqa.yaml") -> dict:
    from lmms_eval.utils import load_yaml_config

    folder = Path(importlib.import_module("lmms_eval.tasks.chartqa.utils").__file__).parent
    return load_yaml_config(str(folder / name), mode="full")


def _lmms_task():
    """lmms-eval's ConfigurableTask for ``chartqa``, built from its YAML without loading the dataset."""
    from lmms_eval.api.task import ConfigurableTask, TaskConfig

    task = object.__new__(ConfigurableTask)
    task._config = TaskConfig(**_lmms_config())
    task.OUTPUT_TYPE = task.config.output_type
    return task


def _lmms_eval_scores(rows: list[dict], predictions: list[str]) -> dict[str, float]:
    """lmms-eval's metrics: its ConfigurableTask.process_results (which strips), then each metric's mean."""
    from lmms_eval.api.metrics import mean

    task, results = _lmms_task(), defaultdict(list)
    for row, prediction in zip(rows, predictions):
        for key, value in task.process_results(row, [prediction]).items():
            results[key].append(value)
    aggregations = {item["metric"]: item["aggregation"] for item in task.config.metric_list}
    assert set(aggregations.values()) == {"mean"}
    return {key: mean(values) for key, values in results.items()}


def test_settings_follow_lmms_eval_yaml():
    from lmms_eval.api.task import TaskConfig

    bench, config = get_benchmark("chartqa"), _lmms_config()
    assert (bench.dataset, bench.subset, bench.split) == (config["dataset_path"], None, config["test_split"])
    assert bench.max_new_tokens == config["generation_kwargs"]["max_new_tokens"] == 16
    # The YAML names no stop: lmms-eval's TaskConfig adds its default (the few-shot delimiter).
    assert list(bench.until) == TaskConfig(**config).generation_kwargs["until"] == ["\n\n"]
    default = config["lmms_eval_specific_kwargs"]["default"]
    assert (bench.pre_prompt, bench.post_prompt) == (default["pre_prompt"], default["post_prompt"])
    assert list(bench.headline) == [item["metric"] for item in config["metric_list"]]
    assert bench.id_column is None and bench.columns == ("type", "question", "answer")


def test_prompt_matches_lmms_eval():
    bench, config = get_benchmark("chartqa"), _lmms_config()
    kwargs = config["lmms_eval_specific_kwargs"]["default"]
    for row in _rows(3):
        assert bench.doc_to_text(row) == config["doc_to_text"](row, kwargs)
    assert (
        bench.doc_to_text(_rows(1)[0])
        == "What is the value of bar 0? \nAnswer the question with a single word."
    )


@pytest.mark.parametrize(("prediction", "reference", "correct"), CASES)
def test_relaxed_correctness_by_hand_and_against_lmms_eval(prediction, reference, correct):
    from lmms_eval.tasks.chartqa.utils import relaxed_correctness

    assert relaxed_correct(prediction.strip(), reference) is correct
    assert relaxed_correctness(prediction.strip(), reference) is correct
    row = {"type": "human_test", "question": "q", "answer": reference}
    ours = get_benchmark("chartqa").process_results(row, prediction)
    assert (
        ours
        == _lmms_task().process_results(row, [prediction])
        == {
            "relaxed_overall": float(correct),
            "relaxed_human_split": float(correct),
        }
    )


def test_relaxed_correctness_on_many_pairs():
    from lmms_eval.tasks.chartqa.utils import relaxed_correctness

    texts = ["0", "0.0", "5", "5%", "4.76", "5.25", "5.26", "-5", "1e400", "-0", "abc", "ABC", "", "%", "1,5"]
    for prediction in texts:
        for reference in texts:
            assert relaxed_correct(prediction, reference) == relaxed_correctness(prediction, reference)


def test_metrics_equal_lmms_eval_and_hand_values():
    rows = _rows(len(CASES))
    predictions = [prediction for prediction, _, _ in CASES]
    ours = score("chartqa", [{**row, "prediction": p} for row, p in zip(rows, predictions)])
    assert ours == _lmms_eval_scores(rows, predictions)
    # Also through the shared oracle helper, with the strip done by hand.
    from lmms_eval.api.metrics import mean
    from lmms_eval.tasks.chartqa.utils import chartqa_process_results

    aggregations = dict.fromkeys(get_benchmark("chartqa").headline, mean)
    stripped = [p.strip() for p in predictions]
    assert ours == lmms_eval_metrics(chartqa_process_results, aggregations, rows, stripped)

    correct = [c for _, _, c in CASES]
    human = [c for i, c in enumerate(correct) if i % 3]
    augmented = [c for i, c in enumerate(correct) if not i % 3]
    assert ours == pytest.approx(
        {
            "relaxed_overall": sum(correct) / len(correct),
            "relaxed_human_split": sum(human) / len(human),
            "relaxed_augmented_split": sum(augmented) / len(augmented),
        }
    )


def test_small_hand_example():
    rows = [
        {"type": "human_test", "question": "a", "answer": "100"},
        {"type": "human_test", "question": "b", "answer": "Yes"},
        {"type": "augmented_test", "question": "c", "answer": "12%"},
        {"type": "augmented_test", "question": "d", "answer": "Japan"},
    ]
    predictions = ["104", "no", "0.12", None]
    metrics = score("chartqa", [{**row, "prediction": p} for row, p in zip(rows, predictions)])
    assert metrics == {"relaxed_overall": 0.5, "relaxed_human_split": 0.5, "relaxed_augmented_split": 0.5}


def test_a_split_without_rows_has_no_value():
    row = {"type": "human_test", "question": "a", "answer": "7", "prediction": "7"}
    assert score("chartqa", [row]) == {"relaxed_overall": 1.0, "relaxed_human_split": 1.0}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("type", "val_human", r"'type' is 'val_human'"), ("answer", None, r"'answer' is None")],
)
def test_bad_rows_are_refused(field, value, message):
    row = {"type": "human_test", "question": "How many?", "answer": "3", "prediction": "3", field: value}
    with pytest.raises(DataError, match=message):
        score("chartqa", [row])


def test_reads_a_hub_snapshot_folder(tmp_path):
    write_parquet(tmp_path / "ChartQA" / "data" / "test-00000-of-00001.parquet", _rows(4))
    data = load_benchmark_data(get_benchmark("chartqa"), tmp_path / "ChartQA")
    assert len(data) == 4 and isinstance(data.row(0)["image"], bytes)
    rows = data.rows_without_images()
    assert [row["type"] for row in rows] == ["augmented_test", "human_test", "human_test", "augmented_test"]
    predictions = ["105", "106", "106", "100"]  # every reference is "100"
    metrics = score("chartqa", [{**row, "prediction": p} for row, p in zip(rows, predictions)])
    assert metrics == {"relaxed_overall": 0.5, "relaxed_human_split": 0.0, "relaxed_augmented_split": 1.0}


def test_missing_column_is_named(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "type"} for row in _rows(2)]
    path = write_parquet(tmp_path / "test.parquet", rows)
    with pytest.raises(DataError, match=r"missing column\(s\) \['type'\]"):
        load_benchmark_data(get_benchmark("chartqa"), path)
