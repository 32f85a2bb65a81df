"""VizWiz-VQA: the prompt with its "Unanswerable" instruction, VQA accuracy and the EvalAI submission file, against
hand-computed values and lmms-eval's own vizwiz_vqa utils."""

from __future__ import annotations

import copy
import datetime
import importlib
import json
import types
from pathlib import Path

import pytest
import yaml
from eval_fixtures import lmms_eval_metrics, png_bytes, write_parquet

from llavakit.errors import DataError
from llavakit.evaluation import score
from llavakit.evaluation import vizwiz as vizwiz_module
from llavakit.evaluation.registry import get_benchmark
from llavakit.evaluation.sources import load_benchmark_data

POST = (
    "\nWhen the provided information is insufficient, respond with 'Unanswerable'."
    "\nAnswer the question using a single word or phrase."
)
# Ten answers each, with the hand-computed VQA accuracy of PREDICTIONS[i].
ANSWERS = [
    ["unanswerable"] * 5 + ["cat"] * 5,  # "Unanswerable." by 5: 1.0
    ["two", "2", "2", "3", "3", "3", "3", "3", "3", "3"],  # "2" by 3 (two/2/2): 0.9
    ["coca cola"] * 2 + ["coke"] * 8,  # "Coca-Cola" by 2: 0.6
    ["it's blue"] + ["blue"] * 9,  # "its blue" misses "it 's blue": 0.0
    ["the"] + ["red"] * 9,  # "" matches "the" (an article only) by 1: 0.3
]
PREDICTIONS = ["Unanswerable.", "2", "Coca-Cola", "its blue", ""]
EXPECTED = [1.0, 0.9, 0.6, 0.0, 0.3]


def _rows(answers: list | None = None, split: str = "val") -> list[dict]:
    answers = ANSWERS if answers is None else answers
    return [
        {
            "question_id": f"VizWiz_{split}_{number:08d}",
            "image": png_bytes(),
            "question": f"what is THIS can {number}?",
            "answers": a,
            "category": "other",
        }
        for number, a in enumerate(answers)
    ]


def _test_rows() -> list[dict]:
    return _rows([[]] * 3, split="test")


def _lmms_yaml(name: str) -> dict:
    folder = Path(importlib.import_module("lmms_eval.tasks.vizwiz_vqa.utils").__file__).parent
    lines = (folder / name).read_text(encoding="utf-8").splitlines()
    return yaml.safe_load("\n".join(line for line in lines if "!function" not in line))


def _with(rows: list[dict], predictions: list[str]) -> list[dict]:
    return [{**row, "prediction": p} for row, p in zip(rows, predictions)]


@pytest.mark.parametrize("task", ["vizwiz_vqa_val", "vizwiz_vqa_test"])
def test_settings_follow_lmms_eval_yaml(task):
    bench, template, config = (
        get_benchmark(task),
        _lmms_yaml("_default_template_vqa_yaml"),
        _lmms_yaml(f"{task}.yaml"),
    )
    assert (bench.dataset, bench.subset, bench.split) == (
        template["dataset_path"],
        None,
        config["test_split"],
    )
    assert list(bench.until) == template["generation_kwargs"]["until"] == ["ASSISTANT:"]
    # No max_new_tokens in the YAML: lmms-eval's LLaVA generates up to 1024.
    assert "max_new_tokens" not in template["generation_kwargs"] and bench.max_new_tokens == 1024
    assert bench.post_prompt == template["lmms_eval_specific_kwargs"]["default"]["post_prompt"] == POST
    assert bench.headline == tuple(m["metric"] for m in config["metric_list"] if m["metric"] != "submission")
    assert bench.id_column == "question_id"


@pytest.mark.parametrize("task", ["vizwiz_vqa_val", "vizwiz_vqa_test"])
def test_prompt_matches_lmms_eval(task, lmms_eval_task):
    bench = get_benchmark(task)
    kwargs = _lmms_yaml("_default_template_vqa_yaml")["lmms_eval_specific_kwargs"]["default"]
    for row in _rows()[:3]:
        assert bench.doc_to_text(row) == lmms_eval_task("vizwiz_vqa").vizwiz_vqa_doc_to_text(row, kwargs)
    assert bench.doc_to_text(_rows()[1]) == "What is this can 1?" + POST


def test_vqa_accuracy_by_hand():
    rows = _rows()
    bench = get_benchmark("vizwiz_vqa_val")
    values = [bench.process_results(r, p)["exact_match"] for r, p in zip(rows, PREDICTIONS)]
    assert values == pytest.approx(EXPECTED)
    assert score("vizwiz_vqa_val", _with(rows, PREDICTIONS)) == {
        "exact_match": pytest.approx(sum(EXPECTED) / 5)
    }


