"""VQAv2: open questions about COCO images, as lmms-eval's ``vqav2_val`` and ``vqav2_test`` tasks define them.

Data: lmms-eval's Hub dataset ``lmms-lab-encoder/VQAv2``, split ``validation`` (214,354 questions) for
``vqav2_val`` and ``test`` (the full test-standard set, not ``testdev``) for ``vqav2_test``. Columns
``question_id`` (an integer, unique: predictions files key rows by it), ``question``, ``image``, ``answers``
-- ten human answers, each a dict ``{"answer", "answer_confidence", "answer_id"}`` --,
``multiple_choice_answer``, ``question_type``, ``answer_type``, ``image_id``. Only ``question_id``,
``question`` and ``answers`` are read; test rows have no answers (``None``).

Prompt (``vqav2_doc_to_text``): the question as it is (not capitalised, not stripped), then "\\nAnswer the
question using a single word or phrase." Up to 16 new tokens, cut at the first blank line (lmms-eval's default
stop, the few-shot delimiter, since the YAML names none).

Scoring (``vqav2_process_results``, then ``mean``; the YAML's ``ignore_case``/``ignore_punctuation`` do not
apply, since the task has its own ``process_results``). lmms-eval strips the answer, then:

- the answer and each reference (its ``answer`` value) have newlines and tabs turned into spaces and are
  stripped, then pass only the last two steps of the EvalAI normalisation (``process_punctuation`` and
  ``process_digit_article``), not ``EvalAIAnswerProcessor.__call__`` as TextVQA and VizWiz do. So, unlike
  `llavakit.evaluation.vqa_normalize.normalize_answer`: ``,`` and ``?`` are not deleted up front but are
  punctuation marks like the others (deleted when touching a space, else a space: "yes,no" reads "yes no",
  not "yesno"); ``'s`` is not split off ("it's" stays one word); and the official "digit,digit" exception
  fires -- when a comma sits between two digits anywhere ("1,000"), every punctuation mark is deleted rather
  than turned into a space ("1,000-2" reads "10002"). Periods (the first 32 only) and the word step (number
  words, articles, contractions) are as in `vqa_normalize`, whose pieces are reused;
- VQA accuracy, left out *by value*: for each reference dict, the others are the references not equal to it
  as dicts (answer, confidence and id compared), and it scores min(1, m / 3), m the number of those others
  whose answer equals the prediction; the row's value is the ``statistics.mean`` of those scores. Real rows
  carry distinct ``answer_id`` values, so this is TextVQA's leave-one-out (`textvqa.vqa_accuracy`); identical
  duplicate dicts would all be left out together, which is why that function is not reused;
- ``exact_match`` (lmms-eval's key, although the metric is VQA accuracy) is the mean over rows, a fraction
  (0-1).

lmms-eval scores a validation row whose ``answers`` is missing or None as 0 and crashes on an empty list
(``statistics.mean([])``); ``vqav2_val`` rows all have answers, so both are refused.

``vqav2_test`` has no metrics: ``write_submission`` writes lmms-eval's EvalAI file,
``vqav2-test-submission-<%Y-%m-%d-%H-%M-%S>.json``, a JSON list of ``{"question_id", "answer"}`` in row order.
Quirk kept: lmms-eval normalises the answer only inside its "row has answers" branch, so for test rows (no
answers) the submitted answer is the model output only stripped, not normalised (EvalAI normalises it on its
side); a test row that does carry answers gets the normalised answer, as in lmms-eval.
"""

from __future__ import annotations

import datetime
import json
import re
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llavakit.errors import DataError
from llavakit.evaluation.benchmark import Benchmark, Row
from llavakit.evaluation.vqa_normalize import (
    MAX_PERIODS,
    PERIOD,
    PUNCTUATION,
    process_digit_article,
    process_punctuation,
)

# The official exception: a comma between two digits makes every punctuation mark be deleted.
DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")
POST_PROMPT = "\nAnswer the question using a single word or phrase."


