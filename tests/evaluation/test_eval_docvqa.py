"""DocVQA and InfoVQA: the prompts, ANLS and the test-split submission files, against hand-computed values and
lmms-eval's own tasks (their YAML configs, ConfigurableTask.process_results, the registered ``anls`` metric and
the ``*_test_process_results`` / ``*_test_aggregate_results`` functions)."""

from __future__ import annotations

import importlib
import random
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
from eval_fixtures import png_bytes, write_parquet

from llavakit.errors import DataError
from llavakit.evaluation import score
from llavakit.evaluation.docvqa import anls, levenshtein
from llavakit.evaluation.registry import get_benchmark
from llavakit.evaluation.sources import load_benchmark_data

VAL_IDS = ["docvqa_val", "infovqa_val"]
TEST_IDS = ["docvqa_test", "infovqa_test"]

# (prediction, references, ANLS by hand)
CASES = [
    ("  The  Answer \n", ["the answer"], 1.0),  # stripped, lower-cased, spaces collapsed
    ("fo  o", ["foo"], 0.8),  # distance 1 over the unnormalised length 5, not 4
    ("fo", [" foo "], 0.8),  # the reference's own spaces count in the length (5)
    ("abxy", ["abcd"], 0.5),  # exactly the threshold: kept
    ("abcxy", ["abcde"], 0.6),
    ("abxyz", ["abcde"], 0.0),  # 0.4 is below the threshold
    ("1,000", ["1000", "1,000 "], 1.0),  # the best reference counts
    ("$ 12.50", ["12.50", "$12.50"], 1 - 1 / 7),
    ("aßß", ["abß"], 0.8),  # distance 1 over len("ASSSS") = 5: str.upper lengthens "ß" (else 1 - 1/3)
    ("", ["abc"], 0.0),
    ("", [""], 1.0),  # two empty strings: distance 0
    ("yes", ["Yes", "no"], 1.0),
    ("Dr. John Smith", ["john smith"], 1 - 4 / 14),
]


def _rows(family: str, n: int, with_answers: bool = True) -> list[dict]:
    rows = []
    for i in range(n):
        row = {
            "questionId": str(49153 + i),
            "question": f"What is the date mentioned in this letter {i}? ",
            "image": png_bytes(),
            "answers": list(CASES[i % len(CASES)][1]) if with_answers else None,
            "data_split": "val" if with_answers else "test",
        }
        if family == "docvqa":
            row.update(question_types=["handwritten", "form"], docId=14465, ucsf_document_id="txpp0227")
            row["ucsf_document_page_no"] = "10"
        else:
            row.update(answer_type=["single span"], image_url="https://x/y.jpg", ocr="{}")
            row["operation/reasoning"] = ["counting"]
        rows.append(row)
    return rows


def _lmms_config(benchmark_id: str) -> dict:
    from lmms_eval.utils import load_yaml_config

    family = benchmark_id.split("_")[0]
    folder = Path(importlib.import_module(f"lmms_eval.tasks.{family}.utils").__file__).parent
    return load_yaml_config(str(folder / f"{benchmark_id}.yaml"), mode="full")


def _lmms_task(benchmark_id: str):
    """lmms-eval's ConfigurableTask for ``benchmark_id``, built from its YAML without loading the dataset."""
    from lmms_eval.api.registry import get_metric
    from lmms_eval.api.task import ConfigurableTask, TaskConfig

    task = object.__new__(ConfigurableTask)
    task._config = TaskConfig(**_lmms_config(benchmark_id))
    task.OUTPUT_TYPE = task.config.output_type
    # What ConfigurableTask.__init__ sets for the generic path: list targets, registered metrics.
    task.features = list(_rows("docvqa", 1)[0]) + ["answer_type", "ocr"]
    task.multiple_target = 1
    names = [item["metric"] for item in task.config.metric_list]
    task._metric_fn_list = {name: get_metric(name) for name in names if task.config.process_results is None}
    task._metric_fn_kwargs = {name: {} for name in names}
    return task


def _lmms_eval_results(benchmark_id: str, rows: list[dict], predictions: list[str]) -> dict[str, list]:
    task, results = _lmms_task(benchmark_id), defaultdict(list)
    for row, prediction in zip(rows, predictions):
        for key, value in task.process_results(row, [prediction]).items():
            results[key].append(value)
    return results


