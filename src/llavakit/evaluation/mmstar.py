"""MMStar: 1,500 vision-indispensable multiple-choice questions, scored as lmms-eval's ``mmstar`` task does.

Data: the Hub dataset lmms-eval reads, ``Lin-Chen/MMStar``, split ``val`` (columns ``index``, ``question``
(with its options inline: "...\\nOptions: A: ..., B: ..., C: ..., D: ..."), ``image``, ``answer`` (a letter
A-D), ``category`` (one of the six core capabilities below), ``l2_category`` (one of their 18
sub-capabilities), ``meta_info``). ``index`` names rows in predictions files. A downloaded snapshot keeps the
split in ``mmstar.parquet`` at its top (the README maps split ``val`` to it): pass that file with ``--data``.

Prompt (``mmstar_doc_to_text`` with the default kwargs of ``_default_template_yaml``): the stripped question,
every " Please answer yes or no." in it removed (the post prompt is set), then "\\nAnswer with the option's
letter from the given choices directly" — with no closing period, unlike the same sentence in other lmms-eval
tasks.

Generation: the template YAML sets no ``generation_kwargs``, so lmms-eval's LLaVA default of 1024 new tokens,
greedy, and lmms-eval's default stop (``"\\n\\n"``) apply.

Scoring (``mmstar_process_results``): the stripped output's letter as lmms-eval's ``extract_mcq_answer`` reads
it over ``A``-``D`` (see `llavakit.evaluation.mmbench`: "B", "(B) cat", "The answer is B" read B; "Definitely"
reads D; a lower-case "b" alone reads nothing) must equal the stripped, upper-cased ``answer``.

Aggregation (``mmstar_aggregate_results``, 0-1): a macro average over sub-capabilities — each
``l2_category``'s mean score, then the mean of those means over the ones present. ``average`` does so over
every row (it is not the mean of the six category scores, nor the plain accuracy); each ``category/<name>``
over that category's rows. lmms-eval prints them as ``average,none`` and ``coarse perception,none``, ...; a
category with no rows (a ``--limit`` run) is reported by neither. ``l2_category/<name>`` is each
sub-capability's mean, which lmms-eval only logs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from llavakit.errors import DataError
from llavakit.evaluation.benchmark import Benchmark, Row
from llavakit.evaluation.choices import extract_mcq_answer

CHOICE_LETTERS = ("A", "B", "C", "D")
# lmms-eval's metric_list: one metric per core capability, plus "average".
CATEGORIES = (
    "coarse perception",
    "fine-grained perception",
    "instance reasoning",
    "logical reasoning",
    "science & technology",
    "math",
)
# Removed from questions whenever a pre or post prompt is set (a leftover of the MME-derived template).
YES_NO_SUFFIX = " Please answer yes or no."


def read_letter(prediction: str) -> str:
    """The option letter lmms-eval reads from ``prediction`` (``""`` when none)."""
    return extract_mcq_answer(prediction.strip(), CHOICE_LETTERS)


def macro_average(records: Sequence[Mapping[str, Any]]) -> tuple[float, dict[str, float]]:
    """The mean of the per-``l2_category`` mean scores, and those means."""
    by_l2: dict[str, list[float]] = defaultdict(list)
    for record in records:
        by_l2[record["l2_category"]].append(record["score"])
    means = {l2: sum(scores) / len(scores) for l2, scores in by_l2.items()}
    return sum(means.values()) / len(means), means


class MMStar(Benchmark):
    """lmms-eval's ``mmstar`` task."""

    id = "mmstar"
    dataset = "Lin-Chen/MMStar"
    split = "val"
    columns = ("index", "question", "answer", "category", "l2_category")
    id_column = "index"
    max_new_tokens = 1024  # lmms-eval's LLaVA default: the YAML sets no generation_kwargs
    until = ("\n\n",)  # lmms-eval's default stop (the few-shot delimiter) when the YAML names none
    post_prompt = "\nAnswer with the option's letter from the given choices directly"
    headline = ("average",)

    def doc_to_text(self, row: Row) -> str:
        question = row["question"].strip()
        if self.pre_prompt or self.post_prompt:
            question = question.replace(YES_NO_SUFFIX, "")
        return f"{self.pre_prompt}{question}{self.post_prompt}"

    def parse(self, row: Row, prediction: str) -> str:
        return read_letter(prediction)

    def process_results(self, row: Row, prediction: str) -> dict[str, Any]:
        category, l2_category = _categories(row)
        score = float(read_letter(prediction) == _answer(row))
        return {"average": {"category": category, "l2_category": l2_category, "score": score}}

    def aggregate(self, results: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        records = results["average"]
        average, l2_means = macro_average(records)
        metrics = {"average": average}
        for category in CATEGORIES:
            rows = [record for record in records if record["category"] == category]
            if rows:
                metrics[f"category/{category}"] = macro_average(rows)[0]
        metrics.update({f"l2_category/{l2}": mean for l2, mean in l2_means.items()})
        return metrics


def _answer(row: Row) -> str:
    answer = row["answer"]
    if not isinstance(answer, str) or answer.strip().upper() not in CHOICE_LETTERS:
        raise DataError(
            f"MMStar question {row['index']!r}: answer {answer!r} is not an option letter A-D "
            "(Lin-Chen/MMStar's 'answer' column holds the right letter)"
        )
    return answer.strip().upper()


def _categories(row: Row) -> tuple[str, str]:
    category, l2_category = row["category"], row["l2_category"]
    if category not in CATEGORIES:
        raise DataError(
            f"MMStar question {row['index']!r}: category {category!r} is not one of MMStar's six core "
            f"capabilities {list(CATEGORIES)} (lmms-eval has a metric for those only)"
        )
    if not isinstance(l2_category, str) or not l2_category:
        raise DataError(f"MMStar question {row['index']!r}: l2_category {l2_category!r} is not a name")
    return category, l2_category


BENCHMARKS = (MMStar(),)
