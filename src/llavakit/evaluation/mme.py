"""MME: 14 yes/no subtasks, perception (10) and cognition (4), scored as lmms-eval's ``mme`` task scores them.

Data: lmms-eval's Hub dataset (columns ``question_id``, ``image``, ``question``, ``answer``, ``category``). Each
image carries two questions (one answered yes, one no); ``question_id`` is the image's path, shared by the pair, so
predictions files key MME rows by row number.

Prompt: the question, stripped, with its trailing " Please answer yes or no." replaced by
"\\nAnswer the question using a single word or phrase." (LLaVA-1.5's MME prompt; lmms-eval's default kwargs).

Scoring, with lmms-eval's (and the official calculation's, from Otter) quirks:

- answer parsing: lower-case, strip, delete every ``.``; exactly ``yes``/``no`` count; a one-letter answer counts
  ``y``/``n``; otherwise only the first four characters are searched, ``yes`` before ``no`` ("Yes, there is." is
  yes, "Not at all" is no, "There is no dog" is neither, "nothing" is no);
- per subtask: acc = the percentage of right answers, acc+ = the percentage of images with both answers right,
  both averaged over images; the subtask score is acc + acc+ (at most 200);
- ``mme_perception_score`` / ``mme_cognition_score`` are sums of their subtasks' scores (at most 2000 / 800).
  A subtask with no rows is absent from the sum, as in lmms-eval.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from llavakit.errors import DataError
from llavakit.evaluation.benchmark import Benchmark, Row

PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
ORIGINAL_SUFFIX = " Please answer yes or no."


def parse_yes_no(prediction: str) -> str:
    """``"yes"``, ``"no"`` or ``"other"``, by the rule in the module docstring."""
    answer = prediction.lower().strip().replace(".", "")
    if answer in ("yes", "no"):
        return answer
    if len(answer) == 1:
        return {"y": "yes", "n": "no"}.get(answer, "other")
    head = answer[:4]
    if "yes" in head:
        return "yes"
    return "no" if "no" in head else "other"


class MME(Benchmark):
    """lmms-eval's ``mme`` task."""

    id = "mme"
    dataset = "lmms-lab-encoder/MME"
    split = "test"
    columns = ("question_id", "question", "answer", "category")
    max_new_tokens = 16
    post_prompt = "\nAnswer the question using a single word or phrase."
    headline = ("mme_perception_score", "mme_cognition_score")

    def doc_to_text(self, row: Row) -> str:
        return row["question"].strip().replace(ORIGINAL_SUFFIX, "") + self.post_prompt

    def parse(self, row: Row, prediction: str) -> str:
        return parse_yes_no(prediction)

    def process_results(self, row: Row, prediction: str) -> dict[str, Any]:
        truth = row["answer"].lower().strip().replace(".", "")
        if truth not in ("yes", "no"):
            raise DataError(f"MME question {row['question_id']!r}: answer {row['answer']!r} is not Yes/No")
        category = row["category"]
        key = "mme_perception_score" if category in PERCEPTION else "mme_cognition_score"
        score = float(parse_yes_no(prediction) == truth)
        return {key: {"question_id": row["question_id"], "category": category, "score": score}}

    def aggregate(self, results: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for key in self.headline:
            if results.get(key):
                metrics[key] = 0.0
                for category, (acc, acc_plus) in _subtask_scores(results[key]).items():
                    metrics[key] += acc + acc_plus
                    metrics[f"score/{category}"] = acc + acc_plus
                    metrics[f"acc/{category}"] = acc
                    metrics[f"acc_plus/{category}"] = acc_plus
        return metrics


def _subtask_scores(values: Sequence[Mapping[str, Any]]) -> dict[str, tuple[float, float]]:
    """Per subtask, (acc, acc+) in percent, averaged over images (question pairs)."""
    pairs: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for value in values:
        pairs[value["category"]][value["question_id"]].append(value["score"])
    scores = {}
    for category, by_image in pairs.items():
        for question_id, image_scores in by_image.items():
            if len(image_scores) != 2:
                raise DataError(
                    f"MME scores questions in pairs, but image {question_id!r} has {len(image_scores)}: "
                    "evaluate whole pairs (an even --limit cuts no pair in lmms-lab's order)"
                )
        acc = sum(sum(s) / 2 * 100.0 for s in by_image.values()) / len(by_image)
        acc_plus = sum((sum(s) == 2) * 100.0 for s in by_image.values()) / len(by_image)
        scores[category] = (acc, acc_plus)
    return scores


BENCHMARKS = (MME(),)