def test_equals_lmms_eval(lmms_eval_task):
    from lmms_eval.api.metrics import mean

    utils = lmms_eval_task("vizwiz_vqa")
    rows = _rows() * 3
    predictions = PREDICTIONS + ["unanswerable", "two", "coke", "It's blue.", "Red"]
    predictions += ["  CAT\n", "3.", "Coca cola", "blue", "the red"]
    ours = score("vizwiz_vqa_val", _with(rows, predictions))
    # lmms-eval normalises the answers in place (give it copies) and strips outputs before process_results.
    theirs = lmms_eval_metrics(
        utils.vizwiz_vqa_process_results,
        {"exact_match": mean},
        copy.deepcopy(rows),
        [p.strip() for p in predictions],
    )
    assert ours == theirs and set(ours) == {"exact_match"}
    for row, prediction in zip(rows, predictions):
        expected = utils.vizwiz_vqa_process_results(copy.deepcopy(row), [prediction.strip()])["exact_match"]
        assert get_benchmark("vizwiz_vqa_val").process_results(row, prediction)["exact_match"] == expected


@pytest.mark.parametrize("answers", [None, [], "yes"])
def test_missing_answers_are_refused(answers):
    row = {**_rows()[0], "answers": answers, "prediction": "cat"}
    with pytest.raises(DataError, match=r"vizwiz_vqa_val: question 'VizWiz_val_00000000' has 'answers'"):
        score("vizwiz_vqa_val", [row])


def test_test_split_has_no_metrics(lmms_eval_task):
    utils = lmms_eval_task("vizwiz_vqa")
    bench = get_benchmark("vizwiz_vqa_test")
    predictions = ["  Unanswerable.\n", "Two cans", ""]
    assert score("vizwiz_vqa_test", _with(_test_rows(), predictions)) == {}
    for row, prediction in zip(_test_rows(), predictions):
        theirs = utils.vizwiz_vqa_process_results(copy.deepcopy(row), [prediction.strip()])
        assert bench.process_results(row, prediction) == {"submission": theirs["submission"]}


def test_submission_file_equals_lmms_eval(tmp_path, monkeypatch, lmms_eval_task):
    utils = lmms_eval_task("vizwiz_vqa")
    fixed = datetime.datetime(2024, 3, 5, 7, 8, 9)

    class Clock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return fixed

    for module in (utils, vizwiz_module):
        monkeypatch.setattr(module, "datetime", types.SimpleNamespace(datetime=Clock))
    rows, predictions = _test_rows(), ["  Unanswerable.\n", "Two cans", ""]
    (path,) = get_benchmark("vizwiz_vqa_test").write_submission(_with(rows, predictions), tmp_path / "ours")
    assert path.name == "vizwiz_vqa-test-submission-2024-0305-0708-09.json"
    assert json.loads(path.read_text(encoding="utf-8")) == [
        {"image": "VizWiz_test_00000000.jpg", "answer": "unanswerable"},
        {"image": "VizWiz_test_00000001.jpg", "answer": "2 cans"},
        {"image": "VizWiz_test_00000002.jpg", "answer": ""},
    ]
    results = [
        utils.vizwiz_vqa_process_results(copy.deepcopy(r), [p.strip()])["submission"]
        for r, p in zip(rows, predictions)
    ]
    utils.vizwiz_vqa_aggregate_submissions(
        results, types.SimpleNamespace(output_path=str(tmp_path / "theirs"))
    )
    theirs = tmp_path / "theirs" / "submissions" / path.name
    assert path.read_bytes() == theirs.read_bytes()


def test_validation_writes_no_submission(tmp_path):
    assert get_benchmark("vizwiz_vqa_val").write_submission(_with(_rows(), PREDICTIONS), tmp_path) == []


def test_reads_a_hub_snapshot_folder(tmp_path):
    folder = tmp_path / "VizWiz-VQA"
    write_parquet(folder / "data" / "val-00000-of-00005-7775fd61bc6a3d98.parquet", _rows()[:3])
    write_parquet(folder / "data" / "val-00001-of-00005-18e4fb673cfdd7cb.parquet", _rows()[3:])
    write_parquet(folder / "data" / "test-00000-of-00008-8bb04d0d8c47d4ab.parquet", _test_rows())
    data = load_benchmark_data(get_benchmark("vizwiz_vqa_val"), folder)
    assert len(data) == 5 and isinstance(data.row(0)["image"], bytes)
    rows = data.rows_without_images()
    assert rows[1]["answers"] == ANSWERS[1]
    assert score("vizwiz_vqa_val", _with(rows, PREDICTIONS)) == {
        "exact_match": pytest.approx(sum(EXPECTED) / 5)
    }
    assert len(load_benchmark_data(get_benchmark("vizwiz_vqa_test"), folder)) == 3
