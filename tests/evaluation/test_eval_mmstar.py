"""MMStar: the prompt, letter reading, and the macro average over sub-capabilities (overall and per
capability), against hand-computed values and lmms-eval's own mmstar_process_results and
mmstar_aggregate_results."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from eval_fixtures import lmms_eval_metrics, png_bytes, write_parquet

from llavakit.errors import DataError
from llavakit.evaluation import score
from llavakit.evaluation.mmstar import CATEGORIES
from llavakit.evaluation.registry import get_benchmark
from llavakit.evaluation.sources import load_benchmark_data

IMAGE = png_bytes()
OPTIONS = "\nOptions: A: red, B: blue, C: green, D: white"


def _row(
    index: int, answer: str, category: str, l2_category: str, question: str = "What colour is the car?"
) -> dict:
    """A Lin-Chen/MMStar row (options inline in the question)."""
    return {
        "index": index, "question": question + OPTIONS, "image": IMAGE, "answer": answer,
        "category": category, "l2_category": l2_category,
        "meta_info": {"source": "MMBench", "split": "val", "image_path": f"images/{index}.jpg"},
    }  # fmt: skip


def _rows() -> list[dict]:
    return [
        _row(0, "A", "coarse perception", "image scene and topic"),
        _row(1, "B", "coarse perception", "image scene and topic"),
        _row(2, "C", "coarse perception", "image emotion"),
        _row(3, "D", "math", "geometry", "  Is the angle right? Please answer yes or no."),
        _row(4, "A", "math", "statistical reasoning"),
        _row(5, "B", "math", "statistical reasoning"),
        _row(6, "C", "math", "statistical reasoning"),
        _row(7, "D", "logical reasoning", "diagram reasoning"),
    ]


def _lmms_yaml(name: str) -> dict:
    folder = Path(importlib.import_module("lmms_eval.tasks.mmstar.utils").__file__).parent
    lines = (folder / name).read_text(encoding="utf-8").splitlines()
    return yaml.safe_load("\n".join(line for line in lines if "!function" not in line))


def _lmms_eval(rows: list[dict], predictions: list[str]) -> dict:
    """lmms-eval's metrics: the task strips outputs; every metric aggregates with mmstar_aggregate_results."""
    utils = importlib.import_module("lmms_eval.tasks.mmstar.utils")
    metrics = [entry["metric"] for entry in _lmms_yaml("_default_template_yaml")["metric_list"]]
    aggregations = dict.fromkeys(metrics, utils.mmstar_aggregate_results)
    stripped = [prediction.strip() for prediction in predictions]
    return lmms_eval_metrics(utils.mmstar_process_results, aggregations, rows, stripped)


def _ours_as_lmms_eval_keys(metrics: dict) -> dict:
    return {
        key.removeprefix("category/"): value
        for key, value in metrics.items()
        if not key.startswith("l2_category/")
    }


def test_settings_follow_lmms_eval_yaml():
    bench, config, template = (
        get_benchmark("mmstar"),
        _lmms_yaml("mmstar.yaml"),
        _lmms_yaml("_default_template_yaml"),
    )
    assert (bench.dataset, bench.split) == (config["dataset_path"], template["test_split"])
    assert "generation_kwargs" not in template and "generation_kwargs" not in config
    assert (bench.max_new_tokens, bench.until) == (1024, ("\n\n",))  # lmms-eval's LLaVA and task defaults
    default = template["lmms_eval_specific_kwargs"]["default"]
    assert (bench.pre_prompt, bench.post_prompt) == (default["pre_prompt"], default["post_prompt"])
    assert [m["metric"] for m in template["metric_list"]] == [*CATEGORIES, "average"]
    assert bench.headline == ("average",) and bench.id_column == "index"


def test_prompt_equals_lmms_eval(lmms_eval_task):
    utils, bench = lmms_eval_task("mmstar"), get_benchmark("mmstar")
    kwargs = _lmms_yaml("_default_template_yaml")["lmms_eval_specific_kwargs"]["default"]
    for row in _rows():
        assert bench.doc_to_text(row) == utils.mmstar_doc_to_text(row, kwargs)
    assert bench.doc_to_text(_rows()[3]) == (
        "Is the angle right?" + OPTIONS + "\nAnswer with the option's letter from the given choices directly"
    )


@pytest.mark.parametrize(
    ("prediction", "right"),
    [("B", True), ("B.", True), (" (B) blue", True), ("The answer is B", True), ("b", False), ("blue", False),
     ("Blue", True), ("A or B", False), ("I think it is B", True), ("", False), ("E", False),
     ("B, not A", True),     ("Answer: C", False), ("**B**", True), ("None of them", False)],
)  # fmt: skip
def test_each_answer_scores_as_lmms_eval(prediction, right):
    # "blue" reads nothing, "Blue" reads B (a capital letter anywhere is the last resort); "A or B" reads A.
    row = _row(9, "B", "math", "geometry")
    ours = score("mmstar", [{**row, "prediction": prediction}])
    theirs = _lmms_eval([row], [prediction])
    assert ours["average"] == theirs["average"] == theirs["math"] == float(right)


