"""OCRBench: the prompt, the substring scoring (formula rows apart, fullwidth folding) and the per-kind counts
and 0-1000 total, against hand-computed values and lmms-eval's own ocrbench_process_results / aggregation.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from eval_fixtures import lmms_eval_metrics, png_bytes, write_parquet

from llavakit.errors import DataError
from llavakit.evaluation import score
from llavakit.evaluation.ocrbench import QUESTION_TYPES
from llavakit.evaluation.registry import get_benchmark
from llavakit.evaluation.sources import load_benchmark_data

IMAGE = png_bytes()


def _row(dataset: str, question_type: str, answer: list[str], question: str = " what is written? ") -> dict:
    """An echo840/OCRBench row."""
    return {
        "dataset": dataset,
        "question": question,
        "question_type": question_type,
        "answer": answer,
        "image": IMAGE,
    }


def _rows() -> list[dict]:
    return [
        _row("IIIT5K", "Regular Text Recognition", ["Hello"]),
        _row("IC15", "Irregular Text Recognition", ["CAFÉ", "cafe"]),
        _row("WordArt", "Artistic Text Recognition", ["ｓｔｏｐ"]),  # fullwidth answer
        _row("IAM", "Handwriting Recognition", ["new\nyork"]),
        _row("ORAND", "Digit String Recognition", ["0123"]),
        _row("ESTVQA", "Scene Text-centric VQA", ["Coca Cola"]),
        _row("DocVQA", "Doc-oriented VQA", ["12.5%"]),
        _row("FUNSD", "Key Information Extraction", ["John Smith"]),
        _row("HME100k", "Handwritten Mathematical Expression Recognition", ["x ^ { 2 } + 1"]),
        _row("HME100k", "Handwritten Mathematical Expression Recognition", ["\\frac { A } { B }"]),
        _row("NonSemanticText", "Non-Semantic Text Recognition", ["xq7Zp"]),
    ]  # fmt: skip


PREDICTIONS = [
    " The word is HELLO.",  # substring, case folded: right
    "Café",  # "cafe" does not occur in "café", "CAFÉ" lower-cased does: right
    "stop sign",  # fullwidth answer folded: right
    "New York",  # answer's newline becomes a space: right
    "0 1 2 3",  # spaces break the digits: wrong
    "cocacola",  # wrong
    "12.5 %",  # wrong
    "Name:\nJohn   Smith",  # two spaces inside: wrong
    "x^{2}+1",  # formula: spaces removed on both sides: right
    "\\frac{a}{b}",  # formula: case kept: wrong
    "XQ7ZP",  # right
]


def _lmms_eval(rows: list[dict], predictions: list[str], monkeypatch, tmp_path: Path) -> dict:
    """lmms-eval's result: the task strips outputs before process_results; the aggregation's counts live in a
    module-level dict that is never reset, so each call starts from a fresh one."""
    utils = importlib.import_module("lmms_eval.tasks.ocrbench.utils")
    monkeypatch.setattr(utils, "OCRBench_score", dict.fromkeys(utils.OCRBench_score, 0))
    return lmms_eval_metrics(
        utils.ocrbench_process_results,
        {"ocrbench_accuracy": utils.ocrbench_aggregate_accuracy},
        rows,
        [prediction.strip() for prediction in predictions],
        SimpleNamespace(output_path=str(tmp_path)),
    )


def _lmms_yaml() -> dict:
    folder = Path(importlib.import_module("lmms_eval.tasks.ocrbench.utils").__file__).parent
    lines = (folder / "ocrbench.yaml").read_text(encoding="utf-8").splitlines()
    return yaml.safe_load("\n".join(line for line in lines if "!function" not in line))


def test_settings_follow_lmms_eval_yaml():
    bench, config = get_benchmark("ocrbench"), _lmms_yaml()
    assert (bench.dataset, bench.split) == (config["dataset_path"], config["test_split"])
    assert bench.max_new_tokens == config["generation_kwargs"]["max_new_tokens"] == 128
    assert "until" not in config["generation_kwargs"] and bench.until == ("\n\n",)
    default = config["lmms_eval_specific_kwargs"]["default"]
    assert (bench.pre_prompt, bench.post_prompt) == (default["pre_prompt"], default["post_prompt"])
    assert bench.headline == ("ocrbench_accuracy",) and bench.id_column is None
    assert QUESTION_TYPES == tuple(importlib.import_module("lmms_eval.tasks.ocrbench.utils").OCRBench_score)


def test_prompt_equals_lmms_eval(lmms_eval_task):
    utils, bench = lmms_eval_task("ocrbench"), get_benchmark("ocrbench")
    kwargs = _lmms_yaml()["lmms_eval_specific_kwargs"]["default"]
    for row in _rows() + [_row("IIIT5K", "Regular Text Recognition", ["a"], "\nRead the text.\n")]:
        assert bench.doc_to_text(row) == utils.ocrbench_doc_to_text(row, kwargs)
    assert bench.doc_to_text(_rows()[0]) == "what is written?"


def test_hand_computed():
    metrics = score("ocrbench", [{**row, "prediction": p} for row, p in zip(_rows(), PREDICTIONS)])
    assert metrics["final_score"] == 6.0 and metrics["ocrbench_accuracy"] == pytest.approx(0.006)
    assert metrics["text_recognition"] == 5.0  # Regular, Irregular, Artistic, Handwriting, Non-Semantic
    assert metrics["category/Handwritten Mathematical Expression Recognition"] == 1.0
    assert metrics["category/Digit String Recognition"] == 0.0
    assert len([key for key in metrics if key.startswith("category/")]) == 10


@pytest.mark.parametrize(
    ("dataset", "answer", "prediction", "right"),
    [("IIIT5K", "Hello", "hello world", True), ("IIIT5K", "Hello", "hel lo", False),
     ("IIIT5K", "ＡＢＣ１", "abc1", True), ("IIIT5K", "abc1", "ＡＢＣ１", True), ("IIIT5K", "a b", "a\u3000b", True),
     ("IIIT5K", "a b", "a\nb", True), ("IIIT5K", "a b", "a\tb", False), ("IIIT5K", " pad ", "x pad y", True),
     ("IIIT5K", "Straße", "STRASSE", False), ("IIIT5K", "İ", "i̇", True), ("IIIT5K", "x", "", False),
     ("HME100k", "a + b", "A+B", False), ("HME100k", "a + b", "a+b", True),
     ("HME100k", "a\n+ b", " a +b ", True), ("HME100k", "a + b", "a\t+b", False),
     ("HME100k", "ａ", "a", False), ("DocVQA", "5", "15", True)],
)  # fmt: skip
def test_each_answer_scores_as_lmms_eval(dataset, answer, prediction, right, monkeypatch, tmp_path):
    row = _row(dataset, "Doc-oriented VQA", [answer])
    ours = score("ocrbench", [{**row, "prediction": prediction}])
    theirs = _lmms_eval([row], [prediction], monkeypatch, tmp_path)
    assert ours["ocrbench_accuracy"] == theirs["ocrbench_accuracy"] == float(right) / 1000


@pytest.mark.parametrize("shift", [0, 1, 3, 5])
def test_scores_equal_lmms_eval(shift, monkeypatch, tmp_path):
    rows = _rows() * 2
    predictions = PREDICTIONS[shift:] + PREDICTIONS[:shift] + [p.upper() for p in PREDICTIONS]
    ours = score("ocrbench", [{**row, "prediction": p} for row, p in zip(rows, predictions)])
    theirs = _lmms_eval(rows, predictions, monkeypatch, tmp_path)
    assert ours["ocrbench_accuracy"] == theirs["ocrbench_accuracy"]
    # lmms-eval's summary file holds the same counts.
    summary = (tmp_path / "results" / "ocrbench_results.txt").read_text(encoding="utf-8")
    assert f"Final Score(Total 1000): {int(ours['final_score'])}" in summary
    assert f"Text Recognition(Total 300): {int(ours['text_recognition'])}" in summary
    for kind in QUESTION_TYPES:
        assert f"{kind}(Total " in summary
        line = next(line for line in summary.splitlines() if line.startswith(f"{kind}(Total "))
        assert line.endswith(f": {int(ours[f'category/{kind}'])}")


def test_scoring_twice_does_not_accumulate():
    # lmms-eval's module-level counts would double on a second aggregation in one process; ours do not.
    rows = [{**row, "prediction": p} for row, p in zip(_rows(), PREDICTIONS)]
    assert score("ocrbench", rows) == score("ocrbench", rows)


def test_reads_the_hub_layout(tmp_path):
    bench = get_benchmark("ocrbench")
    write_parquet(tmp_path / "OCRBench" / "data" / "test-00000-of-00001.parquet", _rows())
    data = load_benchmark_data(bench, tmp_path / "OCRBench")
    assert len(data) == 11 and data.rows_without_images()[1]["answer"] == ["CAFÉ", "cafe"]
    assert bench.doc_to_visual(data.row(0)) == [IMAGE] and bench.row_id(data.row(4), 4) == "4"
    rows = [{**row, "prediction": p} for row, p in zip(data.rows_without_images(), PREDICTIONS)]
    assert score(bench, rows)["final_score"] == 6.0


def test_missing_columns_are_named(tmp_path):
    path = write_parquet(tmp_path / "test.parquet", [{k: v for k, v in _rows()[0].items() if k != "dataset"}])
    with pytest.raises(DataError, match=r"missing column\(s\) \['dataset'\]"):
        load_benchmark_data(get_benchmark("ocrbench"), path)


@pytest.mark.parametrize(
    ("change", "message"),
    [({"question_type": "Math"}, "question_type 'Math' is not one of"),
     ({"answer": None}, "not a list of strings"), ({"answer": [1]}, "not a list of strings"),
     ({"answer": []}, "blank answer"), ({"answer": ["a", " \n"]}, "blank answer"),
     ({"dataset": "HME100k", "answer": [" \n "]}, "blank answer")],
)  # fmt: skip
def test_bad_rows_are_refused(change, message):
    with pytest.raises(DataError, match=message):
        score("ocrbench", [{**_rows()[0], **change, "prediction": "hello"}])
