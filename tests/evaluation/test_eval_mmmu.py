"""MMMU val: prompt, referenced images, multiple-choice and open-answer parsing and the instance-level accuracy per
subject and discipline, against hand-computed values and lmms-eval's own functions."""

from __future__ import annotations

import pytest
from eval_fixtures import png_bytes, write_parquet

from llavakit.errors import DataError
from llavakit.evaluation import score
from llavakit.evaluation.registry import get_benchmark
from llavakit.evaluation.sources import load_benchmark_data

KWARGS = {
    "prompt_type": "format",
    "multiple_choice_prompt": "Answer with the option's letter from the given choices directly.",
    "open_ended_prompt": "Answer the question using a single word or phrase.",
}
IMAGES = [f"image_{n}" for n in range(1, 8)]


def _row(id_, question, options, answer, question_type="multiple-choice", images=(1,)) -> dict:
    row = {
        "id": id_,
        "question": question,
        "options": repr(options),
        "answer": answer,
        "question_type": question_type,
    }
    return {**row, **{column: png_bytes() if int(column[-1]) in images else None for column in IMAGES}}


def _rows() -> list[dict]:
    return [
        _row("validation_Art_1", "<image 1> Which style?", ["Baroque", "Cubism", "Gothic", "Modern"], "B"),
        _row(
            "validation_Art_2", "Compare <image 2> and <image 1>.", ["same", "different"], "A", images=(1, 2)
        ),
        _row("validation_Math_1", "What is 2+3? <image 1>", "[]", "5", "open"),
        _row("validation_Math_2", "Value of x?", "[]", "2.5", "open", images=()),
        _row("validation_Computer_Science_1", "Which sort? <image 1>", ["quick", "merge", "heap"], "C"),
    ]


def test_prompt_and_images_equal_lmms_eval(lmms_eval_task):
    utils = lmms_eval_task("mmmu")
    bench = get_benchmark("mmmu_val")
    for row in _rows():
        assert bench.doc_to_text(row) == utils.mmmu_doc_to_text(row, KWARGS)
    assert len(bench.doc_to_visual(_rows()[1])) == 2 and bench.doc_to_visual(_rows()[3]) == []


@pytest.mark.parametrize(
    "answers",
    [
        ["B", "(A) same", "5", "2.5", "C"],
        ["The answer is B.", "A.", "The answer is 5.", "x = 2.50", "the answer must be heap sort here"],
        [
            "I think the style is Cubism here",
            "they look very much different to me",
            "five",
            "2",
            "C. heap sort",
        ],
        ["B C", "A", "5.0", "It is 2.5 units", "(C)"],
    ],
)
def test_scores_equal_lmms_eval_when_every_choice_parses(answers, lmms_eval_task):
    utils = lmms_eval_task("mmmu")
    rows = _rows()
    choices = [(row, p) for row, p in zip(rows, answers) if row["question_type"] == "multiple-choice"]
    assert all(get_benchmark("mmmu_val").parse(row, p) is not None for row, p in choices)  # no random draw
    ours = score("mmmu_val", [{**row, "prediction": p} for row, p in zip(rows, answers)])
    values = [utils.mmmu_process_results(row, [p])["mmmu_acc"] for row, p in zip(rows, answers)]
    assert ours["mmmu_acc"] == pytest.approx(utils.mmmu_aggregate_results(values))


def test_hand_computed_with_breakdowns():
    answers = ["B", "B", "5", "3", "C"]  # Art 1 of 2, Math 1 of 2, CS 1 of 1
    metrics = score("mmmu_val", [{**row, "prediction": p} for row, p in zip(_rows(), answers)])
    assert metrics["mmmu_acc"] == pytest.approx(3 / 5)
    assert metrics["subject/Art"] == 0.5 and metrics["subject/Math"] == 0.5
    assert metrics["subject/Computer_Science"] == 1.0


def test_an_unparsed_choice_falls_back_to_a_seeded_random_letter():
    rows = [_row(f"validation_Art_{n}", "Q?", ["a", "b", "c", "d"], "A") for n in range(40)]
    first = score("mmmu_val", [{**row, "prediction": "no idea"} for row in rows])
    assert first == score("mmmu_val", [{**row, "prediction": "no idea"} for row in rows])
    assert 0.0 < first["mmmu_acc"] < 1.0


def test_reads_the_hub_layout_and_refuses_a_missing_referenced_image(tmp_path):
    bench = get_benchmark("mmmu_val")
    data = load_benchmark_data(bench, write_parquet(tmp_path / "validation-0.parquet", _rows(), IMAGES))
    assert bench.doc_to_visual(data.row(1)) == [png_bytes(), png_bytes()]
    with pytest.raises(DataError, match="refers to <image 2>"):
        bench.doc_to_visual(_row("validation_Art_9", "See <image 2>", ["a", "b"], "A"))
