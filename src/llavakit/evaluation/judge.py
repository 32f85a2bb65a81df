"""The LLM judge of the judge-scored benchmarks (LLaVA-Bench-in-the-Wild, MM-Vet), as lmms-eval 0.7.3 calls it.

lmms-eval scores those tasks by asking an OpenAI chat model (``lmms_eval.llm_judge.providers.openai``): one
``chat.completions`` request per question, the whole grading prompt as one user message, and the task's
temperature and ``max_tokens`` (``max_completion_tokens`` and no temperature for reasoning models, ``gpt-5*``,
``o1``/``o3``/``o4``*, which reject the others). `Judge` sends that same request body to any OpenAI-compatible
endpoint with the ``openai`` client, with lmms-eval's retry loop: ``attempts`` tries, ``retry_delay`` seconds
apart, where a raised error or a reply without message content (lmms-eval's ``content.strip()`` fails on None)
is a failed try. Each try is itself retried by the ``openai`` client (2 retries by default, as lmms-eval builds it).

Configuration (explicit arguments first, then the environment lmms-eval reads):

- API key: ``OPENAI_API_KEY`` only (never a command-line flag). Unset or empty is a `ConfigError` raised when
  the judge is built -- before any model loads -- where lmms-eval 0.7.3 silently scores every LLaVA-W row as a
  failed judge call and fails to load the MM-Vet task;
- endpoint: ``--judge-base-url``, else ``OPENAI_API_URL`` (lmms-eval's name), else ``OPENAI_BASE_URL`` (the
  ``openai`` client's), else ``https://api.openai.com/v1``;
- judge model: ``--judge-model``, else ``MODEL_VERSION`` (lmms-eval's name), else the benchmark's lmms-eval
  default: ``gpt-4o-2024-11-20`` for both ``llava_in_the_wild`` and ``mmvet`` in 0.7.3 (older lmms-eval and
  LLaVA's own scripts used GPT-4-0613: scores from different judges are not comparable);
- ``API_TYPE``: lmms-eval's provider switch; only ``openai`` (its default) is supported here -- Azure and other
  providers are refused rather than sent an OpenAI request.

A request that still fails after the retries is returned as a failed `Exchange`; the benchmark scores the row
as lmms-eval scores a failed judge call and counts it. Every exchange is appended, with the parsed score, to
``reviews.jsonl`` in the folder the judge is given (``OUT/<benchmark>/`` under ``llavakit eval``).

Unlike lmms-eval, which asks again on every run, a judge with a folder reuses the replies already in its
``reviews.jsonl``: a request whose judge model, temperature and prompt equal a logged exchange that got a
non-empty reply is answered from the log, not sent. Resuming ``llavakit eval`` or re-running ``llavakit eval
score`` then costs no requests and gives the same metrics (a judge at temperature 0 is not deterministic); only
new or changed answers are graded. Delete ``reviews.jsonl`` to have everything graded again.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llavakit.errors import ConfigError, DataError
from llavakit.evaluation.benchmark import Benchmark

LOG = logging.getLogger(__name__)

DEFAULT_JUDGE_MODEL = "gpt-4o-2024-11-20"  # lmms-eval 0.7.3's MODEL_VERSION default
DEFAULT_BASE_URL = "https://api.openai.com/v1"  # lmms-eval's OPENAI_API_URL default
REVIEWS = "reviews.jsonl"
REASONING_PREFIXES = ("gpt-5", "o1", "o3", "o4")


@dataclass(frozen=True)
class JudgeOptions:
    """What the user chose for the judge (``--judge-model``, ``--judge-base-url``); None: environment/default."""

    model: str | None = None
    base_url: str | None = None


@dataclass(frozen=True)
class Exchange:
    """One judge request after its retries.

    Attributes:
        content: the reply's message content, stripped (None: every try failed).
        model: the model the endpoint says answered ("" when every try failed).
        error: the last try's error (None when it succeeded).
        tries: how many tries were made (0: the reply was reused from ``reviews.jsonl``).
    """

    content: str | None
    model: str
    error: str | None
    tries: int

    @property
    def reused(self) -> bool:
        return self.tries == 0

    @property
    def failed(self) -> bool:
        return self.content is None


def sampling_kwargs(model: str, temperature: float, max_tokens: int) -> dict[str, Any]:
    """lmms-eval's token-limit and temperature fields for ``model`` (reasoning models take neither of the usual)."""
    if model.startswith(REASONING_PREFIXES):
        return {"max_completion_tokens": max_tokens}
    return {"max_tokens": max_tokens, "temperature": temperature}


