"""MMBench: prompt, static option reading, CircularEval and submission files, against hand-computed values and
lmms-eval's own functions (``tasks/mmbench/{en,cn}_utils.py``, ``mmbench_evals.py``, ``mcq_extract.py``)."""

from __future__ import annotations

import base64
import csv
import importlib
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from eval_fixtures import lmms_eval_metrics, png_bytes, write_parquet

from llavakit.errors import DataError
from llavakit.evaluation import score
from llavakit.evaluation.mmbench import SUBMISSION_COLUMNS, MMBench, extract_option, with_circular_copies
from llavakit.evaluation.registry import get_benchmark
from llavakit.evaluation.sources import load_benchmark_data

ANIMALS = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}
IDS = ("mmbench_en_dev", "mmbench_cn_dev", "mmbench_en_test", "mmbench_cn_test")


def _question(index, options, answer, category, l2, hint=None, split="dev", question=None) -> dict:
    """A row in lmms-lab's MMBench layout (missing options are None, as in the Hub dataset)."""
    row = {
        "index": index,
        "question": question or f"Question number {index}?",
        "hint": hint,
        "answer": answer,
        **{letter: options.get(letter) for letter in "ABCD"},
        "category": category,
        "image": png_bytes(),
        "source": "MMBench",
        "L2-category": l2,
        "comment": None,
        "split": split,
    }
    return row


def _originals() -> list[dict]:
    """Five questions without rotated copies: 4, 3, 2 options, a fixed "All of the above", no category."""
    return [
        _question(
            0, ANIMALS, "A", "attribute_recognition", "fine_perception", question="Which animal is it?"
        ),
        _question(
            1, {"A": "red", "B": "green", "C": "blue"}, "C", "color", "coarse", hint="A street at night."
        ),
        _question(2, {"A": "yes", "B": "no"}, "B", "attribute_recognition", "fine_perception", hint="nan"),
        _question(3, {**ANIMALS, "D": "All of the above"}, "B", "spatial", "relation", hint=""),
        _question(4, {"A": "left", "B": "right", "C": "up", "D": "down"}, "D", None, None),
    ]


def _rows() -> list[dict]:
    return with_circular_copies(_originals())


def _text(row: dict, letter: str) -> str:
    return str(row[letter])


def _predictions(rows: list[dict]) -> list[str]:
    """Free-form answers cycling through right and wrong forms (letter, text, phrase, article, empty...)."""
    templates = [
        "{a}", "({a}) {t}", "The answer is {a}.", "{t}", "{w}", "", "I think {a}", "{a}. {t}", "b",
        "Definitely {a}", "A {t} is here", "{a} or {w}", "{a}", "{t}.", "{a}",
    ]  # fmt: skip
    answers = []
    for number, row in enumerate(rows):
        wrong = "A" if row["answer"] != "A" else "B"
        template = templates[number % len(templates)]
        answers.append(template.format(a=row["answer"], t=_text(row, row["answer"]), w=wrong))
    return answers


def _with(rows: list[dict], predictions: list[str | None]) -> list[dict]:
    return [{**row, "prediction": p} for row, p in zip(rows, predictions)]


def _lmms_yaml(name: str) -> dict:
    """An lmms-eval MMBench yaml, without its ``!function`` lines (as lmms-eval's utils read mmbench.yaml)."""
    folder = Path(importlib.import_module("lmms_eval.tasks.mmbench.mmbench_evals").__file__).parent
    lines = (folder / name).read_text(encoding="utf-8").splitlines()
    return yaml.safe_load("\n".join(line for line in lines if "!function" not in line))


