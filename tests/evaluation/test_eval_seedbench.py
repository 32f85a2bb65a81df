"""SEED-Bench (image questions): prompt, first-character reading and accuracy, against hand-computed values and
lmms-eval's scorer; the Hub layout (a list of images per row, video rows dropped) and VLMEvalKit's
SEEDBench_IMG.tsv."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from eval_fixtures import lmms_eval_metrics, png_bytes

from llavakit.errors import DataError
from llavakit.evaluation import score
from llavakit.evaluation.registry import get_benchmark
from llavakit.evaluation.seedbench import first_character
from llavakit.evaluation.sources import load_benchmark_data

RED, BLUE = png_bytes(colour=(200, 30, 30)), png_bytes(colour=(30, 30, 200))


def _row(number: int, answer: str, question_type_id: int, data_type: str = "image", frames: int = 1) -> dict:
    """A row in lmms-lab's SEED-Bench columns (``image`` a list of images; ``question_type_id`` an int)."""
    return {
        "question_id": f"{100 + number}", "question": f"What is shown {number}?", "choice_a": "a cat",
        "choice_b": "a dog", "choice_c": "a cow", "choice_d": "a hen", "answer": answer, "data_type": data_type,
        "question_type_id": question_type_id, "data_id": f"{number}.jpg", "image": [RED] * frames,
    }  # fmt: skip


def _rows() -> list[dict]:
    """Four image questions: two of dimension 1 (Scene Understanding), two of 5 (Instances Counting)."""
    return [_row(0, "A", 1), _row(1, "B", 1), _row(2, "C", 5), _row(3, "D", 5)]


