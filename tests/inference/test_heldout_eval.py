"""Held-out QA evaluation: answer normalisation, record parsing errors, per-type scores, the text-only baseline."""

from __future__ import annotations

import json

import pytest

from llavakit.errors import DataError
from llavakit.evaluation.base import BenchmarkReport, Example, Prediction, build_request, run_benchmark
from llavakit.evaluation.heldout import HeldoutQA, normalize_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [("Red.", "red"), ("  the Circle ", "circle"), ("a red circle!", "red circle"), ("LEFT", "left"), ("", "")],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def _write(tmp_path, lines):
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_records_are_parsed_with_image_paths_under_the_root(tmp_path):
    record = {"question_id": "q1", "image": "images/a.png", "question": "What colour?", "answer": "red", "type": "colour"}
    text_only = {"question_id": "q2", "question": "Which shape is round?", "answer": "circle", "type": "text"}
    path = _write(tmp_path, [json.dumps(record), "", json.dumps(text_only)])
    first, second = HeldoutQA(path, image_root=tmp_path / "root").examples()
    assert first.images == (tmp_path / "root" / "images" / "a.png",) and second.images == ()
    assert HeldoutQA(path).score("Red.", first) == 1.0 and HeldoutQA(path).score("red circle", first) == 0.0


@pytest.mark.parametrize(
    ("line", "message"),
    [("{not json", r"qa.jsonl:2: malformed JSON"), ("[1, 2]", "expected a JSON object"), ('{"question_id": "x"}', "missing")],
)
def test_malformed_records_name_their_line(tmp_path, line, message):
    good = json.dumps({"question_id": "q", "question": "?", "answer": "a", "type": "t"})
    with pytest.raises(DataError, match=message):
        HeldoutQA(_write(tmp_path, [good, line])).examples()


def test_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(DataError, match="llavakit data synth"):
        HeldoutQA(tmp_path / "nope.jsonl").examples()


def test_text_only_baseline_drops_images_and_placeholders(tmp_path):
    example = Example("q", "What colour?", "red", "colour", (tmp_path / "a.png",))
    with_image, without = build_request(example, True), build_request(example, False)
    assert with_image.images == (str(tmp_path / "a.png"),) and with_image.conversation.turns[0].text.startswith("<image>\n")
    assert without.images == () and "<image>" not in without.conversation.turns[0].text


def test_report_aggregates_per_type():
    def prediction(kind, score):
        return Prediction(Example("q", "?", "a", kind), "a", score)

    report = BenchmarkReport("b", True, [prediction("colour", 1.0), prediction("colour", 0.0), prediction("shape", 1.0)])
    assert report.accuracy_by_type() == {"colour": 0.5, "shape": 1.0}
    assert report.count_by_type() == {"colour": 2, "shape": 1}
    assert report.accuracy == pytest.approx(2 / 3)


def test_majority_baseline_is_the_most_common_answer_among_questions_offering_the_same_choices():
    truths = [("What word?", "cat"), ("What word?", "cat"), ("What word?", "dog"), ("What word?", "sun")]
    truths += [("Is A left or right of B?", a) for a in ("left", "left", "right")]
    truths += [("Is A above or below B?", a) for a in ("above", "below", "below", "below", "above")]
    kinds = ["word"] * 4 + ["position"] * 8
    examples = [Example(f"q{i}", q, a, k) for i, ((q, a), k) in enumerate(zip(truths, kinds))]
    report = BenchmarkReport("b", True, [Prediction(example, "x", 0.0) for example in examples])
    # word: "cat" 2 of 4; position: "left" 2 of 3 left/right questions + "below" 3 of 5 above/below questions.
    assert report.majority_by_type() == {"position": 5 / 8, "word": 0.5}


def test_run_benchmark_scores_a_real_model(checkpoint, images, tmp_path):
    import llavakit

    records = [
        {"question_id": f"q{i}", "image": path, "question": "What colour is the circle?", "answer": "red", "type": "colour"}
        for i, path in enumerate(images)
    ]
    path = _write(tmp_path, [json.dumps(r) for r in records])
    assistant = llavakit.load(checkpoint, device="cpu")
    report = run_benchmark(assistant, HeldoutQA(path, image_root="/"), batch_size=2, max_new_tokens=3, progress=False)
    assert [p.example.id for p in report.predictions] == [r["question_id"] for r in records]
    assert all(p.score == float(normalize_answer(p.prediction) == "red") for p in report.predictions)
