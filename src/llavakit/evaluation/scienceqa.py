"""ScienceQA-IMG: the test questions that have an image, scored as lmms-eval's ``scienceqa_img`` task scores them.

Data: lmms-eval's Hub dataset, subset ``ScienceQA-IMG`` (columns ``image``, ``question``, ``choices`` (a list),
``answer`` (the right option's index), ``hint``, ``subject``, ``category``, ...). Rows have no id column, so
predictions files key them by row number.

Prompt (lmms-eval's default kwargs): ``"Context: <hint>\\n"`` when the hint is non-empty, then the question, a
newline, the options lettered ``"A. ...\\nB. ..."``, and "\\nAnswer with the option's letter from the given choices
directly.". A hint that is None (not empty) is written as the text ``None`` with no "Context: " label, as lmms-eval's
f-string writes it.

Scoring (lmms-eval's ``sqa_process_results``, "how llava parses it"), on the stripped answer:

- the whole answer equal to the right letter, ignoring case, is right (``b`` counts for B);
- otherwise an answer whose first character is upper case and second a ``.`` is right when that letter, lower-cased,
  is the right one (``"B. cat"`` counts for B); ``"c."`` (lower case with a dot) and ``"(B) cat"``, ``"B) cat"``,
  ``"The answer is C."`` are wrong;
- the YAML's ``ignore_case``/``ignore_punctuation`` options are never applied: the task's own ``process_results``
  returns ``exact_match`` itself.

``exact_match`` is the mean over questions, on lmms-eval's 0-1 scale (lmms-eval prints it as
``exact_match,none``). lmms-eval reports no breakdown; the ``subject/<subject>`` and ``category/<category>`` keys are
our own (the same mean over each group's questions).

Generation: 16 new tokens, greedy; the YAML names no stop string, so lmms-eval's default (``"\\n\\n"``) applies. Its
``model_specific_generation_kwargs`` (``image_aspect_ratio: original`` for lmms-eval's ``llava`` model) only take
effect for a checkpoint whose config lacks ``image_aspect_ratio`` (every LLaVA-NeXT config has one), so they are not
reproduced.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from llavakit.errors import DataError
from llavakit.evaluation.benchmark import Benchmark, Row
from llavakit.evaluation.choices import lettered_options, option_letters

GROUPS = ("subject", "category")


def read_letter(prediction: str, letters: Sequence[str]) -> str | None:
    """The option letter lmms-eval's rule reads from ``prediction`` (see the module docstring), or None.

    The rule compares against the right letter only; read as a parser, it accepts the whole answer being one of
    ``letters`` (any case) or an upper-case first character followed by ``.``.
    """
    answer = prediction.strip()
    for letter in letters:
        if answer.lower() == letter.lower():
            return letter
    if len(answer) >= 2 and answer[0].isupper() and answer[1] == ".":
        return answer[0]
    return None


class ScienceQAImg(Benchmark):
    """lmms-eval's ``scienceqa_img`` task."""

    id = "scienceqa_img"
    dataset = "lmms-lab-encoder/ScienceQA"
    subset = "ScienceQA-IMG"
    split = "test"
    columns = ("question", "choices", "answer", "hint", *GROUPS)
    max_new_tokens = 16
    until = ("\n\n",)  # lmms-eval's default stop (the few-shot delimiter) when the YAML names none
    post_prompt = "\nAnswer with the option's letter from the given choices directly."
    headline = ("exact_match",)

    def doc_to_text(self, row: Row) -> str:
        hint = row["hint"]
        context = f"Context: {hint}\n" if hint else f"{hint}"
        return f"{self.pre_prompt}{context}{row['question']}\n{lettered_options(row['choices'])}{self.post_prompt}"

    def parse(self, row: Row, prediction: str) -> str | None:
        return read_letter(prediction, option_letters(len(row["choices"])))

    def process_results(self, row: Row, prediction: str) -> dict[str, Any]:
        right = _right_letter(row)
        answer = prediction.strip()
        if answer.lower() == right.lower():
            score = 1.0
        elif len(answer) >= 2 and answer[0].isupper() and answer[1] == ".":
            score = float(answer[0].lower() == right.lower())
        else:
            score = 0.0
        return {"exact_match": {"score": score, **{group: row[group] for group in GROUPS}}}

    def aggregate(self, results: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        values = results["exact_match"]
        metrics = {"exact_match": sum(value["score"] for value in values) / len(values)}
        for group in GROUPS:
            scores: dict[str, list[float]] = defaultdict(list)
            for value in values:
                scores[value[group]].append(value["score"])
            for name, group_scores in sorted(scores.items()):
                metrics[f"{group}/{name}"] = sum(group_scores) / len(group_scores)
        return metrics


def _right_letter(row: Row) -> str:
    letters = option_letters(len(row["choices"]))
    answer = row["answer"]
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(letters):
        raise DataError(
            f"ScienceQA question {row['question']!r}: answer {answer!r} is not the index of one of its "
            f"{len(letters)} choices (lmms-lab's ScienceQA 'answer' column holds the right choice's index)"
        )
    return letters[answer]


BENCHMARKS = (ScienceQAImg(),)
