"""LoRA through peft: only adapters (and the configured non-LLM parts) train; export merges into plain weights."""

from __future__ import annotations

import torch
from training_helpers import debug_config, debug_stage

from llavakit.distributed import init_distributed
from llavakit.model.llava_next import LlavaNextModel
from llavakit.training.config_loading import config_from_dict
from llavakit.training.data import build_train_data
from llavakit.training.trainer import Trainer


def test_lora_trains_adapters_and_projector_then_merges(tmp_path, synth):
    stage = debug_stage(synth, trainable=["projector", "language_model"], max_steps=2)
    config = config_from_dict(
        debug_config(tmp_path / "run", [stage], lora={"enabled": True, "r": 4, "alpha": 8})
    )
    trainer = Trainer(config, 0, init_distributed(needs_process_group=False), build_train_data)
    trainer.build()
    trainable = set(trainer.trainable)
    assert trainable and all(
        "lora_" in name or name.startswith(("projector.", "image_newline")) for name in trainable
    )
    assert any("lora_B" in name for name in trainable) and "image_newline" in trainable
    base_before = {
        name: param.detach().clone()
        for name, param in trainer.unwrapped.named_parameters()
        if name.startswith("llm.") and "lora_" not in name
    }
    stream = trainer.micro_batches()
    for _ in range(2):
        trainer.train_step([next(stream) for _ in range(trainer.plan.accumulation_steps)])
    for name, param in trainer.unwrapped.named_parameters():
        if name in base_before:
            assert torch.equal(param.detach(), base_before[name]), f"frozen base weight {name} changed"
    # Merged export: plain llava-hf weights whose q_proj equals base + scaling * B @ A.
    layer = trainer.unwrapped.llm.base_model.model.model.layers[0].self_attn.q_proj
    expected_q = (
        layer.base_layer.weight
        + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    )
    expected_q = expected_q.detach().clone()
    exported = LlavaNextModel.from_pretrained(trainer.export())
    assert not any("lora_" in name for name, _ in exported.named_parameters())
    torch.testing.assert_close(exported.llm.model.layers[0].self_attn.q_proj.weight, expected_q)
