"""OCRBench: 1,000 text-reading questions in ten kinds, scored as lmms-eval's ``ocrbench`` task scores them.

Data: the Hub dataset lmms-eval reads, ``echo840/OCRBench``, split ``test`` (columns ``dataset`` (the source
set, e.g. ``IIIT5K``, ``HME100k``), ``question``, ``question_type`` (one of the ten kinds below), ``answer``
(a list of accepted strings), ``image``). Rows have no id column, so predictions files key them by row number.

Prompt (``ocrbench_doc_to_text`` with the YAML's default kwargs, both empty): the stripped question, nothing
else.

Generation: 128 new tokens, greedy; the YAML names no stop string, so lmms-eval's default (``"\\n\\n"``)
applies.

Scoring (``ocrbench_process_results``): the output is stripped; a row scores 1 when one of its answers occurs
in it as a substring, after

- for ``dataset == "HME100k"`` (handwritten formulas): removing every space and newline from both sides (case
  and other whitespace kept);
- otherwise: folding fullwidth ASCII (U+FF01-U+FF5E) and the ideographic space to ASCII, lower-casing,
  stripping, and turning newlines into spaces, on both sides.

So a long output containing the answer anywhere scores ("The text says HELLO world" for "hello"). A blank
answer would match every output, so such rows are refused rather than scored.

Aggregation (``ocrbench_aggregate_accuracy``): the right answers are counted per question type; the "Final
Score" is their sum (0-1000 on the full set), "Text Recognition" the sum of the six recognition kinds.
lmms-eval's metric ``ocrbench_accuracy`` (printed as ``ocrbench_accuracy,none``) is the final score divided by
1000 — by 1000 whatever the number of rows, so a ``--limit`` run reports count/1000, not a mean; we keep that.
Two lmms-eval quirks we do not copy: its counts live in a module-level dict never reset, so a second
aggregation in one process adds to the first; and it writes the counts to ``ocrbench_results.txt`` (a summary,
not a submission; our report prints them).

Keys: ``ocrbench_accuracy`` (0-1), ``final_score`` and ``text_recognition`` (counts), ``category/<kind>``
(counts; every kind is listed, 0 when absent, as lmms-eval's text file lists them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llavakit.errors import DataError
from llavakit.evaluation.benchmark import Benchmark, Row

RECOGNITION_TYPES = (
    "Regular Text Recognition",
    "Irregular Text Recognition",
    "Artistic Text Recognition",
    "Handwriting Recognition",
    "Digit String Recognition",
    "Non-Semantic Text Recognition",
)
QUESTION_TYPES = RECOGNITION_TYPES + (
    "Scene Text-centric VQA",
    "Doc-oriented VQA",
    "Key Information Extraction",
    "Handwritten Mathematical Expression Recognition",
)
# The source set whose answers are LaTeX formulas, compared with spaces removed and case kept.
FORMULA_DATASET = "HME100k"
# lmms-eval divides the count by the full benchmark's size, whatever was evaluated.
FULL_SIZE = 1000

_FULLWIDTH_FIRST, _FULLWIDTH_LAST, _FULLWIDTH_OFFSET = 0xFF01, 0xFF5E, 0xFEE0
_IDEOGRAPHIC_SPACE = "\u3000"


def fold_fullwidth(text: str) -> str:
    """``text`` with fullwidth ASCII forms and the ideographic space made ASCII (no wider NFKC)."""
    return "".join(
        chr(ord(char) - _FULLWIDTH_OFFSET)
        if _FULLWIDTH_FIRST <= ord(char) <= _FULLWIDTH_LAST
        else (" " if char == _IDEOGRAPHIC_SPACE else char)
        for char in text
    )


def comparable(text: str, formula: bool) -> str:
    """``text`` as the substring test compares it (formula rows: no spaces or newlines; see the module)."""
    if formula:
        return text.strip().replace("\n", "").replace(" ", "")
    return fold_fullwidth(text).lower().strip().replace("\n", " ")


def is_right(prediction: str, answers: Sequence[str], formula: bool) -> bool:
    """Whether one of ``answers`` occurs in the (stripped) ``prediction``."""
    said = comparable(prediction.strip(), formula)
    return any(comparable(answer, formula) in said for answer in answers)


class OCRBench(Benchmark):
    """lmms-eval's ``ocrbench`` task."""

    id = "ocrbench"
    dataset = "echo840/OCRBench"
    split = "test"
    columns = ("dataset", "question", "question_type", "answer")
    max_new_tokens = 128
    until = ("\n\n",)  # lmms-eval's default stop (the few-shot delimiter) when the YAML names none
    headline = ("ocrbench_accuracy",)

    def doc_to_text(self, row: Row) -> str:
        return f"{self.pre_prompt}{row['question'].strip()}{self.post_prompt}"

    def process_results(self, row: Row, prediction: str) -> dict[str, Any]:
        question_type = _question_type(row)
        answers = _answers(row)
        score = int(is_right(prediction, answers, row["dataset"] == FORMULA_DATASET))
        return {"ocrbench_accuracy": {"question_type": question_type, "score": score}}

    def aggregate(self, results: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        counts = dict.fromkeys(QUESTION_TYPES, 0)
        for result in results["ocrbench_accuracy"]:
            counts[result["question_type"]] += result["score"]
        final = sum(counts.values())
        return {
            "ocrbench_accuracy": final / FULL_SIZE,
            "final_score": float(final),
            "text_recognition": float(sum(counts[kind] for kind in RECOGNITION_TYPES)),
            **{f"category/{kind}": float(count) for kind, count in counts.items()},
        }


def _question_type(row: Row) -> str:
    question_type = row["question_type"]
    if question_type not in QUESTION_TYPES:
        raise DataError(
            f"OCRBench question {row['question']!r}: question_type {question_type!r} is not one of "
            f"OCRBench's ten kinds {list(QUESTION_TYPES)}"
        )
    return question_type


def _answers(row: Row) -> list[str]:
    """The row's accepted answers (a list of strings in echo840/OCRBench; a lone string is taken too)."""
    answer = row["answer"]
    answers = [answer] if isinstance(answer, str) else answer
    if not isinstance(answers, (list, tuple)) or not all(isinstance(item, str) for item in answers):
        raise DataError(
            f"OCRBench question {row['question']!r}: answer {answer!r} is not a list of strings "
            "(echo840/OCRBench's 'answer' column holds the accepted answers)"
        )
    if not answers or any(not comparable(item, row["dataset"] == FORMULA_DATASET) for item in answers):
        raise DataError(
            f"OCRBench question {row['question']!r}: answer {answer!r} is empty or holds a blank answer, "
            "which would match every prediction; fix the row"
        )
    return list(answers)


BENCHMARKS = (OCRBench(),)
