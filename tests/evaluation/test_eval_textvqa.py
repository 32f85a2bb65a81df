"""TextVQA: the VQA answer normalisation, the prompt with and without OCR tokens, and VQA accuracy, against
hand-computed values and lmms-eval's own EvalAIAnswerProcessor / textvqa_process_results."""

from __future__ import annotations

import copy
import importlib
import json
import random
import string
from pathlib import Path

import pytest
import yaml
from eval_fixtures import lmms_eval_metrics, png_bytes, write_parquet

from llavakit.errors import DataError
from llavakit.evaluation import score
from llavakit.evaluation.registry import get_benchmark
from llavakit.evaluation.sources import load_benchmark_data
from llavakit.evaluation.vqa_normalize import CONTRACTIONS, normalize_answer

# Ten human answers each, as the validation split has them.
ANSWERS = [
    ["Nokia"] * 4 + ["nokia phone"] * 6,  # "nokia" by 4: 1.0
    ["two", "2", "2", "3", "three", "3", "3", "3", "3", "3"],  # "2" by 3 (two/2/2): 0.9
    [
        "the stop",
        "stop",
        "stop",
        "STOP!",
        "go",
        "go",
        "go",
        "go",
        "go",
        "go",
    ],  # "stop" by 4 (article dropped)
    ["coca cola"] * 2 + ["coke"] * 8,  # "coca-cola": by 2 -> 0.6
    ["a"] + ["yes"] * 9,  # "" matches "a" (an article only): by 1 -> 0.3
]
PREDICTIONS = ["Nokia.", "two", "Stop", "Coca-Cola", ""]


def _rows() -> list[dict]:
    return [
        {
            "image_id": f"img{number}",
            "question_id": 34602 + number,
            "question": f"what brand is THIS {number}?",
            "question_tokens": ["what", "brand"],
            "image": png_bytes(),
            "answers": answers,
            "ocr_tokens": ["nokia", "Stop"] if number else [],
            "set_name": "val",
        }
        for number, answers in enumerate(ANSWERS)
    ]


def _lmms_yaml(name: str) -> dict:
    folder = Path(importlib.import_module("lmms_eval.tasks.textvqa.utils").__file__).parent
    lines = (folder / name).read_text(encoding="utf-8").splitlines()
    return yaml.safe_load("\n".join(line for line in lines if "!function" not in line))


@pytest.mark.parametrize(
    "text",
    ["Nokia.", "two", "Two dogs", "none", "The STOP sign!", "it's", "dont", "Im", "3.5", "1,000", "a-b",
     "a - b", "(left)", "x (left)", "e.g.", "no.", "Yes, there is.", "  \n yes\t", "", "the", "a an the",
     "hello world?",
     "somebody'd", "rock'n'roll", "$5.00", "50%", "mr. smith", "u.s.a.", "c++", "@home", "\\n"],
)  # fmt: skip
def test_normalisation_matches_lmms_eval(text):
    from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor

    assert normalize_answer(text) == EvalAIAnswerProcessor()(text)


def test_normalisation_by_hand():
    assert normalize_answer("Two dogs.") == "2 dogs"
    assert normalize_answer("The STOP sign!") == "stop sign"
    assert normalize_answer("dont") == "don't" and normalize_answer("it's") == "it 's"
    # A mark touching a space anywhere is deleted everywhere, else it becomes a space.
    assert normalize_answer("x-y") == "x y" and normalize_answer("x-y -z") == "xy z"
    assert normalize_answer("3.5") == "3.5" and normalize_answer("e.g.") == "eg"
    # Only the first 32 periods go (lmms-eval passes re.UNICODE as re.sub's count).
    assert normalize_answer("." * 40) == "." * 8


def test_normalisation_on_random_text():
    from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor

    processor = EvalAIAnswerProcessor()
    pieces = list(string.printable) + ["two", "the ", "a ", "'s", "dont ", "none", ".", " ", "3.5", "1,0"]
    generator = random.Random(19)
    for _ in range(3000):
        text = "".join(generator.choice(pieces) for _ in range(generator.randint(0, 25)))
        assert normalize_answer(text) == processor(text), repr(text)


def test_contraction_table_is_the_official_one():
    from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor

    assert CONTRACTIONS == EvalAIAnswerProcessor.CONTRACTIONS


