"""LLaVA-Bench-in-the-Wild: lmms-eval's own ``llava_process_results`` and aggregations and ours, run against the
same local judge endpoint with the same canned reviews, must send the same requests and give the same metrics;
plus the review parsing and the relative-score arithmetic against lmms-eval's functions, and hand-computed
values."""

from __future__ import annotations

import importlib
import json
import random
import time
from pathlib import Path

import pytest
import yaml
from eval_fixtures import lmms_eval_metrics, png_bytes, write_parquet
from judge_stub import by_marker, stub_endpoint

from llavakit.cli.main import main
from llavakit.errors import DataError
from llavakit.evaluation import score
from llavakit.evaluation.judge import JudgeOptions, attach_judge
from llavakit.evaluation.llava_wild import RULE, parse_review, relative_score
from llavakit.evaluation.registry import get_benchmark
from llavakit.evaluation.sources import load_benchmark_data

TASK = "llava-in-the-wild"
CATEGORIES = ["conv", "detail", "complex", "conv", "detail", "complex", "conv", "complex"]
# The judge's review of each prediction (marked P0, P1, ...): an int is that HTTP error, None a reply without content.
REVIEWS = {
    "P0": "8 7\nAssistant 2 misses a detail.",
    "P1": "Assistant 1: 9/10, Assistant 2: 6/10\nThe first two numbers are 1 and 9.",
    "P2": "9;6\nsemicolons count as spaces",
    "P3": "8.5 9.5",
    "P4": "",  # parsed, not retried: (-1, -1)
    "P5": "7\n8",  # one number on the first line: (-1, -1)
    "P6": 400,  # failed after 5 tries: (-1, -1)
    "P7": None,  # no content: failed after 5 tries
}
HEADLINE = ["gpt_eval_llava_all", "gpt_eval_llava_conv", "gpt_eval_llava_detail", "gpt_eval_llava_complex"]
ENV = ("OPENAI_API_KEY", "OPENAI_API_URL", "OPENAI_BASE_URL", "MODEL_VERSION", "API_TYPE")


def _rows() -> list[dict]:
    return [
        {
            "question_id": str(number),
            "question": f"What is unusual about image {number}?",
            "image": png_bytes(),
            "caption": f"A man irons clothes on a board attached to a taxi ({number}).",
            "gpt_answer": f"The man is ironing on the back of a moving taxi ({number}).",
            "category": category,
            "image_id": f"{number // 3:03d}.jpg",
        }
        for number, category in enumerate(CATEGORIES)
    ]


def _predictions() -> list[str]:
    # Trailing white space: lmms-eval strips generated answers before llava_process_results sees them.
    return [f"[Assistant 2]\nP{number} He irons clothes. \n" for number in range(len(CATEGORIES))]


def _marker_replies() -> dict:
    return {f"[Assistant 2]\n[Assistant 2]\n{marker} ": reply for marker, reply in REVIEWS.items()}


