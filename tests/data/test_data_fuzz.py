"""Property-based fuzz of the data reader: mutated LLaVA records give a valid `Sample` or a `DataError`, nothing else.

Valid records are drawn, then mutated the ways real data goes wrong: fields of the wrong type, missing or extra
fields, any unicode, empty and huge strings, ``<image>`` placeholders that do not match the ``image`` entries, turns
out of order, and records that are not objects at all. They are written as a ``.json`` list or as ``.jsonl`` and
read back through `read_records` + `parse_sample`, the path every training and inspection run takes. Every record
must become either a well-formed `Sample` or a `DataError` that names the file, the record's line and the field at
fault; any other exception is a bug. Examples are bounded and derandomized so the test runs in seconds, the same way
on every machine.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from llavakit.data.formats import IMAGE_PLACEHOLDER, parse_sample, read_records
from llavakit.data.issues import IssueLog
from llavakit.data.schema import ASSISTANT, ROLES, USER, Sample
from llavakit.errors import DataError

# What an error must point at: one of the record's fields, or the record itself.
FIELD_WORDS = ("'id'", "'image'", "'conversations'", "turn", IMAGE_PLACEHOLDER, "JSON object")
HUGE = 200_000

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        ["", " ", IMAGE_PLACEHOLDER, f"{IMAGE_PLACEHOLDER}{IMAGE_PLACEHOLDER}", "\u202e\x00\ufeff"]
    ),
    st.builds(lambda char: char * HUGE, st.characters()),
)


@st.composite
def valid_record(draw) -> dict[str, Any]:
    """A well-formed LLaVA record: 0-2 images, one placeholder per image in the user turns, alternating turns."""
    num_images = draw(st.integers(0, 2))
    num_pairs = draw(st.integers(1, 3))
    keys = draw(
        st.sampled_from([("from", "value", "human", "gpt"), ("role", "content", "user", "assistant")])
    )
    turns = []
    for pair in range(num_pairs):
        question = draw(st.text(max_size=20).map(lambda t: t.replace(IMAGE_PLACEHOLDER, "")))
        if pair == 0 and num_images:
            question = f"{IMAGE_PLACEHOLDER}\n" * num_images + question
        turns.append({keys[0]: keys[2], keys[1]: question})
        turns.append({keys[0]: keys[3], keys[1]: draw(st.text(max_size=20))})
    record: dict[str, Any] = {"id": draw(st.text(max_size=10)), "conversations": turns}
    if num_images:
        record["image"] = [f"img/{index}.png" for index in range(num_images)]
        if num_images == 1 and draw(st.booleans()):
            record["image"] = record["image"][0]
    if draw(st.booleans()):
        turns.insert(0, {keys[0]: "system", keys[1]: draw(st.text(max_size=10))})
    return record


def _mutate(draw, record: dict[str, Any]) -> Any:
    """Apply one drawn mutation to ``record`` (in place when it stays a dict); returns the record."""
    turns = record["conversations"]
    kind = draw(
        st.sampled_from(
            [
                "replace field",
                "delete field",
                "extra field",
                "replace turn",
                "replace turn key",
                "delete turn key",
                "turn text",
                "image count",
                "swap turns",
                "not an object",
            ]
        )
    )
    if kind == "replace field":
        record[draw(st.sampled_from(["id", "image", "conversations"]))] = draw(json_value)
    elif kind == "delete field":
        record.pop(draw(st.sampled_from(["id", "image", "conversations"])), None)
    elif kind == "extra field":
        record[draw(st.text(max_size=10))] = draw(json_value)
    elif kind == "replace turn":
        turns[draw(st.integers(0, len(turns) - 1))] = draw(json_value)
    elif kind in ("replace turn key", "delete turn key"):
        turn = turns[draw(st.integers(0, len(turns) - 1))]
        key = draw(st.sampled_from(["from", "value", "role", "content", "weight"]))
        if kind == "delete turn key":
            turn.pop(key, None)
        else:
            turn[key] = draw(
                json_value | st.sampled_from(["human", "gpt", "system", "user", "assistant", "bot"])
            )
    elif kind == "turn text":
        turn = turns[draw(st.integers(0, len(turns) - 1))]
        turn["value" if "value" in turn else "content"] = draw(text)
    elif kind == "image count":
        record["image"] = [f"img/{index}.png" for index in range(draw(st.integers(0, 3)))]
    elif kind == "swap turns":
        first, second = draw(st.integers(0, len(turns) - 1)), draw(st.integers(0, len(turns) - 1))
        turns[first], turns[second] = turns[second], turns[first]
    else:
        return draw(json_leaf | st.lists(json_value, max_size=3))
    return record


@st.composite
def mutated_record(draw) -> Any:
    record = draw(valid_record())
    for _ in range(draw(st.integers(0, 3))):
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            break
        if not record["conversations"] or not all(isinstance(turn, dict) for turn in record["conversations"]):
            break
        record = _mutate(draw, record)
    return record


def _write(folder: Path, records: list[Any], jsonl: bool, ascii_only: bool) -> tuple[Path, list[int]]:
    """Write ``records``; returns the file and each record's first line."""
    if jsonl:
        path = folder / "fuzz.jsonl"
        path.write_text("".join(json.dumps(record, ensure_ascii=ascii_only) + "\n" for record in records))
        return path, list(range(1, len(records) + 1))
    path = folder / "fuzz.json"
    lines, chunks, line = [], [], 2
    for record in records:
        chunk = json.dumps(record, indent=1, ensure_ascii=ascii_only)
        lines.append(line)
        chunks.append(chunk)
        line += chunk.count("\n") + 1
    path.write_text("[\n" + ",\n".join(chunks) + "\n]\n")
    return path, lines


