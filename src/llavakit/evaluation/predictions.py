"""Predictions files: one JSON object per question, appended as answers finish, read back to resume or to score.

A record written by ``llavakit eval``::

    {"question_id": "12", "row": 12, "prompt": "Is there a dog?\\nAnswer ...", "prediction": "Yes", "parsed": "yes"}

and, for a question whose image could not be used, ``"prediction": null`` plus ``"error": "..."``. Files from
elsewhere need only ``question_id`` and ``prediction`` (`read_predictions`).

A run killed mid-write can leave a truncated last line; `drop_truncated_tail` (resuming) cuts that one line off
the file and says so, before more answers are appended; anywhere else a malformed line is an error naming it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llavakit.errors import DataError

logger = logging.getLogger(__name__)


def drop_truncated_tail(path: Path) -> None:
    """Cut an unfinished last line (no newline, not JSON: a killed write) off ``path``."""
    content = path.read_bytes()
    if not content or content.endswith(b"\n"):
        return
    cut = content.rfind(b"\n") + 1
    try:
        json.loads(content[cut:])
    except ValueError:
        logger.warning("%s: dropped a truncated last line (an interrupted run)", path)
        with path.open("r+b") as handle:
            handle.truncate(cut)
        return
    with path.open("ab") as handle:
        handle.write(b"\n")


def read_predictions(path: Path) -> dict[str, dict[str, Any]]:
    """Records of ``path`` by ``question_id`` (as a string).

    Raises:
        DataError: malformed JSON (file:line), a record without ``question_id``/``prediction``, a non-string
            prediction, or a duplicate id (both lines named).
    """
    if not path.is_file():
        raise DataError(f"predictions file {path} does not exist")
    lines = path.read_text(encoding="utf-8").split("\n")
    records: dict[str, dict[str, Any]] = {}
    where: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: malformed JSON ({err.msg}, column {err.colno})") from None
        key = _check_record(record, f"{path}:{number}")
        if key in records:
            raise DataError(f"{path}:{number}: duplicate question_id {key!r} (first on line {where[key]})")
        records[key] = record
        where[key] = number
    return records


def _check_record(record: Any, location: str) -> str:
    if not isinstance(record, dict) or "question_id" not in record or "prediction" not in record:
        raise DataError(
            f'{location}: expected {{"question_id": ..., "prediction": "..."}}, got {str(record)[:80]}'
        )
    prediction = record["prediction"]
    if prediction is not None and not isinstance(prediction, str):
        raise DataError(f"{location}: 'prediction' must be a string or null, got {type(prediction).__name__}")
    question_id = record["question_id"]
    if isinstance(question_id, (dict, list)) or question_id is None:
        raise DataError(f"{location}: 'question_id' must be a string or number, got {question_id!r}")
    return str(question_id)


def append_records(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Append ``records`` to ``path`` and flush, so a killed run keeps them."""
    with path.open("a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def write_records(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace ``path`` with ``records`` atomically (a temporary file renamed over it)."""
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    temporary.replace(path)


def match_predictions(
    ids: list[str], predictions: dict[str, dict[str, Any]], source: str, benchmark_id: str
) -> dict[str, str | None]:
    """Each data id's prediction; unknown or missing ids are an error listing a few of them."""
    known = set(ids)
    unknown = [key for key in predictions if key not in known]
    missing = [key for key in ids if key not in predictions]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"{len(unknown)} id(s) not in the data ({', '.join(unknown[:5])})")
        if missing:
            parts.append(f"{len(missing)} question(s) without a prediction ({', '.join(missing[:5])})")
        raise DataError(
            f"{source} does not match benchmark {benchmark_id!r}: {'; '.join(parts)}. Ids are the benchmark's id "
            "column or the row number (see the README's table); --limit N scores the first N questions"
        )
    return {key: predictions[key]["prediction"] for key in ids}
