"""2-process torchrun (gloo) DDP and FSDP2 runs match a 1-process run with the same global batch.

Why they match: each step's loss is the token mean over the whole global batch (see `llavakit.training.trainer`),
and the per-epoch sample order assigns every global batch the same samples whatever the world size. Remaining
differences come from float summation order and padding (samples are paired differently into micro-batches), so
losses are compared with a relative tolerance of 1e-4.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from training_helpers import debug_config, debug_stage

from llavakit.training.config_loading import config_from_dict
from llavakit.training.trainer import train

TOLERANCE = 1e-4
STEPS = 4


def _stage(synth, name="finetune"):
    return debug_stage(
        synth,
        name,
        max_steps=STEPS,
        global_batch_size=4,
        micro_batch_size=1,
        optim={"lr": 2e-3, "warmup_ratio": 0.0, "schedule": "constant"},
    )


def _torchrun(tmp_path, synth, strategy, *overrides, stage="finetune"):
    config = debug_config(tmp_path / strategy, [_stage(synth, stage)], strategy={"name": strategy})
    config_file = tmp_path / f"{strategy}.yaml"
    config_file.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "llavakit.cli.main",
        "train",
        "--config",
        str(config_file),
        *overrides,
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = (tmp_path / strategy / stage / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in metrics]


@pytest.fixture(scope="module")
def single_losses(tmp_path_factory, synth):
    run_dir = tmp_path_factory.mktemp("single")
    return train(config_from_dict(debug_config(run_dir, [_stage(synth)]))).stages[0].losses


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_process_run_matches_one_process(tmp_path, synth, single_losses, strategy):
    losses = _torchrun(tmp_path, synth, strategy)
    assert len(losses) == STEPS
    assert losses == pytest.approx(single_losses, rel=TOLERANCE)
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_two_process_fsdp2_align_with_frozen_sharded_layers_matches_one_process(tmp_path, synth):
    # The align stage trains the projector only: the frozen LLM and vision layers are FSDP2 groups of their own
    # (unsharded for forward and again for the backward that reaches the projector through the LLM).
    single = train(config_from_dict(debug_config(tmp_path / "single", [_stage(synth, "align")]))).stages[0].losses
    losses = _torchrun(tmp_path, synth, "fsdp2", stage="align")
    assert losses == pytest.approx(single, rel=TOLERANCE)


@pytest.mark.slow
def test_fsdp2_bf16_with_accumulation_and_all_parts_trains(tmp_path, synth):
    # One process (a world of one): FSDP2's bf16 policy and gradient accumulation with the vision tower trained,
    # the combination that breaks when never-run vision layers get their own FSDP group.
    stage = _stage(synth)
    stage.update(trainable=["vision_tower", "projector", "language_model"], micro_batch_size=2)
    config = debug_config(tmp_path / "run", [stage], strategy={"name": "fsdp2", "mixed_precision": "bf16"})
    config_file = tmp_path / "fsdp2-bf16.yaml"
    config_file.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "llavakit.cli.main", "train", "--config", str(config_file)]
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    losses = [
        json.loads(line)["loss"]
        for line in (tmp_path / "run" / "finetune" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(losses) == STEPS and losses[-1] < losses[0]


@pytest.mark.slow
def test_fsdp2_resume_reproduces_the_lost_steps(tmp_path, synth):
    # 4 steps with a sharded checkpoint after step 2; deleting the export makes the next launch resume from step 2,
    # and its steps 3-4 must equal the first launch's, replacing their rows in metrics.jsonl (no step twice).
    first = _torchrun(tmp_path, synth, "fsdp2", "logging.save_every=2")
    shutil.rmtree(tmp_path / "fsdp2" / "finetune" / "final")
    resumed = _torchrun(tmp_path, synth, "fsdp2", "logging.save_every=2")
    assert len(first) == STEPS and len(resumed) == STEPS
    assert resumed[:2] == first[:2]
    assert resumed[2:] == pytest.approx(first[2:], rel=1e-6)
