"""MMMU val: prompt, referenced images, multiple-choice and open-answer parsing, the seeded random fallback and the
instance-level accuracy per subject and discipline, against hand-computed values and lmms-eval's own functions."""

from __future__ import annotations

import ast
import io
import random

import pytest
from eval_fixtures import png_bytes, write_parquet
from PIL import Image

from llavakit.errors import DataError
from llavakit.evaluation import score
from llavakit.evaluation.mmmu import parse_multiple_choice, parse_open
from llavakit.evaluation.registry import get_benchmark
from llavakit.evaluation.sources import load_benchmark_data

KWARGS = {
    "prompt_type": "format",
    "multiple_choice_prompt": "Answer with the option's letter from the given choices directly.",
    "open_ended_prompt": "Answer the question using a single word or phrase.",
}
IMAGES = [f"image_{n}" for n in range(1, 8)]
COLOURS = {n: (30 * n, 200 - 20 * n, 100) for n in range(1, 8)}  # one colour per image column
STYLES = ["Baroque", "Cubism", "Gothic", "Modern"]


def _row(id_, question, options, answer, question_type="multiple-choice", images=(1,)) -> dict:
    """A row in lmms-lab's MMMU columns: ``options`` a Python list *as a string*, ``image_1`` ... ``image_7``."""
    row = {
        "id": id_, "question": question, "options": repr(options), "explanation": "", "img_type": "['Diagrams']",
        "answer": answer, "topic_difficulty": "Medium", "question_type": question_type, "subfield": "Misc",
    }  # fmt: skip
    return {
        **row,
        **{f"image_{n}": png_bytes(colour=COLOURS[n]) if n in images else None for n in range(1, 8)},
    }


def _rows() -> list[dict]:
    return [
        _row("validation_Art_1", "<image 1> Which style?", STYLES, "B"),
        _row(
            "validation_Art_2", "Compare <image 2> and <image 1>.", ["same", "different"], "A", images=(1, 2)
        ),
        _row("validation_Math_1", "What is 2+3? <image 1>", [], "5", "open"),
        _row("validation_Math_2", "Value of x?", [], "2.5", "open", images=()),
        _row("validation_Computer_Science_1", "Which sort? <image 1>", ["quick", "merge", "heap"], "C"),
        _row("validation_Physics_1", "Which graph?", ["<image 3>", "<image 1>"], "B", images=(1, 2, 3)),
    ]


def _lmms_eval(rows: list[dict], answers: list[str], lmms_eval_task, capsys) -> dict[str, float]:
    """lmms-eval's mmmu_acc on ``rows``, Python's random seeded 0 first (lmms-eval's default --seed), rows scored
    in order (one process_results worker); the per-subject and per-discipline accuracies as it prints them."""
    utils = lmms_eval_task("mmmu")
    random.seed(0)
    # lmms-eval strips every answer before the task's own process_results.
    values = [utils.mmmu_process_results(row, [p.strip()])["mmmu_acc"] for row, p in zip(rows, answers)]
    capsys.readouterr()
    overall = utils.mmmu_aggregate_results(values)
    printed = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = {"mmmu_acc": overall}
    for name, result in printed.items():
        if name.startswith("Overall-"):
            if result["num"]:
                metrics[f"discipline/{name.removeprefix('Overall-')}"] = result["acc"]
        elif name != "Overall":
            metrics[f"subject/{name}"] = result["acc"]
    return metrics


def _colours(images) -> list[tuple[int, int, int]]:
    return [
        (image if isinstance(image, Image.Image) else Image.open(io.BytesIO(image)))
        .convert("RGB")
        .getpixel((0, 0))
        for image in images
    ]


