"""Resume equals an uninterrupted run; partial saves are ignored; rotation; export and upstream projector file."""

from __future__ import annotations

import json

import pytest
import torch
from training_helpers import debug_config, debug_stage

from llavakit.data.schema import USER, Conversation, Turn
from llavakit.distributed import init_distributed
from llavakit.inference.prompts import Request
from llavakit.model.llava_next import LlavaNextModel
from llavakit.model.projector import read_upstream_projector_file
from llavakit.training.config_loading import config_from_dict
from llavakit.training.data import build_train_data
from llavakit.training.trainer import Trainer, train


def _config(run_dir, synth, **logging):
    stage = debug_stage(synth, max_steps=4, optim={"lr": 1e-3, "warmup_ratio": 0.25})
    return config_from_dict(debug_config(run_dir, [stage], logging={"save_every": 2, **logging}))


def _trainer(config):
    return Trainer(config, 0, init_distributed(needs_process_group=False), build_train_data)


def test_resume_after_kill_gives_the_same_losses(tmp_path, synth):
    reference = train(_config(tmp_path / "straight", synth)).stages[0].losses

    config = _config(tmp_path / "killed", synth)
    first = _trainer(config)
    first.build()
    stream = first.micro_batches()
    for _ in range(
        3
    ):  # steps 1-3, as fit() runs them: a checkpoint after step 2; step 3 is lost in the "kill"
        first.train_step([next(stream) for _ in range(first.plan.accumulation_steps)])
        if first.state.step == 2:
            first.save()
    partial = tmp_path / "killed" / "finetune" / "checkpoints" / ".partial-step-000003"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half-written")  # a save that crashed midway

    metrics = tmp_path / "killed" / "finetune" / "metrics.jsonl"
    metrics.write_text(
        "".join(json.dumps({"step": step, "loss": 9.0}) + "\n" for step in (1, 2, 3)) + '{"step": 4, "lo'
    )  # the interrupted run logged steps 1-3 and was killed while writing step 4
    resumed = _trainer(config).fit()
    assert not partial.exists()
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # steps 3-4 redone after the step-2 checkpoint, each logged once
    assert resumed.losses[:2] == pytest.approx(reference[:2], rel=1e-6)
    assert resumed.losses == pytest.approx(reference, rel=1e-5)


def test_rotation_keeps_the_newest(tmp_path, synth):
    config = _config(tmp_path / "run", synth, save_every=1, save_total_limit=2)
    train(config)
    kept = sorted(p.name for p in (tmp_path / "run" / "finetune" / "checkpoints").iterdir())
    assert kept == ["step-000002", "step-000003"]


def test_align_export_and_upstream_projector_file(tmp_path, synth):
    logging = {"report_to": "tensorboard", "peak_tflops": 1.0}
    config = config_from_dict(debug_config(tmp_path / "run", [debug_stage(synth, "align")], logging=logging))
    result = train(config)
    export = result.final_checkpoint
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert result.stages[0].projector_file == export / "mm_projector.bin"
    raw = torch.load(export / "mm_projector.bin", weights_only=True)
    assert sorted(raw) == [f"model.mm_projector.{i}.{k}" for i in (0, 2) for k in ("bias", "weight")]
    trained = LlavaNextModel.from_pretrained(export)
    for key, tensor in read_upstream_projector_file(export / "mm_projector.bin").items():
        assert torch.equal(tensor, trained.projector.state_dict()[key])
    assert (tmp_path / "run" / "align" / "loss.png").is_file()
    assert any((tmp_path / "run" / "align" / "tensorboard").iterdir())
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "align" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert row["tokens_per_s"] > 0 and 0 <= row["padding_fraction"] < 1
        assert row["mfu"] == pytest.approx(row["model_tflops"])  # peak_tflops 1.0
        # The align stage trains the projector only: the frozen LLM and vision tower cost less than 6 FLOPs per
        # parameter and token (llavakit.training.flops), yet gradients flow through the LLM (4 per parameter).
        flops_per_token = row["model_tflops"] * 1e12 / row["tokens_per_s"]
        llm_parameters = trained_parameters(trained.llm)
        assert 4 * llm_parameters < flops_per_token < 6 * trained_parameters(trained)
        assert {"lr/projector/decay", "lr/projector/no_decay"} <= set(row)


def trained_parameters(model):
    return sum(param.numel() for param in model.parameters())


def test_finetune_starts_from_upstream_projector_file(tmp_path, synth, preset_parts):
    align = train(config_from_dict(debug_config(tmp_path / "align", [debug_stage(synth, "align")])))
    parts = preset_parts("debug-clip-llama").from_parts_kwargs()
    model = {
        "preset": None,
        "vision": parts["vision"],
        "llm": parts["llm"],
        "template": "vicuna_v1",
        "image_spec": parts["image_spec"].to_dict(),
        "pretrained_projector": str(align.stages[0].projector_file),
    }
    config = config_from_dict(debug_config(tmp_path / "ft", [debug_stage(synth)], model=model))
    trainer = _trainer(config)
    trainer.build()
    for key, tensor in read_upstream_projector_file(align.stages[0].projector_file).items():
        assert torch.equal(tensor, trainer.unwrapped.projector.state_dict()[key])


def test_the_trained_system_prompt_is_saved_and_served(tmp_path, synth):
    import llavakit

    stage = debug_stage(synth, max_steps=1, data={"template": "vicuna_v1", "system_prompt": "Answer the questions."})
    result = train(config_from_dict(debug_config(tmp_path / "run", [stage])))
    saved = json.loads((result.final_checkpoint / "config.json").read_text())
    assert saved["llavakit"]["system_prompt"] == "Answer the questions."
    assistant = llavakit.load(result.final_checkpoint, device="cpu")
    ids = assistant.prompts.encode(Request(Conversation((Turn(USER, "hi"),)))).input_ids
    assert assistant.tokenizer.decode(ids, skip_special_tokens=True) == "Answer the questions. USER: hi ASSISTANT:"


def test_batches_do_not_draw_from_the_global_generator(tmp_path, synth):
    # Dropout draws from the global generator; a loader seeded from it would shift every mask after a resume.
    trainer = _trainer(_config(tmp_path / "run", synth))
    trainer.build()
    before = torch.random.get_rng_state()
    next(trainer.micro_batches())
    assert torch.equal(torch.random.get_rng_state(), before)
