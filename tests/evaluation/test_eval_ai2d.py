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


def _rows() -> list[dict]:
    return [
        {"question": "Which stage is the egg?", "options": ["larva", "egg", "adult", "pupa"], "answer": "1", "image": png_bytes()},
        {"question": "What eats grass?", "options": ["cow", "lion"], "answer": "0", "image": png_bytes()},
        {"question": "Which is last?", "options": ["a", "b", "c"], "answer": "2", "image": png_bytes()},
    ]  # fmt: skip


def _lmms_eval(rows, answers, lmms_eval_task) -> float:
    """lmms-eval's pipeline: the task's MultiChoiceRegexFilter, then the registered exact_match with the YAML's
    ignore_case / ignore_punctuation."""
    from lmms_eval.api.metrics import exact_match_hf_evaluate

    utils = lmms_eval_task("ai2d")
    flt = utils.MultiChoiceRegexFilter(
        regex_pattern=r"([A-Z])\.", group_select=0, ignore_case=True, ignore_punctuation=True
    )
    filtered = flt.apply([[a] for a in answers], rows)
    targets = [utils.ai2d_doc_to_target(row, "mcq") for row in rows]
    return float(
        exact_match_hf_evaluate(filtered, targets, ignore_case=True, ignore_punctuation=True)["exact_match"]
    )


def test_prompt_equals_lmms_eval(lmms_eval_task):
    utils = lmms_eval_task("ai2d")
    for row in _rows():
        assert get_benchmark("ai2d").doc_to_text(row) == utils.ai2d_doc_to_text(row, KWARGS)


@pytest.mark.parametrize(
    "answers",
    [["B", "A", "C"], ["B. egg", "(A) cow", "The answer is C."], ["b", "a.", " C. c"], ["", "A B", "C!"],
     ["egg", "A)", "c"]],
)  # fmt: skip
def test_scores_equal_lmms_eval(answers, lmms_eval_task):
    rows = _rows()
    ours = score("ai2d", [{**row, "prediction": p} for row, p in zip(rows, answers)])
    assert ours["exact_match"] == pytest.approx(_lmms_eval(rows, answers, lmms_eval_task))


def test_hand_computed():
    answers = [
        "B. egg",
        "(A) cow",
        "c",
    ]  # "B." is cut to B; "(A) cow" stays whole (wrong); "c" matches ignoring case
    metrics = score("ai2d", [{**row, "prediction": p} for row, p in zip(_rows(), answers)])
    assert metrics == {"exact_match": pytest.approx(2 / 3)}


def test_reads_hub_parquet_and_vlmevalkit_tsv(tmp_path):
    bench = get_benchmark("ai2d")
    data = load_benchmark_data(bench, write_parquet(tmp_path / "test-00000-of-00001.parquet", _rows()))
    assert data.rows_without_images()[0]["options"] == ["larva", "egg", "adult", "pupa"]
    assert bench.doc_to_visual(data.row(0)) == [png_bytes()]
    image = base64.b64encode(png_bytes()).decode()
    path = tmp_path / "AI2D_TEST.tsv"
    path.write_text(f"index\tquestion\tA\tB\tC\tD\tanswer\timage\n0\tWhich?\tx\ty\tz\t\tB\t{image}\n")
    tsv = load_benchmark_data(bench, path)
    row = tsv.row(0)
    assert row["options"] == ["x", "y", "z"] and bench.doc_to_text(row) == bench.doc_to_text(
        {"question": "Which?", "options": ["x", "y", "z"]}
    )
    assert score(bench, [{**tsv.rows_without_images()[0], "prediction": "B"}]) == {"exact_match": 1.0}


def test_bad_answer_is_named():
    with pytest.raises(DataError, match="not the index of one of its"):
        score("ai2d", [{**_rows()[1], "answer": "5", "prediction": "A"}])