@pytest.mark.parametrize("benchmark_id", IDS)
def test_settings_follow_lmms_eval_yaml(benchmark_id):
    bench = get_benchmark(benchmark_id)
    language, split = benchmark_id.split("_")[1:]
    template = _lmms_yaml(f"_default_template_mmbench_{language}_yaml")
    assert _lmms_yaml(f"{benchmark_id}.yaml")["test_split"] == bench.split == split
    assert (bench.dataset, bench.subset) == (template["dataset_path"], template["dataset_name"])
    assert bench.max_new_tokens == template["generation_kwargs"]["max_new_tokens"]
    assert list(bench.until) == template["generation_kwargs"].get("until", [])
    assert bench.post_prompt == template["lmms_eval_specific_kwargs"]["default"]["post_prompt"]
    assert bench.headline == (("gpt_eval_score",) if split == "dev" else ())


def test_prompt_by_hand():
    rows = _originals()
    assert MMBench("en", "dev").doc_to_text(rows[1]) == (
        "A street at night. Question number 1? There are several options:\nA. red\nB. green\nC. blue\n\n"
        "Answer with the option's letter from the given choices directly."
    )
    # CN keeps the English option header and prints its hint "nan", EN does not; an empty hint leaves a space.
    assert (
        MMBench("cn", "dev")
        .doc_to_text(rows[2])
        .startswith("nan Question number 2? There are several options:")
    )
    assert MMBench("en", "dev").doc_to_text(rows[2]).startswith("Question number 2? There")
    assert MMBench("en", "dev").doc_to_text(rows[3]).startswith(" Question number 3? There")
    assert (
        MMBench("cn", "dev")
        .doc_to_text(rows[0])
        .endswith("D. fish\n\n请直接使用所提供的选项字母作为答案回答。")
    )


def _odd_rows() -> list[dict]:
    """Rows exercising the option filters: an "nan" option, an empty one, an E column, a trailing newline."""
    base = _originals()[0]
    return [
        {**base, "C": "nan", "D": ""},
        {**base, "E": "whale"},
        {**base, "E": None, "hint": float("nan")},
        {**base, "D": "fish\n\n", "hint": "Look closely.\n"},
    ]


@pytest.mark.parametrize("language", ["en", "cn"])
def test_prompt_equals_lmms_eval(language, lmms_eval_task):
    utils = lmms_eval_task("mmbench", f"{language}_utils")
    bench = MMBench(language, "dev")
    kwargs = {"pre_prompt": "", "post_prompt": bench.post_prompt}
    for row in _rows() + _odd_rows():
        assert bench.doc_to_text(row) == utils.mmbench_doc_to_text(row, kwargs)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("(B) cat", "B"), ("The answer is C.", "C"), ("B", "B"), ("b", None), ("C.", "C"), ("  D  ", "D"),
        ("a dog", "B"), ("A dog is in the picture", "B"), ("A or B", "A"), ("C and D", "C"), ("", None),
        ("I don't know", None), ("cat or dog", None), ("Definitely not", "D"), ("E", "E"),
        ("The answer is (C), not B", "B"), ("Option: B", "B"), ("答案是C", "C"), ("It is a fish.", "D"),
        ("the answer is D. A. or B, C, fine", "C"),
    ],
)  # fmt: skip
def test_option_reading_by_hand_and_as_lmms_eval(answer, expected, lmms_eval_task):
    from lmms_eval.tasks._task_utils.mcq_extract import extract_mcq_answer

    evaluator = lmms_eval_task("mmbench", "en_utils").mmbench_evaluator
    theirs = evaluator.can_infer(answer, dict(ANIMALS)) or extract_mcq_answer(answer, sorted(ANIMALS)) or None
    assert extract_option(answer, ANIMALS) == expected == theirs


def test_option_reading_with_two_options_as_lmms_eval(lmms_eval_task):
    from lmms_eval.tasks._task_utils.mcq_extract import extract_mcq_answer

    evaluator = lmms_eval_task("mmbench", "en_utils").mmbench_evaluator
    options = {"A": "yes", "B": "no"}
    for answer in ("C", "Clearly yes", "yes and no", "No.", "The choice is D", "Definitely", "A: yes"):
        theirs = (
            evaluator.can_infer(answer, dict(options)) or extract_mcq_answer(answer, sorted(options)) or None
        )
        assert extract_option(answer, options) == theirs, answer


