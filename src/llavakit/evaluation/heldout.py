"""Held-out question answering: JSONL QA records scored by exact match after normalisation (not an lmms-eval task).

Reads the records `llavakit.data.synth` writes to ``heldout.jsonl`` (and any file of the same shape)::

    {"question_id": "heldout-00000-colour", "image": "images/heldout/00000.png",
     "question": "What colour is the triangle?", "answer": "orange", "type": "colour"}

``image`` is a path relative to the file's folder (or a list of them, or absent for text-only questions). The
question is sent as it is, images first. Answers are compared after `normalize_answer`, so ``"Red."`` matches
``red``; anything else (a second word, a synonym) is wrong, which keeps the score honest for one-word answers.

Metrics (0-1): ``accuracy`` over all questions and ``accuracy/<type>`` per question type. Two baselines tell
whether a model looks at the images: ``heldout_text_only`` asks the same questions with every image removed, and
`majority_by_type` answers each question with its type's most common answer (no model at all).

Run it with ``llavakit eval --benchmark heldout --data runs/demo/data/<size>-seed0/heldout.jsonl``.
"""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llavakit.anyres.pixels import ImageSource
from llavakit.errors import DataError
from llavakit.evaluation.benchmark import Benchmark, Row
from llavakit.evaluation.sources import json_object

REQUIRED_FIELDS = ("question_id", "question", "answer", "type")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace (``"The Red."`` → ``"red"``)."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


class HeldoutQA(Benchmark):
    """Exact-match QA over a JSONL file of records (see the module docstring).

    Args:
        with_images: False gives the text-only baseline (``heldout_text_only``): the same rows, no images.
    """

    dataset = None
    split = "heldout"
    columns = REQUIRED_FIELDS
    image_columns = ("image",)
    id_column = "question_id"
    max_new_tokens = 8
    headline = ("accuracy",)

    def __init__(self, with_images: bool = True) -> None:
        self.with_images = with_images
        self.id = "heldout" if with_images else "heldout_text_only"

    def doc_to_text(self, row: Row) -> str:
        return row["question"]

    def doc_to_visual(self, row: Row) -> list[ImageSource]:
        """The row's image paths (a record may hold several); none for the text-only baseline."""
        return list(row.get("image") or ()) if self.with_images else []

    def parse(self, row: Row, prediction: str) -> str:
        return normalize_answer(prediction)

    def process_results(self, row: Row, prediction: str) -> dict[str, Any]:
        score = float(normalize_answer(prediction) == normalize_answer(row["answer"]))
        return {"accuracy": {"type": row["type"], "score": score}}

    def aggregate(self, results: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        values = results["accuracy"]
        by_type: dict[str, list[float]] = defaultdict(list)
        for value in values:
            by_type[value["type"]].append(value["score"])
        metrics = {"accuracy": sum(value["score"] for value in values) / len(values)}
        metrics.update({f"accuracy/{kind}": sum(s) / len(s) for kind, s in sorted(by_type.items())})
        return metrics

    def read_jsonl(self, path: Path) -> list[dict[str, Any]]:
        """Records of ``path`` with ``image`` as a list of paths resolved against the file's folder.

        Raises:
            DataError: a missing file (says how to make one), malformed JSON or a record lacking a field
                (``file:line``), or a file without records.
        """
        if not path.is_file():
            raise DataError(f"QA file {path} does not exist; generate it with 'llavakit data synth OUT_DIR'")
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                rows.append(_record(line, path.parent, f"{path}:{number}"))
        if not rows:
            raise DataError(f"QA file {path} holds no record")
        return rows

    def prompt_description(self) -> str:
        images = "images first" if self.with_images else "images removed"
        return f"the record's question as it is ({images}), answers compared after normalize_answer"


def _record(line: str, root: Path, location: str) -> dict[str, Any]:
    record = json_object(line, location)
    missing = [name for name in REQUIRED_FIELDS if not isinstance(record.get(name), str)]
    if missing:
        raise DataError(
            f"{location}: missing or non-string field(s) {missing}; every record needs {REQUIRED_FIELDS}"
        )
    images = record.get("image") or []
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
        raise DataError(f"{location}: 'image' must be a path or a list of paths, got {record['image']!r}")
    fields = {name: record[name] for name in REQUIRED_FIELDS}
    return {**fields, "image": [str(root / image) for image in images]}


def majority_by_type(rows: Sequence[Row]) -> dict[str, float]:
    """Per type, the exact-match accuracy of a guesser that knows only the answer distribution.

    Each question is answered with the most common reference answer among the questions of its type that offer
    the same candidate answers: a question naming some of its type's answers ("Is the shape left or right of the
    word?") is grouped with the others naming the same ones, so a two-way choice scores about 0.5, not the share of
    the most common of all four directions. Unlike the text-only baseline (a model trained with images may answer
    worse than chance without them) it cannot fall below chance.

    Args:
        rows: records with ``question``, ``answer`` and ``type``.
    """
    vocabulary: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        vocabulary[row["type"]].add(_words(row["answer"]))
    groups: dict[tuple[str, frozenset[str]], Counter[str]] = defaultdict(Counter)
    for row in rows:
        question = f" {_words(row['question'])} "
        offered = frozenset(answer for answer in vocabulary[row["type"]] if f" {answer} " in question)
        groups[(row["type"], offered)][row["answer"]] += 1
    hits: dict[str, int] = defaultdict(int)
    for (kind, _), answers in groups.items():
        hits[kind] += max(answers.values())
    counts = Counter(row["type"] for row in rows)
    return {kind: hits[kind] / counts[kind] for kind in sorted(counts)}


def _words(text: str) -> str:
    """Lower-case words of ``text`` separated by single spaces (punctuation dropped)."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


HELDOUT = HeldoutQA()
HELDOUT_TEXT_ONLY = HeldoutQA(with_images=False)
BENCHMARKS = (HELDOUT, HELDOUT_TEXT_ONLY)