@pytest.mark.parametrize("benchmark_id", VAL_IDS + TEST_IDS)
def test_settings_follow_lmms_eval_yaml(benchmark_id):
    from lmms_eval.api.task import TaskConfig

    bench, config = get_benchmark(benchmark_id), _lmms_config(benchmark_id)
    assert (bench.dataset, bench.subset, bench.split) == (
        config["dataset_path"],
        config["dataset_name"],
        config["test_split"],
    )
    assert bench.max_new_tokens == config["generation_kwargs"]["max_new_tokens"] == 32
    # The YAMLs name no stop: lmms-eval's TaskConfig adds its default (the few-shot delimiter).
    assert list(bench.until) == TaskConfig(**config).generation_kwargs["until"] == ["\n\n"]
    default = config["lmms_eval_specific_kwargs"]["default"]
    assert (bench.pre_prompt, bench.post_prompt) == (default["pre_prompt"], default["post_prompt"])
    assert bench.id_column == "questionId"
    scored = [item["metric"] for item in config["metric_list"] if item["metric"] != "submission"]
    assert list(bench.headline) == scored == (["anls"] if benchmark_id in VAL_IDS else [])


@pytest.mark.parametrize("benchmark_id", VAL_IDS + TEST_IDS)
def test_prompt_matches_lmms_eval(benchmark_id):
    bench, config = get_benchmark(benchmark_id), _lmms_config(benchmark_id)
    rows = _rows(benchmark_id.split("_")[0], 2)
    for row in rows:
        assert bench.doc_to_text(row) == config["doc_to_text"](
            row, config["lmms_eval_specific_kwargs"]["default"]
        )
    expected = (
        "What is the date mentioned in this letter 1? \nAnswer the question using a single word or phrase."
    )
    assert bench.doc_to_text(rows[1]) == expected


@pytest.mark.parametrize(("prediction", "references", "expected"), CASES)
def test_anls_by_hand_and_against_lmms_eval(prediction, references, expected):
    from lmms_eval.api.metrics import anls as lmms_anls

    assert anls(prediction.strip(), references) == pytest.approx(expected)
    assert anls(prediction.strip(), references) == lmms_anls(references, [prediction.strip()])["anls"]
    row = {"questionId": "7", "question": "q", "answers": references}
    for benchmark_id in VAL_IDS:
        theirs = _lmms_eval_results(benchmark_id, [row], [prediction])
        assert get_benchmark(benchmark_id).process_results(row, prediction) == {"anls": theirs["anls"][0]}


def test_anls_on_random_strings():
    from lmms_eval.api.metrics import anls as lmms_anls
    from lmms_eval.api.metrics import levenshtein_distance

    pieces = list("abcAB .,") + ["ß", "İ", "\t", "  ", "ﬁ", "é"]
    generator = random.Random(23)
    for _ in range(4000):
        prediction = "".join(generator.choice(pieces) for _ in range(generator.randint(0, 9))).strip()
        references = [
            "".join(generator.choice(pieces) for _ in range(generator.randint(0, 9)))
            for _ in range(generator.randint(1, 3))
        ]
        assert anls(prediction, references) == lmms_anls(references, [prediction])["anls"], (
            prediction,
            references,
        )
        assert levenshtein(prediction, references[0]) == levenshtein_distance(prediction, references[0])


@pytest.mark.parametrize("benchmark_id", VAL_IDS)
def test_metrics_equal_lmms_eval_and_hand_value(benchmark_id):
    from lmms_eval.api.metrics import mean

    rows = _rows(benchmark_id.split("_")[0], len(CASES))
    predictions = [prediction for prediction, _, _ in CASES]
    ours = score(benchmark_id, [{**row, "prediction": p} for row, p in zip(rows, predictions)])
    theirs = _lmms_eval_results(benchmark_id, rows, predictions)
    assert ours == {"anls": mean(theirs["anls"])}
    assert ours["anls"] == pytest.approx(sum(expected for _, _, expected in CASES) / len(CASES))


def test_small_hand_example():
    rows = [
        {"questionId": "1", "question": "a", "answers": ["March 3, 1969"]},
        {"questionId": "2", "question": "b", "answers": ["ITC", "I.T.C."]},
        {"questionId": "3", "question": "c", "answers": ["0.28"]},
    ]
    predictions = ["march 3, 1969", "ITC Ltd", None]  # 1; 1 - 4/7 = 0.43 -> 0; no output: 0
    metrics = score("docvqa_val", [{**row, "prediction": p} for row, p in zip(rows, predictions)])
    assert metrics == {"anls": pytest.approx(1 / 3)}


