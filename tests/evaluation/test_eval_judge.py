"""The LLM judge against a real local OpenAI-compatible endpoint: the request body equals the one lmms-eval's own
provider sends, lmms-eval's retry counts, configuration from flags and lmms-eval's environment, the missing-key
error, and the reviews log."""

from __future__ import annotations

import json
import time

import pytest
from judge_stub import stub_endpoint

from llavakit.errors import ConfigError, DataError
from llavakit.evaluation.judge import DEFAULT_BASE_URL, Judge, JudgeOptions, attach_judge
from llavakit.evaluation.registry import get_benchmark

ENV = ("OPENAI_API_KEY", "OPENAI_API_URL", "OPENAI_BASE_URL", "MODEL_VERSION", "API_TYPE")


@pytest.fixture
def endpoint(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # lmms-eval's and the openai client's waits
    with stub_endpoint() as stub:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        monkeypatch.setenv("OPENAI_API_URL", stub.url)
        yield stub


def _lmms_eval_request(prompt: str, model: str, temperature: float, max_tokens: int) -> str:
    """What lmms-eval's OpenAI provider returns for ``prompt`` (its environment points at the stub)."""
    from lmms_eval.llm_judge import Request, ServerConfig, get_server

    config = ServerConfig(model_name=model, temperature=temperature, max_tokens=max_tokens)
    server = get_server("openai", config)
    return server.evaluate(Request(messages=[{"role": "user", "content": prompt}], config=config)).content


@pytest.mark.parametrize(
    ("model", "temperature", "max_tokens"),
    [("gpt-4o-2024-11-20", 0.0, 1024), ("gpt-4-0613", 0.5, 128), ("o3-mini", 0.0, 128), ("gpt-5", 1.0, 64)],
)
def test_request_body_equals_lmms_eval(endpoint, model, temperature, max_tokens):
    prompt = "[Context]\nA cat.\n\n[Question]\nWhat?  \n"
    endpoint.reply = lambda body: "  7 8\nfine  "
    theirs = _lmms_eval_request(prompt, model, temperature, max_tokens)
    judge = Judge(model, "sk-test", endpoint.url)
    ours = judge.ask(prompt, temperature, max_tokens, attempts=5, retry_delay=2.0)
    assert endpoint.requests[0] == endpoint.requests[1]
    assert endpoint.paths == ["/v1/chat/completions"] * 2
    assert ours.content == theirs == "7 8\nfine"
    assert ours.model == f"{model}-served" and ours.tries == 1 and not ours.failed
    body = endpoint.requests[1]
    assert body["messages"] == [{"role": "user", "content": prompt}]
    if model.startswith(("o3", "gpt-5")):  # reasoning models: no temperature, max_completion_tokens
        assert body == {"model": model, "messages": body["messages"], "max_completion_tokens": max_tokens}
    else:
        assert body == {
            "model": model,
            "messages": body["messages"],
            "max_tokens": max_tokens,
            "temperature": temperature,
        }


@pytest.mark.parametrize(("status", "requests_per_try"), [(400, 1), (500, 3)])
def test_failed_requests_retry_as_lmms_eval(endpoint, status, requests_per_try):
    """5 tries; the openai client retries a 500 twice more per try (lmms-eval builds it with its defaults)."""
    endpoint.reply = lambda body: status
    from openai import APIStatusError

    with pytest.raises(APIStatusError):
        _lmms_eval_request("q", "gpt-4o-2024-11-20", 0.0, 1024)
    theirs = len(endpoint.requests)
    endpoint.requests.clear()
    sleeps: list[float] = []
    judge = Judge("gpt-4o-2024-11-20", "sk-test", endpoint.url, sleep=sleeps.append)
    exchange = judge.ask("q", 0.0, 1024, attempts=5, retry_delay=2.0)
    assert len(endpoint.requests) == theirs == 5 * requests_per_try
    assert exchange.failed and exchange.content is None and exchange.model == "" and exchange.tries == 5
    assert f"Error code: {status}" in exchange.error
    assert sleeps == [2.0] * 4


def test_reply_without_content_is_a_failed_try(endpoint):
    replies = iter([None, None, "9 8"])
    endpoint.reply = lambda body: next(replies)
    sleeps: list[float] = []
    exchange = Judge("m", "sk-test", endpoint.url, sleep=sleeps.append).ask("q", 0.0, 16, 5, 10.0)
    assert exchange.content == "9 8" and exchange.tries == 3 and exchange.error is None
    assert sleeps == [10.0, 10.0]

    endpoint.reply = lambda body: None
    exchange = Judge("m", "sk-test", endpoint.url, sleep=sleeps.append).ask("q", 0.0, 16, 2, 10.0)
    assert exchange.failed and "no message content" in exchange.error


def test_empty_reply_is_an_answer(endpoint):
    endpoint.reply = lambda body: "   "
    exchange = Judge("m", "sk-test", endpoint.url).ask("q", 0.0, 16, 5, 2.0)
    assert exchange.content == "" and not exchange.failed and len(endpoint.requests) == 1


def test_configuration_from_flags_and_environment(endpoint, monkeypatch, tmp_path):
    judge = attach_judge(get_benchmark("mmvet"), JudgeOptions(), tmp_path).judge
    assert (judge.model, judge.base_url) == ("gpt-4o-2024-11-20", endpoint.url)
    assert judge.reviews_path == tmp_path / "reviews.jsonl"

    monkeypatch.setenv("MODEL_VERSION", "gpt-4-0613")
    monkeypatch.delenv("OPENAI_API_URL")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    judge = attach_judge(get_benchmark("llava_in_the_wild"), JudgeOptions(), None).judge
    assert (judge.model, judge.base_url, judge.reviews_path) == ("gpt-4-0613", "http://127.0.0.1:9/v1", None)

    monkeypatch.setenv("OPENAI_API_URL", "http://127.0.0.1:8/v1")  # lmms-eval's name wins over the client's
    judge = attach_judge(get_benchmark("mmvet"), JudgeOptions(), None).judge
    assert judge.base_url == "http://127.0.0.1:8/v1"

    judge = attach_judge(get_benchmark("mmvet"), JudgeOptions("my-judge", endpoint.url), None).judge
    assert (judge.model, judge.base_url) == ("my-judge", endpoint.url)

    for name in ("OPENAI_API_URL", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name)
    assert attach_judge(get_benchmark("mmvet"), JudgeOptions(), None).judge.base_url == DEFAULT_BASE_URL


def test_rule_based_benchmarks_need_no_judge(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    pope = get_benchmark("pope")
    assert attach_judge(pope, JudgeOptions(), None) is pope


@pytest.mark.parametrize("key", [None, ""])
@pytest.mark.parametrize("benchmark", ["llava_in_the_wild", "mmvet"])
def test_missing_api_key_is_a_config_error(monkeypatch, benchmark, key):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    if key is not None:
        monkeypatch.setenv("OPENAI_API_KEY", key)
    with pytest.raises(ConfigError, match=f"{benchmark} is scored by an LLM judge: set OPENAI_API_KEY"):
        attach_judge(
            get_benchmark(benchmark), JudgeOptions(model="m", base_url="http://127.0.0.1:1/v1"), None
        )


def test_other_api_types_are_refused(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("API_TYPE", "azure")
    with pytest.raises(ConfigError, match="API_TYPE='azure' is not supported"):
        attach_judge(get_benchmark("mmvet"), JudgeOptions(), None)


def test_unattached_benchmark_refuses_to_score():
    row = {"question_id": "v1_0", "question": "q", "answer": "a", "capability": "rec"}
    with pytest.raises(ConfigError, match="mmvet is scored by an LLM judge and none is attached"):
        get_benchmark("mmvet").process_results(row, "a")


def test_registry_values_stay_unconfigured(endpoint, tmp_path):
    attached = attach_judge(get_benchmark("mmvet"), JudgeOptions(), tmp_path)
    assert attached is not get_benchmark("mmvet") and attached.judge is not None
    assert get_benchmark("mmvet").judge is None and attached.id == "mmvet"


def test_reviews_log(endpoint, tmp_path):
    endpoint.reply = lambda body: "0.7"
    judge = Judge("gpt-4o-2024-11-20", "sk-test", endpoint.url, reviews_dir=tmp_path / "out")
    exchange = judge.ask("grade this", 0.5, 128, 5, 10.0)
    judge.record("mmvet", "v1_3", "grade this", 0.5, exchange, 0.7)
    judge.record("mmvet", "v1_4", "again", 0.0, judge.ask("again", 0.0, 128, 5, 10.0), 0.7)
    lines = (tmp_path / "out" / "reviews.jsonl").read_text(encoding="utf-8").splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["question_id"] for e in entries] == ["v1_3", "v1_4"]
    first = entries[0]
    assert {k: first[k] for k in first if k != "time"} == {
        "benchmark": "mmvet",
        "question_id": "v1_3",
        "judge_model": "gpt-4o-2024-11-20",
        "answered_by": "gpt-4o-2024-11-20-served",
        "temperature": 0.5,
        "prompt": "grade this",
        "review": "0.7",
        "error": None,
        "tries": 1,
        "score": 0.7,
    }


def test_logged_replies_are_reused_not_sent_again(endpoint, tmp_path):
    endpoint.reply = lambda body: "" if "empty" in body["messages"][0]["content"] else "0.7"
    first = Judge("gpt-4o-2024-11-20", "sk-test", endpoint.url, reviews_dir=tmp_path)
    for prompt in ("grade this", "empty reply"):
        first.record("mmvet", prompt, prompt, 0.0, first.ask(prompt, 0.0, 128, 5, 10.0), None)
    assert len(endpoint.requests) == 2

    again = Judge("gpt-4o-2024-11-20", "sk-test", endpoint.url, reviews_dir=tmp_path)
    reused = again.ask("grade this", 0.0, 128, 5, 10.0)
    assert (reused.content, reused.model, reused.reused) == ("0.7", "gpt-4o-2024-11-20-served", True)
    again.record("mmvet", "q", "grade this", 0.0, reused, 0.7)
    assert len(endpoint.requests) == 2 and len((tmp_path / "reviews.jsonl").read_text().splitlines()) == 2
    # An empty reply, another temperature or another judge model is asked for real.
    assert not again.ask("empty reply", 0.0, 128, 5, 10.0).reused
    assert not again.ask("grade this", 0.5, 128, 5, 10.0).reused
    other_model = Judge("gpt-4-0613", "sk-test", endpoint.url, reviews_dir=tmp_path)
    assert not other_model.ask("grade this", 0.0, 128, 5, 10.0).reused
    assert len(endpoint.requests) == 5


def test_a_corrupt_reviews_log_is_refused_naming_its_line(endpoint, tmp_path):
    entry = {"judge_model": "m", "temperature": 0.0, "prompt": "p", "review": "0.5", "answered_by": "m"}
    (tmp_path / "reviews.jsonl").write_text(json.dumps(entry) + "\n{not json\n")
    with pytest.raises(DataError, match=r"reviews\.jsonl:2: not a judge review record .*delete the file"):
        Judge("m", "sk-test", endpoint.url, reviews_dir=tmp_path)
