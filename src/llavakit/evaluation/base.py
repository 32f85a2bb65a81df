"""The benchmark contract and the one loop that runs any benchmark on an `Assistant`.

A benchmark is a list of `Example` values plus a scoring rule; `run_benchmark` batches the examples through
`llavakit.inference.api.Assistant.generate_requests` and aggregates scores per example type. Standard benchmarks
(TextVQA, MME, ...) are added as further modules implementing `Benchmark`, each with its own reader and metric,
without touching this loop.

``with_images=False`` removes every image (and its placeholder) from the prompts: the *text-only baseline*, which
measures what the model answers from the question alone. A model that truly looks at images beats it clearly, and
beats `BenchmarkReport.majority_by_type` (always the most common answer) too.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from llavakit.data.schema import USER, Conversation, Turn
from llavakit.inference.api import Assistant
from llavakit.inference.prompts import Request, user_text


@dataclass(frozen=True)
class Example:
    """One evaluation question.

    Attributes:
        id: unique id (``question_id``).
        question: the user's question, without image placeholders.
        answer: the reference answer.
        type: a category used to aggregate accuracy (e.g. ``colour``).
        images: image paths, resolved (absolute or relative to the working directory).
    """

    id: str
    question: str
    answer: str
    type: str
    images: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Prediction:
    """The model's answer to one `Example` and its score in [0, 1]."""

    example: Example
    prediction: str
    score: float


@dataclass
class BenchmarkReport:
    """Scores of one run of a benchmark.

    Attributes:
        name: benchmark name.
        with_images: False for the text-only baseline.
        predictions: one per example, in example order.
    """

    name: str
    with_images: bool
    predictions: list[Prediction] = field(default_factory=list)

    def accuracy_by_type(self) -> dict[str, float]:
        """Mean score per example type, types sorted by name."""
        scores: dict[str, list[float]] = defaultdict(list)
        for prediction in self.predictions:
            scores[prediction.example.type].append(prediction.score)
        return {kind: sum(values) / len(values) for kind, values in sorted(scores.items())}

    def count_by_type(self) -> dict[str, int]:
        """Number of examples per type."""
        counts: dict[str, int] = defaultdict(int)
        for prediction in self.predictions:
            counts[prediction.example.type] += 1
        return dict(sorted(counts.items()))

    def majority_by_type(self) -> dict[str, float]:
        """Per type, the exact-match accuracy of a guesser that knows only the answer distribution.

        Each question is answered with the most common reference answer among the questions of its type that offer
        the same candidate answers: a question naming some of its type's answers ("Is the red circle left or right
        of the blue square?") is grouped with the others naming the same ones, so a two-way choice scores about 0.5,
        not the share of the most common of all four directions. Unlike the text-only baseline (a model trained
        with images may answer worse than chance without them) it cannot fall below chance.
        """
        vocabulary: dict[str, set[str]] = defaultdict(set)
        for prediction in self.predictions:
            vocabulary[prediction.example.type].add(_words(prediction.example.answer))
        groups: dict[tuple[str, frozenset[str]], Counter[str]] = defaultdict(Counter)
        for prediction in self.predictions:
            example = prediction.example
            question = f" {_words(example.question)} "
            offered = frozenset(a for a in vocabulary[example.type] if f" {a} " in question)
            groups[(example.type, offered)][example.answer] += 1
        hits: dict[str, int] = defaultdict(int)
        for (kind, _), answers in groups.items():
            hits[kind] += max(answers.values())
        counts = self.count_by_type()
        return {kind: hits[kind] / counts[kind] for kind in counts}

    @property
    def accuracy(self) -> float:
        """Mean score over all examples."""
        return sum(p.score for p in self.predictions) / max(len(self.predictions), 1)


def _words(text: str) -> str:
    """Lower-case words of ``text`` separated by single spaces (punctuation dropped)."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


class Benchmark(ABC):
    """A set of examples and how answers are scored."""

    name: str = "benchmark"

    @abstractmethod
    def examples(self) -> list[Example]:
        """All examples, in a fixed order."""

    @abstractmethod
    def score(self, prediction: str, example: Example) -> float:
        """Score of ``prediction`` for ``example`` in [0, 1]."""


def build_request(example: Example, with_images: bool) -> Request:
    """The single-turn request of ``example``, with its images or (baseline) without them."""
    images = example.images if with_images else ()
    turn = Turn(USER, user_text(example.question, len(images)))
    return Request(Conversation((turn,)), tuple(str(path) for path in images))


def run_benchmark(
    assistant: Assistant,
    benchmark: Benchmark,
    with_images: bool = True,
    batch_size: int = 32,
    max_new_tokens: int = 8,
    progress: bool = True,
) -> BenchmarkReport:
    """Answer every example greedily in batches and score the answers.

    Args:
        assistant: the model to evaluate.
        benchmark: what to evaluate on.
        with_images: False runs the text-only baseline.
        batch_size: requests per generation batch.
        max_new_tokens: answer length cap.
        progress: show a progress bar.
    """
    examples = benchmark.examples()
    report = BenchmarkReport(benchmark.name, with_images)
    label = f"eval {benchmark.name}" + ("" if with_images else " (no image)")
    for start in tqdm(range(0, len(examples), batch_size), desc=label, disable=not progress, unit="batch"):
        chunk = examples[start : start + batch_size]
        requests = [build_request(example, with_images) for example in chunk]
        answers = assistant.generate_requests(requests, max_new_tokens=max_new_tokens, do_sample=False)
        report.predictions.extend(
            Prediction(example, answer, benchmark.score(answer, example))
            for example, answer in zip(chunk, answers)
        )
    return report