def normalize_vqav2_answer(text: str) -> str:
    """``text`` as lmms-eval's vqav2 scorer normalises answers and references (see the module docstring)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    if DIGIT_COMMA.search(text):
        for mark in PUNCTUATION:
            text = text.replace(mark, "")
    else:
        text = process_punctuation(text)
    text = PERIOD.sub("", text, count=MAX_PERIODS)
    return process_digit_article(text)


def vqav2_accuracy(answer: str, references: Sequence[Mapping[str, Any]]) -> float:
    """VQA accuracy of the normalised ``answer`` against reference dicts (normalised ``answer`` values),
    each left out together with the references equal to it."""
    scores = []
    for left_out in references:
        matches = sum(ref["answer"] == answer for ref in references if ref != left_out)
        scores.append(min(1.0, matches / 3))
    return statistics.mean(scores)


class VQAv2(Benchmark):
    """lmms-eval's ``vqav2_val`` (scored here) or ``vqav2_test`` (a submission file for EvalAI)."""

    dataset = "lmms-lab-encoder/VQAv2"
    id_column = "question_id"
    max_new_tokens = 16
    until = ("\n\n",)  # lmms-eval's default stop (the few-shot delimiter) when the YAML names none
    post_prompt = POST_PROMPT

    def __init__(self, split: str) -> None:
        self.split = split
        self.scored = split == "validation"
        self.id = "vqav2_val" if self.scored else "vqav2_test"
        self.columns = ("question_id", "question", "answers") if self.scored else ("question_id", "question")
        self.headline = ("exact_match",) if self.scored else ()

    def doc_to_text(self, row: Row) -> str:
        return f"{self.pre_prompt}{row['question']}{self.post_prompt}"

    def parse(self, row: Row, prediction: str) -> str:
        # lmms-eval normalises the answer only for rows with answers (the quirk in the module docstring).
        if row.get("answers") is None:
            return prediction.strip()
        return normalize_vqav2_answer(prediction)

    def process_results(self, row: Row, prediction: str) -> dict[str, Any]:
        if not self.scored:
            return {"submission": submission_record(row, self.parse(row, prediction))}
        references = self._references(row)
        return {"exact_match": vqav2_accuracy(self.parse(row, prediction), references)}

    def aggregate(self, results: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        if not self.scored:
            return {}  # the test split has no answers: EvalAI scores the submission file
        scores = results["exact_match"]
        return {"exact_match": sum(scores) / len(scores)}

    def write_submission(self, rows: Sequence[Row], out_dir: Path) -> list[Path]:
        if self.scored:
            return []  # lmms-eval's vqav2_val writes no submission file
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / submission_name(datetime.datetime.now())
        records = [submission_record(row, self.parse(row, row.get("prediction") or "")) for row in rows]
        path.write_text(json.dumps(records), encoding="utf-8")
        return [path]

    def _references(self, row: Row) -> list[dict[str, Any]]:
        """The row's answer dicts with their ``answer`` normalised; refused when absent or malformed."""
        answers = row.get("answers")
        if answers is None or isinstance(answers, (str, Mapping)) or len(answers) == 0:
            raise DataError(
                f"{self.id}: question {row.get('question_id')!r} has 'answers' {answers!r}, expected the ten "
                "human answer dicts ({'answer', 'answer_confidence', 'answer_id'}) that the validation split has"
            )
        references = []
        for answer in answers:
            if not isinstance(answer, Mapping) or not isinstance(answer.get("answer"), str):
                raise DataError(
                    f"{self.id}: question {row.get('question_id')!r} has the answer {answer!r} in 'answers', "
                    "expected a dict with a string 'answer' (the lmms-lab VQAv2 layout)"
                )
            references.append({**answer, "answer": normalize_vqav2_answer(answer["answer"])})
        return references


def submission_record(row: Row, answer: str) -> dict[str, Any]:
    """One line of the EvalAI submission file (lmms-eval's ``submission`` value)."""
    return {"question_id": row["question_id"], "answer": answer}


def submission_name(now: datetime.datetime) -> str:
    """lmms-eval's submission file name at time ``now``."""
    return f"vqav2-test-submission-{now:%Y-%m-%d-%H-%M-%S}.json"


BENCHMARKS = (VQAv2("validation"), VQAv2("test"))