def test_circular_eval_by_hand():
    rows = [row for row in _rows() if row["index"] % 1_000_000 in (0, 1, 2)]
    assert sorted(row["index"] for row in rows) == [
        0, 1, 2, 1_000_000, 1_000_001, 1_000_002, 2_000_000, 2_000_001, 3_000_000,
    ]  # fmt: skip
    predictions = [row["answer"] for row in rows]
    # Question 0: three of its four rotations right -> 0; questions 1 (3 rows) and 2 (2 rows) all right -> 1.
    predictions[[row["index"] for row in rows].index(2_000_000)] = "Z"
    metrics = score("mmbench_en_dev", _with(rows, predictions))
    assert metrics["gpt_eval_score"] == pytest.approx(200 / 3)
    assert metrics["category/attribute_recognition"] == 50.0 and metrics["category/color"] == 100.0
    assert metrics["l2_category/fine_perception"] == 50.0 and metrics["l2_category/coarse"] == 100.0
    predictions[[row["index"] for row in rows].index(2_000_000)] = "C"
    assert score("mmbench_en_dev", _with(rows, predictions))["gpt_eval_score"] == 100.0


def test_a_question_without_category_counts_only_overall():
    rows = [row for row in _rows() if row["index"] % 1_000_000 in (0, 4)]
    metrics = score("mmbench_en_dev", _with(rows, [row["answer"] for row in rows]))
    assert metrics == {
        "gpt_eval_score": 100.0,
        "category/attribute_recognition": 100.0,
        "l2_category/fine_perception": 100.0,
    }


@pytest.mark.parametrize("language", ["en", "cn"])
def test_scores_equal_lmms_eval_static(language, lmms_eval_task, tmp_path):
    utils = lmms_eval_task("mmbench", f"{language}_utils")
    rows = _rows()
    answers = _predictions(rows)
    ours = score(f"mmbench_{language}_dev", _with(rows, answers))
    assert 0.0 < ours["gpt_eval_score"] < 100.0  # the fixture mixes hits and misses
    results = [
        utils.mmbench_process_results(row, [answer])["gpt_eval_score"] for row, answer in zip(rows, answers)
    ]
    overall, categories, l2_categories = utils.mmbench_evaluator.eval_result(results, eval_method="static")
    theirs = {"gpt_eval_score": overall * 100}
    theirs.update({f"category/{name}": value * 100 for name, value in categories.items()})
    theirs.update({f"l2_category/{name}": value * 100 for name, value in l2_categories.items()})
    assert ours == pytest.approx(theirs, abs=1e-9)
    if language == "en":  # the static task's own aggregation, on the same rows
        args = SimpleNamespace(output_path=str(tmp_path))
        static = {"gpt_eval_score": utils.mmbench_aggregate_dev_results_static}
        oracle = lmms_eval_metrics(utils.mmbench_process_results, static, rows, answers, args)
        assert ours["gpt_eval_score"] == pytest.approx(oracle["gpt_eval_score"], abs=1e-9)


def test_per_row_reading_is_recorded():
    row = _rows()[0]
    assert MMBench("en", "dev").parse(row, "  (A) cat ") == "A"
    assert MMBench("en", "test").parse(row, "nothing useful") is None


def test_dev_rows_need_a_letter_answer():
    row = {**_originals()[0], "answer": None, "prediction": "A"}
    with pytest.raises(DataError, match="answer None"):
        score("mmbench_en_dev", [row])


