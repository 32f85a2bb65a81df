"""SEED-Bench: prompt, first-character reading and accuracy per data type, against hand-computed values and
lmms-eval's scorer; the Hub layout (a list of images per row) and VLMEvalKit's SEEDBench_IMG.tsv."""

from __future__ import annotations

import base64

import pytest
from eval_fixtures import lmms_eval_metrics, png_bytes

from llavakit.errors import DataError
from llavakit.evaluation import score
from llavakit.evaluation.registry import get_benchmark
from llavakit.evaluation.sources import load_benchmark_data


def _rows() -> list[dict]:
    rows = []
    for number, (answer, data_type) in enumerate(
        (("A", "image"), ("B", "image"), ("C", "image"), ("D", "video"))
    ):
        rows.append(
            {"question_id": f"q{number}", "question": f"What is shown {number}?", "choice_a": "a cat",
             "choice_b": "a dog", "choice_c": "a cow", "choice_d": "a hen", "answer": answer, "data_type": data_type,
             "question_type_id": 1 + number % 2, "image": [png_bytes()]}
        )  # fmt: skip
    return rows


def test_prompt_equals_lmms_eval(lmms_eval_task):
    utils = lmms_eval_task("seedbench")
    for row in _rows():
        assert get_benchmark("seedbench").doc_to_text(row) == utils.seed_doc_to_text(row)


@pytest.mark.parametrize(
    "answers",
    [["A", "B", "C", "D"], ["a", "B. a dog", "(C) a cow", "The answer is D."], ["", " C", "C", "d."],
     ["A B", "Bee", "c", "E"]],
)  # fmt: skip
def test_scores_equal_lmms_eval(answers, lmms_eval_task):
    utils = lmms_eval_task("seedbench")
    rows = _rows()
    ours = score("seedbench", [{**row, "prediction": p} for row, p in zip(rows, answers)])
    aggregate = utils.seed_aggregation_result
    theirs = lmms_eval_metrics(
        utils.seed_process_result,
        {"seed_image": aggregate, "seed_video": aggregate, "seed_all": aggregate},
        rows,
        answers,
    )
    assert {key: ours[key] for key in theirs} == pytest.approx(theirs)


def test_hand_computed():
    answers = ["a", "(B)", "C. a cow", "D"]  # right, wrong (reads "("), right, right (video)
    metrics = score("seedbench", [{**row, "prediction": p} for row, p in zip(_rows(), answers)])
    assert metrics["seed_image"] == pytest.approx(2 / 3) and metrics["seed_video"] == 1.0
    assert (
        metrics["seed_all"] == 0.75
        and metrics["question_type/1"] == 1.0
        and metrics["question_type/2"] == 0.5
    )


def test_reads_vlmevalkit_tsv(tmp_path):
    image = base64.b64encode(png_bytes()).decode()
    lines = ["index\tquestion\tA\tB\tC\tD\tanswer\tcategory\timage", f"7\tWhat?\tx\ty\tz\tw\tC\tScene\t{image}",
             "8\tAnd?\tx\ty\tz\tw\tA\tScene\t7"]  # fmt: skip
    path = tmp_path / "SEEDBench_IMG.tsv"
    path.write_text("\n".join(lines) + "\n")
    bench = get_benchmark("seedbench")
    data = load_benchmark_data(bench, path)
    assert [bench.doc_to_visual(data.row(i)) for i in range(2)] == [[png_bytes()], [png_bytes()]]
    assert bench.doc_to_text(data.row(1)) == "And?\nA. x\nB. y\nC. z\nD. w\n" + (
        "Answer with the option's letter from the given choices directly."
    )
    metrics = score(bench, [{**row, "prediction": "C"} for row in data.rows_without_images()])
    assert metrics == {"seed_image": 0.5, "seed_all": 0.5, "question_type/Scene": 0.5}


def test_bad_answer_is_named():
    with pytest.raises(DataError, match="not a letter A-D"):
        score("seedbench", [{**_rows()[0], "answer": "E", "prediction": "A"}])