def _write_hub_parquet(path: Path, rows: list[dict]) -> Path:
    """``rows`` as the Hub snapshot holds them: ``image`` a list of ``datasets.Image``."""
    from datasets import Dataset, Features, Image, List, Value

    columns = {name: Value("string") for name in rows[0] if name not in ("question_type_id", "image")}
    features = Features({**columns, "question_type_id": Value("int64"), "image": List(Image())})
    encoded = [{**row, "image": [{"bytes": b, "path": None} for b in row["image"]]} for row in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(encoded, features=features).to_parquet(str(path))
    return path


def test_prompt_equals_lmms_eval(lmms_eval_task):
    utils = lmms_eval_task("seedbench")
    for row in _rows():
        assert get_benchmark("seedbench").doc_to_text(row) == utils.seed_doc_to_text(row)
    assert get_benchmark("seedbench").doc_to_text(_rows()[0]) == (
        "What is shown 0?\nA. a cat\nB. a dog\nC. a cow\nD. a hen\n"
        "Answer with the option's letter from the given choices directly."
    )


@pytest.mark.parametrize(
    ("answer", "read"),
    [("B", "B"), ("b", "b"), ("(B) cat", "("), ("The answer is C.", "T"), ("C.", "C"), ("", ""), ("E", "E"),
     ("A B", "A"), ("  D  ", "D"), ("\nB. a dog", "B")],
)  # fmt: skip
def test_reads_the_first_character_as_lmms_eval(answer, read, lmms_eval_task):
    theirs = lmms_eval_task("seedbench").seed_process_result(_rows()[1], [answer.strip()])["seed_image"][
        "pred"
    ]
    assert first_character(answer) == read == theirs


@pytest.mark.parametrize(
    "answers",
    [["A", "B", "C", "D"], ["a", "B. a dog", "(C) a cow", "The answer is D."], ["", " C", "C", "d."],
     ["A B", "Bee", "c", "E"], ["b", "b", "b", "b"]],
)  # fmt: skip
def test_scores_equal_lmms_eval(answers, lmms_eval_task):
    utils = lmms_eval_task("seedbench")
    rows = _rows()
    ours = score("seedbench", [{**row, "prediction": p} for row, p in zip(rows, answers)])
    aggregate = utils.seed_aggregation_result
    # lmms-eval's process_results receives the stripped answer.
    theirs = lmms_eval_metrics(
        utils.seed_process_result,
        {"seed_image": aggregate, "seed_all": aggregate},
        rows,
        [a.strip() for a in answers],
    )
    assert ours["seed_image"] == pytest.approx(theirs["seed_image"]) == pytest.approx(theirs["seed_all"])
    assert set(ours) == {"seed_image", "dimension/Scene Understanding", "dimension/Instances Counting"}


def test_hand_computed():
    # right ("a" for A), wrong (reads "("), right ("C. a cow"), wrong (reads "T").
    answers = ["a", "(B)", "C. a cow", "The answer is D."]
    metrics = score("seedbench", [{**row, "prediction": p} for row, p in zip(_rows(), answers)])
    assert metrics == {
        "seed_image": 0.5,
        "dimension/Scene Understanding": 0.5,
        "dimension/Instances Counting": 0.5,
    }
    metrics = score("seedbench", [{**row, "prediction": p} for row, p in zip(_rows(), ["A", "B", "C", "x"])])
    assert metrics["seed_image"] == 0.75 and metrics["dimension/Scene Understanding"] == 1.0


def test_reads_the_hub_layout_without_its_video_rows(tmp_path):
    rows = [_row(0, "A", 1), _row(1, "B", 11, data_type="video", frames=3), _row(2, "C", 9)]
    rows[2]["image"] = [BLUE]
    _write_hub_parquet(tmp_path / "snapshot" / "data" / "test-00000-of-00001.parquet", rows)
    bench = get_benchmark("seedbench")
    data = load_benchmark_data(bench, tmp_path / "snapshot")
    assert len(data) == 2 and [bench.row_id(data.row(i), i) for i in range(2)] == ["100", "102"]
    assert bench.doc_to_visual(data.row(0)) == [RED] and bench.doc_to_visual(data.row(1)) == [BLUE]
    assert bench.doc_to_text(data.row(1)) == bench.doc_to_text(rows[2])
    metrics = score(bench, [{**row, "prediction": "C"} for row in data.rows_without_images()])
    assert metrics == {
        "seed_image": 0.5,
        "dimension/Scene Understanding": 0.0,
        "dimension/Text Understanding": 1.0,
    }


def test_reads_vlmevalkit_tsv(tmp_path):
    image = base64.b64encode(BLUE).decode()
    lines = ["index\tquestion\tA\tB\tC\tD\tanswer\tcategory\timage",
             f"7\tWhat?\tx\ty\tz\tw\tC\tScene Understanding\t{image}",
             "8\tAnd?\tx\ty\tz\tw\tA\tInstance Location\t7"]  # fmt: skip
    path = tmp_path / "SEEDBench_IMG.tsv"
    path.write_text("\n".join(lines) + "\n")
    bench = get_benchmark("seedbench")
    data = load_benchmark_data(bench, path)
    assert [bench.doc_to_visual(data.row(i)) for i in range(2)] == [[BLUE], [BLUE]]
    assert [bench.row_id(data.row(i), i) for i in range(2)] == ["7", "8"]
    assert bench.doc_to_text(data.row(1)) == "And?\nA. x\nB. y\nC. z\nD. w\n" + (
        "Answer with the option's letter from the given choices directly."
    )
    metrics = score(bench, [{**row, "prediction": "C"} for row in data.rows_without_images()])
    assert metrics == {
        "seed_image": 0.5,
        "dimension/Scene Understanding": 1.0,
        "dimension/Instance Location": 0.0,
    }


def test_an_unknown_tsv_category_is_named(tmp_path):
    path = tmp_path / "SEEDBench_IMG.tsv"
    image = base64.b64encode(RED).decode()
    path.write_text(
        f"index\tquestion\tA\tB\tC\tD\tanswer\tcategory\timage\n1\tQ\ta\tb\tc\td\tA\tColour\t{image}\n"
    )
    with pytest.raises(DataError, match="category 'Colour'"):
        load_benchmark_data(get_benchmark("seedbench"), path)


def test_bad_rows_are_named():
    with pytest.raises(DataError, match="not a letter A-D"):
        score("seedbench", [{**_rows()[0], "answer": "E", "prediction": "A"}])
    with pytest.raises(DataError, match="image questions only"):
        score("seedbench", [{**_row(5, "A", 10, data_type="video"), "prediction": "A"}])
    with pytest.raises(DataError, match="question_type_id 11 is not an image dimension"):
        score("seedbench", [{**_row(6, "A", 11), "prediction": "A"}])
