"""MMMU (validation): multiple-choice and open questions over 30 subjects, scored as lmms-eval's ``mmmu_val`` task.

Data: lmms-eval's Hub dataset, split ``validation`` (columns ``id`` (``validation_<Subject>_<n>``, unique: the
predictions-file id), ``question``, ``options`` (a Python list *written as a string*), ``answer``, ``question_type``
(``multiple-choice`` or ``open``), ``image_1`` ... ``image_7``). lmms-eval scores every validation row: the
"multiple choice" benchmark's ``mmmu_acc`` covers the open questions too, with their own rule.

Prompt (lmms-eval's default kwargs, ``doc_to_text`` path of LLaVA-style models):

- multiple-choice: ``"<question>\\n<A. ...\\nB. ...>\\n\\nAnswer with the option's letter from the given choices
  directly."``; open: ``"<question>\\n\\nAnswer the question using a single word or phrase."``;
- the ``<image N>`` references in the text are kept verbatim (the task's ``interleaved_format`` is false; only its
  chat-model ``doc_to_messages`` path turns them into ``<image>``, and, as it sets that module-wide flag, every
  later ``doc_to_text`` of the same process too). The runner places the images before the text, as lmms-eval's
  LLaVA model does, so the model reads e.g. ``"... in <image 1>?"`` after the images.

Generation: 128 new tokens (the YAML), greedy; no stop string is named, so lmms-eval's default (``"\\n\\n"``)
applies.

Images (``mmmu_doc_to_visual``): only the images *referenced* by an ``<image N>`` token in the question or the
options, each once, ordered by name (``image_1`` first), whatever the order in the text; an unreferenced image
column is not shown. A referenced but empty column is refused (lmms-eval fails on it).

Multiple-choice parsing (the official MMMU ``parse_multi_choice_response``), on the stripped answer:

1. strip, in turn, each of ``, . ! ? ; : '`` from both ends, then pad with one space on each side;
2. candidates: letters written ``(X)``; else letters followed by a space (``"X "``, so ``"A cat"`` reads A); else
   letters followed by a dot; else, only for answers of more than five words, options whose text (ignoring case)
   the answer contains;
3. several candidates: the one whose mark (``(X)``, else `` X ``, else its option text) occurs last; ties
   (e.g. no `` X `` at all) go to the first option letter;
4. none: a *random* option. lmms-eval draws with Python's global ``random`` (seeded 0 at start-up), in the order its
   worker threads (``process_docs_parallel``, 4 by default) reach the rows, so its draws are not reproducible from
   run to run. Here the draws come from ``random.Random(0)``, one per unparsable row, in row order: lmms-eval's
   draws with one worker and nothing else drawing from ``random`` after its seeding. The predictions file shows
   such a row's parsed answer as null.

Open parsing (the official ``parse_open_response``): the stripped answer, trailing/leading dots removed, lower-cased,
is split at line breaks (the sentence split ``\\.\\s(?=[A-Z])`` never fires after lower-casing); from each line the
shortest tail after one of "could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result " (and
"=" on the last line) is kept, unless it is lone punctuation (an empty first tail is replaced by a later
indicator's); no tail at all keeps the whole answer. Numbers found in the kept tails are added; every candidate is
normalised (a number → a float rounded to 2 decimals, commas dropped; text → lower case, one character padded as
``" x"``/``"x "``). The answer, normalised the same way, is right when a text candidate contains a text answer or a
number candidate equals a number answer. The ``answer`` column is one text (an answer written as a list,
``"['24/7', '3.429']"``, is not split into alternatives), and a multiple-choice answer must equal the letter exactly.

Metric (``mmmu_aggregate_results``): accuracy per subject (from the id), then ``mmmu_acc`` = the instance-weighted
mean over subjects (summed in first-seen subject order), rounded to 5 decimals, on a 0-1 scale. The other values of
lmms-eval's ``process_results`` (``mmmu_acc_pass_at_k``, ``submission``) feed no metric of ``mmmu_val``.
Breakdowns, as lmms-eval prints them (rounded to 5): ``subject/<Subject>`` and ``discipline/<discipline>`` (its six
``Overall-<discipline>`` groups; a discipline with no rows is left out rather than shown as 0).
"""

from __future__ import annotations

import ast
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from llavakit.anyres.pixels import ImageSource
from llavakit.errors import DataError
from llavakit.evaluation.benchmark import Benchmark, Row
from llavakit.evaluation.choices import lettered_options, option_letters

IMAGE_COLUMNS = tuple(f"image_{number}" for number in range(1, 8))
IMAGE_TOKEN = re.compile(r"<image \d+>")
MULTIPLE_CHOICE = "multiple-choice"
QUESTION_TYPES = (MULTIPLE_CHOICE, "open")
FALLBACK_SEED = 0  # lmms-eval's default --seed for Python's random

