"""GQA: the image join, the prompt and exact-match scoring, against hand-computed values and lmms-eval."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from eval_fixtures import png_bytes, write_parquet

from llavakit.errors import DataError
from llavakit.evaluation import score
from llavakit.evaluation.registry import get_benchmark
from llavakit.evaluation.sources import load_benchmark_data

ANSWERS = ["yes", "left", "t-shirt", "2", "no", "white"]


def _questions() -> list[dict]:
    """Six testdev-balanced questions on two images, in the instructions config's columns."""
    return [
        {
            "id": f"20{number:06d}",
            "imageId": f"n{number % 2}",
            "question": f"Is the thing {number} on the left? ",
            "answer": answer,
            "fullAnswer": f"The answer is {answer}.",
            "isBalanced": True,
            "types": {"detailed": "existThat", "semantic": "obj", "structural": "verify"},
            "semanticStr": "select: thing",
        }
        for number, answer in enumerate(ANSWERS)
    ]


def _snapshot(folder: Path) -> Path:
    """A Hub snapshot of GQA's two testdev-balanced configs (questions without images, images apart)."""
    write_parquet(folder / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet", _questions())
    images = [
        {"id": "n0", "image": png_bytes(colour=(1, 2, 3))},
        {"id": "n1", "image": png_bytes(colour=(4, 5, 6))},
    ]
    write_parquet(folder / "testdev_balanced_images" / "testdev-00000-of-00001.parquet", images)
    return folder


def _lmms_yaml() -> dict:
    folder = Path(importlib.import_module("lmms_eval.tasks.gqa.utils").__file__).parent
    lines = (folder / "gqa.yaml").read_text(encoding="utf-8").splitlines()
    return yaml.safe_load("\n".join(line for line in lines if "!function" not in line))


def _lmms_eval_exact_match(rows: list[dict], predictions: list[str]) -> float:
    """lmms-eval's generic generate_until path: strip, exact_match with the YAML's options, mean."""
    from lmms_eval.api.registry import get_aggregation, get_metric

    (config,) = [m for m in _lmms_yaml()["metric_list"] if m["metric"] == "exact_match"]
    options = {k: v for k, v in config.items() if k not in ("metric", "aggregation", "higher_is_better")}
    metric = get_metric("exact_match")
    scores = [
        metric(references=[row["answer"]], predictions=[prediction.strip()], **options)["exact_match"]
        for row, prediction in zip(rows, predictions)
    ]
    return get_aggregation(config["aggregation"])(scores)


def test_settings_follow_lmms_eval_yaml():
    bench, config = get_benchmark("gqa"), _lmms_yaml()
    assert (bench.dataset, bench.subset, bench.split) == (
        config["dataset_path"],
        config["dataset_name"],
        config["test_split"],
    )
    assert bench.max_new_tokens == config["generation_kwargs"]["max_new_tokens"]
    assert bench.post_prompt == config["lmms_eval_specific_kwargs"]["default"]["post_prompt"]
    assert bench.headline == ("exact_match",) and bench.id_column == "id"


def test_prompt_matches_lmms_eval(lmms_eval_task):
    row = _questions()[0]
    kwargs = {"pre_prompt": "", "post_prompt": get_benchmark("gqa").post_prompt}
    expected = "Is the thing 0 on the left? \nAnswer the question using a single word or phrase."
    assert (
        get_benchmark("gqa").doc_to_text(row)
        == expected
        == lmms_eval_task("gqa").gqa_doc_to_text(row, kwargs)
    )


@pytest.mark.parametrize(
    ("prediction", "answer", "right"),
    [("Yes", "yes", 1.0), ("Yes.", "yes", 1.0), ("  left\n", "left", 1.0), ("yes .", "yes", 0.0),
     ("T-Shirt", "t-shirt", 1.0), ("tshirt", "t-shirt", 1.0), ("t shirt", "t-shirt", 0.0), ("two", "2", 0.0),
     ("", "no", 0.0), ("Yes, it is.", "yes", 0.0), ("the white one", "white", 0.0), ("(B) cat", "cat", 0.0)],
)  # fmt: skip
def test_exact_match_by_hand_and_as_lmms_eval(prediction, answer, right):
    row = {**_questions()[0], "answer": answer}
    assert score("gqa", [{**row, "prediction": prediction}])["exact_match"] == right
    assert _lmms_eval_exact_match([row], [prediction]) == right


def test_mean_equals_lmms_eval():
    rows = _questions()
    predictions = ["Yes", "Left.", "a t-shirt", "two", "No!", " White "]
    ours = score("gqa", [{**row, "prediction": p} for row, p in zip(rows, predictions)])
    assert ours == {"exact_match": pytest.approx(4 / 6)}
    assert ours["exact_match"] == pytest.approx(_lmms_eval_exact_match(rows, predictions), abs=1e-12)


def test_reads_a_snapshot_and_joins_images(tmp_path):
    snapshot = _snapshot(tmp_path / "GQA")
    bench = get_benchmark("gqa")
    for source in (snapshot, snapshot / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet"):
        rows = load_benchmark_data(bench, source).table
        assert [row["id"] for row in rows] == [row["id"] for row in _questions()]
        assert rows[0]["image"] == png_bytes(colour=(1, 2, 3)) and rows[1]["image"] == png_bytes(
            colour=(4, 5, 6)
        )
        assert rows[0]["image"] is rows[2]["image"]  # one bytes object per image, not per question


def test_a_question_without_its_image_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"question '20000000' has no image"):
        get_benchmark("gqa").doc_to_visual(_questions()[0])
    data = load_benchmark_data(get_benchmark("gqa"), _snapshot(tmp_path / "GQA"))
    assert get_benchmark("gqa").doc_to_visual(data.row(0)) == [png_bytes(colour=(1, 2, 3))]


def test_rows_with_images_are_kept(tmp_path):
    rows = [{**row, "image": png_bytes()} for row in _questions()]
    path = write_parquet(tmp_path / "joined" / "testdev-00000-of-00001.parquet", rows)
    data = load_benchmark_data(get_benchmark("gqa"), path)
    assert get_benchmark("gqa").attach_images(data.table, path) is data.table


def test_a_missing_image_is_named(tmp_path):
    snapshot = _snapshot(tmp_path / "GQA")
    write_parquet(
        snapshot / "testdev_balanced_images" / "testdev-00000-of-00001.parquet",
        [{"id": "n0", "image": png_bytes()}],
    )
    with pytest.raises(DataError, match=r"question '20000001': image 'n1' is not in"):
        load_benchmark_data(get_benchmark("gqa"), snapshot)


def test_missing_images_config_is_explained(tmp_path):
    path = write_parquet(
        tmp_path / "only" / "testdev_balanced_instructions" / "testdev-0.parquet", _questions()
    )
    with pytest.raises(DataError, match="images are a separate config"):
        load_benchmark_data(get_benchmark("gqa"), path)


def test_bad_answer_is_refused():
    row = {**_questions()[0], "answer": None, "prediction": "yes"}
    with pytest.raises(DataError, match="answer None is not a string"):
        score("gqa", [row])


def test_evaluates_end_to_end_from_a_snapshot(checkpoint, tmp_path):
    from llavakit.evaluation.runner import EvalOptions, evaluate
    from llavakit.inference.api import load

    data = load_benchmark_data(get_benchmark("gqa"), _snapshot(tmp_path / "GQA"))
    result = evaluate(load(checkpoint, device="cpu"), data, tmp_path / "out", EvalOptions(4, 3, progress=False))
    assert result.questions == len(_questions()) and not result.failed and set(result.metrics) == {"exact_match"}
