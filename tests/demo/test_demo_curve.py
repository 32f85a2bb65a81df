"""The demo's learning curve asks a prefix of the held-out questions; its last point scores the final answers on it."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from llavakit.data.synth import generate_synth
from llavakit.demo.run import CURVE_QUESTIONS, FULL_DATA, final_curve_point
from llavakit.evaluation.base import BenchmarkReport, Example, Prediction
from llavakit.evaluation.heldout import HeldoutQA


def _report(scores: list[tuple[str, float]]) -> BenchmarkReport:
    predictions = [
        Prediction(Example(f"q{i}", "?", "red", kind), "red" if score else "blue", score)
        for i, (kind, score) in enumerate(scores)
    ]
    return BenchmarkReport("heldout", True, predictions)


def test_the_last_curve_point_scores_only_the_curves_questions():
    report = _report([("colour", 1.0), ("shape", 0.0), ("colour", 0.0), ("shape", 1.0), ("word", 0.0)])
    point = final_curve_point(report, questions=3, step=1700)
    assert point.step == 1700
    assert point.accuracy == {"colour": 0.5, "shape": 0.0}
    assert final_curve_point(report, questions=10, step=1).accuracy == report.accuracy_by_type()


def test_the_curve_asks_a_prefix_of_a_full_size_held_out_split_holding_every_type(tmp_path):
    dataset = generate_synth(tmp_path, replace(FULL_DATA, n_train=2))
    every = HeldoutQA(dataset.heldout_path).examples()
    asked = HeldoutQA(dataset.heldout_path, limit=CURVE_QUESTIONS).examples()
    assert len(asked) == CURVE_QUESTIONS < len(every) / 2
    assert asked == every[:CURVE_QUESTIONS]
    counts = Counter(example.type for example in asked)
    assert set(counts) == {example.type for example in every} and min(counts.values()) >= 30
