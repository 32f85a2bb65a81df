"""MMBench (English and Chinese, dev and test), as lmms-eval's ``mmbench_{en,cn}_{dev,test}`` tasks
define it.

Data: lmms-eval's Hub dataset ``lmms-lab-encoder/MMBench``, subset ``en`` or ``cn``, split ``dev`` or
``test`` (columns ``index``, ``question``, ``hint``, ``A``-``D``, ``answer``, ``category``,
``L2-category``, ``source``, ``split``, ``comment``, ``image``). Each question appears once per circular
rotation of its options: a copy's ``index`` is the original's plus 1,000,000 times the rotation number, so
``index`` is unique and names rows in predictions files (integer text such as "12" is accepted and read as
a number; lmms-eval's arithmetic needs numbers). VLMEvalKit TSV files (``MMBench_DEV_EN.tsv``:
``l2-category``, base64 ``image``, empty cells for missing values) are renamed to those columns; a source
without rotated copies gets them from `with_circular_copies` (VLMEvalKit's ``vlmutil circular``: 4 options
rotated 3 times, 3 options twice, 2 options once; a last option naming all the other letters or holding
the word "all"/"none" stays in place; the copies follow the originals, first rotations first).

Prompt (lmms-eval's ``mmbench_doc_to_text``), with its quirks:

- ``"{hint} {question} There are several options:\\nA. ...\\nB. ..."``; the option header is English for
  MMBench-CN too (cn_utils reads mmbench.yaml's sys_prompt, not mmbench_cn.yaml's "有如下几个选项：");
- option letters are the columns ``A``-``E`` the row has; an option is left out when empty, None, NaN or
  the text "nan"; trailing newlines of the option block are stripped (the last option's own included);
- the hint is left out when None/NaN, and for English also when it is the text "nan" (Chinese prints
  "nan"); an empty hint is kept, leaving a leading space;
- the post prompt is joined with ``"\\n"`` although it starts with ``"\\n"``, so a blank line precedes
  "Answer with the option's letter from the given choices directly." (CN: "请直接使用所提供的选项字母作为
  答案回答。").

Scoring: lmms-eval's plain ``mmbench_en_dev`` / ``mmbench_cn_dev`` call GPT to read answers the rules
cannot; our dev benchmarks keep those ids but score as lmms-eval's GPT-free ``mmbench_en_dev_static``
(``eval_result(..., eval_method="static")``; applied to MMBench-CN as well, which lmms-eval has no static
task for). The model output is stripped; its answer is read as the official toolkit's ``can_infer``, then
lmms-eval's ``extract_mcq_answer``:

1. a bare letter: the output's whitespace tokens hold exactly one of ``A``-``E`` (``E`` counts though only
   ``A``-``D`` are options), unless ``A`` is a token of an output longer than three tokens ("A dog is");
2. else a wrapped letter, trying in order ``X.``, ``X,``, ``X:``, ``X)``, ``X).``, ``(X)``, ``(X).``,
   ``:X``, ``:X,``, ``:X.``, ``:X)``, ``:X).``: the first form that exactly one letter takes;
3. else the option whose text (lower-cased) is in the lower-cased output, when exactly one is;
4. else, among the option letters (``A``-``D`` with a value; ``A``-``H`` when none has), the best-ranked
   candidate (rank, then the later position). The output is stripped of ``, . ! ? ; : ' "`` at its ends
   (one mark after the other); candidates: it starts (rank 10) or ends (9) with a letter not joined to
   another letter; each letter's first upper-case occurrence after an answer phrase ("the answer is",
   "答案是", ...), even inside a word (7); the last ``(X)`` (6), ``X.`` (5), ``X:`` (4), ``X)`` (3),
   ``X `` (2); only when there is none of those, any occurrence (0: "Definitely" reads as D). A lower-case
   "b" alone reads as nothing.

CircularEval: rows are grouped by ``index % 1,000,000``; a question scores 1 only when every row of its
group is read as that row's answer. Groups are scored for the rows with ``index`` below 1,000,000 (copies
whose original is absent are ignored); ``gpt_eval_score`` is the percentage of questions scored 1,
``category/<name>`` and ``l2_category/<name>`` the same per the original row's category (a question with no
category counts only in the overall score, as pandas' groupby drops it).

Submissions: ``write_submission`` writes lmms-eval's ``mmbench_{en,cn}_{dev,test}_results.xlsx``, one line
per row with ``index, question, answer, prediction, hint, source, split, category, L2-category, A-E``
(``E`` holds the text "nan" when the data has no ``E`` column, as in lmms-eval). The test split is scored
by the official server from that file, so its metrics are empty. Characters Excel cannot store (control
characters) are removed from the cells, where lmms-eval's writer would fail.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llavakit.errors import DataError
from llavakit.evaluation.benchmark import Benchmark, Row
from llavakit.evaluation.choices import MCQ_DEFAULT_LETTERS, extract_mcq_answer

LETTERS = ("A", "B", "C", "D", "E")
# The official toolkit's scorer only ever offers A-D as choices.
CHOICE_LETTERS = ("A", "B", "C", "D")
CIRCULAR_OFFSET = 1_000_000
OPTIONS_HEADER = "There are several options:"
POST_PROMPTS = {
    "en": "\nAnswer with the option's letter from the given choices directly.",
    "cn": "\n请直接使用所提供的选项字母作为答案回答。",
}
SUBMISSION_COLUMNS = (
    "index", "question", "answer", "prediction", "hint", "source", "split", "category", "L2-category",
    "A", "B", "C", "D", "E",
)  # fmt: skip

# can_infer_option's wrapped-letter forms, (prefix, suffix), in the order they are tried.
_WRAPPED_FORMS = (
    ("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
    (":", ""), (":", ","), (":", "."), (":", ")"), (":", ")."),
)  # fmt: skip
# VLMEvalKit's circular rotations by option count: where A, B, ... move to in each copy.
_ROTATIONS = {2: ("BA",), 3: ("BCA", "CAB"), 4: ("BCDA", "CDAB", "DABC")}


def is_missing(value: Any) -> bool:
    """pandas' notion of a missing scalar, for the values rows hold: None or NaN."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def options_block(row: Row) -> str:
    """``"There are several options:\\nA. ...\\nB. ..."`` for the row's non-empty options (see the module)."""
    lines = [OPTIONS_HEADER]
    for letter in LETTERS:
        value = row.get(letter)
        if value and not is_missing(value) and value != "nan":
            lines.append(f"{letter}. {value}")
    return "\n".join(lines).rstrip("\n")