DISCIPLINES = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": (
        "Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine", "Pharmacy",
        "Public_Health",
    ),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": (
        "Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics", "Energy_and_Power",
        "Materials", "Mechanical_Engineering",
    ),
}  # fmt: skip

# Multiple-choice parsing.
EDGE_CHARACTERS = (",", ".", "!", "?", ";", ":", "'")

# Open-answer parsing: the official MMMU number patterns and answer indicators.
NUMBER_WITH_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
NUMBER_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
NUMBER_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")
INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
TRIVIAL_TAILS = (":", ",", ".", "!", "?", ";", "'")


def parse_multiple_choice(prediction: str, options: Sequence[str]) -> str | None:
    """The option letter read from ``prediction`` by the official rule (module docstring), or None: unparsable."""
    answer = prediction
    for character in EDGE_CHARACTERS:
        answer = answer.strip(character)
    answer = f" {answer} "
    letters = option_letters(len(options))
    bracketed = [letter for letter in letters if f"({letter})" in answer]
    if bracketed:
        return _last(bracketed, lambda letter: answer.rfind(f"({letter})"))
    spaced = [letter for letter in letters if f"{letter} " in answer]
    dotted = [letter for letter in letters if f"{letter}." in answer]
    candidates = spaced or dotted
    if candidates:
        # Dotted candidates are also ranked by " X " (usually absent: the first letter wins), as lmms-eval does.
        return _last(candidates, lambda letter: answer.rfind(f" {letter} "))
    if len(answer.split()) > 5:
        lowered = answer.lower()
        by_text = [letter for letter, option in zip(letters, options) if option.lower() in lowered]
        if by_text:
            by_letter = dict(zip(letters, options))
            return _last(by_text, lambda letter: lowered.rfind(by_letter[letter].lower()))
    return None


def _last(candidates: Sequence[str], position: Any) -> str:
    """The candidate with the greatest ``position``; the first of equal ones (``numpy.argmax``'s tie rule)."""
    positions = [position(candidate) for candidate in candidates]
    return candidates[positions.index(max(positions))]


def parse_open(prediction: str) -> list[str | float]:
    """The normalised candidate answers read from ``prediction`` by the official rule (module docstring)."""
    tails = _key_tails(prediction)
    candidates: list[str] = list(tails)
    for tail in tails:
        candidates.extend(_numbers(tail))
    normalised: list[str | float] = []
    for candidate in candidates:
        normalised.extend(normalise(candidate))
    return list(dict.fromkeys(normalised))  # de-duplicated (order does not matter to the scoring)


def _key_tails(prediction: str) -> list[str]:
    text = prediction.strip().strip(".").lower()
    # The official split also cuts at ". " before a capital letter, which never occurs after lower-casing.
    lines = re.split(r"\.\s(?=[A-Z])|\n", text)
    tails = []
    for number, line in enumerate(lines):
        indicators = INDICATORS + ("=",) if number == len(lines) - 1 else INDICATORS
        shortest = None
        for indicator in indicators:
            if indicator in line:
                tail = line.split(indicator)[-1].strip()
                # An empty tail counts as "none yet", so a later, longer one replaces it (official behaviour).
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in TRIVIAL_TAILS:
            tails.append(shortest)
    return tails or [text]


def _numbers(text: str) -> list[str]:
    return [*NUMBER_WITH_COMMAS.findall(text), *NUMBER_SCIENTIFIC.findall(text), *NUMBER_SIMPLE.findall(text)]


def normalise(text: str) -> list[str | float]:
    """The official ``normalize_str``: a number as a float rounded to 2 decimals, else lower case (one character
    padded with a space on either side, to avoid trivial matches)."""
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        text = text.lower()
        return [f" {text}", f"{text} "] if len(text) == 1 else [text]


def open_answer_is_right(answer: str, candidates: Sequence[str | float]) -> bool:
    """The official ``eval_open``: a text candidate containing a text answer, or a number candidate equal to a
    number answer."""
    answers = normalise(answer)
    for candidate in candidates:
        if isinstance(candidate, str):
            if any(isinstance(right, str) and right in candidate for right in answers):
                return True
        elif candidate in answers:
            return True
    return False


def subject_of(question_id: str) -> str:
    """The subject named in an MMMU id (``validation_Art_Theory_12`` → ``Art_Theory``)."""
    split = question_id.split("_")[0]
    match = re.search(rf"^{split}_(.+?)_\d+$", question_id)
    if match is None:
        raise DataError(
            f"MMMU id {question_id!r} is not '<split>_<Subject>_<number>' (lmms-lab's MMMU 'id' column)"
        )
    return match.group(1)


