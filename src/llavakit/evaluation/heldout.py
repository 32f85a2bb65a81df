"""Held-out question answering: JSONL QA records scored by exact match after normalisation.

Reads the records `llavakit.data.synth` writes to ``heldout.jsonl`` (and any file of the same shape)::

    {"question_id": "heldout-00000-colour", "image": "images/heldout/00000.png",
     "question": "What colour is the triangle?", "answer": "orange", "type": "colour"}

``image`` is a path relative to ``image_root`` (or a list of them, or absent for text-only questions). Answers are
compared after `normalize_answer`, so ``"Red."`` matches ``red``; anything else (a second word, a synonym) is wrong,
which keeps the score honest for one-word answers.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path
from typing import Any

from llavakit.errors import DataError
from llavakit.evaluation.base import Benchmark, Example

REQUIRED_FIELDS = ("question_id", "question", "answer", "type")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace (``"The Red."`` → ``"red"``)."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


class HeldoutQA(Benchmark):
    """Exact-match QA over a JSONL file of records (see module docstring).

    Args:
        path: the ``.jsonl`` file.
        image_root: folder the records' image paths are relative to (default: the file's folder).
        limit: keep only the first ``limit`` records (None: all).
    """

    name = "heldout"

    def __init__(
        self, path: str | Path, image_root: str | Path | None = None, limit: int | None = None
    ) -> None:
        self.path = Path(path)
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.limit = limit

    def examples(self) -> list[Example]:
        """Parse the file; `DataError` names the line of a malformed record."""
        if not self.path.is_file():
            raise DataError(
                f"QA file {self.path} does not exist; generate it with 'llavakit data synth OUT_DIR'"
            )
        examples = []
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                examples.append(self._example(line, f"{self.path}:{number}"))
            if self.limit is not None and len(examples) >= self.limit:
                break
        if not examples:
            raise DataError(f"QA file {self.path} holds no record")
        return examples

    def _example(self, line: str, location: str) -> Example:
        try:
            record: Any = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{location}: malformed JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{location}: expected a JSON object, got {type(record).__name__}")
        missing = [name for name in REQUIRED_FIELDS if not isinstance(record.get(name), str)]
        if missing:
            raise DataError(
                f"{location}: missing or non-string field(s) {missing}; every record needs {REQUIRED_FIELDS}"
            )
        images = record.get("image") or []
        images = [images] if isinstance(images, str) else images
        return Example(
            id=record["question_id"],
            question=record["question"],
            answer=record["answer"],
            type=record["type"],
            images=tuple(self.image_root / image for image in images),
        )

    def score(self, prediction: str, example: Example) -> float:
        """1.0 when the normalised prediction equals the normalised answer, else 0.0."""
        return float(normalize_answer(prediction) == normalize_answer(example.answer))