def choices(row: Row) -> dict[str, str]:
    """The options the scorer matches: ``A``-``D`` that are not None/NaN (an absent column reads "nan")."""
    values = {letter: row.get(letter, "nan") for letter in CHOICE_LETTERS}
    return {letter: str(value) for letter, value in values.items() if not is_missing(value)}


def extract_option(prediction: str, options: Mapping[str, str]) -> str | None:
    """The option letter read from ``prediction`` by the static rules (module docstring), or None."""
    return (
        _letter_token(prediction)
        or _matching_option_text(prediction, options)
        or extract_mcq_answer(prediction, sorted(options) or list(MCQ_DEFAULT_LETTERS))
        or None
    )


def _letter_token(answer: str) -> str | None:
    """Steps 1-2: a letter standing alone, or wrapped in punctuation, among the whitespace tokens."""
    if "Failed to obtain answer via API" in answer:
        return None
    tokens = answer.split()
    bare = [letter for letter in LETTERS if letter in tokens]
    # "A" opening a longer sentence is likely the article, so a lone bare "A" is not trusted there.
    if len(bare) == 1 and not ("A" in tokens and len(tokens) > 3):
        return bare[0]
    for prefix, suffix in _WRAPPED_FORMS:
        wrapped = [letter for letter in LETTERS if f"{prefix}{letter}{suffix}" in tokens]
        if len(wrapped) == 1:
            return wrapped[0]
    return None


def _matching_option_text(answer: str, options: Mapping[str, str]) -> str | None:
    """Step 3: the one option whose text occurs in the answer (case-insensitive)."""
    lowered = answer.lower()
    found = [letter for letter, text in options.items() if text.lower() in lowered]
    return found[0] if len(found) == 1 else None