def test_prompt_equals_lmms_eval(lmms_eval_task):
    utils = lmms_eval_task("mmmu")
    bench = get_benchmark("mmmu_val")
    for row in _rows():
        assert bench.doc_to_text(row) == utils.mmmu_doc_to_text(row, KWARGS)
    assert bench.doc_to_text(_rows()[1]) == (
        "Compare <image 2> and <image 1>.\nA. same\nB. different\n\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert bench.doc_to_text(_rows()[2]) == (
        "What is 2+3? <image 1>\n\nAnswer the question using a single word or phrase."
    )


def test_referenced_images_equal_lmms_eval(lmms_eval_task):
    utils = lmms_eval_task("mmmu")
    bench = get_benchmark("mmmu_val")
    for row in _rows():
        decoded = {k: Image.open(io.BytesIO(v)) if k in IMAGES and v else v for k, v in row.items()}
        assert _colours(bench.doc_to_visual(row)) == _colours(utils.mmmu_doc_to_visual(decoded))
    # Ordered by name, each once, images referenced only in the options included, unreferenced ones left out.
    assert _colours(bench.doc_to_visual(_rows()[1])) == [COLOURS[1], COLOURS[2]]
    assert _colours(bench.doc_to_visual(_rows()[5])) == [COLOURS[1], COLOURS[3]]
    assert bench.doc_to_visual(_rows()[3]) == []


@pytest.mark.parametrize(
    ("answer", "parsed"),
    [("B", "B"), ("(B) cat", "B"), ("The answer is C.", "C"), ("C.", "C"), ("A B", "B"), ("(A) or (D)", "D"),
     ("D) Modern", None), ("I think the style is Cubism here", "B"), ("Gothic or Baroque, it is Gothic", "C"),
     ("b", None), ("", None), ("E", None), ("Cubism", None), ("cubism is the style here", None)],
)  # fmt: skip
def test_multiple_choice_parsing_equals_lmms_eval(answer, parsed, lmms_eval_task):
    utils = lmms_eval_task("mmmu")
    index2ans, letters = utils.get_multi_choice_info(STYLES)
    assert parse_multiple_choice(answer, STYLES) == parsed
    if parsed is not None:  # None: lmms-eval draws a random letter instead
        assert utils.parse_multi_choice_response(answer, letters, index2ans) == parsed


@pytest.mark.parametrize(
    "answer",
    ["5", "The answer is 5.", "five", "5.0", "x = 5", "1,000", "It is 2.5 units", "so the result is 3e2",
     "First 4.\nThus 5", "A", "", "Therefore: .", "2.499"],
)  # fmt: skip
def test_open_parsing_equals_lmms_eval(answer, lmms_eval_task):
    utils = lmms_eval_task("mmmu")
    assert sorted(map(str, parse_open(answer))) == sorted(map(str, utils.parse_open_response(answer)))


def _scored(answers: list[str], rows: list[dict] | None = None) -> dict[str, float]:
    rows = _rows() if rows is None else rows
    return score("mmmu_val", [{**row, "prediction": p} for row, p in zip(rows, answers)])


@pytest.mark.parametrize(
    "answers",
    [
        ["B", "(A) same", "5", "2.5", "C", "B"],
        ["The answer is B.", "A.", "The answer is 5.", "x = 2.50", "heap", "(A)"],
        [
            "I think the style is Cubism here",
            "they look very much different to me",
            "five",
            "2",
            "C. heap",
            "",
        ],
        ["B C", "A", "5.0", "It is 2.5 units", "(C)", "b"],
        ["no idea", "", "5 apples", "2.5e0", "none of them", "E"],
    ],
)
def test_scores_equal_lmms_eval(answers, lmms_eval_task, capsys):
    ours = _scored(answers)
    theirs = _lmms_eval(_rows(), answers, lmms_eval_task, capsys)
    assert ours == pytest.approx(theirs)