@pytest.mark.parametrize(
    "predictions",
    [["A", "B", "C", "D", "A", "B", "C", "D"], ["A", "A", "A", "A", "A", "A", "A", "A"],
     ["", "", "", "", "", "", "", ""],     ["(A)", "b", "C.", "The answer is D", "A", "x", "x", "Definitely"],
     ["B", "B", "C", "C", "A", "x", "x", "x"]],
)  # fmt: skip
def test_scores_equal_lmms_eval(predictions):
    ours = score("mmstar", [{**row, "prediction": p} for row, p in zip(_rows(), predictions)])
    theirs = _lmms_eval(_rows(), predictions)
    assert _ours_as_lmms_eval_keys(ours) == pytest.approx(theirs)
    assert set(_ours_as_lmms_eval_keys(ours)) == {"coarse perception", "math", "logical reasoning", "average"}


def test_hand_computed():
    predictions = ["B", "B", "C", "D", "A", "x", "x", "x"]
    metrics = score("mmstar", [{**row, "prediction": p} for row, p in zip(_rows(), predictions)])
    # l2 means: scene 1/2, emotion 1, geometry 1, statistical 1/3, diagram 0.
    assert metrics == pytest.approx(
        {
            "average": (0.5 + 1 + 1 + 1 / 3 + 0) / 5,  # 0.5667, not the plain accuracy 4/8
            "category/coarse perception": (0.5 + 1) / 2,
            "category/math": (1 + 1 / 3) / 2,
            "category/logical reasoning": 0.0,
            "l2_category/image scene and topic": 0.5,
            "l2_category/image emotion": 1.0,
            "l2_category/geometry": 1.0,
            "l2_category/statistical reasoning": 1 / 3,
            "l2_category/diagram reasoning": 0.0,
        }
    )
    bench = get_benchmark("mmstar")
    assert [bench.parse(_rows()[0], p) for p in ("(C) green", "b", "Blue", "Definitely")] == [
        "C",
        "",
        "B",
        "D",
    ]


def test_reads_the_hub_layout(tmp_path):
    bench = get_benchmark("mmstar")
    # Lin-Chen/MMStar keeps its one split in mmstar.parquet at the top (its README: split val = that file).
    path = write_parquet(tmp_path / "MMStar" / "mmstar.parquet", _rows())
    data = load_benchmark_data(bench, path)
    assert len(data) == 8 and bench.doc_to_visual(data.row(2)) == [IMAGE]
    assert [bench.row_id(data.row(i), i) for i in (0, 7)] == ["0", "7"]
    rows = [{**row, "prediction": row["answer"]} for row in data.rows_without_images()]
    assert score(bench, rows)["average"] == 1.0


# The head of Lin-Chen/MMStar's dataset card: its one config maps split val to mmstar.parquet.
MMSTAR_CARD = """---
task_categories:
- multiple-choice
configs:
- config_name: mmstar
  data_files:
  - split: val
    path: "mmstar.parquet"
---
# MMStar
"""


def test_reads_a_snapshot_folder_through_its_dataset_card(tmp_path):
    """No file is named like the split: the card says which one it is (without it, the folder is refused)."""
    bench = get_benchmark("mmstar")
    folder = tmp_path / "MMStar"
    write_parquet(folder / "mmstar.parquet", _rows())
    with pytest.raises(DataError, match="no parquet file of split 'val'"):
        load_benchmark_data(bench, folder)
    (folder / "README.md").write_text(MMSTAR_CARD, encoding="utf-8")
    assert len(load_benchmark_data(bench, folder)) == 8


@pytest.mark.parametrize(
    ("change", "message"),
    [({"answer": "E"}, "answer 'E' is not an option letter"), ({"answer": None}, "answer None is not"),
     ({"category": "perception"}, "category 'perception' is not one of"),
     ({"l2_category": None}, "l2_category None")],
)  # fmt: skip
def test_bad_rows_are_refused(change, message):
    with pytest.raises(DataError, match=f"MMStar question 0: {message}"):
        score("mmstar", [{**_rows()[0], **change, "prediction": "A"}])


def test_missing_columns_are_named(tmp_path):
    path = write_parquet(
        tmp_path / "val.parquet", [{k: v for k, v in _rows()[0].items() if k != "l2_category"}]
    )
    with pytest.raises(DataError, match=r"missing column\(s\) \['l2_category'\]"):
        load_benchmark_data(get_benchmark("mmstar"), path)
