"""Readers for LLaVA JSON (a list) and JSONL files, and the parser from a raw dict to a `Sample`.

Both readers stream records with their ``file:line`` so every later error can say where a sample lives. The JSON
list is decoded element by element (``json.JSONDecoder.raw_decode``) instead of ``json.load``, which would only
report the first syntax error and no sample positions.

Parsing follows LLaVA-NeXT:

- turns use ``from``/``value`` (``human``/``gpt``/``system``) or ``role``/``content`` (``user``/``assistant``);
- a leading ``system`` turn becomes the sample's system prompt; a leading ``gpt`` turn is dropped, as upstream does
  (``source = source[1:]``), after which turns must alternate user/assistant;
- ``image`` is a path or a list of paths; the number of ``<image>`` placeholders (user turns only) must equal the
  number of images;
- ``video`` (LLaVA-Video / OneVision) is a file or frame folder relative to the video folder (or a list of them);
  as upstream, the text marks a video with ``<image>``, which becomes ``<video>`` here when the sample has no
  ``image`` field. ``<video>`` (transformers' convention) is accepted as written, and needed when a sample has both
  images and videos. The number of ``<video>`` placeholders must equal the number of videos;
- a turn holding the sample's only placeholder (image or video) has it moved to the start as ``<image>\\n``
  (``<video>\\n``) (upstream ``preprocess_multimodal``, which sees videos as ``<image>`` too); multi-image text is
  left as written.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llavakit.data.issues import IssueLog
from llavakit.data.schema import ASSISTANT, SYSTEM, USER, Conversation, Sample, Turn
from llavakit.errors import DataError

IMAGE_PLACEHOLDER = "<image>"
# Where a video goes in a turn (transformers' LlavaOnevision token); upstream data marks videos with <image>.
VIDEO_PLACEHOLDER = "<video>"
_ROLE_ALIASES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT, "system": SYSTEM}


@dataclass(frozen=True)
class Record:
    """One raw sample dict and where it came from (``file:line``)."""

    location: str
    data: dict[str, Any]


def read_records(path: str | Path, issues: IssueLog) -> Iterator[Record]:
    """Stream the records of a ``.json`` (list) or ``.jsonl`` file.

    A malformed JSONL line is reported to ``issues`` as kind ``json`` with ``file:line`` and reading goes on with
    the next line. A ``.json`` list that does not parse to its closing ``]`` (a malformed element, a missing
    bracket, trailing text) raises `DataError` whatever the skip policy: the rest of the list cannot be located, so
    going on would silently train on a shorter dataset. A file that is not UTF-8 raises `DataError` too.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"data file {path} is a folder; point at a LLaVA .json / .jsonl file (or a YAML mixture)")
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if path.suffix == ".jsonl":
        yield from _read_jsonl(path, issues)
    elif path.suffix == ".json":
        yield from _read_json_list(path, issues)
    else:
        raise DataError(
            f"data file {path}: unknown extension {path.suffix!r}; use .json, .jsonl or a .yaml mixture"
        )


def _read_jsonl(path: Path, issues: IssueLog) -> Iterator[Record]:
    # Binary lines decoded one by one, so a non-UTF-8 byte is reported with its line number.
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            line = _decode_utf8(raw, path, line_number)
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as err:
                issues.report(
                    "json", DataError(f"{path}:{line_number}: malformed JSON ({err.msg}, column {err.colno})")
                )
                continue
            if not isinstance(data, dict):
                issues.report(
                    "json",
                    DataError(f"{path}:{line_number}: expected a JSON object, got {type(data).__name__}"),
                )
                continue
            yield Record(f"{path}:{line_number}", data)


