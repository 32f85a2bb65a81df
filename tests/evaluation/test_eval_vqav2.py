"""VQAv2: the prompt, vqav2's own answer normalisation, VQA accuracy with answers left out by value, and the
EvalAI submission file, against hand-computed values and lmms-eval's own vqav2 utils."""

from __future__ import annotations

import copy
import datetime
import importlib
import json
import random
import string
import types
from pathlib import Path

import pytest
import yaml
from eval_fixtures import lmms_eval_metrics, png_bytes, write_parquet

from llavakit.errors import DataError
from llavakit.evaluation import score
from llavakit.evaluation import vqav2 as vqav2_module
from llavakit.evaluation.registry import get_benchmark
from llavakit.evaluation.sources import load_benchmark_data
from llavakit.evaluation.vqa_normalize import normalize_answer
from llavakit.evaluation.vqav2 import normalize_vqav2_answer

POST = "\nAnswer the question using a single word or phrase."


def _answers(texts: list[str], ids: list[int] | None = None) -> list[dict]:
    """Answer dicts as the Hub dataset holds them (distinct answer_id 1-10 unless ``ids`` says otherwise)."""
    ids = ids or list(range(1, len(texts) + 1))
    return [{"answer": t, "answer_confidence": "yes", "answer_id": i} for t, i in zip(texts, ids)]


# Ten answers each, with the hand-computed VQA accuracy of PREDICTIONS[i].
ANSWERS = [
    _answers(["yes"] * 4 + ["no"] * 6),  # "Yes." -> "yes" by 4: 1.0
    _answers(["2", "2", "two", "3", "3", "3", "3", "3", "3", "3"]),  # "two" -> "2" by 3: 0.9
    _answers(
        ["yes no"] * 2 + ["yes"] * 8
    ),  # "yes,no" -> "yes no" (textvqa's normalisation: "yesno") by 2: 0.6
    _answers(["10002"] * 3 + ["1000 2"] * 7),  # "1,000-2": digit comma, so "-" deleted -> "10002" by 3: 0.9
    _answers(["dog 's"] * 5 + ["dog"] * 5),  # "dog's" stays one word: 0.0 (textvqa's normalisation: 1.0)
    # Three identical dicts (same id): each is left out with its twins, so they score 0 and the others 1.
    _answers(["cat"] * 3 + ["dog"] * 7, ids=[1, 1, 1, 4, 5, 6, 7, 8, 9, 10]),  # "cat": 0.7 (by index: 0.9)
    _answers(["the"] + ["red"] * 9),  # "" matches "the" (an article only) by 1: 0.3
]
PREDICTIONS = ["Yes.", "two", "yes,no", "1,000-2", "dog's", "cat", ""]
EXPECTED = [1.0, 0.9, 0.6, 0.9, 0.0, 0.7, 0.3]


def _rows(answers: list[list[dict]] | None = None) -> list[dict]:
    answers = ANSWERS if answers is None else answers
    return [
        {
            "question_type": "what color is the",
            "multiple_choice_answer": None if a is None else a[0]["answer"],
            "answers": a,
            "image_id": 262148 + number,
            "answer_type": "other",
            "question_id": 262148000 + number,
            "question": f"what color is THE cat {number}? ",
            "image": png_bytes(),
        }
        for number, a in enumerate(answers)
    ]


def _test_rows() -> list[dict]:
    return _rows([None] * 4)


def _lmms_yaml(name: str) -> dict:
    folder = Path(importlib.import_module("lmms_eval.tasks.vqav2.utils").__file__).parent
    lines = (folder / name).read_text(encoding="utf-8").splitlines()
    return yaml.safe_load("\n".join(line for line in lines if "!function" not in line))


def _with(rows: list[dict], predictions: list[str]) -> list[dict]:
    return [{**row, "prediction": p} for row, p in zip(rows, predictions)]


@pytest.mark.parametrize(
    ("task", "config"), [("vqav2_val", "vqav2_val.yaml"), ("vqav2_test", "vqav2_test.yaml")]
)
def test_settings_follow_lmms_eval_yaml(task, config):
    from lmms_eval.api.task import TaskConfig

    bench, template, config = (
        get_benchmark(task),
        _lmms_yaml("_default_template_vqav2_yaml"),
        _lmms_yaml(config),
    )
    assert (bench.dataset, bench.subset, bench.split) == (
        template["dataset_path"],
        None,
        config["test_split"],
    )
    assert bench.max_new_tokens == template["generation_kwargs"]["max_new_tokens"] == 16
    # No `until` in the YAML: lmms-eval stops at its few-shot delimiter.
    assert "until" not in template["generation_kwargs"]
    assert list(bench.until) == [TaskConfig.fewshot_delimiter]
    assert bench.post_prompt == config["lmms_eval_specific_kwargs"]["default"]["post_prompt"] == POST
    assert bench.pre_prompt == config["lmms_eval_specific_kwargs"]["default"]["pre_prompt"]
    assert bench.headline == tuple(m["metric"] for m in config["metric_list"] if m["metric"] != "submission")
    assert bench.id_column == "question_id"


