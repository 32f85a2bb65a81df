"""ScienceQA-IMG: prompt, letter reading and accuracy against hand-computed values and lmms-eval's scorer."""

from __future__ import annotations

import pytest
from eval_fixtures import lmms_eval_metrics, png_bytes, write_parquet

from llavakit.evaluation import score
from llavakit.evaluation.registry import get_benchmark
from llavakit.evaluation.sources import load_benchmark_data

KWARGS = {"format": "default", "pre_prompt": "", "post_prompt": "\nAnswer with the option's letter from the given choices directly."}  # fmt: skip


def _rows() -> list[dict]:
    """lmms-lab ScienceQA-IMG rows: ``choices`` a list, ``answer`` the right option's index."""
    return [
        {"question": "Which is a mammal?", "choices": ["cat", "trout", "frog"], "answer": 0, "hint": "Look closely.",
         "subject": "natural science", "category": "Classification", "image": png_bytes()},
        {"question": "Which is hot?", "choices": ["ice", "sun"], "answer": 1, "hint": "",
         "subject": "natural science", "category": "Heat", "image": png_bytes()},
        {"question": "Pick C.", "choices": ["a", "b", "c", "d"], "answer": 2, "hint": "",
         "subject": "language science", "category": "Letters", "image": png_bytes()},
    ]  # fmt: skip


def test_prompt_equals_lmms_eval(lmms_eval_task):
    bench = get_benchmark("scienceqa_img")
    utils = lmms_eval_task("scienceqa")
    for row in _rows():
        assert bench.doc_to_text(row) == utils.sqa_doc_to_text(row, KWARGS)
    assert bench.doc_to_text(_rows()[0]).startswith(
        "Context: Look closely.\nWhich is a mammal?\nA. cat\nB. trout"
    )


@pytest.mark.parametrize(
    "answers",
    [
        ["A", "B", "C"], ["a", "b", "c"], ["A. cat", "B.", "C. c"], ["(A) cat", "The answer is B.", "c."],
        ["", "B)", "C is right"], ["A B", "  B  ", "D"],
    ],
)  # fmt: skip
def test_scores_equal_lmms_eval(answers, lmms_eval_task):
    utils = lmms_eval_task("scienceqa")
    rows = _rows()
    ours = score("scienceqa_img", [{**row, "prediction": p} for row, p in zip(rows, answers)])
    theirs = lmms_eval_metrics(
        utils.sqa_process_results, {"exact_match": lambda v: sum(v) / len(v)}, rows, answers
    )
    assert ours["exact_match"] == pytest.approx(theirs["exact_match"])


def test_hand_computed_with_breakdown():
    answers = ["A. cat", "(B)", "c"]  # right, wrong (no "X." form), right (lower-case whole answer)
    metrics = score("scienceqa_img", [{**row, "prediction": p} for row, p in zip(_rows(), answers)])
    assert metrics["exact_match"] == pytest.approx(2 / 3)
    assert metrics["subject/natural science"] == 0.5 and metrics["subject/language science"] == 1.0


def test_reads_the_hub_layout(tmp_path):
    path = write_parquet(tmp_path / "ScienceQA-IMG" / "test-00000-of-00001.parquet", _rows())
    data = load_benchmark_data(get_benchmark("scienceqa_img"), tmp_path)
    assert len(data) == 3 and get_benchmark("scienceqa_img").doc_to_visual(data.row(0)) == [png_bytes()]
    assert data.rows_without_images()[1]["choices"] == ["ice", "sun"] and path.is_file()
