"""ChartQA test: questions about charts, scored as lmms-eval's ``chartqa`` task scores them (relaxed accuracy).

Data: lmms-eval's Hub dataset ``lmms-lab-encoder/ChartQA``, ``test`` split (2,500 questions: 1,250 written by
people, 1,250 generated from chart summaries). Columns: ``type`` (``human_test`` or ``augmented_test``),
``question``, ``answer`` (one reference string), ``image``. Rows have no id column: predictions files key them
by row number.

Prompt (``chartqa_doc_to_text``, default kwargs): the question as it is, then "\\nAnswer the question with a
single word." Up to 16 new tokens, cut at the first blank line (lmms-eval's default stop when the YAML names
none).

Scoring (``chartqa_process_results`` → ``relaxed_correctness``, taken by lmms-eval from Qwen-VL, then ``mean``):

- the prediction is stripped (lmms-eval's ``ConfigurableTask.process_results`` strips every generated answer
  before calling the task's own ``process_results``); the reference is not;
- both strings are read as numbers with Python's ``float`` (which accepts surrounding whitespace, ``1e3``,
  ``1_000``, ``inf``, ``nan``, but not ``1,000``); a string *ending* in ``%`` loses all its trailing ``%`` and
  is divided by 100, so "50%" is 0.5 and "50%" misses a reference "50" (and "0.5" hits a reference "50%");
- when the prediction is a number and the reference a *non-zero* number, the row is correct when
  ``|prediction - reference| / |reference| <= 0.05`` (5% relative tolerance, bound included, in float
  arithmetic: "105" hits "100"); nan and inf never satisfy it, so a reference "inf" is missed even by "inf";
- otherwise -- a non-number on either side, or a reference equal to 0 -- the two strings must be equal up to
  case (``str.lower``), with no other normalisation: "0.0" misses "0", "1,000" hits only "1,000";
- each row scores 1.0 or 0.0 under ``relaxed_overall`` and under its type's split, ``relaxed_human_split`` for
  ``human_test`` rows and ``relaxed_augmented_split`` for every other type; each metric is the mean over the
  rows that have it (fractions, 0-1).

Quirk handled differently: lmms-eval files any type other than ``human_test`` under the augmented split; the
dataset has only the two types, so another value (or a missing answer, on which lmms-eval crashes) is refused
as a `DataError` naming the row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llavakit.errors import DataError
from llavakit.evaluation.benchmark import Benchmark, Row

MAX_RELATIVE_CHANGE = 0.05
SPLIT_METRICS = {"human_test": "relaxed_human_split", "augmented_test": "relaxed_augmented_split"}


def as_number(text: str) -> float | None:
    """``text`` as ChartQA's scorer reads it: a float, a trailing-``%`` value divided by 100, or None."""
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correct(prediction: str, target: str) -> bool:
    """Whether ``prediction`` is within 5% of a non-zero numeric ``target``, else equal to it up to case."""
    predicted, expected = as_number(prediction), as_number(target)
    # A zero (or non-numeric) reference has no relative tolerance: only the strings are compared.
    if predicted is not None and expected:
        return abs(predicted - expected) / abs(expected) <= MAX_RELATIVE_CHANGE
    return prediction.lower() == target.lower()


class ChartQA(Benchmark):
    """lmms-eval's ``chartqa`` task."""

    id = "chartqa"
    dataset = "lmms-lab-encoder/ChartQA"
    split = "test"
    columns = ("type", "question", "answer")
    max_new_tokens = 16
    until = ("\n\n",)  # lmms-eval's default stop (the few-shot delimiter) when the YAML names none
    post_prompt = "\nAnswer the question with a single word."
    headline = ("relaxed_overall", "relaxed_human_split", "relaxed_augmented_split")

    def doc_to_text(self, row: Row) -> str:
        return f"{self.pre_prompt}{row['question']}{self.post_prompt}"

    def parse(self, row: Row, prediction: str) -> str:
        return prediction.strip()

    def process_results(self, row: Row, prediction: str) -> dict[str, Any]:
        split_metric = SPLIT_METRICS.get(row["type"])
        if split_metric is None:
            raise DataError(
                f"ChartQA question {row['question']!r}: 'type' is {row['type']!r}, expected one of "
                f"{sorted(SPLIT_METRICS)} (lmms-eval's ChartQA test split)"
            )
        if not isinstance(row["answer"], str):
            raise DataError(
                f"ChartQA question {row['question']!r}: 'answer' is {row['answer']!r}, expected the reference "
                "answer string"
            )
        value = 1.0 if relaxed_correct(self.parse(row, prediction), row["answer"]) else 0.0
        return {"relaxed_overall": value, split_metric: value}

    def aggregate(self, results: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        # A split with no rows (a --limit run on human questions only) has no value, as in lmms-eval.
        return {key: sum(results[key]) / len(results[key]) for key in self.headline if results.get(key)}


BENCHMARKS = (ChartQA(),)