@pytest.mark.parametrize("task", ["vqav2_val", "vqav2_test"])
def test_prompt_matches_lmms_eval(task, lmms_eval_task):
    bench = get_benchmark(task)
    kwargs = _lmms_yaml(f"{task}.yaml")["lmms_eval_specific_kwargs"]["default"]
    for row in _rows()[:3]:
        assert bench.doc_to_text(row) == lmms_eval_task("vqav2").vqav2_doc_to_text(row, kwargs)
    # Not capitalised, not stripped (unlike TextVQA and VizWiz).
    assert bench.doc_to_text(_rows()[1]) == "what color is THE cat 1? " + POST


@pytest.mark.parametrize(
    "text",
    ["Yes.", "two", "yes,no", "1,000", "1,000-2", "1,,2 (x)", "a,b-c", "it's", "dog's", "What?", "a?b", "none",
     "The STOP sign!", "x (left)", "e.g.", "3.5", "  \n yes\t", "", "the", "dont", "Im", "$5.00", "u.s.a.",
     "c++", "@home", "1, 2", "rock'n'roll", "\\n", "." * 40],
)  # fmt: skip
def test_normalisation_matches_lmms_eval(text, lmms_eval_task):
    utils = lmms_eval_task("vqav2")
    row = {"question_id": 1, "answers": _answers(["x"])}
    assert (
        normalize_vqav2_answer(text)
        == utils.vqav2_process_results(row, [text.strip()])["submission"]["answer"]
    )


def test_normalisation_on_random_text(lmms_eval_task):
    utils = lmms_eval_task("vqav2")
    pieces = list(string.printable) + [
        "two",
        "the ",
        "a ",
        "'s",
        "dont ",
        "none",
        ".",
        " ",
        "3.5",
        "1,0",
        ", ",
    ]
    generator = random.Random(23)
    for _ in range(3000):
        text = "".join(generator.choice(pieces) for _ in range(generator.randint(0, 25)))
        row = {"question_id": 1, "answers": _answers(["x"])}
        expected = utils.vqav2_process_results(row, [text.strip()])["submission"]["answer"]
        assert normalize_vqav2_answer(text) == expected, repr(text)


def test_normalisation_differs_from_textvqa_by_hand():
    assert normalize_vqav2_answer("yes,no") == "yes no" and normalize_answer("yes,no") == "yesno"
    assert normalize_vqav2_answer("it's") == "it's" and normalize_answer("it's") == "it 's"
    assert normalize_vqav2_answer("1,000-2") == "10002" and normalize_answer("1,000-2") == "1000 2"
    assert normalize_vqav2_answer("Two Dogs.") == "2 dogs" == normalize_answer("Two Dogs.")


def test_vqa_accuracy_by_hand():
    rows = _rows()
    bench = get_benchmark("vqav2_val")
    values = [bench.process_results(r, p)["exact_match"] for r, p in zip(rows, PREDICTIONS)]
    assert values == pytest.approx(EXPECTED)
    assert score("vqav2_val", _with(rows, PREDICTIONS)) == {"exact_match": pytest.approx(sum(EXPECTED) / 7)}


def test_equals_lmms_eval(lmms_eval_task):
    from lmms_eval.api.metrics import mean

    utils = lmms_eval_task("vqav2")
    rows = _rows() * 3
    predictions = PREDICTIONS + ["no", "2", "yes no", "10002", "dog 's", "dog", "Red"]
    predictions += ["  YES\n", "3.", "Yes, no", "1000 2", "DOG", "the cat", "the"]
    ours = score("vqav2_val", _with(rows, predictions))
    # lmms-eval normalises the answers in place (give it copies) and strips outputs before process_results.
    theirs = lmms_eval_metrics(
        utils.vqav2_process_results_val,
        {"exact_match": mean},
        copy.deepcopy(rows),
        [p.strip() for p in predictions],
    )
    assert ours == theirs and set(ours) == {"exact_match"}
    for row, prediction in zip(rows, predictions):
        expected = utils.vqav2_process_results_val(copy.deepcopy(row), [prediction.strip()])["exact_match"]
        assert get_benchmark("vqav2_val").process_results(row, prediction)["exact_match"] == expected


