"""FSDP2 with ranks whose micro-batches hold different media: one rank trains on images only, the other on
videos only, and the 2-process run must finish with the 1-process losses.

Why: every call of a ``fully_shard``-ed vision layer is an all-gather, so two ranks that call the vision
encoder a different number of times per forward wait on each other forever (or, when the mismatched
collectives happen to meet, gloo aborts on their different sizes: what the code before the fix did here). The
model encodes image tiles and video frames in one call (a text-only batch: one blank tile), whatever the batch
holds. The samples are laid out with the trainer's own `BatchPlan` so that rank 0 draws every image sample and
rank 1 every video sample; the subprocess has a timeout, so a hang fails the test instead of blocking the
suite. The video spec is ``no_token``, so the video rank leaves ``image_newline`` out of its layout and must
still use it (as zero) like the image rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from llavakit.training.batches import BatchPlan
from llavakit.training.config_loading import config_from_dict
from llavakit.training.trainer import train

pytest.importorskip("av")

from video_helpers import encode_video  # noqa: E402  (needs av)

TOLERANCE = 1e-4
SEED = 7
STEPS = 2
GLOBAL_BATCH = 4
MICRO_BATCH = 1
SAMPLES = STEPS * GLOBAL_BATCH
VIDEO_SPEC = {"frames_upbound": 2, "force_sample": True, "newline": "no_token"}


def _rank_samples(rank: int) -> set[int]:
    """The sample indices rank ``rank`` of 2 trains on in epoch 0 (the trainer's default random order)."""
    plan = BatchPlan(SAMPLES, GLOBAL_BATCH, MICRO_BATCH, world_size=2, rank=rank, seed=SEED)
    return {index for batch in plan.epoch_batches(0) for index in batch}


def _record(number: int, media: dict) -> dict:
    question = "<image>\nWhat colours do you see?"
    answer = f"Sample {number} shows a few colours."
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"id": f"sample{number}", **media, "conversations": turns}


def _mixed_data(root: Path) -> dict:
    """Images exactly where rank 0 reads, videos where rank 1 reads; returns the stage's data section."""
    images, videos = root / "images", root / "videos"
    images.mkdir(parents=True)
    videos.mkdir()
    image_indices = _rank_samples(0)
    assert image_indices.isdisjoint(_rank_samples(1)) and len(image_indices) == SAMPLES // 2
    rng = np.random.default_rng(0)
    records = []
    for number in range(SAMPLES):
        if number in image_indices:
            pixels = rng.integers(0, 256, (24 + 4 * number, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(images / f"image{number}.png")
            records.append(_record(number, {"image": f"image{number}.png"}))
        else:
            encode_video(videos / f"clip{number}.mp4", frames=3 + number % 3, fps=2)
            records.append(_record(number, {"video": f"clip{number}.mp4"}))
    path = root / "mixed.json"
    path.write_text(json.dumps(records))
    return {"path": str(path), "image_folder": str(images), "video_folder": str(videos), "max_length": 512}


def _config(run_dir: Path, data: dict, strategy: str) -> dict:
    return {
        "run_dir": str(run_dir),
        "seed": SEED,
        "model": {"preset": "debug-siglip-qwen2", "video_spec": VIDEO_SPEC},
        "stages": [
            {
                "name": "finetune",
                "trainable": ["vision_tower", "projector", "language_model"],
                "data": data,
                "global_batch_size": GLOBAL_BATCH,
                "micro_batch_size": MICRO_BATCH,
                "max_steps": STEPS,
                "optim": {"lr": 2e-3, "warmup_ratio": 0.0, "schedule": "constant"},
            }
        ],
        "strategy": {"name": strategy},
        "logging": {"report_to": "none", "progress_bar": False},
    }


@pytest.mark.slow
def test_fsdp2_image_rank_and_video_rank_train_without_hanging(tmp_path):
    data = _mixed_data(tmp_path / "data")
    expected = train(config_from_dict(_config(tmp_path / "single", data, "single"))).stages[0].losses
    config_file = tmp_path / "fsdp2.yaml"
    config_file.write_text(yaml.safe_dump(_config(tmp_path / "fsdp2", data, "fsdp2")))
    command = [
        sys.executable,
        *("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"),
        *("-m", "llavakit.cli.main", "train", "--config", str(config_file)),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    except subprocess.TimeoutExpired as error:
        stderr = (
            error.stderr.decode(errors="replace") if isinstance(error.stderr, bytes) else error.stderr or ""
        )
        pytest.fail(f"the 2-process FSDP2 run hung (ranks made different collectives):\n{stderr[-3000:]}")
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = (tmp_path / "fsdp2" / "finetune" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in metrics]
    assert len(losses) == STEPS and losses == pytest.approx(expected, rel=TOLERANCE)