def row_index(row: Row) -> int:
    """The row's ``index`` as an int (lmms-eval's arithmetic needs a number; integer text is accepted)."""
    value = row.get("index")
    try:
        if isinstance(value, bool) or value is None or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise DataError(f"MMBench row index {value!r} is not an integer (the 'index' column)") from None


def with_circular_copies(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """``rows`` plus their circular copies, as VLMEvalKit's ``vlmutil circular`` makes them (see the module).

    Rows that already include copies (an ``index`` of 1,000,000 or more) are returned unchanged.

    Raises:
        DataError: a row has an ``E`` option (VLMEvalKit rotates at most 4 options).
    """
    originals = [dict(row) for row in rows]
    if any(row_index(row) >= CIRCULAR_OFFSET for row in originals):
        return originals
    copies: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in originals:
        if not is_missing(row.get("E")):
            raise DataError(
                f"MMBench question {row['index']!r} has an option E: circular copies exist for 4 options at "
                "most; pass data that already holds the rotated copies"
            )
        for turn, rotation in enumerate(_ROTATIONS.get(_rotated_count(row), ()), start=1):
            copies[turn].append(_rotated(row, rotation, turn))
    return originals + [copy for turn in sorted(copies) for copy in copies[turn]]


def _rotated_count(row: Row) -> int:
    """How many leading options rotate: the option count, less a last option that must stay last."""
    count = 2 if is_missing(row.get("C")) else 3 if is_missing(row.get("D")) else 4
    for last in (4, 3):
        if count == last and not _movable(str(row[LETTERS[last - 1]]), last):
            count = last - 1
    return count


def _movable(option: str, count: int) -> bool:
    """False for a last option that names every other letter ("A, B and C") or says "all"/"none"."""
    tokens = option.replace(",", " ").split()
    if all(letter in tokens for letter in LETTERS[: count - 1]):
        return False
    words = option.lower().replace(",", " ").split()
    return "all" not in words and "none" not in words


def _rotated(row: Mapping[str, Any], rotation: str, turn: int) -> dict[str, Any]:
    """The copy of ``row`` whose option at ``LETTERS[i]`` moved to ``rotation[i]``."""
    moves = dict(zip(LETTERS, rotation))
    copy = dict(row)
    for old, new in moves.items():
        copy[new] = row[old]
    copy["answer"] = moves.get(row.get("answer"), row.get("answer"))
    copy["index"] = row_index(row) + turn * CIRCULAR_OFFSET
    return copy


class MMBench(Benchmark):
    """lmms-eval's ``mmbench_<language>_<split>`` task (dev scored as the static, GPT-free variant)."""

    dataset = "lmms-lab-encoder/MMBench"
    columns = (
        "index", "question", "hint", "A", "B", "C", "D", "answer", "category", "L2-category", "source",
        "split",
    )  # fmt: skip
    id_column = "index"

    def __init__(self, language: str, split: str) -> None:
        self.language = language
        self.id = f"mmbench_{language}_{split}"
        self.subset = language
        self.split = split
        # lmms-eval's yaml: EN generates up to 1024 tokens and stops at "ASSISTANT:"; CN 256 tokens, no stop.
        self.max_new_tokens = 1024 if language == "en" else 256
        self.until = ("ASSISTANT:",) if language == "en" else ()
        self.post_prompt = POST_PROMPTS[language]
        self.headline = ("gpt_eval_score",) if split == "dev" else ()

    def doc_to_text(self, row: Row) -> str:
        hint = row["hint"]
        show_hint = not is_missing(hint) and (self.language == "cn" or hint != "nan")
        query = f"{row['question']} {options_block(row)}"
        if show_hint:
            query = f"{hint} {query}"
        return f"{query}\n{self.post_prompt}"

    def parse(self, row: Row, prediction: str) -> str | None:
        return extract_option(prediction.strip(), choices(row))

    def process_results(self, row: Row, prediction: str) -> dict[str, Any]:
        record = submission_record(row, prediction)
        if self.split != "dev":
            return {"submission": record}
        if record["answer"] not in LETTERS:
            raise DataError(
                f"{self.id}: question {record['index']} has answer {record['answer']!r}, not a letter A-E: "
                "is this the dev split?"
            )
        return {"gpt_eval_score": {**record, "hit": self.parse(row, prediction) == record["answer"]}}

    def aggregate(self, results: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        if self.split != "dev":
            return {}  # the test split has no answers: the official server scores the submission file
        return circular_scores(results["gpt_eval_score"])

    def from_vlmevalkit(self, row: Row) -> dict[str, Any]:
        mapped = {key: value for key, value in row.items() if key != "l2-category"}
        if "L2-category" not in mapped:
            if "l2-category" not in row:
                raise DataError(
                    f"{self.id}: the TSV has no 'l2-category' column (VLMEvalKit's MMBench layout)"
                )
            mapped["L2-category"] = row["l2-category"]
        # pandas (VLMEvalKit, and the lmms-lab upload made from its TSVs) reads empty cells as missing.
        for key in ("hint", "answer", *LETTERS, "category", "L2-category", "source", "split", "comment"):
            if key in mapped and mapped[key] == "":
                mapped[key] = None
        for key in ("hint", "answer", "C", "D", "source", "split"):
            mapped.setdefault(key, None)
        mapped["index"] = row_index(mapped)
        return mapped

    def complete_rows(self, rows: Sequence[Row]) -> list[dict[str, Any]]:
        """``rows`` completed with their circular copies when they have none (see `with_circular_copies`)."""
        return with_circular_copies(rows)

    def write_submission(self, rows: Sequence[Row], out_dir: Path) -> list[Path]:
        import pandas as pd

        path = out_dir / f"mmbench_{self.language}_{self.split}_results.xlsx"
        out_dir.mkdir(parents=True, exist_ok=True)
        records = [_excel_safe(submission_record(row, row.get("prediction") or "")) for row in rows]
        pd.DataFrame(records, columns=list(SUBMISSION_COLUMNS)).to_excel(path, index=False, engine="openpyxl")
        return [path]


def submission_record(row: Row, prediction: str) -> dict[str, Any]:
    """lmms-eval's per-row record (its ``process_results`` values): the submission file's row."""
    record = {
        "index": row_index(row),
        "question": row["question"],
        "answer": row["answer"],
        "prediction": prediction.strip(),
        "hint": row["hint"],
        "source": row["source"],
        "split": row["split"],
        "category": row["category"],
        "L2-category": row["L2-category"],
    }
    record.update({letter: row.get(letter, "nan") for letter in LETTERS})
    return record


def circular_scores(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """CircularEval (0-100) over per-row records with ``index``, ``hit``, ``category``, ``L2-category``."""
    hits_by_group: dict[int, list[bool]] = defaultdict(list)
    seen: set[int] = set()
    for record in records:
        index = record["index"]
        if index in seen:
            raise DataError(f"MMBench row index {index} appears twice: each question row must be scored once")
        seen.add(index)
        hits_by_group[index % CIRCULAR_OFFSET].append(record["hit"])
    originals = sorted((r for r in records if r["index"] < CIRCULAR_OFFSET), key=lambda r: r["index"])
    if not originals:
        raise DataError("MMBench: no question row with index below 1,000,000 (only rotated copies) to score")
    question_hits = [(record, all(hits_by_group[record["index"]])) for record in originals]
    metrics = {"gpt_eval_score": _percent([hit for _, hit in question_hits])}
    for column, group in (("category", "category"), ("L2-category", "l2_category")):
        by_name: dict[str, list[bool]] = defaultdict(list)
        for record, hit in question_hits:
            if not is_missing(record[column]):
                by_name[record[column]].append(hit)
        metrics.update({f"{group}/{name}": _percent(hits) for name, hits in sorted(by_name.items())})
    return metrics


def _percent(hits: Sequence[bool]) -> float:
    return sum(hits) / len(hits) * 100.0


def _excel_safe(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with the control characters openpyxl refuses removed from its text cells."""
    from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

    return {k: ILLEGAL_CHARACTERS_RE.sub("", v) if isinstance(v, str) else v for k, v in record.items()}


BENCHMARKS = (MMBench("en", "dev"), MMBench("cn", "dev"), MMBench("en", "test"), MMBench("cn", "test"))
