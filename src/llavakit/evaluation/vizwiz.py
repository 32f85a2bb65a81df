"""VizWiz-VQA: questions blind people asked about their own photos, as lmms-eval's ``vizwiz_vqa_val`` and
``vizwiz_vqa_test`` tasks define them.

Data: lmms-eval's Hub dataset ``lmms-lab-encoder/VizWiz-VQA``, split ``val`` (4,319 questions) or ``test``
(8,000). Columns ``question_id`` (text such as ``VizWiz_val_00000000``, unique: predictions files key rows by
it), ``question``, ``image``, ``answers`` (ten human answers, strings, "unanswerable" among them) and
``category`` (``other``, ``yes/no``, ``number``, ``unanswerable``; not read). Test rows have no answers.

Prompt (``vizwiz_vqa_doc_to_text``): the question through Python's ``str.capitalize`` -- first character
upper-cased, *every other character lower-cased* --, then "\\nWhen the provided information is insufficient,
respond with 'Unanswerable'.\\nAnswer the question using a single word or phrase." Generation stops at
"ASSISTANT:" (the YAML's ``until``) and, as the YAML sets no length, runs up to lmms-eval's LLaVA default of
1024 new tokens.

Scoring (``vizwiz_vqa_process_results``, then ``mean``; the YAML's ``ignore_case``/``ignore_punctuation`` do
not apply): the stripped answer and every reference pass the whole EvalAI normalisation
(`llavakit.evaluation.vqa_normalize.normalize_answer`, lmms-eval's ``EvalAIAnswerProcessor()(text)``), then
VQA accuracy with index leave-one-out, the same arithmetic as TextVQA's (`textvqa.vqa_accuracy`, reused): for
each of the n references, min(1, m / 3), m the number of the other n - 1 equal to the answer, averaged with
``statistics.mean``. ``exact_match`` (lmms-eval's key) is the mean over rows, a fraction (0-1). "Unanswerable"
is scored like any other answer (it matches references "unanswerable").

lmms-eval scores a validation row without answers (missing, None or an empty list) as 0; ``vizwiz_vqa_val``
rows all have answers, so one without is refused.

``vizwiz_vqa_test`` has no metrics: ``write_submission`` writes lmms-eval's EvalAI file,
``vizwiz_vqa-test-submission-<%Y-%m%d-%H%M-%S>.json`` (that odd date format is lmms-eval's), a JSON list of
``{"image": "<question_id>.jpg", "answer": <normalised answer>}`` in row order. ``vizwiz_vqa_val`` writes
none (its submission metric is commented out in lmms-eval's YAML).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llavakit.errors import DataError
from llavakit.evaluation.benchmark import Benchmark, Row
from llavakit.evaluation.textvqa import vqa_accuracy
from llavakit.evaluation.vqa_normalize import normalize_answer

POST_PROMPT = (
    "\nWhen the provided information is insufficient, respond with 'Unanswerable'."
    "\nAnswer the question using a single word or phrase."
)


class VizWiz(Benchmark):
    """lmms-eval's ``vizwiz_vqa_val`` (scored here) or ``vizwiz_vqa_test`` (a submission file for EvalAI)."""

    dataset = "lmms-lab-encoder/VizWiz-VQA"
    id_column = "question_id"
    max_new_tokens = 1024
    until = ("ASSISTANT:",)
    post_prompt = POST_PROMPT

    def __init__(self, split: str) -> None:
        self.split = split
        self.scored = split == "val"
        self.id = f"vizwiz_vqa_{split}"
        self.columns = ("question_id", "question", "answers") if self.scored else ("question_id", "question")
        self.headline = ("exact_match",) if self.scored else ()

    def doc_to_text(self, row: Row) -> str:
        return f"{self.pre_prompt}{row['question'].capitalize()}{self.post_prompt}"

    def parse(self, row: Row, prediction: str) -> str:
        return normalize_answer(prediction.strip())

    def process_results(self, row: Row, prediction: str) -> dict[str, Any]:
        answer = self.parse(row, prediction)
        if not self.scored:
            return {"submission": submission_record(row, answer)}
        return {"exact_match": vqa_accuracy(answer, self._references(row))}

    def aggregate(self, results: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        if not self.scored:
            return {}  # the test split has no answers: EvalAI scores the submission file
        scores = results["exact_match"]
        return {"exact_match": sum(scores) / len(scores)}

    def write_submission(self, rows: Sequence[Row], out_dir: Path) -> list[Path]:
        if self.scored:
            return []
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / submission_name(datetime.datetime.now())
        records = [submission_record(row, self.parse(row, row.get("prediction") or "")) for row in rows]
        path.write_text(json.dumps(records), encoding="utf-8")
        return [path]

    def _references(self, row: Row) -> list[str]:
        """The row's normalised human answers; refused when absent (the val split has ten per question)."""
        answers = row.get("answers")
        if answers is None or isinstance(answers, str) or len(answers) == 0:
            raise DataError(
                f"{self.id}: question {row.get('question_id')!r} has 'answers' {answers!r}, expected the list "
                "of human answers that the val split has"
            )
        if not all(isinstance(answer, str) for answer in answers):
            raise DataError(
                f"{self.id}: question {row.get('question_id')!r} has 'answers' {answers!r}, expected strings "
                "(the lmms-lab VizWiz-VQA layout)"
            )
        return [normalize_answer(answer) for answer in answers]


def submission_record(row: Row, answer: str) -> dict[str, Any]:
    """One line of the EvalAI submission file (lmms-eval's ``submission`` value): the image file name."""
    return {"image": f"{row['question_id']}.jpg", "answer": answer}


def submission_name(now: datetime.datetime) -> str:
    """lmms-eval's submission file name at time ``now``."""
    return f"vizwiz_vqa-test-submission-{now:%Y-%m%d-%H%M-%S}.json"


BENCHMARKS = (VizWiz("val"), VizWiz("test"))