def _check_sample(sample: Sample) -> None:
    """A parsed sample is well formed: what the templates and the image loader rely on."""
    assert isinstance(sample.id, str)
    assert all(isinstance(image, str) and image for image in sample.images)
    turns = sample.conversation.turns
    assert turns and all(turn.role in ROLES and isinstance(turn.text, str) for turn in turns)
    assert [turn.role for turn in turns] == [
        USER if index % 2 == 0 else ASSISTANT for index in range(len(turns))
    ]
    assert sum(turn.text.count(IMAGE_PLACEHOLDER) for turn in turns) == len(sample.images)
    assert sample.conversation.system is None or isinstance(sample.conversation.system, str)


def _field_named(error: DataError) -> str:
    return next(word for word in FIELD_WORDS if word in str(error))


def _check_error(error: DataError, path: Path, line: int) -> None:
    message = str(error)
    assert re.search(rf"{re.escape(str(path))}:{line}\b", message), (message[:500], line)
    assert any(word in message for word in FIELD_WORDS), message[:500]


@settings(
    max_examples=300,
    deadline=2000,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(
    records=st.lists(mutated_record(), min_size=1, max_size=3),
    jsonl=st.booleans(),
    ascii_only=st.booleans(),
)
def test_mutated_records_give_a_sample_or_a_data_error_naming_file_line_and_field(
    tmp_path, records, jsonl, ascii_only
):
    path, lines = _write(tmp_path, records, jsonl, ascii_only)
    reader = read_records(path, IssueLog(policy="error"))
    for line in lines:
        try:
            record = next(reader)
        except DataError as error:  # a record that is not an object, raised by the reader (policy "error")
            _check_error(error, path, line)
            event("error: not an object")
            return
        assert record.location == f"{path}:{line}"
        try:
            sample = parse_sample(record)
        except DataError as error:
            _check_error(error, path, line)
            event(f"error: {_field_named(error)}")
        else:
            _check_sample(sample)
            event("sample")
    assert next(reader, None) is None