def _read_json_list(path: Path, issues: IssueLog) -> Iterator[Record]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, raw.count(b"\n", 0, err.start) + 1, raw[err.start]) from None
    decoder = json.JSONDecoder()
    index = _skip_space(text, 0)
    if index >= len(text) or text[index] != "[":
        raise DataError(
            f"{path}:{_line_of(text, index)}: a .json data file must hold a JSON list of samples; "
            "use .jsonl for one object per line"
        )
    index = _skip_space(text, index + 1)
    line, line_index = 1, 0
    while index < len(text) and text[index] != "]":
        # Line numbers are counted incrementally so a 665K-sample file stays linear time.
        line += text.count("\n", line_index, index)
        line_index = index
        try:
            data, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}:{err.lineno}: malformed JSON ({err.msg}, column {err.colno}); the rest of the list "
                "cannot be read, fix the file"
            ) from None
        if isinstance(data, dict):
            yield Record(f"{path}:{line}", data)
        else:
            issues.report(
                "json", DataError(f"{path}:{line}: expected a JSON object, got {type(data).__name__}")
            )
        index = _skip_space(text, index)
        if index < len(text) and text[index] == ",":
            index = _skip_space(text, index + 1)
        elif index < len(text) and text[index] != "]":
            raise DataError(
                f"{path}:{_line_of(text, index)}: expected ',' or ']' after a sample; fix the file"
            )
    _check_list_end(text, index, path)


def _check_list_end(text: str, index: int, path: Path) -> None:
    """The list must close with ``]`` and nothing but whitespace may follow (a cut or concatenated file)."""
    if index >= len(text):
        raise DataError(
            f"{path}:{_line_of(text, index)}: the JSON list has no closing ']' (the file is cut short?); "
            "re-download or re-export the file"
        )
    end = _skip_space(text, index + 1)
    if end < len(text):
        raise DataError(
            f"{path}:{_line_of(text, end)}: unexpected text after the closing ']' of the JSON list "
            f"({text[end : end + 20]!r}); remove it or split the file"
        )


def _decode_utf8(raw: bytes, path: Path, line_number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, line_number, raw[err.start]) from None


def _not_utf8(path: Path, line_number: int, byte: int) -> DataError:
    return DataError(
        f"{path}:{line_number}: not UTF-8 (byte {byte:#04x} cannot be decoded); re-save the file as UTF-8, "
        "e.g. `iconv -f latin1 -t utf-8 IN > OUT`"
    )