@pytest.mark.parametrize("answers", [None, [], "yes"])
def test_missing_answers_are_refused(answers):
    row = {**_rows()[0], "answers": answers, "prediction": "yes"}
    with pytest.raises(DataError, match=r"vqav2_val: question 262148000 has 'answers'"):
        score("vqav2_val", [row])


def test_answers_that_are_not_dicts_are_refused():
    row = {**_rows()[0], "answers": ["yes"] * 10, "prediction": "yes"}
    with pytest.raises(DataError, match="expected a dict with a string 'answer'"):
        score("vqav2_val", [row])


def test_test_split_has_no_metrics_and_submits_the_output_only_stripped(lmms_eval_task):
    utils = lmms_eval_task("vqav2")
    bench = get_benchmark("vqav2_test")
    predictions = ["  Two Dogs.\n", "yes", "", "The cat"]
    assert score("vqav2_test", _with(_test_rows(), predictions)) == {}
    for row, prediction in zip(_test_rows(), predictions):
        ours = bench.process_results(row, prediction)
        assert ours == utils.vqav2_process_results_test(row, [prediction.strip()])
    assert bench.parse(_test_rows()[0], predictions[0]) == "Two Dogs."


def _fixed_clock(monkeypatch, *modules) -> datetime.datetime:
    """Make ``datetime.datetime.now()`` in ``modules`` return one fixed time."""
    fixed = datetime.datetime(2024, 3, 5, 7, 8, 9)

    class Clock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return fixed

    for module in modules:
        monkeypatch.setattr(module, "datetime", types.SimpleNamespace(datetime=Clock))
    return fixed


def test_submission_file_equals_lmms_eval(tmp_path, monkeypatch, lmms_eval_task):
    utils = lmms_eval_task("vqav2")
    _fixed_clock(monkeypatch, utils, vqav2_module)
    rows, predictions = _test_rows(), ["  Two Dogs.\n", "yes", "", "The cat"]
    (path,) = get_benchmark("vqav2_test").write_submission(_with(rows, predictions), tmp_path / "ours")
    assert path.name == "vqav2-test-submission-2024-03-05-07-08-09.json"
    assert json.loads(path.read_text(encoding="utf-8")) == [
        {"question_id": 262148000, "answer": "Two Dogs."},
        {"question_id": 262148001, "answer": "yes"},
        {"question_id": 262148002, "answer": ""},
        {"question_id": 262148003, "answer": "The cat"},
    ]
    results = [
        utils.vqav2_process_results_test(r, [p.strip()])["submission"] for r, p in zip(rows, predictions)
    ]
    utils.vqav2_aggregate_submissions(results, types.SimpleNamespace(output_path=str(tmp_path / "theirs")))
    theirs = tmp_path / "theirs" / "submissions" / path.name
    assert path.read_bytes() == theirs.read_bytes()


def test_validation_writes_no_submission(tmp_path):
    assert get_benchmark("vqav2_val").write_submission(_with(_rows(), PREDICTIONS), tmp_path) == []


def test_reads_a_hub_snapshot_folder(tmp_path, lmms_eval_task):
    from lmms_eval.api.metrics import mean

    folder = tmp_path / "VQAv2"
    write_parquet(folder / "data" / "validation-00000-of-00001.parquet", _rows())
    write_parquet(folder / "data" / "testdev-00000-of-00001.parquet", _test_rows()[:1])
    write_parquet(folder / "data" / "test-00000-of-00001.parquet", _test_rows())
    data = load_benchmark_data(get_benchmark("vqav2_val"), folder)
    assert len(data) == 7 and isinstance(data.row(0)["image"], bytes)
    rows = data.rows_without_images()
    assert rows[5]["answers"] == ANSWERS[5]
    theirs = lmms_eval_metrics(
        lmms_eval_task("vqav2").vqav2_process_results_val,
        {"exact_match": mean},
        copy.deepcopy(rows),
        PREDICTIONS,
    )
    assert score("vqav2_val", _with(rows, PREDICTIONS)) == theirs
    test = load_benchmark_data(get_benchmark("vqav2_test"), folder)
    assert len(test) == 4 and test.rows_without_images()[0]["answers"] is None
