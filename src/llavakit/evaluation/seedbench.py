"""SEED-Bench (v1): four-option questions, scored as lmms-eval's ``seedbench`` task scores them.

Data: lmms-eval's Hub dataset (columns ``question_id``, ``question``, ``choice_a`` ... ``choice_d``, ``answer`` (a
letter), ``data_type`` (``image`` or ``video``), ``question_type_id`` (the evaluation dimension), ``data_id`` and
``image``: a *list* of images, one for an image question, the sampled frames for a video question). ``question_id``
is unique: predictions files key rows by it. VLMEvalKit's ``SEEDBench_IMG.tsv`` (``index``, ``question``, ``A`` ...
``D``, ``answer``, ``category``, ``image``) holds the image questions only; its rows are renamed to these columns
(``index`` → ``question_id``, ``category`` (the dimension's name) → ``question_type_id``, ``data_type`` = image).

lmms-eval does not restrict the task to images: it asks every row (a video row's frames as several images) and
reports ``seed_image``, ``seed_video`` and ``seed_all`` over the rows of each kind. The "SEED-Bench (image)" number
is ``seed_image``. Here too the keys cover the rows given: ``seed_image`` and ``seed_all`` agree on image-only data
(the TSV); ``seed_video`` appears only when video rows are scored.

Prompt: the question, then ``"\\nA. <choice_a>\\nB. ...\\nD. <choice_d>"`` and "\\nAnswer with the option's letter
from the given choices directly." (no prompt kwargs: the wording is fixed in lmms-eval's ``seed_doc_to_text``).
Generation stops at ``ASSISTANT:``; the YAML sets no length, so lmms-eval's LLaVA model uses its default of 1024 new
tokens (only the first character is ever read).

Scoring (``seed_process_result`` / ``seed_aggregation_result``): the answer is stripped and cut to its first
character; right when it equals the answer letter ignoring case and surrounding spaces. So ``b`` and ``"B. cat"``
are right for B; ``"(B) cat"`` (reads ``(``) and ``"The answer is B."`` (reads ``T``) are wrong. Metrics are
fractions (0-1). lmms-eval has no per-dimension breakdown; ``question_type/<question_type_id>`` keys are ours.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from llavakit.anyres.pixels import ImageSource
from llavakit.errors import DataError
from llavakit.evaluation.benchmark import Benchmark, Row
from llavakit.evaluation.choices import option_letters

CHOICE_COLUMNS = ("choice_a", "choice_b", "choice_c", "choice_d")
DATA_TYPES = ("image", "video")
POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."


def first_character(prediction: str) -> str:
    """What lmms-eval reads from an answer: its first character after stripping (empty stays empty)."""
    return prediction.strip()[:1]


class SEEDBench(Benchmark):
    """lmms-eval's ``seedbench`` task."""

    id = "seedbench"
    dataset = "lmms-lab-encoder/SEED-Bench"
    split = "test"
    columns = ("question_id", "question", *CHOICE_COLUMNS, "answer", "data_type", "question_type_id")
    id_column = "question_id"
    max_new_tokens = 1024
    until = ("ASSISTANT:",)
    post_prompt = POST_PROMPT
    headline = ("seed_image", "seed_video", "seed_all")

    def doc_to_text(self, row: Row) -> str:
        options = "\n".join(
            f"{letter}. {row[column]}" for letter, column in zip(option_letters(4), CHOICE_COLUMNS)
        )
        return f"{row['question']}\n{options}{self.post_prompt}"

    def doc_to_visual(self, row: Row) -> list[ImageSource]:
        """Every image of the row's ``image`` list (a Hub row's undecoded ``{"bytes", "path"}`` entries unpacked)."""
        images = row.get("image")
        if not isinstance(images, (list, tuple)) or not images:
            raise DataError(
                f"SEED-Bench question {row['question_id']!r}: 'image' must be a non-empty list of images "
                f"(lmms-lab's SEED-Bench layout), got {type(images).__name__}"
            )
        return [_image(image) for image in images]

    def parse(self, row: Row, prediction: str) -> str:
        return first_character(prediction)

    def process_results(self, row: Row, prediction: str) -> dict[str, Any]:
        data_type = row["data_type"]
        if data_type not in DATA_TYPES:
            raise DataError(
                f"SEED-Bench question {row['question_id']!r}: data_type {data_type!r} is not one of {DATA_TYPES}"
            )
        answer = row["answer"]
        if not isinstance(answer, str) or answer.strip().upper() not in option_letters(4):
            raise DataError(
                f"SEED-Bench question {row['question_id']!r}: answer {answer!r} is not a letter A-D"
            )
        right = first_character(prediction).lower() == answer.lower().strip()
        value = {"score": float(right), "question_type": row["question_type_id"]}
        return {f"seed_{data_type}": value, "seed_all": value}

    def aggregate(self, results: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        metrics = {
            key: sum(value["score"] for value in results[key]) / len(results[key])
            for key in self.headline
            if results.get(key)
        }
        by_type: dict[str, list[float]] = defaultdict(list)
        for value in results["seed_all"]:
            by_type[str(value["question_type"])].append(value["score"])
        for question_type, scores in sorted(by_type.items()):
            metrics[f"question_type/{question_type}"] = sum(scores) / len(scores)
        return metrics

    def from_vlmevalkit(self, row: Row) -> dict[str, Any]:
        missing = [c for c in ("index", "question", "A", "B", "C", "D", "answer", "category") if c not in row]
        if missing:
            raise DataError(
                f"SEED-Bench TSV row {row.get('index')!r}: missing column(s) {missing} of VLMEvalKit's "
                "SEEDBench_IMG.tsv layout (index, question, A, B, C, D, answer, category, image)"
            )
        return {
            "question_id": row["index"],
            "question": row["question"],
            **{column: row[letter] for column, letter in zip(CHOICE_COLUMNS, "ABCD")},
            "answer": row["answer"],
            "data_type": "image",
            "question_type_id": row["category"],
            "image": [row["image"]] if row.get("image") is not None else None,
        }


def _image(value: Any) -> ImageSource:
    """An image entry as bytes or a path (undecoded Hub entries are ``{"bytes", "path"}`` dicts)."""
    if isinstance(value, dict):
        return value.get("bytes") or value.get("path")
    return value


BENCHMARKS = (SEEDBench(),)