def _skip_space(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\r\n":
        index += 1
    return index


def _line_of(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


def parse_sample(record: Record, time_instruction: str | None = None) -> Sample:
    """Validate a raw record and build a `Sample`; `DataError` names the sample id, location and fix.

    ``time_instruction`` (one-video samples): upstream's ``add_time_instruction`` rewrite of the first user turn,
    applied to the raw text before placeholders are placed, as upstream does: ``{mark}\\n{instruction}\\n{text
    without the mark}``, the mark being ``<video>`` if the sample writes it, else ``<image>``."""
    data = record.data
    sample_id = str(data.get("id", record.location))
    where = f"sample {sample_id!r} ({record.location})"
    images = _parse_images(data.get("image"), where)
    videos = _parse_paths(data.get("video"), "video", where)
    turns = _parse_turns(data.get("conversations"), where)
    if time_instruction is not None:
        turns = _with_time_instruction(turns, len(videos), time_instruction, where)
    system = None
    if turns and turns[0].role == SYSTEM:
        system, turns = turns[0].text, turns[1:]
    if turns and turns[0].role == ASSISTANT:
        turns = turns[1:]
    _check_alternation(turns, where)
    if videos:
        turns = _mark_videos(turns, bool(images), where)
        turns = _place_placeholders(turns, len(videos), where, VIDEO_PLACEHOLDER, "video", move=not images)
    turns = _place_placeholders(turns, len(images), where, IMAGE_PLACEHOLDER, "image", move=not videos)
    return Sample(sample_id, Conversation(tuple(turns), system), images, record.location, videos)


def _parse_images(value: Any, where: str) -> tuple[str, ...]:
    return _parse_paths(value, "image", where)


def _parse_paths(value: Any, name: str, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise DataError(f"{where}: field {name!r} must be a path or a list of paths, got {value!r}")
    return tuple(paths)


def timed_video_text(text: str, instruction: str, mark: str = VIDEO_PLACEHOLDER) -> str:
    """A user turn's ``text`` with upstream's time instruction: ``{mark}\\n{instruction}\\n{text without mark}``
    (upstream's ``_get_item`` prepends the sentence, then ``preprocess_multimodal`` moves the placeholder to the
    front, so ``"<image>\\nQ"`` keeps a blank line before ``Q``). Training and inference both write it here."""
    return f"{mark}\n{instruction}\n{text.replace(mark, '')}"


def _with_time_instruction(turns: list[Turn], num_videos: int, instruction: str, where: str) -> list[Turn]:
    if num_videos != 1:
        raise DataError(
            f"{where}: {num_videos} videos; video_spec.add_time_instruction describes one video per sample: split "
            "the sample or turn the instruction off"
        )
    mark = VIDEO_PLACEHOLDER if any(VIDEO_PLACEHOLDER in turn.text for turn in turns) else IMAGE_PLACEHOLDER
    first = next((number for number, turn in enumerate(turns) if turn.role == USER), None)
    if first is None:
        raise DataError(f"{where}: no user turn to put the video's time instruction in")
    turns = list(turns)
    turns[first] = Turn(USER, timed_video_text(turns[first].text, instruction, mark))
    return turns


def _mark_videos(turns: list[Turn], has_images: bool, where: str) -> list[Turn]:
    """Upstream's convention: without ``<video>`` in the text, the ``<image>`` placeholders mark the videos."""
    if any(VIDEO_PLACEHOLDER in turn.text for turn in turns):
        return turns
    if has_images:
        raise DataError(
            f"{where}: the sample has both 'image' and 'video' but its text has no {VIDEO_PLACEHOLDER}: mark each "
            f"video with {VIDEO_PLACEHOLDER} (the {IMAGE_PLACEHOLDER} placeholders are the images)"
        )
    return [Turn(turn.role, turn.text.replace(IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)) for turn in turns]


def _parse_turns(value: Any, where: str) -> list[Turn]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field 'conversations' must be a non-empty list of turns")
    turns = []
    for number, item in enumerate(value):
        if not isinstance(item, dict):
            raise DataError(f"{where}: turn {number} must be an object with from/value or role/content")
        role = item.get("from", item.get("role"))
        text = item.get("value", item.get("content"))
        if not isinstance(role, str) or role not in _ROLE_ALIASES:  # a list or object role is unhashable
            raise DataError(
                f"{where}: turn {number} has role {role!r}; use one of {', '.join(_ROLE_ALIASES)}"
            )
        if not isinstance(text, str):
            raise DataError(f"{where}: turn {number} needs a string 'value' (or 'content'), got {text!r}")
        turns.append(Turn(_ROLE_ALIASES[role], text))
    return turns


def _check_alternation(turns: list[Turn], where: str) -> None:
    if not turns:
        raise DataError(f"{where}: the conversation has no user turn")
    for number, turn in enumerate(turns):
        expected = USER if number % 2 == 0 else ASSISTANT
        if turn.role != expected:
            raise DataError(
                f"{where}: turns out of order: turn {number} is {turn.role!r} but {expected!r} was expected "
                "(turns must alternate user/assistant after an optional system turn)"
            )


def _place_placeholders(
    turns: list[Turn], num_items: int, where: str, placeholder: str, name: str, move: bool = True
) -> list[Turn]:
    """Check ``placeholder`` against the sample's ``num_items`` ``name`` entries; with ``move``, a single one is
    moved to the start of its turn (upstream ``preprocess_multimodal``)."""
    counts = [turn.text.count(placeholder) for turn in turns]
    if any(count and turn.role != USER for count, turn in zip(counts, turns)):
        raise DataError(f"{where}: an assistant turn holds {placeholder}; {name}s go in user turns only")
    if sum(counts) != num_items:
        hint = f" (or {IMAGE_PLACEHOLDER}, upstream's mark of a video)" if name == "video" else ""
        raise DataError(
            f"{where}: {sum(counts)} {placeholder} placeholders but {num_items} {name}s; "
            f"write one {placeholder}{hint} per entry of {name!r}"
        )
    if num_items != 1 or not move:
        return turns
    placed = []
    for turn, count in zip(turns, counts):
        if count == 1 and not turn.text.startswith(placeholder):
            text = turn.text.replace(placeholder, "").strip()
            turn = Turn(turn.role, f"{placeholder}\n{text}".strip())
        placed.append(turn)
    return placed
