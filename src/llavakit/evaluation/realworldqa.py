"""RealWorldQA: xAI's real-world spatial questions, scored as lmms-eval's ``realworldqa`` task scores them.

Data: lmms-eval's Hub dataset ``lmms-lab-encoder/RealWorldQA``, split ``test`` (columns ``image``,
``question``, ``answer``). The question carries its options and its answer instruction ("...\\nA. Left\\nB.
Right\\nPlease answer directly with only the letter of the correct option and nothing else."); the answer is
an option letter or, for open questions, a word or number ("Downhill", "3"). Rows have no id column, so
predictions files key them by row number.

Prompt (``realworldqa_doc_to_text`` with the YAML's default kwargs, both empty): the stripped question. The
instruction sentence is removed only when a post prompt is set, so it stays.

Generation: 16 new tokens, greedy; the YAML names no stop string, so lmms-eval's default (``"\\n\\n"``)
applies.

Scoring (``realworldqa_process_results``), on the stripped output against the stripped answer:

- answer ``A``-``D`` (either case): the letter read by lmms-eval's ``extract_mcq_answer`` over ``A``-``D``
  (see `llavakit.evaluation.mmbench`: rank "starts with a lone letter" over "ends with one" over "after an
  answer phrase" over ``(X)``/``X.``/``X:``/``X)``/``X `` forms, any capital ``A``-``D`` as a last resort, so
  "Definitely" reads as D and "A or B" as A) must equal the answer's upper case;
- any other answer: the output lower-cased, stripped and cleared of trailing periods must equal the
  lower-cased answer ("Downhill." is right for "Downhill"; "3 cars" is wrong for "3", "three" is wrong for
  "3").

``exact_match`` is the mean, 0-1 (lmms-eval prints ``exact_match,none``). The 0.7.3 YAML has no
``filter_list``: the ``NumberWordsToDigitsFilter`` and ``MultiChoiceRegexFilter`` classes in its utils.py are
used by no task, so there is one metric, behind lmms-eval's default ``none`` (take-first) filter. lmms-eval
reports no breakdown.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llavakit.errors import DataError
from llavakit.evaluation.benchmark import Benchmark, Row
from llavakit.evaluation.choices import extract_mcq_answer

CHOICE_LETTERS = ("A", "B", "C", "D")


def read_answer(prediction: str, answer: str) -> str:
    """What the scorer compares with ``answer``: a letter for lettered answers, else the cleaned output."""
    if answer.strip().upper() in CHOICE_LETTERS:
        return extract_mcq_answer(prediction.strip(), CHOICE_LETTERS)
    return prediction.strip().lower().strip().rstrip(".")


def is_right(prediction: str, answer: str) -> bool:
    """Whether ``prediction`` answers ``answer`` (see the module)."""
    truth = answer.strip()
    expected = truth.upper() if truth.upper() in CHOICE_LETTERS else truth.lower()
    return read_answer(prediction, answer) == expected


class RealWorldQA(Benchmark):
    """lmms-eval's ``realworldqa`` task."""

    id = "realworldqa"
    dataset = "lmms-lab-encoder/RealWorldQA"
    split = "test"
    columns = ("question", "answer")
    max_new_tokens = 16
    until = ("\n\n",)  # lmms-eval's default stop (the few-shot delimiter) when the YAML names none
    headline = ("exact_match",)

    def doc_to_text(self, row: Row) -> str:
        return f"{self.pre_prompt}{row['question'].strip()}{self.post_prompt}"

    def parse(self, row: Row, prediction: str) -> str:
        return read_answer(prediction, _answer(row))

    def process_results(self, row: Row, prediction: str) -> dict[str, Any]:
        return {"exact_match": float(is_right(prediction, _answer(row)))}

    def aggregate(self, results: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        scores = results["exact_match"]
        return {"exact_match": sum(scores) / len(scores)}


def _answer(row: Row) -> str:
    answer = row["answer"]
    if not isinstance(answer, str) or not answer.strip():
        raise DataError(
            f"RealWorldQA question {row['question']!r}: answer {answer!r} is not a non-empty string (an "
            "option letter or a word/number, as lmms-lab's RealWorldQA 'answer' column holds)"
        )
    return answer


BENCHMARKS = (RealWorldQA(),)
