"""AI2D: prompt, lmms-eval's flexible-extract filter then exact_match, against hand-computed values and lmms-eval's
own filter and metric; the Hub layout and VLMEvalKit's AI2D_TEST.tsv."""

from __future__ import annotations

import base64

import pytest
from eval_fixtures import png_bytes, write_parquet

from llavakit.errors import DataError
from llavakit.evaluation import score
from llavakit.evaluation.registry import get_benchmark
from llavakit.evaluation.sources import load_benchmark_data

KWARGS = {"prompt_format": "mcq", "pre_prompt": "", "post_prompt": "\nAnswer with the option's letter from the given choices directly."}  # fmt: skip
RED, BLUE = png_bytes(colour=(200, 30, 30)), png_bytes(colour=(30, 30, 200))


def _rows() -> list[dict]:
    """lmms-lab ai2d rows: ``options`` a list, ``answer`` the right option's index as a string."""
    return [
        {"question": "Which stage is the egg?", "options": ["larva", "egg", "adult", "pupa"], "answer": "1", "image": RED},
        {"question": "What eats grass?", "options": ["cow", "lion"], "answer": "0", "image": BLUE},
        {"question": "Which is last?", "options": ["a", "b", "c"], "answer": "2", "image": RED},
    ]  # fmt: skip


def _lmms_eval(rows: list[dict], answers: list[str], lmms_eval_task) -> list[float]:
    """lmms-eval's scoring per row: the YAML's filter (the task's MultiChoiceRegexFilter, built with the YAML's
    options), the strip of ConfigurableTask.process_results, then the registered exact_match with the YAML's
    ignore_case / ignore_punctuation against ai2d_doc_to_target; aggregation: the mean."""
    from lmms_eval.api.metrics import exact_match_hf_evaluate

    utils = lmms_eval_task("ai2d")
    flt = utils.MultiChoiceRegexFilter(
        regex_pattern=r"([A-Z])\.", group_select=0, ignore_case=True, ignore_punctuation=True
    )
    filtered = flt.apply([[a] for a in answers], rows)
    return [
        float(
            exact_match_hf_evaluate(
                predictions=[kept.strip()],
                references=[utils.ai2d_doc_to_target(row, "mcq")],
                ignore_case=True,
                ignore_punctuation=True,
            )["exact_match"]
        )
        for kept, row in zip(filtered, rows)
    ]


def test_prompt_equals_lmms_eval(lmms_eval_task):
    utils = lmms_eval_task("ai2d")
    for row in _rows():
        assert get_benchmark("ai2d").doc_to_text(row) == utils.ai2d_doc_to_text(row, KWARGS)
    assert get_benchmark("ai2d").doc_to_text(_rows()[1]) == (
        "What eats grass?\nA. cow\nB. lion\nAnswer with the option's letter from the given choices directly."
    )


@pytest.mark.parametrize(
    ("answer", "right"),
    [("B", True), ("b", True), ("B.", True), ("B. egg", True), ("  B. egg", True), ("(B)", True), ("B)", True),
     ("**B**", True), ("  B  ", True), ("B\0", True), ("(B) cat", False), ("The answer is B.", False),
     ("b. egg", False), ("B egg", False), ("A B", False), ("C.", False), ("", False), ("E", False),
     ("egg", False), ("\nB. egg", True)],
)  # fmt: skip
def test_each_answer_scores_as_lmms_eval(answer, right, lmms_eval_task):
    row = _rows()[0]  # right answer: B
    ours = score("ai2d", [{**row, "prediction": answer}])["exact_match"]
    assert ours == float(right) == _lmms_eval([row], [answer], lmms_eval_task)[0]


@pytest.mark.parametrize(
    "answers",
    [["B", "A", "C"], ["B. egg", "(A) cow", "The answer is C."], ["b", "a.", " C. c"], ["", "A B", "C!"],
     ["egg", "A)", "c"], ["D", "B", "C"]],
)  # fmt: skip
def test_scores_equal_lmms_eval(answers, lmms_eval_task):
    rows = _rows()
    ours = score("ai2d", [{**row, "prediction": p} for row, p in zip(rows, answers)])
    theirs = _lmms_eval(rows, answers, lmms_eval_task)
    assert ours == {"exact_match": pytest.approx(sum(theirs) / len(theirs))}


def test_hand_computed():
    # "B." is cut to B (right); "(A) cow" stays whole, "a cow" (wrong); "c" matches ignoring case (right).
    metrics = score("ai2d", [{**row, "prediction": p} for row, p in zip(_rows(), ["B. egg", "(A) cow", "c"])])
    assert metrics == {"exact_match": pytest.approx(2 / 3)}
    metrics = score("ai2d", [{**row, "prediction": p} for row, p in zip(_rows(), ["A", "A", ""])])
    assert metrics == {"exact_match": pytest.approx(1 / 3)}


def test_parse_shows_the_compared_text():
    bench = get_benchmark("ai2d")
    assert bench.parse(_rows()[0], " B. egg") == "b" and bench.parse(_rows()[0], "(A) cow!") == "a cow"


def test_reads_the_hub_layout(tmp_path):
    bench = get_benchmark("ai2d")
    write_parquet(tmp_path / "snapshot" / "data" / "test-00000-of-00001.parquet", _rows())
    data = load_benchmark_data(bench, tmp_path / "snapshot")
    assert len(data) == 3 and data.rows_without_images()[0]["options"] == ["larva", "egg", "adult", "pupa"]
    assert bench.doc_to_visual(data.row(0)) == [RED] and bench.doc_to_visual(data.row(1)) == [BLUE]
    assert [bench.row_id(data.row(i), i) for i in range(3)] == ["0", "1", "2"]
    rows = [{**row, "prediction": p} for row, p in zip(data.rows_without_images(), ["B", "B", "C"])]
    assert score(bench, rows) == {"exact_match": pytest.approx(2 / 3)}


def test_reads_vlmevalkit_tsv(tmp_path):
    bench = get_benchmark("ai2d")
    image = base64.b64encode(BLUE).decode()
    path = tmp_path / "AI2D_TEST.tsv"
    path.write_text(
        f"index\tquestion\tA\tB\tC\tD\tanswer\timage\n0\tWhich?\tx\ty\tz\t\tB\t{image}\n"
        "1\tAnd?\tp\tq\tr\ts\tD\t0\n"
    )
    tsv = load_benchmark_data(bench, path)
    first, second = tsv.row(0), tsv.row(1)
    assert first["options"] == ["x", "y", "z"] and first["answer"] == "1" and second["answer"] == "3"
    assert bench.doc_to_visual(first) == [BLUE] and bench.doc_to_visual(second) == [BLUE]
    assert bench.doc_to_text(first) == (
        "Which?\nA. x\nB. y\nC. z\nAnswer with the option's letter from the given choices directly."
    )
    rows = [{**row, "prediction": "B"} for row in tsv.rows_without_images()]
    assert score(bench, rows) == {"exact_match": 0.5}


def test_bad_rows_are_named(tmp_path):
    with pytest.raises(DataError, match="not the index of one of its"):
        score("ai2d", [{**_rows()[1], "answer": "5", "prediction": "A"}])
    path = tmp_path / "AI2D_TEST.tsv"
    path.write_text("index\tquestion\tA\tB\tC\tanswer\timage\n3\tQ?\tx\t\tz\tA\t\n")
    with pytest.raises(DataError, match="skip a letter"):
        load_benchmark_data(get_benchmark("ai2d"), path)