@pytest.mark.parametrize("benchmark_id", VAL_IDS)
@pytest.mark.parametrize("answers", [None, []])
def test_val_rows_without_answers_are_refused(benchmark_id, answers):
    row = {"questionId": "65", "question": "q", "answers": answers, "prediction": "x"}
    family = benchmark_id.split("_")[0]
    with pytest.raises(DataError, match=rf"question '65' has 'answers' .*use {family}_test"):
        score(benchmark_id, [row])


@pytest.mark.parametrize("benchmark_id", TEST_IDS)
def test_submission_file_equals_lmms_eval(benchmark_id, tmp_path):
    family = benchmark_id.split("_")[0]
    rows = _rows(family, 5, with_answers=False)
    predictions = ["  1/12/92\n", "Café «Ünïcode»", "", 'say "hi"\\', None]
    bench = get_benchmark(benchmark_id)
    scored = [{**row, "prediction": p} for row, p in zip(rows, predictions)]
    assert score(benchmark_id, scored) == {}
    (path,) = bench.write_submission(scored, tmp_path / "ours")

    results = _lmms_eval_results(benchmark_id, rows, predictions)
    aggregate = _lmms_config(benchmark_id)["metric_list"][0]["aggregation"]
    aggregate(results["submission"], SimpleNamespace(output_path=str(tmp_path / "theirs")))
    expected = tmp_path / "theirs" / "submissions" / f"{benchmark_id}_for_submission.json"
    assert path.name == expected.name and path.read_bytes() == expected.read_bytes()
    assert path.read_text(encoding="utf-8").startswith('[{"questionId": 49153, "answer": "1/12/92"}, ')


def test_validation_splits_write_no_submission(tmp_path):
    rows = [{**row, "prediction": "x"} for row in _rows("docvqa", 2)]
    assert get_benchmark("docvqa_val").write_submission(rows, tmp_path) == []


def test_non_integer_question_id_is_refused(tmp_path):
    row = {"questionId": "q-17", "question": "q", "answers": None, "prediction": "x"}
    with pytest.raises(DataError, match=r"'questionId' is 'q-17', expected an integer"):
        score("infovqa_test", [row])


def _write_snapshot(root: Path) -> Path:
    """A snapshot of lmms-eval's Hub dataset: one folder per config, split-prefixed parquet files."""
    write_parquet(root / "DocVQA" / "validation-00000-of-00006.parquet", _rows("docvqa", 3))
    write_parquet(root / "DocVQA" / "test-00000-of-00006.parquet", _rows("docvqa", 2, with_answers=False))
    write_parquet(root / "InfographicVQA" / "validation-00000-of-00003.parquet", _rows("infovqa", 4))
    write_parquet(root / "InfographicVQA" / "test-00000-of-00003.parquet", _rows("infovqa", 1, False))
    return root


def test_reads_both_configs_of_a_hub_snapshot(tmp_path):
    root = _write_snapshot(tmp_path / "lmms-lab-DocVQA")
    sizes = {
        benchmark_id: len(load_benchmark_data(get_benchmark(benchmark_id), root)) for benchmark_id in VAL_IDS
    }
    assert sizes == {"docvqa_val": 3, "infovqa_val": 4}
    data = load_benchmark_data(get_benchmark("docvqa_test"), root)
    rows = data.rows_without_images()
    assert len(rows) == 2 and rows[0]["answers"] is None and isinstance(data.row(0)["image"], bytes)
    assert get_benchmark("docvqa_test").row_id(rows[1], 1) == "49154"
    val = load_benchmark_data(get_benchmark("infovqa_val"), root).rows_without_images()
    assert score("infovqa_val", [{**row, "prediction": "yes"} for row in val])["anls"] == pytest.approx(0.0)


def test_reads_a_snapshot_folder_named_like_the_docvqa_config(tmp_path):
    """A snapshot downloaded to a folder named DocVQA (the repository's name, also its config's) holds both
    subsets: each task reads only its own subfolder."""
    root = _write_snapshot(tmp_path / "DocVQA")
    assert len(load_benchmark_data(get_benchmark("docvqa_val"), root)) == 3
    assert len(load_benchmark_data(get_benchmark("infovqa_val"), root)) == 4


def test_test_split_data_given_to_a_val_task_is_refused(tmp_path):
    path = write_parquet(tmp_path / "test.parquet", _rows("docvqa", 2, with_answers=False))
    rows = load_benchmark_data(get_benchmark("docvqa_val"), path).rows_without_images()
    with pytest.raises(DataError, match=r"question '49153' has 'answers' None"):
        score("docvqa_val", [{**row, "prediction": "x"} for row in rows])