class MMMUVal(Benchmark):
    """lmms-eval's ``mmmu_val`` task."""

    id = "mmmu_val"
    dataset = "lmms-lab-encoder/MMMU"
    split = "validation"
    columns = ("id", "question", "options", "answer", "question_type")
    image_columns = IMAGE_COLUMNS
    id_column = "id"
    max_new_tokens = 128
    until = ("\n\n",)  # lmms-eval's default stop (the few-shot delimiter) when the YAML names none
    post_prompt = "Answer with the option's letter from the given choices directly."
    open_prompt = "Answer the question using a single word or phrase."
    headline = ("mmmu_acc",)

    def doc_to_text(self, row: Row) -> str:
        if _question_type(row) == MULTIPLE_CHOICE:
            return f"{row['question']}\n{lettered_options(_options(row))}\n\n{self.post_prompt}"
        return f"{row['question']}\n\n{self.open_prompt}"

    def doc_to_visual(self, row: Row) -> list[ImageSource]:
        """The referenced images, ordered by name (module docstring)."""
        referenced = set(IMAGE_TOKEN.findall(self._prompt_body(row)))
        columns = sorted(token.strip("<>").replace(" ", "_") for token in referenced)
        images = []
        for column in columns:
            if row.get(column) is None:
                raise DataError(
                    f"MMMU question {row['id']!r} refers to <{column.replace('_', ' ')}>, but column {column!r} "
                    "holds no image"
                )
            images.append(row[column])
        return images

    def parse(self, row: Row, prediction: str) -> str | None:
        if _question_type(row) == MULTIPLE_CHOICE:
            return parse_multiple_choice(prediction.strip(), _options(row))
        return "|".join(str(candidate) for candidate in parse_open(prediction.strip()))

    def process_results(self, row: Row, prediction: str) -> dict[str, Any]:
        question_type = _question_type(row)
        answer = prediction.strip()  # lmms-eval strips every answer before the task's own process_results
        value: dict[str, Any] = {"subject": subject_of(row["id"]), "answer": row["answer"]}
        if question_type == MULTIPLE_CHOICE:
            options = _options(row)
            value.update(letters=option_letters(len(options)), parsed=parse_multiple_choice(answer, options))
        else:
            value.update(candidates=parse_open(answer))
        return {"mmmu_acc": value}

    def aggregate(self, results: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        fallback = random.Random(FALLBACK_SEED)
        by_subject: dict[str, list[bool]] = {}  # insertion order: lmms-eval sums subjects in first-seen order
        for value in results["mmmu_acc"]:
            by_subject.setdefault(value["subject"], []).append(_is_right(value, fallback))
        counts = {subject: len(marks) for subject, marks in by_subject.items()}
        accuracy = {subject: sum(marks) / len(marks) for subject, marks in by_subject.items()}
        metrics = {"mmmu_acc": round(_weighted(accuracy, counts, list(accuracy)), 5)}
        for discipline, subjects in DISCIPLINES.items():
            present = [subject for subject in subjects if subject in accuracy]
            if present:
                metrics[f"discipline/{discipline}"] = round(_weighted(accuracy, counts, present), 5)
        for subject in sorted(accuracy):
            metrics[f"subject/{subject}"] = round(accuracy[subject], 5)
        return metrics

    def prompt_description(self) -> str:
        return f"multiple-choice: {self.post_prompt!r}; open: {self.open_prompt!r}"

    def _prompt_body(self, row: Row) -> str:
        """The question and lettered options with no instruction (what lmms-eval searches for image tokens)."""
        if _question_type(row) == MULTIPLE_CHOICE:
            return f"{row['question']}\n{lettered_options(_options(row))}\n\n"
        return f"{row['question']}\n\n"


def _is_right(value: Mapping[str, Any], fallback: random.Random) -> bool:
    if "candidates" in value:
        return open_answer_is_right(value["answer"], value["candidates"])
    parsed = value["parsed"] if value["parsed"] is not None else fallback.choice(value["letters"])
    return parsed == value["answer"]


def _weighted(accuracy: Mapping[str, float], counts: Mapping[str, int], subjects: Sequence[str]) -> float:
    """The official instance-level accuracy: sum of accuracy × count over subjects, divided by the count."""
    total = sum(counts[subject] for subject in subjects)
    return sum(accuracy[subject] * counts[subject] for subject in subjects) / total


def _question_type(row: Row) -> str:
    question_type = row["question_type"]
    if question_type not in QUESTION_TYPES:
        raise DataError(
            f"MMMU question {row['id']!r}: question_type {question_type!r} is not one of {QUESTION_TYPES}"
        )
    return question_type


def _options(row: Row) -> list[str]:
    """A multiple-choice row's options, from the Python-list text lmms-lab stores."""
    try:
        options = ast.literal_eval(row["options"])
    except (ValueError, SyntaxError):
        options = None
    if not isinstance(options, list) or not options:
        raise DataError(
            f"MMMU question {row['id']!r}: options {row['options']!r} is not a Python list of options as text "
            "(lmms-lab's MMMU 'options' column)"
        )
    return [str(option) for option in options]


BENCHMARKS = (MMMUVal(),)
