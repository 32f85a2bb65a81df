"""LLaVA-Bench (In-the-Wild): open-ended questions on 24 images, graded by an LLM judge against GPT-4's answers,
scored as lmms-eval 0.7.3's ``llava_in_the_wild`` task scores them.

Data: lmms-eval's Hub dataset (``lmms-lab-encoder/llava-bench-in-the-wild``, ``train`` split, 60 questions;
columns ``question_id``, ``question``, ``image``, ``caption`` -- the image's description, the judge's only view
of the image --, ``gpt_answer`` -- the text-only GPT-4 reference answer --, ``category``: ``conv``, ``detail`` or
``complex``, ``image_id``). ``question_id`` is unique: predictions files key rows by it.

Prompt (``llava_doc_to_text``): the question alone (the YAML's default pre/post prompts are empty). Generation:
up to 4096 new tokens, ``until`` "ASSISTANT:".

Scoring (``llava_process_results``): one judge request per question (`llavakit.evaluation.judge`), temperature 0,
``max_tokens`` 1024, 5 tries 2 s apart (lmms-eval's ``OpenAIVerifier`` settings). The message is lmms-eval's
review template ("[Context]" the caption -- a list of captions joined by newlines --, "[Question]", "[Assistant 1]"
the GPT-4 answer, "[Assistant 2]" the model's answer, stripped as lmms-eval strips every generated answer, "[System]" the rule of ``rule.json`` for
``llava_bench_<category>``, the same text for all three categories). The review's *first line*, with "," and ";"
read as spaces, must hold two numbers (``-?\\d+(?:\\.\\d+)?``): the first two are (GPT-4's score, the model's
score); otherwise both are -1.

Aggregation (``llava_aggregation``), per category and over all rows: the mean of the (GPT-4, model) pairs
(numpy), each rounded to 3 decimals, then ``round(model / GPT-4 * 100, 1)``: the *relative score*, lmms-eval's
``gpt_eval_llava_all`` / ``_conv`` / ``_detail`` / ``_complex``. No rows, or a zero GPT-4 mean, gives lmms-eval
None; we leave the key out. Breakdowns: ``gpt4_score/<category>`` and ``model_score/<category>`` (those rounded
means, 1-10) and ``judge/failed`` (requests that failed after the retries), ``judge/unparsed`` (reviews without
two scores on their first line).

Quirks of lmms-eval, kept so the numbers match:

- a failed judge call and an unparseable review both score (-1, -1), and those rows *stay in the mean*: they
  lower both means, and a category where every call failed scores 100.0. Check ``judge/failed`` and
  ``judge/unparsed`` before trusting a number;
- the first two numbers of the first line are taken wherever they are: "Assistant 1: 8/10" yields (1, 8);
- a pair holding -999 (lmms-eval's marker for "another category's row") is left out of the means;
- an empty review is parsed, not retried (scores -1, -1); a reply with no content at all is a failed try.

Differences: lmms-eval without an API key scores every row (-1, -1) silently; we refuse before the model loads.
A row whose category is not conv/detail/complex (lmms-eval would send an empty rule) or whose caption is missing
is a `DataError`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from llavakit.errors import DataError
from llavakit.evaluation.benchmark import Row
from llavakit.evaluation.judge import JudgedBenchmark

CATEGORIES = ("conv", "detail", "complex")
ROLE = "Assistant"
# rule.json's "llava_bench_conv" / "_detail" / "_complex" prompt (one text for the three).
RULE = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above. The user asks the question on observing an image. For your reference, the visual "
    "content in the image is represented with a few sentences describing the image. \n"
    "Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each assistant "
    "receives an overall score on a scale of 1 to 10, where a higher score indicates better overall performance.\n"
    "Please first output a single line containing only two values indicating the scores for Assistant 1 and 2, "
    "respectively. The two scores are separated by a space.\n"
    "In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any "
    "potential bias and ensuring that the order in which the responses were presented does not affect your "
    "judgment."
)
FAILED = (-1.0, -1.0)
OTHER_CATEGORY = -999  # lmms-eval's marker value, dropped from its means
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
TEMPERATURE = 0.0
MAX_TOKENS = 1024
ATTEMPTS = 5
RETRY_DELAY = 2.0


def review_prompt(context: str, question: str, reference: str, answer: str) -> str:
    """lmms-eval's review message: context, question, the two answers, then the rule."""
    return (
        f"[Context]\n{context}\n\n[Question]\n{question}\n\n"
        f"[{ROLE} 1]\n{reference}\n\n[End of {ROLE} 1]\n\n"
        f"[{ROLE} 2]\n{answer}\n\n[End of {ROLE} 2]\n\n"
        f"[System]\n{RULE}\n\n"
    )