class Judge:
    """An OpenAI-compatible chat endpoint used as a grader, logging every exchange to ``reviews.jsonl``.

    Args:
        model: the judge model name sent in each request.
        api_key: the endpoint's key.
        base_url: the endpoint (``.../v1``).
        reviews_dir: folder for ``reviews.jsonl`` (None: exchanges are not logged).
        client_retries: the ``openai`` client's own retries per try (its default, 2, as lmms-eval uses).
        timeout: seconds per HTTP request (None: the ``openai`` client's default, as lmms-eval).
        sleep: waits between tries (None: `time.sleep`; tests pass a recorder).
    """

    def __init__(
        self,
        model: str,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        reviews_dir: Path | None = None,
        client_retries: int = 2,
        timeout: float | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        from openai import OpenAI

        if not api_key:
            raise ConfigError("the LLM judge needs an API key: set OPENAI_API_KEY")
        self.model = model
        self.base_url = base_url
        self.reviews_path = None if reviews_dir is None else Path(reviews_dir) / REVIEWS
        self.logged = _logged_replies(self.reviews_path)
        self.sleep = sleep or _sleep
        extra = {} if timeout is None else {"timeout": timeout}
        self._client = OpenAI(api_key=api_key, base_url=base_url, max_retries=client_retries, **extra)

    @classmethod
    def from_env(
        cls,
        options: JudgeOptions,
        default_model: str,
        reviews_dir: Path | None = None,
        benchmark_id: str = "",
    ) -> Judge:
        """The judge ``options`` and the environment describe (see the module docstring for the order)."""
        what = f"{benchmark_id} is scored by an LLM judge" if benchmark_id else "the LLM judge"
        api_type = os.environ.get("API_TYPE", "openai")
        if api_type != "openai":
            raise ConfigError(
                f"{what}: API_TYPE={api_type!r} is not supported; only OpenAI-compatible chat endpoints are "
                "(unset API_TYPE and point --judge-base-url or OPENAI_API_URL at the endpoint)"
            )
        api_key = os.environ.get("OPENAI_API_KEY", "")
        if not api_key:
            raise ConfigError(
                f"{what}: set OPENAI_API_KEY (the key of the OpenAI-compatible endpoint; choose the endpoint with "
                "--judge-base-url or OPENAI_API_URL and the model with --judge-model or MODEL_VERSION)"
            )
        base_url = (
            options.base_url
            or os.environ.get("OPENAI_API_URL")
            or os.environ.get("OPENAI_BASE_URL")
            or DEFAULT_BASE_URL
        )
        model = options.model or os.environ.get("MODEL_VERSION") or default_model
        return cls(model, api_key, base_url, reviews_dir)

    def request_body(self, prompt: str, temperature: float, max_tokens: int) -> dict[str, Any]:
        """The chat-completions body for ``prompt``: one user message, as lmms-eval's provider builds it."""
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            **sampling_kwargs(self.model, temperature, max_tokens),
        }

    def ask(
        self, prompt: str, temperature: float, max_tokens: int, attempts: int, retry_delay: float
    ) -> Exchange:
        """Send ``prompt``; up to ``attempts`` tries ``retry_delay`` seconds apart (lmms-eval's provider loop)."""
        logged = self.logged.get((self.model, temperature, prompt))
        if logged is not None:
            return Exchange(logged[0], logged[1], None, 0)
        body = self.request_body(prompt, temperature, max_tokens)
        error = ""
        for attempt in range(1, attempts + 1):
            try:
                response = self._client.chat.completions.create(**body)
                content = response.choices[0].message.content
                if content is None:
                    raise ValueError("the judge's reply has no message content")
                return Exchange(content.strip(), response.model or "", None, attempt)
            except Exception as err:  # noqa: BLE001 - any failure is a failed try, as in lmms-eval
                error = f"{type(err).__name__}: {err}"
                LOG.warning("judge request %d/%d failed: %s", attempt, attempts, error)
                if attempt < attempts:
                    self.sleep(retry_delay)
        return Exchange(None, "", error, attempts)

    def record(
        self,
        benchmark_id: str,
        question_id: Any,
        prompt: str,
        temperature: float,
        exchange: Exchange,
        score: Any,
    ) -> None:
        """Append one exchange and the score read from it to ``reviews.jsonl`` (when the judge has a folder and
        the exchange was not reused from it)."""
        if self.reviews_path is None or exchange.reused:
            return
        entry = {
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "benchmark": benchmark_id,
            "question_id": question_id,
            "judge_model": self.model,
            "answered_by": exchange.model,
            "temperature": temperature,
            "prompt": prompt,
            "review": exchange.content,
            "error": exchange.error,
            "tries": exchange.tries,
            "score": score,
        }
        self.reviews_path.parent.mkdir(parents=True, exist_ok=True)
        with self.reviews_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")


