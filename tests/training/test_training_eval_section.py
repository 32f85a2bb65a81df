"""A stage's ``eval:`` section: benchmarks answered while training, through ``llavakit eval``'s runner, logged with
the training metrics; the same answers under DDP and FSDP2 (every rank generating) as in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from training_helpers import debug_config, debug_stage, heldout_questions

from llavakit.errors import ConfigError
from llavakit.evaluation import score
from llavakit.evaluation.heldout import HELDOUT
from llavakit.training.config import EvalSection
from llavakit.training.config_loading import config_from_dict
from llavakit.training.trainer import train

STEPS = 4


@pytest.fixture(scope="module")
def questions(synth, tmp_path_factory):
    """Held-out-style questions about 7 of the synthetic images (the session's held-out split has one question)."""
    return heldout_questions(synth, tmp_path_factory.mktemp("questions"), 7)


def _eval_stage(synth, questions, **eval_fields):
    section = {"benchmarks": ["heldout"], "data": {"heldout": str(questions)}, "every": 2, "batch_size": 2}
    return debug_stage(
        synth,
        max_steps=STEPS,
        global_batch_size=4,
        micro_batch_size=1,
        optim={"lr": 2e-3, "warmup_ratio": 0.0, "schedule": "constant"},
        eval={**section, **eval_fields},
    )


def _predictions(folder):
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


def test_the_section_is_typed_and_checked():
    section = {"benchmarks": ["mme"], "every": 5, "limit": 8}
    (stage,) = config_from_dict({"stages": [{"eval": section}]}).stages
    assert stage.eval == EvalSection(benchmarks=("mme",), every=5, limit=8)
    assert [step for step in range(1, 13) if stage.eval.due(step, 12)] == [5, 10, 12]
    assert not EvalSection(every=5).due(5, 12)
    not_final = EvalSection(benchmarks=("mme",), every=4, final=False)
    assert [step for step in range(1, 13) if not_final.due(step, 12)] == [4, 8]
    with pytest.raises(ConfigError, match=r"eval.data names benchmark\(s\) \['pope'\]"):
        EvalSection(benchmarks=("mme",), data={"pope": "x.parquet"})
    with pytest.raises(ConfigError, match="never runs them"):
        EvalSection(benchmarks=("mme",), final=False)
    with pytest.raises(ConfigError, match="every must be >= 0"):
        EvalSection(benchmarks=("mme",), every=-1)
    with pytest.raises(ConfigError, match=r"stages.0.eval: unknown key\(s\) \['steps'\]"):
        config_from_dict({"stages": [{"eval": {"steps": 5}}]})


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"benchmarks": ["no_such_bench"], "data": {}}, "no_such_bench"),
        ({"data": {"heldout": "missing.jsonl"}}, "missing.jsonl"),
        ({"benchmarks": ["mmvet"], "data": {}}, r"\['mmvet'\] are graded by an LLM judge.*llavakit eval"),
    ],
)
def test_bad_benchmarks_fail_before_any_weight_loads(
    tmp_path, synth, questions, no_weight_loading, section, message
):
    stage = _eval_stage(synth, questions, **section)
    with pytest.raises(Exception, match=message):
        train(config_from_dict(debug_config(tmp_path / "run", [stage])))


@pytest.fixture(scope="module")
def plain_losses(tmp_path_factory, synth):
    stage = debug_stage(
        synth,
        max_steps=STEPS,
        global_batch_size=4,
        micro_batch_size=1,
        optim={"lr": 2e-3, "warmup_ratio": 0.0, "schedule": "constant"},
    )
    return train(config_from_dict(debug_config(tmp_path_factory.mktemp("plain"), [stage]))).stages[0].losses


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, synth, questions):
    run_dir = tmp_path_factory.mktemp("single")
    config = debug_config(run_dir, [_eval_stage(synth, questions)], logging={"report_to": "tensorboard"})
    return train(config_from_dict(config))


def test_single_process_evaluates_when_due_and_leaves_training_unchanged(single_run, plain_losses, questions):
    stage = single_run.stages[0]
    assert stage.losses == plain_losses  # generation forks the RNG: the training run is the same
    assert [evaluation.step for evaluation in stage.evaluations] == [2, 4]
    stage_dir = single_run.run_dir / "finetune"
    logged = [json.loads(line) for line in (stage_dir / "eval.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [2, 4]
    rows = HELDOUT.read_jsonl(questions)
    for evaluation, row in zip(stage.evaluations, logged):
        folder = stage_dir / "eval" / f"step-{evaluation.step:06d}" / "heldout"
        answers = [record["prediction"] for record in _predictions(folder)]
        expected = score("heldout", [{**r, "prediction": a} for r, a in zip(rows, answers)])
        assert evaluation.metrics == {"heldout": expected} == row["metrics"]
        assert set(expected) >= {"accuracy", *(f"accuracy/{r['type']}" for r in rows)}


def test_the_last_steps_answers_are_the_exported_models(single_run, questions, tmp_path):
    from llavakit.evaluation.runner import EvalOptions, evaluate
    from llavakit.evaluation.sources import load_benchmark_data
    from llavakit.inference.api import load

    stage_dir = single_run.run_dir / "finetune"
    data = load_benchmark_data(HELDOUT, questions)
    exported = load(stage_dir / "final", device="cpu")
    evaluate(exported, data, tmp_path, EvalOptions(batch_size=2, progress=False))
    during = _predictions(stage_dir / "eval" / f"step-{STEPS:06d}" / "heldout")
    assert [r["prediction"] for r in during] == [r["prediction"] for r in _predictions(tmp_path)]


def test_metrics_are_logged_to_tensorboard_with_the_training_ones(single_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(single_run.run_dir / "finetune" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/loss" in tags and "eval/heldout/accuracy" in tags
    for key in ("accuracy", "accuracy/colour", "accuracy/count"):
        logged = events.Scalars(f"eval/heldout/{key}")
        evaluations = single_run.stages[0].evaluations
        assert [event.step for event in logged] == [evaluation.step for evaluation in evaluations]
        assert [event.value for event in logged] == pytest.approx(
            [e.metrics["heldout"][key] for e in evaluations]
        )


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_every_rank_generates_and_the_answers_equal_one_process(
    tmp_path, synth, questions, single_run, strategy
):
    config = debug_config(tmp_path / strategy, [_eval_stage(synth, questions)], strategy={"name": strategy})
    config_file = tmp_path / f"{strategy}.yaml"
    config_file.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "llavakit.cli.main", "train", "--config", str(config_file)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    eval_log = (tmp_path / strategy / "finetune" / "eval.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in eval_log]
    assert [row["step"] for row in logged] == [2, 4]
    for step in (2, 4):
        folder = f"finetune/eval/step-{step:06d}/heldout"
        ours = _predictions(tmp_path / strategy / folder)
        alone = _predictions(single_run.run_dir / folder)
        assert [r["question_id"] for r in ours] == [r["question_id"] for r in alone]
        # The 2-process model differs from the 1-process one by float summation order only (losses equal to 1e-4).
        assert [r["prediction"] for r in ours] == [r["prediction"] for r in alone]
