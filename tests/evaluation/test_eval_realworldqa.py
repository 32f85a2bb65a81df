"""RealWorldQA: the prompt, letter reading for lettered answers and the cleaned exact match for open ones,
against hand-computed values and lmms-eval's own realworldqa_process_results.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from eval_fixtures import lmms_eval_metrics, png_bytes, write_parquet

from llavakit.errors import DataError
from llavakit.evaluation import score
from llavakit.evaluation.registry import get_benchmark
from llavakit.evaluation.sources import load_benchmark_data

IMAGE = png_bytes()
LETTER_ONLY = "Please answer directly with only the letter of the correct option and nothing else."
WORD_ONLY = "Please answer directly with a single word or number."


def _rows() -> list[dict]:
    """lmms-lab RealWorldQA rows: the options and the instruction are part of the question."""
    questions_answers = [
        (f"Which way does the road turn?\nA. Left\nB. Right\nC. Straight\n{LETTER_ONLY}", "B"),
        (f"How many cars are parked?\n{WORD_ONLY}", "3"),
        (f"Is the road going uphill or downhill?\n{WORD_ONLY}", " Downhill "),
        (f"  Where is the sign?\nA. Left\nB. Right\nC. Ahead\nD. Behind\n{LETTER_ONLY}\n", "d"),
    ]
    return [
        {"image": IMAGE, "question": question, "answer": answer} for question, answer in questions_answers
    ]


def _lmms_yaml() -> dict:
    folder = Path(importlib.import_module("lmms_eval.tasks.realworldqa.utils").__file__).parent
    lines = (folder / "realworldqa.yaml").read_text(encoding="utf-8").splitlines()
    return yaml.safe_load("\n".join(line for line in lines if "!function" not in line))


def _lmms_eval(rows: list[dict], predictions: list[str]) -> float:
    """lmms-eval's exact_match: outputs stripped (as the task does), realworldqa_process_results, the mean."""
    from lmms_eval.api.metrics import mean

    utils = importlib.import_module("lmms_eval.tasks.realworldqa.utils")
    stripped = [prediction.strip() for prediction in predictions]
    return lmms_eval_metrics(utils.realworldqa_process_results, {"exact_match": mean}, rows, stripped)[
        "exact_match"
    ]


def test_settings_follow_lmms_eval_yaml():
    bench, config = get_benchmark("realworldqa"), _lmms_yaml()
    assert (bench.dataset, bench.split) == (config["dataset_path"], config["test_split"])
    assert bench.max_new_tokens == config["generation_kwargs"]["max_new_tokens"] == 16
    assert "until" not in config["generation_kwargs"] and bench.until == ("\n\n",)
    default = config["lmms_eval_specific_kwargs"]["default"]
    assert (bench.pre_prompt, bench.post_prompt) == (default["pre_prompt"], default["post_prompt"])
    # No filter_list: one metric behind lmms-eval's default "none" filter.
    assert "filter_list" not in config and [m["metric"] for m in config["metric_list"]] == ["exact_match"]
    assert bench.headline == ("exact_match",) and bench.id_column is None


def test_prompt_equals_lmms_eval(lmms_eval_task):
    utils, bench = lmms_eval_task("realworldqa"), get_benchmark("realworldqa")
    kwargs = _lmms_yaml()["lmms_eval_specific_kwargs"]["default"]
    for row in _rows():
        assert bench.doc_to_text(row) == utils.realworldqa_doc_to_text(row, kwargs)
    # The empty post prompt leaves the instruction in place.
    assert (
        bench.doc_to_text(_rows()[3])
        == f"Where is the sign?\nA. Left\nB. Right\nC. Ahead\nD. Behind\n{LETTER_ONLY}"
    )


@pytest.mark.parametrize(
    ("answer", "prediction", "right"),
    [("B", "B", True), ("B", " B.", True), ("B", "(B) Right", True), ("B", "The answer is B", True),
     ("B", "b", False), ("B", "Right", False), ("B", "A or B", False), ("B", "B or A", True),
     ("B", "Because", True), ("B", "", False), ("B", "A. no, B.", False), ("d", "D", True), ("d", "d", False),
     ("B", "E", False),
     ("3", "3", True), ("3", "3.", True), ("3", " 3..", True), ("3", "three", False), ("3", "3 cars", False),
     (" Downhill ", "downhill.", True), ("Downhill", "DOWNHILL", True), ("Downhill", "downhill!", False),
     ("E", "e", True), ("E", "E.", True), ("Yes", "yes .", False)],
)  # fmt: skip
def test_each_answer_scores_as_lmms_eval(answer, prediction, right):
    row = {**_rows()[0], "answer": answer}
    ours = score("realworldqa", [{**row, "prediction": prediction}])
    assert ours["exact_match"] == float(right) == _lmms_eval([row], [prediction])


@pytest.mark.parametrize(
    "predictions",
    [["B", "3", "Downhill", "D"], ["Right", "three", "downhill.", "d"],
     ["(B)", "3.", "uphill", "The answer is D."], ["", "", "", ""], ["A", "3 ", "Downhill\n", "(D) Behind"]],
)  # fmt: skip
def test_scores_equal_lmms_eval(predictions):
    ours = score("realworldqa", [{**row, "prediction": p} for row, p in zip(_rows(), predictions)])
    assert ours == {"exact_match": pytest.approx(_lmms_eval(_rows(), predictions))}


def test_hand_computed_and_parse():
    predictions = [
        "(B) Right",
        "three",
        "downhill.",
        "Definitely",
    ]  # right, wrong, right, right ("D"efinitely)
    metrics = score("realworldqa", [{**row, "prediction": p} for row, p in zip(_rows(), predictions)])
    assert metrics == {"exact_match": 0.75}
    bench = get_benchmark("realworldqa")
    assert [bench.parse(row, p) for row, p in zip(_rows(), predictions)] == ["B", "three", "downhill", "D"]


def test_reads_the_hub_layout(tmp_path):
    bench = get_benchmark("realworldqa")
    for number, half in enumerate((_rows()[:2], _rows()[2:])):
        write_parquet(tmp_path / "RealWorldQA" / "data" / f"test-0000{number}-of-00002.parquet", half)
    data = load_benchmark_data(bench, tmp_path / "RealWorldQA")
    assert len(data) == 4 and bench.doc_to_visual(data.row(3)) == [IMAGE]
    rows = [{**row, "prediction": p} for row, p in zip(data.rows_without_images(), ["B", "3", "x", "D"])]
    assert score(bench, rows) == {"exact_match": 0.75}


@pytest.mark.parametrize("answer", [None, "", "  ", 3])
def test_bad_answers_are_refused(answer):
    with pytest.raises(DataError, match="is not a non-empty string"):
        score("realworldqa", [{**_rows()[0], "answer": answer, "prediction": "B"}])


def test_missing_columns_are_named(tmp_path):
    path = write_parquet(tmp_path / "test.parquet", [{k: v for k, v in _rows()[0].items() if k != "answer"}])
    with pytest.raises(DataError, match=r"missing column\(s\) \['answer'\]"):
        load_benchmark_data(get_benchmark("realworldqa"), path)
