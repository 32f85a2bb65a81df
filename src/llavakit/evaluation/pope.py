"""POPE: yes/no object-existence questions on COCO images, scored as lmms-eval's ``pope`` tasks score them.

Data: lmms-eval's Hub dataset (columns ``id``, ``question_id``, ``question``, ``answer``, ``image_source``,
``image``, ``category``). ``pope`` reads its default config's ``test`` split (9,000 questions: 3,000 per
category ``adversarial``/``popular``/``random``); ``pope_adv``/``pope_pop``/``pope_random`` (lmms-eval's
``pope_full`` group) read the ``Full`` config's split of that name. POPE numbers its questions per category,
so ``question_id`` repeats across the 9,000 rows: predictions files key POPE rows by row number.

Prompt: the question, stripped, then "\\nAnswer the question using a single word or phrase." (lmms-eval's
default kwargs, LLaVA-1.5's POPE prompt). Up to 128 new tokens.

Scoring, with lmms-eval's quirks (``pope_process_results`` and the five ``pope_aggregate_*`` functions):

- the answer is lower-cased and stripped and must then be exactly ``yes`` or ``no``: "Yes, there is.", "no."
  and "Yes." are neither. Such an answer is wrong for accuracy, and counts nowhere in precision or recall: it
  is not a predicted yes (no TP/FP) and not a predicted no (no FN);
- ``pope_accuracy``: the fraction right over every row; ``pope_precision`` = TP / (TP + FP); ``pope_recall`` =
  TP / (TP + FN); ``pope_f1_score`` = 2PR / (P + R); each is 0 when its denominator is 0;
- ``pope_yes_ratio`` is the share of *ground-truth* yes answers (0.5 on POPE), not of predicted ones;
- every metric is a fraction (0-1), as lmms-eval prints it.

Breakdowns ``<metric>/<category>`` (``pope_f1_score/adversarial``, ...) apply the same arithmetic to one
category's rows (lmms-eval reports only the pooled value).

``pope_llava`` scores the same ``test`` split as LLaVA's own script (``llava/eval/eval_pope.py``) does. It
differs:

- parsing: the answer (stripped, as LLaVA's answer files are) is cut at its first ``.``, its commas deleted
  and it is split on single spaces; if a word is exactly ``No``, ``no`` or ``not`` the answer is no, otherwise
  it is yes -- every answer is yes or no: "Yes, there is." is yes, "There is no dog" is no, "NO" and "" are
  yes;
- ``pope_yes_ratio`` is the share of *predicted* yes;
- LLaVA prints metrics per category only: those are the ``<metric>/<category>`` keys, and the headline keys
  are their unweighted means over the categories present (our choice, to give one number per metric);
- where LLaVA's script divides by zero (a category with no predicted yes) it crashes; here the value is 0.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llavakit.errors import DataError
from llavakit.evaluation.benchmark import Benchmark, Row

METRICS = ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio")
POST_PROMPT = "\nAnswer the question using a single word or phrase."
# Words that make LLaVA's script read an answer as no (matched case-sensitively, whole words).
LLAVA_NO_WORDS = frozenset({"No", "no", "not"})


@dataclass(frozen=True)
class Judged:
    """One scored row: its category, the ground truth (yes/no) and the answer as the scorer read it."""

    category: str
    truth: str
    prediction: str


def _ratio(numerator: int, denominator: int) -> float:
    """``numerator / denominator``, 0 when the denominator is 0 (lmms-eval's rule for every POPE ratio)."""
    return numerator / denominator if denominator else 0.0


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def lmms_eval_metrics(rows: Sequence[Judged]) -> dict[str, float]:
    """lmms-eval's five POPE metrics over ``rows`` (non yes/no answers count as the docstring says)."""
    tp = sum(r.truth == "yes" and r.prediction == "yes" for r in rows)
    fp = sum(r.truth == "no" and r.prediction == "yes" for r in rows)
    fn = sum(r.truth == "yes" and r.prediction == "no" for r in rows)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "pope_accuracy": sum(r.prediction == r.truth for r in rows) / len(rows),
        "pope_precision": precision,
        "pope_recall": recall,
        "pope_f1_score": _f1(precision, recall),
        "pope_yes_ratio": _ratio(sum(r.truth == "yes" for r in rows), len(rows)),
    }


