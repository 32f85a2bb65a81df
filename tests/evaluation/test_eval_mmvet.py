"""MM-Vet: lmms-eval's own ``mmvet_process_results`` / ``mmvet_aggregate_results`` and ours, run against the same
local judge endpoint with the same canned grades, must give the same scores (and per-capability means, which
lmms-eval only logs) and send the same requests, apart from lmms-eval's discarded extra request; plus the grade
parsing, the retry and temperature ladder, failure counts, reviews.jsonl, and ``llavakit eval`` end to end."""

from __future__ import annotations

import importlib
import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from eval_fixtures import lmms_eval_metrics, png_bytes, write_parquet
from judge_stub import by_marker, stub_endpoint

from llavakit.cli.main import main
from llavakit.errors import DataError
from llavakit.evaluation import score
from llavakit.evaluation.judge import JudgeOptions, attach_judge
from llavakit.evaluation.mmvet import GRADER_PROMPT, grader_prompt, parse_grade
from llavakit.evaluation.registry import get_benchmark
from llavakit.evaluation.sources import load_benchmark_data

ENV = ("OPENAI_API_KEY", "OPENAI_API_URL", "OPENAI_BASE_URL", "MODEL_VERSION", "API_TYPE")
CAPABILITIES = ["rec,ocr", "ocr", "rec,know,gen", "ocr,spat,math", "rec,spat", "ocr,math", "rec",
                "rec,ocr,know,gen", "ocr", "spat,ocr"]  # fmt: skip


def _replies() -> dict:
    """The judge's grade for each prediction (marked P0, ...), by temperature; fresh state per run."""
    asked: Counter = Counter()

    def empty_first(temperature: float) -> str:
        asked["P9"] += 1
        return "" if asked["P9"] == 1 else "0.7"

    replies = {
        "P0": "0.8",
        "P1": "1.0 The prediction matches.",
        "P2": lambda t: "0.5." if t == 0.0 else "0.6",  # unreadable at 0.0, read at 0.5
        "P3": "Correct",  # never a number: 0.0 after four temperatures
        "P4": "",  # empty three times: 0.0
        "P5": 400,  # every try fails: 0.0
        "P6": "0.3\nThe prediction is partly right.",  # the text before the first space is "0.3\nThe"
        "P7": "1e-1 close",
        "P8": None,  # no content: failed tries
        "P9": empty_first,  # empty once, then "0.7"
    }
    return {f"| P{index} answer |": replies[f"P{index}"] for index in range(len(replies))}


def _rows() -> list[dict]:
    return [
        {
            "question_id": f"v1_{number}",
            "image": png_bytes(),
            "question": f"What is x in equation {number}?",
            "answer": "-1<AND>-5" if number % 2 else "7<OR>seven",
            "image_source": f"img_{number}.png",
            "capability": capability,
        }
        for number, capability in enumerate(CAPABILITIES)
    ]


def _predictions() -> list[str]:
    # Surrounding white space: lmms-eval strips generated answers before mmvet_process_results sees them.
    return [f" P{number} answer\n" for number in range(len(CAPABILITIES))]


@pytest.fixture
def sleeps(monkeypatch):
    waited: list[float] = []
    monkeypatch.setattr(time, "sleep", waited.append)
    return waited


@pytest.fixture
def endpoint(monkeypatch, sleeps):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    with stub_endpoint() as stub:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        monkeypatch.setenv("OPENAI_API_URL", stub.url)
        stub.reply = by_marker(_replies())
        yield stub


@pytest.fixture
def lmms_utils(lmms_eval_task, monkeypatch, endpoint):
    """lmms-eval's task module, its judge server rebuilt against the stub."""
    from lmms_eval.llm_judge import ServerConfig, get_server

    utils = lmms_eval_task("mmvet")
    config = ServerConfig(model_name=utils.MODEL_VERSION, temperature=0.0, max_tokens=128)
    monkeypatch.setattr(utils, "server", get_server("openai", config))
    return utils


@pytest.fixture
def data(tmp_path):
    path = write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", _rows())
    return load_benchmark_data(get_benchmark("mmvet"), str(path.parent))


def _lmms_yaml() -> dict:
    folder = Path(importlib.import_module("lmms_eval.tasks.mmvet.utils").__file__).parent
    lines = (folder / "mmvet.yaml").read_text(encoding="utf-8").splitlines()
    return yaml.safe_load("\n".join(line for line in lines if "!function" not in line))


def _marker(body: dict) -> str:
    return re.search(r"\| (P\d+) answer \|$", body["messages"][0]["content"]).group(1)