def test_circular_copies_by_hand():
    originals = _originals() + [
        _question(5, {"A": "one", "B": "two", "C": "A and B"}, "C", "count", "relation"),
    ]
    rows = with_circular_copies(originals)
    # 4 options -> 3 copies; 3 -> 2; 2 -> 1; "All of the above" as D -> A-C rotate (2); "A and B" as C -> 1.
    by_index = {row["index"]: row for row in rows}
    assert [row["index"] for row in rows] == [
        0, 1, 2, 3, 4, 5,
        1_000_000, 1_000_001, 1_000_002, 1_000_003, 1_000_004, 1_000_005,
        2_000_000, 2_000_001, 2_000_003, 2_000_004,
        3_000_000, 3_000_004,
    ]  # fmt: skip
    assert [by_index[i][c] for i in (1_000_000, 2_000_000, 3_000_000) for c in "ABCD"] == [
        "fish", "cat", "dog", "bird", "bird", "fish", "cat", "dog", "dog", "bird", "fish", "cat",
    ]  # fmt: skip
    assert [by_index[i]["answer"] for i in (1_000_000, 2_000_000, 3_000_000)] == ["B", "C", "D"]
    assert [by_index[1_000_003][c] for c in "ABCD"] == ["bird", "cat", "dog", "All of the above"]
    assert by_index[1_000_003]["answer"] == "C" and by_index[2_000_003]["answer"] == "A"
    assert [by_index[1_000_005][c] for c in "ABC"] == ["two", "one", "A and B"]
    assert by_index[1_000_005]["answer"] == "C"
    assert [by_index[1_000_002][c] for c in "ABCD"] == ["no", "yes", None, None]
    assert by_index[1_000_002]["answer"] == "A" and by_index[1_000_002]["image"] == originals[2]["image"]


def test_circular_copies_are_kept_when_present_and_five_options_refused():
    rows = _rows()
    assert with_circular_copies(rows) == rows
    with pytest.raises(DataError, match="option E"):
        with_circular_copies([{**_originals()[0], "E": "whale"}])


def test_reads_hub_snapshot_subsets(tmp_path):
    originals = _originals()
    cn = [{**row, "question": f"问题 {row['index']}"} for row in originals]
    write_parquet(tmp_path / "snapshot" / "en" / "dev-00000-of-00001.parquet", _rows())
    write_parquet(tmp_path / "snapshot" / "cn" / "dev-00000-of-00001.parquet", cn)
    en_data = load_benchmark_data(get_benchmark("mmbench_en_dev"), tmp_path / "snapshot")
    cn_data = load_benchmark_data(get_benchmark("mmbench_cn_dev"), tmp_path / "snapshot")
    assert len(en_data) == len(_rows()) and len(cn_data) == len(cn)
    assert isinstance(en_data.row(0)["image"], bytes) and cn_data.row(1)["question"] == "问题 1"
    loaded = en_data.rows_without_images()
    assert loaded == [{k: v for k, v in row.items() if k != "image"} for row in _rows()]
    bench = get_benchmark("mmbench_en_dev")
    assert [bench.row_id(row, n) for n, row in enumerate(loaded)] == [str(row["index"]) for row in _rows()]
    answers = _predictions(_rows())
    assert score(bench, _with(loaded, answers)) == score(bench, _with(_rows(), answers))
    # A subset's own folder passed directly (its name is the subset) is read whole.
    assert len(load_benchmark_data(bench, tmp_path / "snapshot" / "en")) == len(_rows())


def _write_tsv(path: Path, rows: list[dict]) -> Path:
    """``rows`` in VLMEvalKit's MMBench TSV layout: base64 image (a copy refers to its original's index)."""
    columns = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
               "l2-category", "comment", "split"]  # fmt: skip
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(columns)
        for row in rows:
            values = {**row, "l2-category": row["L2-category"]}
            original = row["index"] % 1_000_000
            values["image"] = (
                base64.b64encode(row["image"]).decode() if row["index"] < 1_000_000 else original
            )
            writer.writerow(["" if values[c] is None else values[c] for c in columns])
    return path


