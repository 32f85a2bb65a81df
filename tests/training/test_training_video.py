"""Training a video model: ``model.video_spec`` builds it, the trainer feeds it ``pixel_values_videos`` /
``video_frames`` from LLaVA-Video JSON, the export reloads with its spec, and preflight refuses video data for a
model without video before anything is loaded.

The data is four short synthetic videos (PyAV) with their colour sequence as the answer, trained as one global batch
so every step sees the same batch: the loss must fall.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from llavakit.anyres.video_spec import VideoSpec
from llavakit.errors import ConfigError
from llavakit.model.llava_next import LlavaNextModel
from llavakit.training.config_loading import config_from_dict
from llavakit.training.trainer import train

pytest.importorskip("av")

from video_helpers import encode_video  # noqa: E402  (needs av)

VIDEO_SPEC = {"frames_upbound": 3, "force_sample": True, "newline": "frame"}


def _video_data(root):
    videos = root / "videos"
    videos.mkdir(parents=True)
    records = []
    for number in range(4):
        encode_video(videos / f"clip{number}.mp4", frames=4 + number, fps=2)
        records.append(
            {
                "id": f"clip{number}",
                "video": f"clip{number}.mp4",
                "conversations": [
                    {"from": "human", "value": "<image>\nHow many frames?"},
                    {"from": "gpt", "value": f"{4 + number} frames, colours changing."},
                ],
            }
        )
    records.append(
        {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    )
    path = root / "videos.json"
    path.write_text(json.dumps(records))
    return path, videos


def _config(tmp_path, model, steps=6):
    data, videos = _video_data(tmp_path / "data")
    return {
        "run_dir": str(tmp_path / "run"),
        "model": model,
        "stages": [
            {
                "name": "finetune",
                "trainable": ["projector", "language_model"],
                "data": {"path": str(data), "video_folder": str(videos), "max_length": 512},
                "global_batch_size": 5,
                "micro_batch_size": 5,
                "max_steps": steps,
                "optim": {"lr": 2e-3, "warmup_ratio": 0.0},
            }
        ],
        "logging": {"report_to": "none", "progress_bar": False},
    }


def test_train_a_video_model_end_to_end(tmp_path):
    model = {"preset": "debug-siglip-qwen2", "video_spec": VIDEO_SPEC}
    result = train(config_from_dict(_config(tmp_path, model)))
    (stage,) = result.stages
    assert all(math.isfinite(loss) for loss in stage.losses)
    assert all(later < earlier for earlier, later in zip(stage.losses, stage.losses[1:])), stage.losses

    reloaded = LlavaNextModel.from_pretrained(result.final_checkpoint)
    assert reloaded.config.video_spec == VideoSpec.from_dict(VIDEO_SPEC)
    assert reloaded.tokenizer.convert_ids_to_tokens(reloaded.config.video_token_id) == "<video>"
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["video_spec"] == VIDEO_SPEC
    stats = json.loads((tmp_path / "run" / "finetune" / "data_stats.json").read_text())
    assert stats["num_kept"] == 5 and stats["num_skipped"] == 0


def test_preflight_refuses_video_data_for_a_model_without_video(tmp_path):
    config = config_from_dict(_config(tmp_path, {"preset": "debug-siglip-qwen2"}))
    with pytest.raises(
        ConfigError, match=r"has video samples but the model has no video support.*model\.video_spec"
    ):
        train(config)
    assert not (tmp_path / "run" / "parts").exists(), "nothing may be built before the check"


def test_video_spec_is_checked_with_the_config(tmp_path):
    with pytest.raises(ConfigError, match="pool_mode"):
        config_from_dict(
            _config(tmp_path, {"preset": "debug-siglip-qwen2", "video_spec": {"pool_mode": "mean"}})
        )
    with pytest.raises(ConfigError, match="model.video_spec builds a fresh model"):
        config_from_dict(_config(tmp_path / "b", {"path": str(tmp_path), "video_spec": {}}))


@pytest.mark.slow
def test_two_process_ddp_gives_the_one_process_losses(tmp_path):
    """Videos of different lengths land on different ranks; gradients averaged by DDP give the 1-process steps."""
    model = {"preset": "debug-siglip-qwen2", "video_spec": VIDEO_SPEC}
    single = _config(tmp_path / "single", model, steps=3)
    single["stages"][0].update(global_batch_size=4, micro_batch_size=1)
    expected = train(config_from_dict(single)).stages[0].losses
    ddp = _config(tmp_path / "ddp", model, steps=3)
    ddp["stages"][0].update(global_batch_size=4, micro_batch_size=1)
    ddp["strategy"] = {"name": "ddp"}
    config_file = tmp_path / "ddp.yaml"
    config_file.write_text(yaml.safe_dump(ddp))
    command = [
        sys.executable,
        *("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"),
        *("-m", "llavakit.cli.main", "train", "--config", str(config_file)),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = (tmp_path / "ddp" / "run" / "finetune" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in metrics]
    assert len(losses) == 3 and losses == pytest.approx(expected, rel=1e-4)
