"""Held-out QA as a benchmark: records, normalisation, exact-match metrics per type, the two baselines, and a real
model answering through ``llavakit eval``'s runner."""

from __future__ import annotations

import json

import pytest

from llavakit.errors import DataError
from llavakit.evaluation import get_benchmark, score
from llavakit.evaluation.heldout import HELDOUT, HELDOUT_TEXT_ONLY, majority_by_type, normalize_answer
from llavakit.evaluation.runner import EvalOptions, evaluate
from llavakit.evaluation.sources import load_benchmark_data


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Red.", "red"),
        ("  the Circle ", "circle"),
        ("a red circle!", "red circle"),
        ("LEFT", "left"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def _write(tmp_path, lines):
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _record(number, answer="red", kind="colour", image="images/a.png", question="What colour?"):
    record = {"question_id": f"q{number}", "question": question, "answer": answer, "type": kind}
    return record if image is None else {**record, "image": image}


def test_records_load_with_image_paths_under_the_files_folder(tmp_path):
    records = [_record(1), _record(2, image=None), _record(3, image=["b.png", "c.png"])]
    path = _write(tmp_path, [json.dumps(records[0]), "", json.dumps(records[1]), json.dumps(records[2])])
    data = load_benchmark_data(get_benchmark("heldout"), path)
    first, second, third = (data.row(i) for i in range(len(data)))
    assert first["image"] == [str(tmp_path / "images" / "a.png")] and second["image"] == []
    assert HELDOUT.doc_to_visual(third) == [str(tmp_path / "b.png"), str(tmp_path / "c.png")]
    assert HELDOUT_TEXT_ONLY.doc_to_visual(first) == [] and HELDOUT.doc_to_text(first) == "What colour?"
    assert [HELDOUT.row_id(row, i) for i, row in enumerate(data.rows_without_images())] == ["q1", "q2", "q3"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"qa.jsonl:2: malformed JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"question_id": "x"}', "missing"),
        (json.dumps(_record(9, image=7)), "'image' must be a path"),
    ],
)
def test_malformed_records_name_their_line(tmp_path, line, message):
    with pytest.raises(DataError, match=message):
        HELDOUT.read_jsonl(_write(tmp_path, [json.dumps(_record(1)), line]))


def test_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(DataError, match="llavakit data synth"):
        HELDOUT.read_jsonl(tmp_path / "nope.jsonl")


def test_exact_match_accuracy_overall_and_per_type():
    rows = [
        {**_record(1), "prediction": "Red."},  # normalised: right
        {**_record(2), "prediction": "red circle"},  # a second word: wrong
        {**_record(3, answer="circle", kind="shape"), "prediction": "The circle"},  # article dropped: right
        {**_record(4, answer="two", kind="count"), "prediction": "2"},  # digits are not words: wrong
        {**_record(5, answer="two", kind="count"), "prediction": None},  # no output: wrong
    ]
    metrics = score("heldout", rows)
    assert metrics == {
        "accuracy": 2 / 5,
        "accuracy/colour": 1 / 2,
        "accuracy/count": 0.0,
        "accuracy/shape": 1.0,
    }
    assert score("heldout_text_only", rows) == metrics
    assert HELDOUT.parse(rows[2], "The Circle!") == "circle"


def test_majority_baseline_is_the_most_common_answer_among_questions_offering_the_same_choices():
    truths = [("What word?", "cat"), ("What word?", "cat"), ("What word?", "dog"), ("What word?", "sun")]
    truths += [("Is A left or right of B?", a) for a in ("left", "left", "right")]
    truths += [("Is A above or below B?", a) for a in ("above", "below", "below", "below", "above")]
    kinds = ["word"] * 4 + ["position"] * 8
    rows = [_record(i, a, k, question=q) for i, ((q, a), k) in enumerate(zip(truths, kinds))]
    # word: "cat" 2 of 4; position: "left" 2 of 3 left/right questions + "below" 3 of 5 above/below questions.
    assert majority_by_type(rows) == {"position": 5 / 8, "word": 0.5}


def test_a_real_model_answers_through_the_runner_with_and_without_images(checkpoint, images, tmp_path):
    import llavakit

    records = [_record(i, image=path) for i, path in enumerate(images)]
    path = _write(tmp_path, [json.dumps(r) for r in records])
    assistant = llavakit.load(checkpoint, device="cpu")
    options = EvalOptions(batch_size=2, max_new_tokens=3, progress=False)
    runs = {}
    for benchmark in (HELDOUT, HELDOUT_TEXT_ONLY):
        data = load_benchmark_data(benchmark, path)
        result = evaluate(assistant, data, tmp_path / benchmark.id, options)
        lines = (tmp_path / benchmark.id / "predictions.jsonl").read_text().splitlines()
        runs[benchmark.id] = (result, [json.loads(line) for line in lines])
    for benchmark_id, with_images in (("heldout", True), ("heldout_text_only", False)):
        result, predictions = runs[benchmark_id]
        assert [p["question_id"] for p in predictions] == [r["question_id"] for r in records]
        for record, prediction in zip(records, predictions):
            prompt = f"<image>\n{record['question']}" if with_images else record["question"]
            alone = assistant.generate(
                [prompt], images=[[record["image"]] if with_images else []], max_new_tokens=3, do_sample=False
            )
            assert prediction["prediction"] == alone[0]
        hits = [normalize_answer(p["prediction"]) == "red" for p in predictions]
        assert result.metrics["accuracy"] == sum(hits) / len(hits) == result.metrics["accuracy/colour"]