def test_hand_computed_with_breakdowns():
    # Art 1 of 2 (B right, B wrong), Math 1 of 2 ("5" right, "3" wrong), Computer_Science 1 of 1, Physics 0 of 1.
    metrics = _scored(["B", "B", "5", "3", "C", "A"])
    assert metrics == pytest.approx(
        {
            "mmmu_acc": 0.5,
            "discipline/Art and Design": 0.5,
            "discipline/Science": round(1 / 3, 5),
            "discipline/Tech and Engineering": 1.0,
            "subject/Art": 0.5,
            "subject/Computer_Science": 1.0,
            "subject/Math": 0.5,
            "subject/Physics": 0.0,
        }
    )
    # Open answers: "the answer is 5" reads 5.0; "2.50" reads 2.5 (numbers compare as floats rounded to 2).
    assert _scored(["x", "x", "the answer is 5", "2.50", "x", "x"])["subject/Math"] == 1.0


def test_the_random_fallback_is_seeded_and_equals_lmms_eval(lmms_eval_task, capsys):
    rows = [_row(f"validation_Art_{n}", "Q?", ["a", "b", "c", "d"], "ABCD"[n % 4]) for n in range(30)]
    rows += [_row(f"validation_Math_{n}", "Q?", [], "7", "open") for n in range(3)]
    answers = ["no idea"] * 30 + ["7", "8", "seven"]
    ours = _scored(answers, rows)
    assert ours == _scored(answers, rows)  # deterministic
    assert ours == pytest.approx(_lmms_eval(rows, answers, lmms_eval_task, capsys))
    assert 0.0 < ours["subject/Art"] < 1.0 and ours["subject/Math"] == round(1 / 3, 5)
    # Each draw is Random(0)'s next choice, one per unparsed row in row order.
    draws = random.Random(0)
    expected_art = sum(draws.choice("ABCD") == row["answer"] for row in rows[:30]) / 30
    assert ours["subject/Art"] == round(expected_art, 5)


def test_parse_for_the_predictions_file():
    bench = get_benchmark("mmmu_val")
    assert bench.parse(_rows()[0], " (B) cat ") == "B" and bench.parse(_rows()[0], "no idea") is None
    assert bench.parse(_rows()[2], "The answer is 5.") == "5.0"


def test_reads_the_hub_layout(tmp_path):
    bench = get_benchmark("mmmu_val")
    snapshot = tmp_path / "MMMU"
    write_parquet(snapshot / "data" / "validation-00000-of-00001.parquet", _rows(), IMAGES)
    write_parquet(snapshot / "data" / "dev-00000-of-00001.parquet", _rows()[:1], IMAGES)
    data = load_benchmark_data(bench, snapshot)
    assert len(data) == 6 and [bench.row_id(data.row(i), i) for i in range(2)] == [
        "validation_Art_1",
        "validation_Art_2",
    ]
    assert _colours(bench.doc_to_visual(data.row(1))) == [COLOURS[1], COLOURS[2]]
    assert _colours(bench.doc_to_visual(data.row(5))) == [COLOURS[1], COLOURS[3]]
    rows = data.rows_without_images()
    assert rows[0]["options"] == repr(STYLES) and bench.doc_to_text(rows[0]) == bench.doc_to_text(_rows()[0])
    # Right: Art_1 (B) and Physics_1 (B); the open answers read "b", not 5 or 2.5.
    assert score(bench, [{**row, "prediction": "B"} for row in rows])["mmmu_acc"] == round(2 / 6, 5)


def test_bad_rows_are_named():
    bench = get_benchmark("mmmu_val")
    with pytest.raises(DataError, match="refers to <image 2>"):
        bench.doc_to_visual(_row("validation_Art_9", "See <image 2>", ["a", "b"], "A"))
    with pytest.raises(DataError, match="is not a Python list of options"):
        score(bench, [{**_rows()[0], "options": "Baroque, Cubism", "prediction": "A"}])
    with pytest.raises(DataError, match="is not '<split>_<Subject>_<number>'"):
        score(bench, [{**_rows()[0], "id": "Art-1", "prediction": "A"}])