def _logged_replies(path: Path | None) -> dict[tuple[str, float, str], tuple[str, str]]:
    """(judge model, temperature, prompt) → (reply, answering model) of the exchanges in ``path`` that got a
    non-empty reply; a line that is not such a record is an error naming it."""
    if path is None or not path.is_file():
        return {}
    replies = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            entry = json.loads(line)
            key = (entry["judge_model"], float(entry["temperature"]), entry["prompt"])
            review, answered_by = entry["review"], entry["answered_by"]
        except (ValueError, TypeError, KeyError) as err:
            raise DataError(
                f"{path}:{number}: not a judge review record ({type(err).__name__}: {err}); delete the file to "
                "have every answer graded again"
            ) from err
        if review:
            replies[key] = (review, answered_by)
    return replies


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


class JudgedBenchmark(Benchmark):
    """A benchmark whose `process_results` asks an LLM judge; `attach_judge` gives it one.

    Attributes:
        judge_model: lmms-eval's default judge model for the task.
        judge: the attached judge (None: scoring refuses with a `ConfigError`).
    """

    judge_model: str = DEFAULT_JUDGE_MODEL
    judge: Judge | None = None

    def with_judge(self, judge: Judge) -> JudgedBenchmark:
        """A copy of this benchmark that scores with ``judge`` (registry values stay unconfigured)."""
        configured = copy.copy(self)
        configured.judge = judge
        return configured

    def require_judge(self) -> Judge:
        """The attached judge, or a `ConfigError` saying how to attach one."""
        if self.judge is None:
            raise ConfigError(
                f"{self.id} is scored by an LLM judge and none is attached: use "
                "llavakit.evaluation.judge.attach_judge (llavakit eval does it; set OPENAI_API_KEY)"
            )
        return self.judge


def attach_judge(benchmark: Benchmark, options: JudgeOptions, reviews_dir: Path | None) -> Benchmark:
    """``benchmark`` with a judge built from ``options`` and the environment when it needs one, else unchanged.

    Raises `ConfigError` when a judge is needed and none is configured (no OPENAI_API_KEY).
    """
    if not isinstance(benchmark, JudgedBenchmark):
        return benchmark
    judge = Judge.from_env(options, benchmark.judge_model, reviews_dir, benchmark.id)
    return benchmark.with_judge(judge)