@pytest.fixture
def endpoint(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    with stub_endpoint() as stub:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        monkeypatch.setenv("OPENAI_API_URL", stub.url)
        stub.reply = by_marker(_marker_replies())
        yield stub


@pytest.fixture
def lmms_utils(lmms_eval_task, monkeypatch, endpoint):
    """lmms-eval's task module, its judge pipeline rebuilt against the stub."""
    utils = lmms_eval_task(TASK)
    monkeypatch.setattr(utils, "_pipeline", None)
    return utils


@pytest.fixture
def data(tmp_path):
    path = write_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", _rows())
    return load_benchmark_data(get_benchmark("llava_in_the_wild"), str(path.parent))


def _lmms_yaml() -> dict:
    folder = Path(importlib.import_module(f"lmms_eval.tasks.{TASK}.utils").__file__).parent
    lines = (folder / "llava-in-the-wild.yaml").read_text(encoding="utf-8").splitlines()
    return yaml.safe_load("\n".join(line for line in lines if "!function" not in line))


def _lmms_metrics(utils, rows, predictions) -> dict:
    names = ("all", "conv", "detail", "complex")
    aggregations = {f"gpt_eval_llava_{name}": getattr(utils, f"llava_{name}_aggregation") for name in names}
    return lmms_eval_metrics(utils.llava_process_results, aggregations, rows, predictions)


def test_task_settings_match_lmms_eval(lmms_eval_task):
    config = _lmms_yaml()
    bench = get_benchmark("llava_in_the_wild")
    assert (bench.dataset, bench.split) == (config["dataset_path"], config["test_split"])
    assert bench.max_new_tokens == config["generation_kwargs"]["max_new_tokens"] == 4096
    assert list(bench.until) == config["generation_kwargs"]["until"]
    assert list(bench.headline) == [metric["metric"] for metric in config["metric_list"]]
    utils = lmms_eval_task(TASK)
    kwargs = config["lmms_eval_specific_kwargs"]["default"]
    for row in _rows():
        assert bench.doc_to_text(row) == utils.llava_doc_to_text(row, kwargs) == row["question"]
    for category in ("conv", "detail", "complex"):
        assert utils.rule_dict[f"llava_bench_{category}"] == {"role": "Assistant", "prompt": RULE}
    assert bench.judge_model == utils.MODEL_VERSION == "gpt-4o-2024-11-20"


def test_requests_and_metrics_equal_lmms_eval(lmms_utils, endpoint, data, tmp_path):
    rows = data.rows_without_images()
    predictions = _predictions()
    theirs = _lmms_metrics(lmms_utils, rows, [p.strip() for p in predictions])
    their_requests = list(endpoint.requests)
    endpoint.requests.clear()

    bench = attach_judge(get_benchmark("llava_in_the_wild"), JudgeOptions(), tmp_path)
    ours = score(bench, [{**row, "prediction": p} for row, p in zip(rows, predictions)])

    assert endpoint.requests == their_requests
    assert len(their_requests) == 6 + 5 + 5  # one each, five tries for each failed call
    assert {key: ours[key] for key in HEADLINE if key in ours} == {
        key: value for key, value in theirs.items() if value is not None
    }
    # By hand: all (8,7) (1,9) (9,6) (8.5,9.5) and four (-1,-1): means 2.8125 -> 2.812, 3.4375 -> 3.438.
    assert ours["gpt_eval_llava_all"] == round(3.438 / 2.812 * 100, 1) == 122.3
    assert ours["gpt_eval_llava_conv"] == 100.0  # (8,7) (8.5,9.5) (-1,-1): 5.167 / 5.167
    assert "gpt_eval_llava_detail" not in ours and theirs["gpt_eval_llava_detail"] is None  # GPT-4 mean 0
    assert ours["gpt_eval_llava_complex"] == 57.1  # (9,6) (-1,-1) (-1,-1): 1.333 / 2.333
    assert (ours["gpt4_score/all"], ours["model_score/all"]) == (2.812, 3.438)
    assert (ours["judge/failed"], ours["judge/unparsed"]) == (2, 2)


def test_reviews_log(endpoint, data, tmp_path):
    rows = data.rows_without_images()
    bench = attach_judge(get_benchmark("llava_in_the_wild"), JudgeOptions("judge-x"), tmp_path / "reviews")
    score(bench, [{**row, "prediction": p} for row, p in zip(rows, _predictions())])
    entries = [json.loads(line) for line in (tmp_path / "reviews" / "reviews.jsonl").read_text().splitlines()]
    assert [entry["question_id"] for entry in entries] == [str(n) for n in range(8)]
    assert [entry["score"] for entry in entries] == [
        [8.0, 7.0], [1.0, 9.0], [9.0, 6.0], [8.5, 9.5], [-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0]
    ]  # fmt: skip
    first, failed = entries[0], entries[6]
    assert first["prompt"] == endpoint.requests[0]["messages"][0]["content"]
    assert first["prompt"].startswith("[Context]\nA man irons clothes") and first["prompt"].endswith(
        "judgment.\n\n"
    )
    assert (first["review"], first["judge_model"], first["answered_by"], first["tries"]) == (
        REVIEWS["P0"],
        "judge-x",
        "judge-x-served",
        1,
    )
    assert failed["review"] is None and "Error code: 400" in failed["error"] and failed["tries"] == 5
    assert all(entry["temperature"] == 0.0 for entry in entries)


def test_caption_list_and_empty_prediction_as_lmms_eval(lmms_utils, endpoint, tmp_path):
    row = {**_rows()[0], "caption": ["A man irons.", "A yellow taxi."]}
    endpoint.reply = lambda body: "6 2"
    theirs = lmms_utils.llava_process_results(row, [""])
    ours = attach_judge(get_benchmark("llava_in_the_wild"), JudgeOptions(), None).process_results(row, " \n ")
    first, second = endpoint.requests
    assert (
        first == second and "[Context]\nA man irons.\nA yellow taxi.\n\n" in first["messages"][0]["content"]
    )
    assert ours["scores"] == tuple(theirs["gpt_eval_llava_conv"]["scores"]) == (6.0, 2.0)


@pytest.mark.parametrize(
    "review",
    ["8 7", "8 7\n9 9", "  10 10  \nok", "Assistant 1: 8/10, Assistant 2: 7/10", "8,7", "8;7", "8, 7.5 6",
     "-1 5", "1e3 2", "8.5.5 3", "Scores: 7 and 8", "(8, 9)", "7", "", "\n8 7", "no numbers", "8\n7", "٣ ٤",
     "7/10 8/10", "1.0 2.", "Assistant 1 receives 8"],
)  # fmt: skip
def test_review_parsing_matches_lmms_eval(lmms_eval_task, review):
    theirs = lmms_eval_task(TASK)._parse_comparative_scores(review).metadata["scores"]
    ours = parse_review(review)
    assert (list(ours) if ours is not None else [-1, -1]) == theirs


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # lmms-eval's mean of no rows
def test_relative_score_matches_lmms_eval(lmms_eval_task):
    utils = lmms_eval_task(TASK)
    generator = random.Random(0)
    cases = [
        [(8, 7)],
        [(0, 5)],  # GPT-4 mean 0: lmms-eval's division fails, None
        [(-1, -1)] * 3,  # every call failed: 100.0
        [(8, -999), (6, 5)],  # -999 marks another category's row: dropped
        [(-999, -999)],
        [(7.5, 8.25), (9, 10), (-1, -1)],
    ]
    for _ in range(200):
        cases.append(
            [(generator.randint(1, 10), generator.randint(1, 10)) for _ in range(generator.randint(1, 40))]
        )
    for pairs in cases:
        theirs = utils.llava_aggregation([{"scores": list(pair)} for pair in pairs], "x")
        ours = relative_score(pairs)
        assert (ours[2] if ours is not None else None) == theirs, pairs
    assert relative_score([(-1, -1)] * 3)[2] == 100.0
    assert relative_score([]) is None and relative_score([(0, 5)]) is None


def test_bad_rows_are_refused(endpoint):
    bench = attach_judge(get_benchmark("llava_in_the_wild"), JudgeOptions(), None)
    with pytest.raises(DataError, match=r"question '0': category 'chat' is not one of"):
        bench.process_results({**_rows()[0], "category": "chat"}, "x")
    with pytest.raises(DataError, match=r"question '0': 'caption' is None"):
        bench.process_results({**_rows()[0], "caption": None}, "x")
    assert endpoint.requests == []


def test_eval_score_cli(endpoint, data, tmp_path, capsys, monkeypatch):
    predictions = tmp_path / "run" / "predictions.jsonl"
    predictions.parent.mkdir()
    predictions.write_text(
        "".join(
            json.dumps({"question_id": str(n), "prediction": p}) + "\n" for n, p in enumerate(_predictions())
        )
    )
    argv = ["eval", "score", "llava_in_the_wild", "--data", data.source, "--predictions", str(predictions)]
    assert main([*argv, "--json", "--judge-model", "judge-y", "--judge-base-url", endpoint.url]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["gpt_eval_llava_all"] == 122.3 and metrics["judge/failed"] == 2
    assert {request["model"] for request in endpoint.requests} == {"judge-y"}
    assert len((predictions.parent / "reviews.jsonl").read_text().splitlines()) == 8

    monkeypatch.delenv("OPENAI_API_KEY")
    requests = len(endpoint.requests)
    assert main(argv) == 2
    assert "llava_in_the_wild is scored by an LLM judge: set OPENAI_API_KEY" in capsys.readouterr().err
    assert len(endpoint.requests) == requests
