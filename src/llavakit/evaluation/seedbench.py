"""SEED-Bench (v1), image questions: four-option questions scored as lmms-eval's ``seedbench`` task scores them.

Data: lmms-eval's Hub dataset (columns ``question_id``, ``question``, ``choice_a`` ... ``choice_d``, ``answer`` (a
letter), ``data_type`` (``image`` or ``video``), ``question_type_id`` (the evaluation dimension, 1-12), ``data_id``
and ``image``: a *list* of images, one for an image question, the sampled frames for a video question).
``question_id`` is unique: predictions files key rows by it. VLMEvalKit's ``SEEDBench_IMG.tsv`` (``index``,
``question``, ``A`` ... ``D``, ``answer``, ``category``, ``image``) holds the image questions only; its rows are
renamed to these columns (``index`` → ``question_id``, ``category`` (the dimension's name) → its
``question_type_id``, ``data_type`` = image, ``image`` → a one-image list).

Image questions only (a deviation, asked for by this project): lmms-eval's task itself asks *every* row of the
split, a video row's frames as several images, and reports ``seed_image``, ``seed_video`` and ``seed_all``. Here the
video rows are dropped when the data is read (`SEEDBench.attach_images`), so a run answers the 14,233 image
questions and reports ``seed_image`` only, the "SEED-IMG" number of the LLaVA papers. lmms-eval scores each row on
its own and ``seed_image`` is the mean over the image rows alone, so it is unchanged by the dropped rows;
``seed_video``/``seed_all`` are not computed (a video row given to `score` is refused).

Prompt: the question, then ``"\\nA. <choice_a>\\nB. ...\\nD. <choice_d>"`` and "\\nAnswer with the option's letter
from the given choices directly." (no prompt kwargs: the wording is fixed in lmms-eval's ``seed_doc_to_text``).
Generation: the YAML stops at ``ASSISTANT:`` and sets no length, so lmms-eval's LLaVA model uses its default of
1024 new tokens (only the first character is ever read). Its ``image_aspect_ratio: original`` generation kwarg only
reaches lmms-eval's ``llava`` model, and only for a checkpoint whose config lacks ``image_aspect_ratio`` (every
LLaVA-NeXT config has one), so it is not reproduced.

Scoring (``seed_process_result`` / ``seed_aggregation_result``): the answer is stripped and cut to its first
character; right when that character equals the answer letter ignoring case and surrounding spaces. So ``b`` and
``"B. cat"`` are right for B; ``"(B) cat"`` (reads ``(``), ``"The answer is B."`` (reads ``T``) and ``"A B"``
(reads ``A``) are wrong, and an empty answer is wrong. ``seed_image`` is a fraction (0-1). lmms-eval has no
per-dimension breakdown; the ``dimension/<name>`` keys are ours (the same mean over each dimension's questions).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llavakit.anyres.pixels import ImageSource
from llavakit.errors import DataError
from llavakit.evaluation.benchmark import Benchmark, Row
from llavakit.evaluation.choices import option_letters

CHOICE_COLUMNS = ("choice_a", "choice_b", "choice_c", "choice_d")
POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
# SEED-Bench's image evaluation dimensions by question_type_id (its SEED-Bench.json "question_type" table; the
# names are VLMEvalKit's TSV categories). Ids 10-12 are the video dimensions.
DIMENSIONS = {
    1: "Scene Understanding", 2: "Instance Identity", 3: "Instance Attributes", 4: "Instance Location",
    5: "Instances Counting", 6: "Spatial Relation", 7: "Instance Interaction", 8: "Visual Reasoning",
    9: "Text Understanding",
}  # fmt: skip
DIMENSION_IDS = {name: number for number, name in DIMENSIONS.items()}


def first_character(prediction: str) -> str:
    """What lmms-eval reads from an answer: its first character after stripping (empty stays empty)."""
    return prediction.strip()[:1]


class SEEDBench(Benchmark):
    """lmms-eval's ``seedbench`` task, restricted to its image questions."""

    id = "seedbench"
    dataset = "lmms-lab-encoder/SEED-Bench"
    split = "test"
    columns = ("question_id", "question", *CHOICE_COLUMNS, "answer", "data_type", "question_type_id")
    id_column = "question_id"
    max_new_tokens = 1024
    until = ("ASSISTANT:",)
    post_prompt = POST_PROMPT
    headline = ("seed_image",)

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

    def attach_images(self, table: Any, source: str | Path | None) -> Any:
        """The image questions only (module docstring), their image lists left undecoded (bytes or paths).

        A VLMEvalKit TSV (a list of rows) holds image questions only and is returned as it is.
        """
        if isinstance(table, list) or "data_type" not in table.column_names:
            return table  # a missing data_type column is named by the column check that follows
        # Rows of any other data_type are kept, so that `process_results` refuses them by name.
        table = table.filter(lambda data_type: data_type != "video", input_columns="data_type")
        return _undecoded_image_lists(table)

    def parse(self, row: Row, prediction: str) -> str:
        return first_character(prediction)

    def process_results(self, row: Row, prediction: str) -> dict[str, Any]:
        if row["data_type"] != "image":
            raise DataError(
                f"SEED-Bench question {row['question_id']!r}: data_type {row['data_type']!r} is not 'image'; "
                "llavakit's seedbench scores the image questions only (video rows are dropped when the data "
                "is read)"
            )
        answer = row["answer"]
        if not isinstance(answer, str) or answer.strip().upper() not in option_letters(4):
            raise DataError(
                f"SEED-Bench question {row['question_id']!r}: answer {answer!r} is not a letter A-D"
            )
        right = first_character(prediction).lower() == answer.lower().strip()
        return {"seed_image": {"score": float(right), "dimension": _dimension(row)}}

    def aggregate(self, results: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        values = results["seed_image"]
        metrics = {"seed_image": sum(value["score"] for value in values) / len(values)}
        by_dimension: dict[str, list[float]] = defaultdict(list)
        for value in values:
            by_dimension[value["dimension"]].append(value["score"])
        for dimension, scores in sorted(by_dimension.items()):
            metrics[f"dimension/{dimension}"] = sum(scores) / len(scores)
        return metrics

    def from_vlmevalkit(self, row: Row) -> dict[str, Any]:
        missing = [c for c in ("index", "question", "A", "B", "C", "D", "answer", "category") if c not in row]
        if missing:
            raise DataError(
                f"SEED-Bench TSV row {row.get('index')!r}: missing column(s) {missing} of VLMEvalKit's "
                "SEEDBench_IMG.tsv layout (index, question, A, B, C, D, answer, category, image)"
            )
        if row["category"] not in DIMENSION_IDS:
            raise DataError(
                f"SEED-Bench TSV row {row['index']!r}: category {row['category']!r} is not one of SEED-Bench's "
                f"image dimensions {sorted(DIMENSION_IDS)}"
            )
        return {
            "question_id": row["index"],
            "question": row["question"],
            **{column: row[letter] for column, letter in zip(CHOICE_COLUMNS, "ABCD")},
            "answer": row["answer"],
            "data_type": "image",
            "question_type_id": DIMENSION_IDS[row["category"]],
            "image": [row["image"]] if row.get("image") is not None else None,
        }


def _dimension(row: Row) -> str:
    """The name of an image row's evaluation dimension, from its ``question_type_id``."""
    value = row["question_type_id"]
    try:
        return DIMENSIONS[int(value)]
    except (KeyError, TypeError, ValueError):
        raise DataError(
            f"SEED-Bench question {row['question_id']!r}: question_type_id {value!r} is not an image dimension "
            f"(1-9: {', '.join(DIMENSIONS.values())})"
        ) from None


def _undecoded_image_lists(table: Any) -> Any:
    """``table`` with its ``image`` list of images read as bytes/paths (the loader only undecodes plain image
    columns): the runner then holds compressed images, and a corrupt one fails its own question. The cast copies
    the column once into the ``datasets`` cache (reused by later runs)."""
    from datasets import Image, List

    feature = table.features.get("image")
    if isinstance(feature, List) and isinstance(feature.feature, Image) and feature.feature.decode:
        table = table.cast_column("image", List(Image(decode=False)))
    return table


def _image(value: Any) -> ImageSource:
    """An image entry as bytes or a path (undecoded Hub entries are ``{"bytes", "path"}`` dicts)."""
    if isinstance(value, dict):
        return value.get("bytes") or value.get("path")
    return value


BENCHMARKS = (SEEDBench(),)