@pytest.mark.parametrize(("task", "ocr"), [("textvqa_val", False), ("textvqa_val_ocr", True)])
def test_settings_follow_lmms_eval_yaml(task, ocr):
    bench = get_benchmark(task)
    template, config = _lmms_yaml("_default_template_textvqa_yaml"), _lmms_yaml("textvqa_val.yaml")
    assert (bench.dataset, bench.split) == (template["dataset_path"], config["test_split"])
    assert list(bench.until) == template["generation_kwargs"]["until"]
    assert bench.post_prompt == template["lmms_eval_specific_kwargs"]["default"]["post_prompt"]
    assert template["lmms_eval_specific_kwargs"]["default"]["ocr"] is False and bench.ocr is ocr
    assert bench.headline == ("exact_match",) and bench.id_column == "question_id"


@pytest.mark.parametrize("ocr", [False, True])
def test_prompt_matches_lmms_eval(ocr, lmms_eval_task):
    bench = get_benchmark("textvqa_val_ocr" if ocr else "textvqa_val")
    kwargs = {"pre_prompt": "", "post_prompt": bench.post_prompt, "ocr": ocr}
    for row in _rows()[:2]:
        assert bench.doc_to_text(row) == lmms_eval_task("textvqa").textvqa_doc_to_text(row, kwargs)
    post = "\nAnswer the question using a single word or phrase."
    assert get_benchmark("textvqa_val").doc_to_text(_rows()[1]) == "What brand is this 1?" + post
    assert get_benchmark("textvqa_val_ocr").doc_to_text(_rows()[1]) == (
        "What brand is this 1?\nReference OCR token: nokia, Stop" + post
    )
    assert get_benchmark("textvqa_val_ocr").doc_to_text(_rows()[0]) == (
        "What brand is this 0?\nReference OCR token: " + post
    )


def test_vqa_accuracy_by_hand():
    rows = _rows()
    metrics = score("textvqa_val", [{**row, "prediction": p} for row, p in zip(rows, PREDICTIONS)])
    assert metrics == {"exact_match": pytest.approx((1.0 + 0.9 + 1.0 + 0.6 + 0.3) / 5)}
    assert [
        get_benchmark("textvqa_val").process_results(r, p)["exact_match"] for r, p in zip(rows, PREDICTIONS)
    ] == (pytest.approx([1.0, 0.9, 1.0, 0.6, 0.3]))


def test_equals_lmms_eval(lmms_eval_task):
    utils = lmms_eval_task("textvqa")
    rows = _rows()
    predictions = PREDICTIONS + ["nokia phone", "3", "STOP", "coke.", "yes"]
    rows = rows + rows
    ours = score("textvqa_val", [{**row, "prediction": p} for row, p in zip(rows, predictions)])
    from lmms_eval.api.metrics import mean

    # lmms-eval normalises the answers in place: give it copies. It strips answers before process_results.
    theirs = lmms_eval_metrics(
        utils.textvqa_process_results,
        {"exact_match": mean},
        copy.deepcopy(rows),
        [p.strip() for p in predictions],
    )
    assert ours["exact_match"] == theirs["exact_match"]


def test_missing_answers_are_refused():
    row = {**_rows()[0], "answers": None, "prediction": "nokia"}
    with pytest.raises(DataError, match="'answers' is None"):
        score("textvqa_val", [row])


def test_submission_file(tmp_path):
    rows = [{**row, "prediction": p} for row, p in zip(_rows(), PREDICTIONS)]
    (path,) = get_benchmark("textvqa_val").write_submission(rows, tmp_path)
    records = json.loads(path.read_text(encoding="utf-8"))
    assert records[:2] == [{"question_id": 34602, "answer": "nokia"}, {"question_id": 34603, "answer": "2"}]


def test_reads_a_hub_snapshot_folder(tmp_path):
    write_parquet(tmp_path / "textvqa" / "data" / "validation-00000-of-00001.parquet", _rows())
    write_parquet(tmp_path / "textvqa" / "data" / "test-00000-of-00001.parquet", _rows()[:1])
    data = load_benchmark_data(get_benchmark("textvqa_val_ocr"), tmp_path / "textvqa")
    assert len(data) == 5 and isinstance(data.row(0)["image"], bytes)
    assert data.rows_without_images()[1]["answers"] == ANSWERS[1]


def test_missing_ocr_tokens_are_named_for_the_ocr_variant(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "ocr_tokens"} for row in _rows()]
    path = write_parquet(tmp_path / "validation.parquet", rows)
    assert len(load_benchmark_data(get_benchmark("textvqa_val"), path)) == 5
    with pytest.raises(DataError, match=r"missing column\(s\) \['ocr_tokens'\]"):
        load_benchmark_data(get_benchmark("textvqa_val_ocr"), path)
