"""TextVQA validation: questions about text in images, scored as lmms-eval's ``textvqa_val`` task scores them.

Data: lmms-eval's Hub dataset, ``validation`` split (5,000 questions; columns ``question_id``, ``question``,
``image``, ``answers`` -- ten human answers --, ``ocr_tokens``, ...). ``question_id`` is unique: predictions
files key TextVQA rows by it.

Prompt (``textvqa_doc_to_text``): the question passed through Python's ``str.capitalize`` -- first character
upper-cased, *every other character lower-cased* ("What does the SIGN say?" becomes "What does the sign say?")
--, then "\\nAnswer the question using a single word or phrase." ``textvqa_val`` uses lmms-eval's default
kwargs (``ocr: false``); ``textvqa_val_ocr`` sets ``ocr: true``, which inserts "\\nReference OCR token: " and
the row's OCR tokens joined by ", " between the question and that instruction (LLaVA-1.5's TextVQA prompt;
with no tokens the line ends "token: "). Generation stops at "ASSISTANT:" (the task's ``until``) and, as the
YAML sets no length, runs up to lmms-eval's LLaVA default of 1024 new tokens.

Scoring (``textvqa_process_results``, then ``mean``; the YAML's ``ignore_case``/``ignore_punctuation`` options
do not apply, since the task has its own ``process_results``):

- the answer (stripped) and each reference answer are normalised by the official VQA normalisation
  (`llavakit.evaluation.vqa_normalize`: punctuation, articles, number words "two" -> "2", contractions);
- VQA accuracy: for each of the n references, leave it out and score min(1, m / 3), m the number of the other
  n - 1 references equal to the answer; the row's value is the mean of those n scores (``statistics.mean``, as
  lmms-eval). With ten references, an answer given by 4 or more annotators scores 1, by 3 scores 0.9, by 2
  scores 0.6, by 1 scores 0.3;
- ``exact_match`` (lmms-eval's key, although the metric is VQA accuracy) is the mean over rows, a fraction
  (0-1).

lmms-eval scores a row without answers as 0; ``textvqa_val`` rows all have answers, so one without is refused.
``write_submission`` writes lmms-eval's ``submission`` list (``question_id`` and the normalised answer) as
``textvqa_submission.json``.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llavakit.errors import DataError
from llavakit.evaluation.benchmark import Benchmark, Row
from llavakit.evaluation.vqa_normalize import normalize_answer

OCR_PREFIX = "\nReference OCR token: "


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The VQA accuracy of the normalised ``prediction`` against the normalised reference ``answers``."""
    scores = []
    for left_out in range(len(answers)):
        matches = sum(answer == prediction for i, answer in enumerate(answers) if i != left_out)
        scores.append(min(1.0, matches / 3))
    return statistics.mean(scores)


class TextVQA(Benchmark):
    """lmms-eval's ``textvqa_val`` task, with or without the OCR reference tokens in the prompt."""

    dataset = "lmms-lab-encoder/textvqa"
    split = "validation"
    id_column = "question_id"
    max_new_tokens = 1024
    until = ("ASSISTANT:",)
    post_prompt = "\nAnswer the question using a single word or phrase."
    headline = ("exact_match",)

    def __init__(self, ocr: bool = False) -> None:
        self.ocr = ocr
        self.id = "textvqa_val_ocr" if ocr else "textvqa_val"
        self.columns = ("question_id", "question", "answers") + (("ocr_tokens",) if ocr else ())

    def doc_to_text(self, row: Row) -> str:
        reference = OCR_PREFIX + ", ".join(row["ocr_tokens"]) if self.ocr else ""
        return f"{self.pre_prompt}{row['question'].capitalize()}{reference}{self.post_prompt}"

    def parse(self, row: Row, prediction: str) -> str:
        return normalize_answer(prediction.strip())

    def process_results(self, row: Row, prediction: str) -> dict[str, Any]:
        answers = row["answers"]
        if answers is None or isinstance(answers, str) or len(answers) == 0:
            raise DataError(
                f"TextVQA question {row['question_id']!r}: 'answers' is {answers!r}, expected the list of "
                "human answers (textvqa_val scores the validation split, which has them)"
            )
        references = [normalize_answer(answer) for answer in answers]
        return {"exact_match": vqa_accuracy(self.parse(row, prediction), references)}

    def aggregate(self, results: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        scores = results["exact_match"]
        return {"exact_match": sum(scores) / len(scores)}

    def write_submission(self, rows: Sequence[Row], out_dir: Path) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "textvqa_submission.json"
        records = [
            {"question_id": row["question_id"], "answer": self.parse(row, row.get("prediction") or "")}
            for row in rows
        ]
        path.write_text(json.dumps(records), encoding="utf-8")
        return [path]

    def prompt_description(self) -> str:
        return f"{super().prompt_description()} ocr={self.ocr}"


BENCHMARKS = (TextVQA(), TextVQA(ocr=True))