def _run_lmms_eval(utils, rows, predictions) -> tuple[dict, dict[str, float]]:
    """lmms-eval's metric, and the per-capability scores it logs."""
    from loguru import logger

    logged: list[str] = []
    sink = logger.add(logged.append, format="{message}")
    try:
        metrics = lmms_eval_metrics(
            utils.mmvet_process_results, {"gpt_eval_score": utils.mmvet_aggregate_results}, rows, predictions
        )
    finally:
        logger.remove(sink)
    found = [re.match(r"Score for (\w+): ([\d.]+)", line) for line in logged]
    pairs = [(match.group(1), float(match.group(2))) for match in found if match]
    # The six capabilities are logged first, then the 16 combinations (which reuse the names "rec" and "ocr").
    scores = {f"capability/{name}": value for name, value in pairs[:6]}
    return metrics, {**scores, **{f"capability_detail/{name}": value for name, value in pairs[6:]}}


def test_task_settings_match_lmms_eval(lmms_eval_task, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")  # lmms-eval's module builds its judge client on import
    config = _lmms_yaml()
    bench = get_benchmark("mmvet")
    assert (bench.dataset, bench.split) == (config["dataset_path"], config["test_split"])
    assert bench.max_new_tokens == config["generation_kwargs"]["max_new_tokens"] == 1024
    assert "until" not in config["generation_kwargs"] and bench.until == ("\n\n",)
    assert list(bench.headline) == [metric["metric"] for metric in config["metric_list"]]
    utils = lmms_eval_task("mmvet")
    kwargs = config["lmms_eval_specific_kwargs"]["default"]
    for row in _rows():
        assert bench.doc_to_text(row) == utils.doc_to_text(row, kwargs)
        assert bench.doc_to_text(row).startswith("First please perform reasoning")
    assert GRADER_PROMPT == utils.MM_VET_PROMPT
    assert bench.judge_model == utils.MODEL_VERSION == "gpt-4o-2024-11-20"


def test_scores_and_requests_equal_lmms_eval(lmms_utils, endpoint, data, tmp_path):
    rows = data.rows_without_images()
    predictions = _predictions()
    theirs, their_capabilities = _run_lmms_eval(lmms_utils, rows, [p.strip() for p in predictions])
    their_requests = list(endpoint.requests)
    endpoint.requests.clear()
    endpoint.reply = by_marker(_replies())

    bench = attach_judge(get_benchmark("mmvet"), JudgeOptions(), tmp_path)
    ours = score(bench, [{**row, "prediction": p} for row, p in zip(rows, predictions)])

    assert ours["gpt_eval_score"] == theirs["gpt_eval_score"]
    # By hand: 0.8 + 1.0 + 0.6 + 0.1 + 0.7 over ten rows.
    assert ours["gpt_eval_score"] == pytest.approx(32.0)
    assert len(their_capabilities) == 6 + 16
    for key, value in their_capabilities.items():  # lmms-eval logs 0.00 where no row has it; we leave it out
        assert round(ours.get(key, 0.0), 2) == value, key
    assert ours["capability/rec"] == pytest.approx((0.8 + 0.6 + 0.0 + 0.0 + 0.1) / 5 * 100)  # rows 0 2 4 6 7
    assert "capability_detail/rec_gen_know" in ours and "capability_detail/rec_spat_know" not in ours
    assert (ours["judge/failed"], ours["judge/unparsed"]) == (3, 2)  # P4 P5 P8; P3 P6

    # Same request bodies; lmms-eval also sends a discarded request after each unreadable grade (the last at 2.0).
    def distinct(requests):
        return list(dict.fromkeys(json.dumps(body, sort_keys=True) for body in requests))

    assert distinct(endpoint.requests) == [
        body for body in distinct(their_requests) if json.loads(body)["temperature"] != 2.0
    ]
    ours_per_row = Counter(_marker(body) for body in endpoint.requests)
    theirs_per_row = Counter(_marker(body) for body in their_requests)
    for marker in ("P0", "P1", "P4", "P5", "P7", "P8", "P9"):  # no unreadable grade: identical requests
        assert ours_per_row[marker] == theirs_per_row[marker], marker
    assert [ours_per_row[m] for m in ("P0", "P2", "P3", "P4", "P5", "P8", "P9")] == [1, 2, 4, 3, 15, 15, 2]
    assert [theirs_per_row[m] for m in ("P2", "P3", "P6")] == [3, 8, 8]
    temperatures = [body["temperature"] for body in endpoint.requests if _marker(body) == "P3"]
    assert temperatures == [0.0, 0.5, 1.0, 1.5]
    assert {body["max_tokens"] for body in endpoint.requests} == {128}


def test_rate_limit_waits_as_lmms_eval(lmms_utils, endpoint, sleeps, tmp_path):
    row = _rows()[0]
    endpoint.reply = lambda body: 429
    theirs = lmms_utils.mmvet_process_results(row, ["P0 answer"])["gpt_eval_score"]["score"]
    their_sleeps, their_requests = Counter(sleeps), len(endpoint.requests)
    sleeps.clear()
    endpoint.requests.clear()
    ours = attach_judge(get_benchmark("mmvet"), JudgeOptions(), None).process_results(row, "P0 answer")
    assert ours["score"] == theirs == 0.0 and ours["judge_failed"] == 1
    assert len(endpoint.requests) == their_requests == 3 * 5 * 3  # patience x tries x (1 + client retries)
    assert Counter(sleeps)[10.0] == their_sleeps[10.0] == 3 * 4  # between tries
    assert Counter(sleeps)[5.0] == their_sleeps[5.0] == 3  # after a "Rate limit" error


@pytest.mark.parametrize("reply", ["5", "nan", "1.5 too high", "-0.1", "0_5"])
def test_out_of_range_grade_ends(endpoint, reply):
    """lmms-eval asks again forever at the same temperature; we raise it, as for an unreadable grade."""
    endpoint.reply = lambda body: reply
    result = attach_judge(get_benchmark("mmvet"), JudgeOptions(), None).process_results(_rows()[0], "x")
    assert (result["score"], result["judge_unparsed"], result["judge_failed"]) == (0.0, 1, 0)
    assert [body["temperature"] for body in endpoint.requests] == [0.0, 0.5, 1.0, 1.5]


@pytest.mark.parametrize(
    ("reply", "grade"),
    [("0.8", 0.8), ("1", 1.0), ("0", 0.0), ("1.0 because", 1.0), ("0.8.", None), ("0.8,", None),
     ("0.3\nBecause", None), ("1e-1", 0.1), ("0_5", None), ("nan", None), ("-0.0", 0.0), ("Correct: 1.0", None),
     ("0.5\tok", None), ("", None)],
)  # fmt: skip
def test_grade_parsing(reply, grade):
    assert parse_grade(reply) == grade


def test_grader_prompt_by_hand():
    prompt = grader_prompt("What is x?", "-1<AND>-5<OR>five", "x = -1")
    assert prompt.endswith("| 1.0\n\nWhat is x? | -1 <AND> -5 <OR> five | x = -1 |")
    assert prompt.startswith("Compare the ground truth and prediction from AI models")
    assert "\ngpt_query_prompt | Ground truth | Prediction | Correctness\n" in prompt


def test_reviews_log(endpoint, data, tmp_path):
    rows = data.rows_without_images()
    bench = attach_judge(get_benchmark("mmvet"), JudgeOptions(), tmp_path)
    score(bench, [{**row, "prediction": p} for row, p in zip(rows, _predictions())])
    entries = [json.loads(line) for line in (tmp_path / "reviews.jsonl").read_text().splitlines()]
    # One entry per request; the 5 tries of each of the 3 failed requests of P5 and P8 make one entry each.
    assert len(endpoint.requests) == 48 and len(entries) == 48 - 2 * 3 * 4
    by_row = {}
    for entry in entries:
        by_row.setdefault(entry["question_id"], []).append(entry)
    assert [(e["review"], e["score"]) for e in by_row["v1_2"]] == [("0.5.", None), ("0.6", 0.6)]
    assert [e["temperature"] for e in by_row["v1_2"]] == [0.0, 0.5]
    assert [(e["review"], e["error"] is not None, e["tries"]) for e in by_row["v1_5"]] == [
        (None, True, 5)
    ] * 3
    assert [e["review"] for e in by_row["v1_4"]] == ["", "", ""]
    assert by_row["v1_0"][0]["prompt"] == grader_prompt(rows[0]["question"], rows[0]["answer"], "P0 answer")


def test_capability_lists_and_bad_rows(endpoint):
    bench = attach_judge(get_benchmark("mmvet"), JudgeOptions(), None)
    row = {**_rows()[0], "capability": ["rec", "ocr"]}
    assert bench.process_results(row, "P0 answer")["capability"] == "rec,ocr"
    with pytest.raises(DataError, match=r"mmvet question 'v1_0': 'capability' is None"):
        bench.process_results({**row, "capability": None}, "P0 answer")


def test_eval_end_to_end(endpoint, data, checkpoint, tmp_path, capsys, monkeypatch):
    endpoint.reply = lambda body: "0.5"
    out = tmp_path / "out"
    argv = ["eval", "--model", str(checkpoint), "--benchmark", "mmvet", "--data", data.source, "--out", str(out),
            "--limit", "3", "--max-new-tokens", "3", "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main([*argv, "--judge-model", "judge-z"]) == 0
    summary = json.loads((out / "metrics.json").read_text())["benchmarks"]["mmvet"]["metrics"]
    assert summary["gpt_eval_score"] == 50.0 and summary["judge/failed"] == 0
    reviews = [json.loads(line) for line in (out / "mmvet" / "reviews.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in reviews] == ["v1_0", "v1_1", "v1_2"]
    assert {body["model"] for body in endpoint.requests} == {"judge-z"}
    predictions = [
        json.loads(line) for line in (out / "mmvet" / "predictions.jsonl").read_text().splitlines()
    ]
    assert all(f"| {p['prediction'].strip()} |" in r["prompt"] for p, r in zip(predictions, reviews))

    monkeypatch.delenv("OPENAI_API_KEY")
    missing = ["eval", "--model", str(tmp_path / "no-such-model"), "--benchmark", "mmvet", "--out", str(out)]
    assert main(missing) == 2
    assert "mmvet is scored by an LLM judge: set OPENAI_API_KEY" in capsys.readouterr().err
