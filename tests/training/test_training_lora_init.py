"""LoRA adapters' initial values: peft's default initialisation drawn from the run's seed, the same in every strategy.

The oracle is peft itself: its ``reset_lora_parameters`` (``init_lora_weights=True``) run layer by layer after
seeding the global generator with the seed draws what `initialise_adapters` must give. Across strategies, a stage
with learning rate 0 exports its adapters unchanged (AdamW's update is then exactly zero), so the adapter folders of
a 1-process run, a 2-process FSDP2 run from parts and one from a checkpoint folder (both built on the meta device,
adapters filled after the shards are read) must hold the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training_lora_fsdp2 import _launch
from training_helpers import debug_config, debug_stage

from llavakit.training.config import LoraConfig
from llavakit.training.config_loading import config_from_dict
from llavakit.training.lora import ADAPTER_DIR, apply_lora, initialise_adapters
from llavakit.training.trainer import train

peft = pytest.importorskip("peft")

LORA = LoraConfig(
    enabled=True, r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj", "embed_tokens")
)


def _adapters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if ".lora_" in name}


def _wrapped(preset_model) -> torch.nn.Module:
    model = preset_model("debug-clip-llama")
    apply_lora(model, LORA)
    return model


def test_adapters_are_peft_default_init_drawn_from_the_seed(preset_model):
    model = _wrapped(preset_model)
    global_state = torch.get_rng_state()
    initialise_adapters(model, seed=7)
    assert torch.equal(torch.get_rng_state(), global_state), (
        "initialising the adapters moved the global generator"
    )
    ours = _adapters(model)

    from peft.tuners.lora import LoraLayer

    torch.manual_seed(7)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.reset_lora_parameters("default", init_lora_weights=True)
    expected = _adapters(model)
    assert ours.keys() == expected.keys()
    assert any(".lora_embedding_B." in name for name in ours), "the embedding adapter is not covered"
    for name, tensor in expected.items():
        assert torch.equal(ours[name], tensor), name
    assert all(not t.any() for n, t in ours.items() if ".lora_B." in n or ".lora_embedding_A." in n)

    initialise_adapters(model, seed=8)
    other = _adapters(model)
    for name, tensor in ours.items():
        if ".lora_A." in name or ".lora_embedding_B." in name:
            assert not torch.equal(other[name], tensor), f"{name} does not depend on the seed"


def test_applying_lora_does_not_move_the_global_generator(preset_model):
    model = preset_model("debug-clip-llama")
    state = torch.get_rng_state()
    apply_lora(model, LORA)
    assert torch.equal(torch.get_rng_state(), state)


def _zero_lr_config(synth, run_dir: Path, strategy: str, seed: int, path: Path | None = None) -> dict:
    stage = debug_stage(synth, max_steps=1, micro_batch_size=1, optim={"lr": 0.0, "warmup_ratio": 0.0})
    lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
    config = debug_config(run_dir, [stage], lora=lora, strategy={"name": strategy}, seed=seed)
    if path is not None:
        config["model"] = {"path": str(path)}
    return config


def _exported_adapters(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "finetune" / "final" / ADAPTER_DIR / "adapter_model.safetensors")


@pytest.mark.slow
def test_single_and_fsdp2_from_parts_and_from_a_checkpoint_start_from_the_same_adapters(
    tmp_path, synth, checkpoint
):
    seed = 1234
    train(config_from_dict(_zero_lr_config(synth, tmp_path / "single", "single", seed)))
    single = _exported_adapters(tmp_path / "single")
    assert any(".lora_A." in key and tensor.any() for key, tensor in single.items())
    assert all(not tensor.any() for key, tensor in single.items() if ".lora_B." in key)
    for name, path in (("parts", None), ("folder", checkpoint)):
        config = _zero_lr_config(synth, tmp_path / name, "fsdp2", seed, path)
        _launch(tmp_path, config, 2)
        sharded = _exported_adapters(tmp_path / name)
        assert sharded.keys() == single.keys()
        for key, tensor in single.items():
            assert torch.equal(sharded[key], tensor), f"fsdp2 from {name}: {key}"