def test_reads_a_vlmevalkit_tsv(tmp_path, lmms_eval_task):
    rows = [row for row in _rows() if row["hint"] != ""]  # a TSV cannot tell an empty hint from a missing one
    data = load_benchmark_data(
        get_benchmark("mmbench_en_dev"), _write_tsv(tmp_path / "MMBench_DEV_EN.tsv", rows)
    )
    loaded = [data.row(n) for n in range(len(data))]
    assert loaded == rows
    bench = get_benchmark("mmbench_en_dev")
    utils = lmms_eval_task("mmbench", "en_utils")
    kwargs = {"pre_prompt": "", "post_prompt": bench.post_prompt}
    assert [bench.doc_to_text(row) for row in loaded] == [utils.mmbench_doc_to_text(r, kwargs) for r in rows]


def test_a_tsv_without_copies_is_completed(tmp_path):
    path = _write_tsv(tmp_path / "MMBench_DEV_EN_legacy.tsv", _originals()[:3])
    bench = get_benchmark("mmbench_en_dev")
    data = load_benchmark_data(bench, path)
    rows = data.rows_without_images()
    assert len(rows) == 3 + 3 + 2 + 1 and isinstance(data.row(len(data) - 1)["image"], bytes)
    right = score(bench, _with(rows, [row["answer"] for row in rows]))
    assert right["gpt_eval_score"] == 100.0


def test_a_tsv_without_l2_category_is_refused(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("index\tquestion\tA\tB\tanswer\tcategory\timage\n0\tq?\tx\ty\tA\tc\t\n", encoding="utf-8")
    with pytest.raises(DataError, match="l2-category"):
        load_benchmark_data(get_benchmark("mmbench_en_dev"), path)


def test_missing_columns_are_named(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "L2-category"} for row in _rows()]
    path = write_parquet(tmp_path / "dev.parquet", rows)
    with pytest.raises(DataError, match=r"missing column\(s\) \['L2-category'\]"):
        load_benchmark_data(get_benchmark("mmbench_en_dev"), path)


def _test_rows() -> list[dict]:
    return [{**row, "answer": None, "split": "test"} for row in _rows()[:6]]


@pytest.mark.parametrize("language", ["en", "cn"])
def test_test_split_writes_the_official_submission(language, lmms_eval_task, tmp_path):
    utils = lmms_eval_task("mmbench", f"{language}_utils")
    rows = _test_rows()
    answers = ["A", "(B) dog", "", "The answer is C.", "yes", "D"]
    bench = get_benchmark(f"mmbench_{language}_test")
    assert score(bench, _with(rows, answers)) == {}  # no answers: the server scores the file
    [path] = bench.write_submission(_with(rows, answers[:2] + [None] + answers[3:]), tmp_path / "ours")
    assert path.name == f"mmbench_{language}_test_results.xlsx"
    args = SimpleNamespace(output_path=str(tmp_path / "lmms"))
    aggregations = {"submission": utils.mmbench_aggregate_test_results}
    lmms_eval_metrics(utils.mmbench_process_results, aggregations, rows, answers, args)
    theirs = pd.read_excel(tmp_path / "lmms" / "submissions" / path.name)
    ours = pd.read_excel(path)
    assert list(ours.columns) == list(SUBMISSION_COLUMNS)
    pd.testing.assert_frame_equal(ours, theirs)
    from openpyxl import load_workbook

    sheet = load_workbook(path).active
    assert [cell.value for cell in sheet[1]] == list(SUBMISSION_COLUMNS)
    assert [cell.value for cell in sheet[3]][:4] == [1, "Question number 1?", None, "(B) dog"]
    assert sheet.cell(row=2, column=14).value == "nan"  # lmms-eval's E for data without an E column


def test_dev_submission_is_written_too(tmp_path):
    rows = _with(_rows(), _predictions(_rows()))
    rows[0]["prediction"] = "A\x00\x07"  # control characters openpyxl cannot store
    [path] = get_benchmark("mmbench_cn_dev").write_submission(rows, tmp_path)
    assert path.name == "mmbench_cn_dev_results.xlsx"
    frame = pd.read_excel(path)
    assert list(frame.columns) == list(SUBMISSION_COLUMNS) and len(frame) == len(rows)
    assert frame["prediction"][0] == "A" and list(frame["index"]) == [row["index"] for row in rows]
