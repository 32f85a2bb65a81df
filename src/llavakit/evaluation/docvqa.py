"""DocVQA and InfographicVQA (InfoVQA): document questions scored by ANLS, as lmms-eval's ``docvqa_val``,
``docvqa_test``, ``infovqa_val`` and ``infovqa_test`` tasks score them.

Data: lmms-eval's Hub dataset ``lmms-lab-encoder/DocVQA`` holds both benchmarks as configs (snapshot folders
``DocVQA/`` and ``InfographicVQA/``, files ``validation-*.parquet`` and ``test-*.parquet``):

- ``DocVQA``: scanned industry documents; columns ``questionId`` (a string of digits), ``question``,
  ``question_types``, ``image``, ``docId``, ``ucsf_document_id``, ``ucsf_document_page_no``, ``answers`` (a list
  of reference strings), ``data_split``; 5,349 validation and 5,188 test questions;
- ``InfographicVQA``: infographics; columns ``questionId``, ``question``, ``answers``, ``answer_type``,
  ``image``, ``image_url``, ``operation/reasoning``, ``ocr``, ``data_split``; 2,801 validation and 3,288 test
  questions.

``questionId`` is unique within a split: predictions files key rows by it. The test splits carry no answers.

Prompt (``docvqa_doc_to_text`` / ``infovqa_doc_to_text``, default kwargs): the question as it is, then
"\\nAnswer the question using a single word or phrase." Up to 32 new tokens, cut at the first blank line
(lmms-eval's default stop when the YAML names none).

Scoring of the validation splits: lmms-eval strips the prediction (``ConfigurableTask.process_results`` strips
every generated answer) and, as the tasks have no ``process_results`` of their own, applies its registered
``anls`` metric (after Qwen-VL's InfographicVQA evaluation) to the row's ``answers``, then ``mean``:

- each string is normalised by stripping, lower-casing and collapsing runs of whitespace to one space;
- per reference, the normalised Levenshtein distance is the edit distance between the two *normalised* strings
  divided by the longer of the two *unnormalised* lengths -- the stripped prediction and the reference as stored
  --, each taken after ``str.upper`` (which lengthens "ß" to "SS"); two empty strings have distance 0. So inner
  runs of spaces in the prediction, or spaces around a reference, enlarge the denominator: "fo  o" scores 0.8
  against "foo", not 0.75;
- the row's similarity is 1 minus the smallest distance over its references (the best reference), set to 0 when
  it is below 0.5 (0.5 itself is kept);
- ``anls`` is the mean over rows (a fraction, 0-1).

A validation row without references (None or empty; lmms-eval crashes on an empty list) is refused, naming the
question and pointing to the ``*_test`` task.

Test splits are scored by the official server (rrc.cvc.uab.es): no metrics. ``write_submission`` writes
lmms-eval's ``docvqa_test_for_submission.json`` / ``infovqa_test_for_submission.json``: one JSON list (Python's
``json.dump`` defaults: ASCII escapes, ", " and ": " separators, no newline) of ``{"questionId": int,
"answer": prediction}`` in row order, the prediction stripped (lmms-eval strips it before the tasks'
``*_test_process_results``). (``docvqa_test_process_results`` also returns the record under ``anls``, which
no metric of the task reads.) A ``questionId`` that is not an integer is refused (lmms-eval's ``int()`` would
crash).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llavakit.errors import DataError
from llavakit.evaluation.benchmark import Benchmark, Row

ANLS_THRESHOLD = 0.5
SUBSETS = {"docvqa": "DocVQA", "infovqa": "InfographicVQA"}
SPLITS = {"val": "validation", "test": "test"}


def levenshtein(first: str, second: str) -> int:
    """The edit distance (insertions, deletions, substitutions) between two strings."""
    previous = list(range(len(second) + 1))
    for i, first_char in enumerate(first, start=1):
        current = [i]
        for j, second_char in enumerate(second, start=1):
            substitution = previous[j - 1] + (first_char != second_char)
            current.append(min(substitution, previous[j] + 1, current[j - 1] + 1))
        previous = current
    return previous[-1]


def anls_normalise(text: str) -> str:
    """``text`` stripped, lower-cased, with whitespace runs collapsed to one space."""
    return " ".join(text.strip().lower().split())


def normalised_distance(prediction: str, answer: str) -> float:
    """The edit distance of the normalised strings over the longer unnormalised (upper-cased) length."""
    # lmms-eval measures the lengths before normalising; upper() is kept since it can change a length.
    length = max(len(answer.upper()), len(prediction.upper()))
    if length == 0:
        return 0.0
    return levenshtein(anls_normalise(answer), anls_normalise(prediction)) / length


def anls(prediction: str, answers: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """The ANLS similarity of ``prediction`` to its closest reference answer, 0 below ``threshold``."""
    similarity = 1 - min(normalised_distance(prediction, answer) for answer in answers)
    return similarity if similarity >= threshold else 0.0


class DocumentVQA(Benchmark):
    """One of lmms-eval's ``docvqa_{val,test}`` and ``infovqa_{val,test}`` tasks."""

    dataset = "lmms-lab-encoder/DocVQA"
    id_column = "questionId"
    max_new_tokens = 32
    until = ("\n\n",)  # lmms-eval's default stop (the few-shot delimiter) when the YAML names none
    post_prompt = "\nAnswer the question using a single word or phrase."

    def __init__(self, family: str, split: str) -> None:
        self.family = family
        self.id = f"{family}_{split}"
        self.subset = SUBSETS[family]
        self.split = SPLITS[split]
        self.scored = split == "val"
        self.columns = ("questionId", "question") + (("answers",) if self.scored else ())
        self.headline = ("anls",) if self.scored else ()

    def doc_to_text(self, row: Row) -> str:
        return f"{self.pre_prompt}{row['question']}{self.post_prompt}"

    def parse(self, row: Row, prediction: str) -> str:
        return prediction.strip()

    def process_results(self, row: Row, prediction: str) -> dict[str, Any]:
        answer = self.parse(row, prediction)
        if not self.scored:
            return {"submission": self.submission_record(row, answer)}
        return {"anls": anls(answer, self._answers(row))}

    def aggregate(self, results: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        if not self.scored:
            return {}  # the test split has no answers: the official server scores the submission file
        scores = results["anls"]
        return {"anls": sum(scores) / len(scores)}

    def write_submission(self, rows: Sequence[Row], out_dir: Path) -> list[Path]:
        if self.scored:
            return []  # lmms-eval writes no file for the validation splits
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{self.id}_for_submission.json"
        records = [self.submission_record(row, self.parse(row, row.get("prediction") or "")) for row in rows]
        path.write_text(json.dumps(records), encoding="utf-8")
        return [path]

    def submission_record(self, row: Row, answer: str) -> dict[str, Any]:
        """lmms-eval's submission entry for ``row``: the integer question id and the (stripped) ``answer``."""
        try:
            question_id = int(row["questionId"])
        except (TypeError, ValueError):
            raise DataError(
                f"{self.id}: 'questionId' is {row['questionId']!r}, expected an integer (the evaluation server "
                "reads integer question ids)"
            ) from None
        return {"questionId": question_id, "answer": answer}

    def _answers(self, row: Row) -> list[str]:
        answers = row["answers"]
        valid = isinstance(answers, Sequence) and not isinstance(answers, str) and len(answers) > 0
        if not valid or not all(isinstance(answer, str) for answer in answers):
            raise DataError(
                f"{self.id}: question {row['questionId']!r} has 'answers' {answers!r}, expected a non-empty list "
                f"of reference strings ({self.id} scores the validation split, which has them; the test split "
                f"has none: use {self.family}_test for a submission file)"
            )
        return list(answers)


BENCHMARKS = tuple(DocumentVQA(family, split) for family in SUBSETS for split in SPLITS)
