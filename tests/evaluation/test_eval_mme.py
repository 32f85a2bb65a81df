"""MME: prompt, yes/no parsing and acc / acc+ arithmetic, against hand-computed values and lmms-eval's scorer."""

from __future__ import annotations

import pytest
from eval_fixtures import lmms_eval_metrics, png_bytes, write_parquet

from llavakit.errors import DataError
from llavakit.evaluation import score
from llavakit.evaluation.mme import MME, parse_yes_no
from llavakit.evaluation.registry import get_benchmark
from llavakit.evaluation.sources import load_benchmark_data


def _rows() -> list[dict]:
    """Two perception subtasks (two images each) and one cognition subtask (one image): 10 questions."""
    rows = []
    for category, images in (("existence", 2), ("OCR", 2), ("code_reasoning", 1)):
        for number in range(images):
            for answer in ("Yes", "No"):
                rows.append(
                    {
                        "question_id": f"{category}/{number:04d}.png",
                        "question": f"Is there a thing {number}? Please answer yes or no.",
                        "answer": answer,
                        "category": category,
                        "image": png_bytes(),
                    }
                )
    return rows


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("Yes", "yes"), ("no.", "no"), ("Yes, there is.", "yes"), ("Y", "yes"), ("n", "no"), ("x", "other"),
        ("Not at all", "no"), ("There is no dog", "other"), ("nothing", "no"), ("", "other"), ("  YES.  ", "yes"),
        ("The answer is yes", "other"), ("(B) cat", "other"),
    ],
)  # fmt: skip
def test_parse_matches_lmms_eval(text, parsed, lmms_eval_task):
    assert parse_yes_no(text) == parsed == lmms_eval_task("mme").parse_pred_ans(text)


def test_prompt_replaces_the_yes_no_suffix(lmms_eval_task):
    row = _rows()[0]
    expected = "Is there a thing 0?\nAnswer the question using a single word or phrase."
    kwargs = {"pre_prompt": "", "post_prompt": MME.post_prompt}
    assert MME().doc_to_text(row) == expected == lmms_eval_task("mme").mme_doc_to_text(row, kwargs)


def test_scores_by_hand_and_as_lmms_eval():
    rows = _rows()
    # existence: image 0 both right, image 1 one right; OCR: both images both wrong; code: one right.
    predictions = ["Yes", "No", "Yes", "Yes", "No", "Yes", "maybe", "", "Yes", "Yes"]
    metrics = score("mme", [{**row, "prediction": p} for row, p in zip(rows, predictions)])
    # existence: acc = (100 + 50) / 2 = 75, acc+ = (100 + 0) / 2 = 50 -> 125; OCR: 0; code_reasoning: 50 + 0.
    assert metrics["acc/existence"] == 75.0 and metrics["acc_plus/existence"] == 50.0
    assert metrics["score/OCR"] == 0.0 and metrics["score/code_reasoning"] == 50.0
    assert metrics["mme_perception_score"] == 125.0 and metrics["mme_cognition_score"] == 50.0


def test_equals_lmms_eval_on_many_answers(lmms_eval_task):
    utils = lmms_eval_task("mme")
    rows = _rows() * 1
    answers = ["Yes", "no", "Yes.", "No, it is not", "y", "N", "there is", "nope", "yes!", "No."]
    ours = score("mme", [{**row, "prediction": p} for row, p in zip(rows, answers)])
    theirs = lmms_eval_metrics(
        utils.mme_process_results,
        {
            "mme_perception_score": utils.mme_aggregate_results,
            "mme_cognition_score": utils.mme_aggregate_results,
        },
        rows,
        answers,
    )
    assert {k: ours[k] for k in theirs} == pytest.approx(theirs, abs=1e-9)


def test_a_split_pair_is_refused():
    rows = _rows()[:3]
    with pytest.raises(DataError, match="pairs"):
        score("mme", [{**row, "prediction": "Yes"} for row in rows])


def test_reads_a_hub_snapshot_folder(tmp_path):
    write_parquet(tmp_path / "snapshot" / "data" / "test-00000-of-00001.parquet", _rows())
    data = load_benchmark_data(get_benchmark("mme"), tmp_path / "snapshot")
    assert len(data) == 10 and isinstance(data.row(0)["image"], bytes)
    assert "image" not in data.rows_without_images()[0]


def test_missing_columns_are_named(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "category"} for row in _rows()]
    path = write_parquet(tmp_path / "test.parquet", rows)
    with pytest.raises(DataError, match=r"missing column\(s\) \['category'\]"):
        load_benchmark_data(get_benchmark("mme"), path)
