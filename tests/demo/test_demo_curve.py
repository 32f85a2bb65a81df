"""The demo's learning curve asks a prefix of the held-out questions; its last point scores the final answers on it."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

from llavakit.data.synth import generate_synth
from llavakit.demo.run import CURVE_QUESTIONS, FULL_DATA, HeldoutRun, curve_section, final_curve_point
from llavakit.evaluation.heldout import HELDOUT
from llavakit.training.evaluation import check_evaluations


def _run(answers: list[tuple[str, bool]]) -> HeldoutRun:
    rows = [
        {
            "question_id": f"q{i}",
            "question": "?",
            "answer": "red",
            "type": kind,
            "prediction": "red" if hit else "blue",
        }
        for i, (kind, hit) in enumerate(answers)
    ]
    return HeldoutRun({}, rows, Path("unused"))


def test_the_last_curve_point_scores_only_the_curves_questions():
    run = _run([("colour", True), ("shape", False), ("colour", False), ("shape", True), ("word", False)])
    point = final_curve_point(run, questions=3, step=1700)
    assert point.step == 1700
    assert point.accuracy == {"colour": 0.5, "shape": 0.0}
    assert final_curve_point(run, questions=10, step=1).accuracy == {"colour": 0.5, "shape": 0.5, "word": 0.0}


def test_the_curve_asks_a_prefix_of_a_full_size_held_out_split_holding_every_type(tmp_path):
    dataset = generate_synth(tmp_path, replace(FULL_DATA, n_train=2))
    every = HELDOUT.read_jsonl(dataset.heldout_path)
    section = curve_section(dataset.heldout_path, every=400)
    assert (section.every, section.final, section.limit) == (400, False, CURVE_QUESTIONS)
    assert not section.due(1700, 1700) and section.due(1600, 1700) and not section.due(1500, 1700)

    class Config:  # only the stages' eval sections are read
        stages = [type("Stage", (), {"eval": section})()]

    (evaluator,) = check_evaluations(Config)
    (data,) = evaluator.data
    asked = data.table
    assert len(asked) == CURVE_QUESTIONS < len(every) / 2
    assert asked == every[:CURVE_QUESTIONS]
    counts = Counter(row["type"] for row in asked)
    assert set(counts) == {row["type"] for row in every} and min(counts.values()) >= 30
