"""ScienceQA-IMG: prompt, letter reading and accuracy against hand-computed values and lmms-eval's scorer; the Hub
snapshot layout (one folder per subset)."""

from __future__ import annotations

import pytest
from eval_fixtures import lmms_eval_metrics, png_bytes, write_parquet

from llavakit.errors import DataError
from llavakit.evaluation import score
from llavakit.evaluation.registry import get_benchmark
from llavakit.evaluation.sources import load_benchmark_data

KWARGS = {"format": "default", "pre_prompt": "", "post_prompt": "\nAnswer with the option's letter from the given choices directly."}  # fmt: skip
POST = "\nAnswer with the option's letter from the given choices directly."
RED, BLUE = png_bytes(colour=(200, 30, 30)), png_bytes(colour=(30, 30, 200))


def _row(question, choices, answer, hint, subject, category, image=RED) -> dict:
    """A row in lmms-lab's ScienceQA columns: ``choices`` a list, ``answer`` the right choice's index."""
    return {
        "image": image, "question": question, "choices": choices, "answer": answer, "hint": hint,
        "task": "closed choice", "grade": "grade4", "subject": subject, "topic": "biology", "category": category,
        "skill": "Identify", "lecture": "", "solution": "",
    }  # fmt: skip


def _rows() -> list[dict]:
    return [
        _row(
            "Which is a mammal?", ["cat", "trout", "frog"], 0, "Look closely.", "natural science", "Animals"
        ),
        _row("Which is hot?", ["ice", "sun"], 1, "", "natural science", "Heat", image=BLUE),
        _row("Pick C.", ["a", "b", "c", "d"], 2, "", "language science", "Letters"),
        _row("Pick B.", ["a", "b", "c"], 1, "", "language science", "Letters"),
    ]


def test_prompt_equals_lmms_eval(lmms_eval_task):
    bench = get_benchmark("scienceqa_img")
    utils = lmms_eval_task("scienceqa")
    rows = [*_rows(), _row("Which?", ["x", "y"], 0, None, "social science", "Maps")]
    for row in rows:
        assert bench.doc_to_text(row) == utils.sqa_doc_to_text(row, KWARGS)
    assert (
        bench.doc_to_text(rows[0])
        == "Context: Look closely.\nWhich is a mammal?\nA. cat\nB. trout\nC. frog" + POST
    )
    assert bench.doc_to_text(rows[1]) == "Which is hot?\nA. ice\nB. sun" + POST
    assert (
        bench.doc_to_text(rows[4]) == "NoneWhich?\nA. x\nB. y" + POST
    )  # lmms-eval's f-string of a None hint


@pytest.mark.parametrize(
    ("answer", "right", "parsed"),
    [("B", True, "B"), ("b", True, "B"), ("  B ", True, "B"), ("B. trout", True, "B"), ("B.", True, "B"),
     ("(B) trout", False, None), ("B) trout", False, None), ("The answer is B.", False, None), ("b.", False, None),
     ("C.", False, "C"), ("A B", False, None), ("", False, None), ("E", False, None), ("trout", False, None),
     ("Bb", False, None)],
)  # fmt: skip
def test_each_answer_scores_as_lmms_eval(answer, right, parsed, lmms_eval_task):
    row = _rows()[3]  # three choices, right answer B
    theirs = lmms_eval_task("scienceqa").sqa_process_results(row, [answer.strip()])["exact_match"]
    assert score("scienceqa_img", [{**row, "prediction": answer}])["exact_match"] == float(right) == theirs
    assert get_benchmark("scienceqa_img").parse(row, answer) == parsed


@pytest.mark.parametrize(
    "answers",
    [
        ["A", "B", "C", "B"], ["a", "b", "c", "b"], ["A. cat", "B.", "C. c", "B. b"],
        ["(A) cat", "The answer is B.", "c.", "B)"], ["", "B)", "C is right", "D"], ["A B", "  B  ", "D", "b."],
    ],
)  # fmt: skip
def test_scores_equal_lmms_eval(answers, lmms_eval_task):
    utils = lmms_eval_task("scienceqa")
    rows = _rows()
    ours = score("scienceqa_img", [{**row, "prediction": p} for row, p in zip(rows, answers)])
    theirs = lmms_eval_metrics(
        utils.sqa_process_results,
        {"exact_match": lambda values: sum(values) / len(values)},  # the YAML's aggregation: mean
        rows,
        [a.strip() for a in answers],  # lmms-eval strips every answer before the task's process_results
    )
    assert ours["exact_match"] == pytest.approx(theirs["exact_match"])


def test_hand_computed_with_breakdown():
    # right ("A. cat"), wrong ("(B)": no "X." form), right ("c": the whole answer, any case), wrong (reads C).
    answers = ["A. cat", "(B)", "c", "C. c"]
    metrics = score("scienceqa_img", [{**row, "prediction": p} for row, p in zip(_rows(), answers)])
    assert metrics == {
        "exact_match": 0.5,
        "subject/language science": 0.5,
        "subject/natural science": 0.5,
        "category/Animals": 1.0,
        "category/Heat": 0.0,
        "category/Letters": 0.5,
    }


def test_reads_the_ScienceQA_IMG_subset_of_a_hub_snapshot(tmp_path):
    snapshot = tmp_path / "ScienceQA"
    write_parquet(snapshot / "ScienceQA-IMG" / "test-00000-of-00001.parquet", _rows())
    write_parquet(snapshot / "ScienceQA-IMG" / "validation-00000-of-00001.parquet", _rows()[:1])
    full = [_row("No image?", ["x", "y"], 0, "", "social science", "Maps", image=None), *_rows()]
    write_parquet(snapshot / "ScienceQA-FULL" / "test-00000-of-00001.parquet", full)
    bench = get_benchmark("scienceqa_img")
    data = load_benchmark_data(bench, snapshot)
    assert (
        len(data) == 4
        and bench.doc_to_visual(data.row(0)) == [RED]
        and bench.doc_to_visual(data.row(1)) == [BLUE]
    )
    assert [bench.row_id(data.row(i), i) for i in range(4)] == ["0", "1", "2", "3"]
    rows = data.rows_without_images()
    assert rows[1]["choices"] == ["ice", "sun"] and rows[1]["answer"] == 1
    assert bench.doc_to_text(rows[0]) == bench.doc_to_text(_rows()[0])
    assert score(bench, [{**row, "prediction": "B"} for row in rows])["exact_match"] == 0.5


def test_bad_answer_is_named():
    with pytest.raises(DataError, match="answer 3 is not the index of one of its 2 choices"):
        score("scienceqa_img", [{**_rows()[1], "answer": 3, "prediction": "A"}])