def parse_review(review: str) -> tuple[float, float] | None:
    """(GPT-4's score, the model's score): the first two numbers of the review's first line; None if fewer."""
    first_line = review.strip().split("\n")[0].replace(",", " ").replace(";", " ")
    numbers = NUMBER.findall(first_line)
    if len(numbers) < 2:
        return None
    return float(numbers[0]), float(numbers[1])


def relative_score(pairs: Sequence[Sequence[float]]) -> tuple[float, float, float] | None:
    """(GPT-4 mean, model mean, relative score) as lmms-eval rounds them; None where lmms-eval gives None."""
    kept = [pair for pair in pairs if OTHER_CATEGORY not in pair]
    if not kept:
        return None
    gpt4, model = (round(value, 3) for value in np.asarray(kept, dtype=float).mean(0).tolist())
    if gpt4 == 0:
        return None
    return gpt4, model, round(model / gpt4 * 100, 1)


def _context(row: Row) -> str:
    caption = row.get("caption")
    if isinstance(caption, str):
        return caption
    if isinstance(caption, (list, tuple)) and all(isinstance(line, str) for line in caption):
        return "\n".join(caption)
    raise DataError(
        f"llava_in_the_wild question {row.get('question_id')!r}: 'caption' is {caption!r}, expected the image "
        "description (a string or a list of strings) the judge reads in place of the image"
    )


class LlavaInTheWild(JudgedBenchmark):
    """lmms-eval's ``llava_in_the_wild`` task."""

    id = "llava_in_the_wild"
    dataset = "lmms-lab-encoder/llava-bench-in-the-wild"
    split = "train"
    columns = ("question_id", "question", "caption", "gpt_answer", "category")
    id_column = "question_id"
    max_new_tokens = 4096
    until = ("ASSISTANT:",)
    headline = (
        "gpt_eval_llava_all",
        "gpt_eval_llava_conv",
        "gpt_eval_llava_detail",
        "gpt_eval_llava_complex",
    )

    def doc_to_text(self, row: Row) -> str:
        return f"{self.pre_prompt}{row['question']}{self.post_prompt}"

    def process_results(self, row: Row, prediction: str) -> dict[str, Any]:
        judge = self.require_judge()
        category = row["category"]
        if category not in CATEGORIES:
            raise DataError(
                f"llava_in_the_wild question {row['question_id']!r}: category {category!r} is not one of "
                f"{list(CATEGORIES)} (lmms-eval has a judge rule only for those)"
            )
        # lmms-eval strips generated answers before a task's process_results sees them
        prompt = review_prompt(_context(row), row["question"], row["gpt_answer"], prediction.strip())
        exchange = judge.ask(prompt, TEMPERATURE, MAX_TOKENS, ATTEMPTS, RETRY_DELAY)
        parsed = None if exchange.failed else parse_review(exchange.content)
        scores = parsed or FAILED
        judge.record(self.id, row["question_id"], prompt, TEMPERATURE, exchange, list(scores))
        return {
            "category": category,
            "scores": scores,
            "judge_failed": int(exchange.failed),
            "judge_unparsed": int(not exchange.failed and parsed is None),
        }

    def aggregate(self, results: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        groups = {"all": list(results["scores"])}
        for category in CATEGORIES:
            groups[category] = [s for c, s in zip(results["category"], results["scores"]) if c == category]
        metrics: dict[str, float] = {}
        breakdown: dict[str, float] = {}
        for name, pairs in groups.items():
            stats = relative_score(pairs)
            if stats is None:
                continue
            metrics[f"gpt_eval_llava_{name}"] = stats[2]
            breakdown[f"gpt4_score/{name}"] = stats[0]
            breakdown[f"model_score/{name}"] = stats[1]
        breakdown["judge/failed"] = sum(results["judge_failed"])
        breakdown["judge/unparsed"] = sum(results["judge_unparsed"])
        return {**metrics, **breakdown}


BENCHMARKS = (LlavaInTheWild(),)
