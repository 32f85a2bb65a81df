"""AI2D: diagram questions with lettered options, scored as lmms-eval's ``ai2d`` task scores them.

Data: lmms-eval's Hub dataset (columns ``question``, ``options`` (a list), ``answer`` (the right option's index,
as a string), ``image``). Rows have no id column, so predictions files key them by row number. VLMEvalKit's
``AI2D_TEST.tsv`` (``index``, ``question``, ``A`` ... ``D``, ``answer`` (a letter), ``image``) is renamed to these
columns: the non-empty option columns, in letter order, become ``options`` and the answer letter its index.

Prompt (lmms-eval's default kwargs, ``prompt_format: mcq``): the question, a newline, the options lettered
``"A. ...\\nB. ..."``, then "\\nAnswer with the option's letter from the given choices directly.".

Scoring is lmms-eval's generic ``exact_match`` behind the YAML's ``flexible-extract`` filter:

- filter (``utils.MultiChoiceRegexFilter``, whose ``apply`` ignores the YAML's ``regex_pattern`` and every other
  option): an answer matching ``^\\s*([A-Z])\\.`` becomes that letter (``" B. cat"`` → ``B``); any other answer is
  kept whole (no option-text matching, no fallback value);
- the kept text is stripped (lmms-eval strips every filtered answer), lower-cased and cleared of ASCII punctuation
  (``string.punctuation``; the registered ``exact_match`` metric's ``ignore_case``/``ignore_punctuation`` YAML
  options), as is the right letter, and must then equal it exactly, except that trailing NUL characters are
  ignored (the metric compares numpy fixed-width strings, which drop them).

So ``B``, ``b``, ``(B)``, ``B)``, ``**B**`` and ``"B. cat"`` are right for B; ``"(B) cat"`` (``"b cat"``), ``"b. cat"``
(lower case escapes the filter), ``"B cat"``, ``"A B"``, ``"The answer is B."`` and an empty answer are wrong.
``exact_match`` is the mean, 0-1 (lmms-eval prints it as ``exact_match,flexible-extract``). lmms-eval reports no
breakdown and the data has no category column.

Generation: 16 new tokens, greedy; the YAML names no stop string, so lmms-eval's default (``"\\n\\n"``) applies.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

from llavakit.errors import DataError
from llavakit.evaluation.benchmark import Benchmark, Row
from llavakit.evaluation.choices import lettered_options, option_letters
from llavakit.evaluation.exact_match import exact_match_text

OPTION_LETTER = re.compile(r"^\s*([A-Z])\.")


def flexible_extract(prediction: str) -> str:
    """The answer after lmms-eval's ``flexible-extract`` filter and the metric's normalisation (see above)."""
    match = OPTION_LETTER.match(prediction)
    kept = match.group(1) if match else prediction
    # numpy's fixed-width strings, which the metric compares, drop trailing NULs.
    return exact_match_text(kept.strip()).rstrip("\0")


class AI2D(Benchmark):
    """lmms-eval's ``ai2d`` task."""

    id = "ai2d"
    dataset = "lmms-lab-encoder/ai2d"
    split = "test"
    columns = ("question", "options", "answer")
    max_new_tokens = 16
    until = ("\n\n",)  # lmms-eval's default stop (the few-shot delimiter) when the YAML names none
    post_prompt = "\nAnswer with the option's letter from the given choices directly."
    headline = ("exact_match",)

    def doc_to_text(self, row: Row) -> str:
        return f"{self.pre_prompt}{row['question']}\n{lettered_options(row['options'])}{self.post_prompt}"

    def parse(self, row: Row, prediction: str) -> str:
        return flexible_extract(prediction)

    def process_results(self, row: Row, prediction: str) -> dict[str, Any]:
        right = exact_match_text(_right_letter(row))
        return {"exact_match": float(flexible_extract(prediction) == right)}

    def aggregate(self, results: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        scores = results["exact_match"]
        return {"exact_match": sum(scores) / len(scores)}

    def from_vlmevalkit(self, row: Row) -> dict[str, Any]:
        missing = [column for column in ("question", "answer", "A", "B") if column not in row]
        if missing:
            raise DataError(
                f"AI2D TSV row {row.get('index')!r}: missing column(s) {missing} of VLMEvalKit's AI2D_TEST.tsv "
                "layout (index, question, A, B, C, D, answer, image)"
            )
        letters = [letter for letter in string.ascii_uppercase if row.get(letter)]
        if letters != option_letters(len(letters)):
            raise DataError(f"AI2D TSV row {row.get('index')!r}: option columns {letters} skip a letter")
        if row["answer"] not in letters:
            raise DataError(
                f"AI2D TSV row {row.get('index')!r}: answer {row['answer']!r} is not one of its options {letters}"
            )
        return {
            "question": row["question"],
            "options": [row[letter] for letter in letters],
            "answer": str(letters.index(row["answer"])),
            "image": row.get("image"),
        }


def _right_letter(row: Row) -> str:
    letters = option_letters(len(row["options"]))
    answer = str(row["answer"])
    if not answer.isdigit() or int(answer) >= len(letters):
        raise DataError(
            f"AI2D question {row['question']!r}: answer {row['answer']!r} is not the index of one of its "
            f"{len(letters)} options (lmms-lab's ai2d 'answer' column holds the right option's index)"
        )
    return letters[int(answer)]


BENCHMARKS = (AI2D(),)