def llava_metrics(rows: Sequence[Judged]) -> dict[str, float]:
    """LLaVA's ``eval_pope`` metrics over ``rows`` (every prediction is yes or no)."""
    tp = sum(r.truth == "yes" and r.prediction == "yes" for r in rows)
    fp = sum(r.truth == "no" and r.prediction == "yes" for r in rows)
    tn = sum(r.truth == "no" and r.prediction == "no" for r in rows)
    fn = sum(r.truth == "yes" and r.prediction == "no" for r in rows)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "pope_accuracy": (tp + tn) / len(rows),
        "pope_precision": precision,
        "pope_recall": recall,
        "pope_f1_score": _f1(precision, recall),
        "pope_yes_ratio": (tp + fp) / len(rows),
    }


def parse_lmms_eval(prediction: str) -> str:
    """The answer as lmms-eval reads it: lower-cased and stripped, compared whole with ``yes``/``no``."""
    return prediction.lower().strip()


def parse_llava(prediction: str) -> str:
    """``"yes"`` or ``"no"`` by LLaVA's rule (see the module docstring)."""
    first_sentence = prediction.strip().split(".")[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if LLAVA_NO_WORDS.intersection(words) else "yes"


class POPE(Benchmark):
    """One lmms-eval POPE task: ``pope`` (all categories) or a ``pope_full`` member (one category's split)."""

    dataset = "lmms-lab-encoder/POPE"
    columns = ("question_id", "question", "answer", "category")
    id_column = None
    max_new_tokens = 128
    until = ("\n\n",)  # lmms-eval's default stop (the few-shot delimiter) when the YAML names none
    post_prompt = POST_PROMPT
    headline = METRICS

    def __init__(self, task: str = "pope", subset: str | None = None, split: str = "test") -> None:
        self.id = task
        self.subset = subset
        self.split = split

    def doc_to_text(self, row: Row) -> str:
        return row["question"].strip() + self.post_prompt

    def parse(self, row: Row, prediction: str) -> str:
        answer = self._read(prediction)
        return answer if answer in ("yes", "no") else "other"

    def process_results(self, row: Row, prediction: str) -> dict[str, Any]:
        truth = row["answer"].lower().strip() if isinstance(row["answer"], str) else row["answer"]
        if truth not in ("yes", "no"):
            raise DataError(
                f"{self.id} question {row['question_id']!r} ({row['category']}): answer {row['answer']!r} "
                "is not yes/no; is this lmms-lab's POPE data?"
            )
        # One value per row, read by every metric (lmms-eval repeats it under each of its five keys).
        return {"pope": Judged(row["category"], truth, self._read(prediction))}

    def aggregate(self, results: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        judged: Sequence[Judged] = results["pope"]
        by_category: dict[str, list[Judged]] = defaultdict(list)
        for row in judged:
            by_category[row.category].append(row)
        per_category = {category: self._metrics(rows) for category, rows in sorted(by_category.items())}
        metrics = self._headline(judged, per_category)
        for category, values in per_category.items():
            metrics.update({f"{key}/{category}": value for key, value in values.items()})
        return metrics

    def _read(self, prediction: str) -> str:
        return parse_lmms_eval(prediction)

    def _metrics(self, rows: Sequence[Judged]) -> dict[str, float]:
        return lmms_eval_metrics(rows)

    def _headline(
        self, rows: Sequence[Judged], per_category: Mapping[str, Mapping[str, float]]
    ) -> dict[str, float]:
        """lmms-eval's headline: the metrics over every row together."""
        return self._metrics(rows)


class LLaVAPOPE(POPE):
    """``pope_llava``: POPE's ``test`` split scored as LLaVA's ``eval_pope.py`` scores it."""

    def __init__(self) -> None:
        super().__init__("pope_llava")

    def _read(self, prediction: str) -> str:
        return parse_llava(prediction)

    def _metrics(self, rows: Sequence[Judged]) -> dict[str, float]:
        return llava_metrics(rows)

    def _headline(
        self, rows: Sequence[Judged], per_category: Mapping[str, Mapping[str, float]]
    ) -> dict[str, float]:
        """The unweighted mean of each metric over the categories (LLaVA reports per category only)."""
        return {
            key: sum(values[key] for values in per_category.values()) / len(per_category) for key in METRICS
        }


BENCHMARKS = (
    POPE("pope"),
    POPE("pope_adv", "Full", "adversarial"),
    POPE("pope_pop", "Full", "popular"),
    POPE("pope_random", "Full", "random"),
    LLaVAPOPE(),
)
