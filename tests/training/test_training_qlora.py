"""QLoRA: a 4-bit LLM trains through LoRA adapters only; export dequantises and merges into a plain llava-hf model."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from PIL import Image
from training_helpers import debug_config, debug_stage

from llavakit.anyres.geometry import count_visual_tokens
from llavakit.anyres.pixels import process_image
from llavakit.distributed import init_distributed
from llavakit.errors import ConfigError, TrainingError
from llavakit.model.llava_next import LlavaNextModel
from llavakit.training import lora
from llavakit.training.checkpoint import _SafeFileSystemReader
from llavakit.training.config import LoraConfig
from llavakit.training.config_loading import config_from_dict
from llavakit.training.data import build_train_data
from llavakit.training.trainer import Trainer, train

bnb = pytest.importorskip("bitsandbytes", reason='QLoRA needs bitsandbytes: pip install -e ".[quant]"')

QLORA = {"enabled": True, "bits": 4, "r": 4, "alpha": 8}
# bitsandbytes' quantisation constants in a 4-bit layer's state dict (``<layer>.weight.absmax``, ...).
QUANT_CONSTANTS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4")


def _run(tmp_path, synth, **sections):
    train(config_from_dict(debug_config(tmp_path / "run", [debug_stage(synth)], **sections)))


def test_qlora_trains_adapters_and_projector_then_exports_plain_llava_hf(tmp_path, synth):
    stage = debug_stage(synth, trainable=["projector", "language_model"], max_steps=4, optim={"lr": 1e-2})
    config = config_from_dict(debug_config(tmp_path / "run", [stage], lora=QLORA))
    trainer = Trainer(config, 0, init_distributed(needs_process_group=False), build_train_data)
    trainer.build()
    model = trainer.unwrapped
    assert trainer.trainable and all(
        "lora_" in name or name.startswith(("projector.", "image_newline")) for name in trainer.trainable
    )
    assert any("lora_B" in name for name in trainer.trainable)
    quantised = {
        n: m.weight.detach().clone() for n, m in model.llm.named_modules() if isinstance(m, bnb.nn.Linear4bit)
    }
    assert quantised and all(w.dtype == torch.uint8 for w in quantised.values())
    assert all(
        p.dtype == torch.float32 for p in [*model.vision_encoder.parameters(), *model.projector.parameters()]
    )
    projector_before = [p.detach().clone() for p in model.projector.parameters()]

    # The same global batch every step: its loss must fall.
    stream = trainer.micro_batches()
    batch = [next(stream) for _ in range(trainer.plan.accumulation_steps)]
    losses = [trainer.train_step(batch).loss for _ in range(4)]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0], losses
    assert any(not torch.equal(p, q) for p, q in zip(projector_before, model.projector.parameters()))
    for name, module in model.llm.named_modules():
        if name in quantised:
            assert torch.equal(module.weight, quantised[name]), f"quantised base weight {name} changed"

    # Merged export: fp32 weights equal to the dequantised base + scaling * B @ A.
    layer = model.llm.base_model.model.model.layers[0].self_attn.q_proj
    expected_q = bnb.functional.dequantize_4bit(
        layer.base_layer.weight.data, layer.base_layer.weight.quant_state
    )
    expected_q = (expected_q + layer.get_delta_weight("default")).detach().clone()
    exported = trainer.export()
    _check_plain_llava_hf(exported, expected_q)
    _check_reload_quantised(tmp_path, synth, exported)


def _check_plain_llava_hf(path, expected_q: torch.Tensor) -> None:
    """The export loads in transformers with no missing key and gives llavakit's logits."""
    from transformers import LlavaNextForConditionalGeneration

    reference, info = LlavaNextForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert getattr(reference.config.text_config, "quantization_config", None) is None
    ours = LlavaNextModel.from_pretrained(path).eval()
    assert not any("lora_" in name for name, _ in ours.named_parameters())
    torch.testing.assert_close(ours.llm.model.layers[0].self_attn.q_proj.weight, expected_q)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8))
    spec = ours.config.image_spec
    prompt = ours.tokenizer("USER: a picture ASSISTANT: a square").input_ids
    ids = [ours.config.image_token_id] * count_visual_tokens((40, 70), spec) + prompt
    inputs = {"input_ids": torch.tensor([ids]), "image_sizes": torch.tensor([[40, 70]])}
    tiles = process_image(image, spec)
    with torch.no_grad():
        expected = ours(**inputs, pixel_values=tiles).logits
        actual = reference.eval()(**inputs, pixel_values=tiles.unsqueeze(0)).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def _check_reload_quantised(tmp_path, synth, exported) -> None:
    """A stage starting from a llavakit checkpoint reloads its LLM quantised and removes the temporary copy."""
    stage = debug_stage(synth, max_steps=1)
    model = {"preset": None, "path": str(exported)}
    config = config_from_dict(debug_config(tmp_path / "run2", [stage], model=model, lora=QLORA))
    trainer = Trainer(config, 0, init_distributed(needs_process_group=False), build_train_data)
    trainer.build()
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.unwrapped.llm.modules())
    assert not (tmp_path / "run2" / "finetune" / "llm-to-quantise").exists()
    stream = trainer.micro_batches()
    metrics = trainer.train_step([next(stream) for _ in range(trainer.plan.accumulation_steps)])
    assert math.isfinite(metrics.loss)


def test_qlora_preflight_errors(tmp_path, synth, monkeypatch, no_weight_loading):
    with pytest.raises(ConfigError, match="lora.bits=4 .*needs lora.enabled=true"):
        _run(tmp_path, synth, lora={"enabled": False, "bits": 4})
    with pytest.raises(
        ConfigError, match=r"lora \(QLoRA, lora.bits=8\) with strategy fsdp2 is not supported"
    ):
        _run(tmp_path, synth, lora={**QLORA, "bits": 8}, strategy={"name": "fsdp2"})
    monkeypatch.setattr(lora.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r'needs the bitsandbytes package: pip install -e "\.\[quant\]"'):
        _run(tmp_path, synth, lora=QLORA)


def test_qlora_stage_resumes_from_its_checkpoint(tmp_path, synth):
    """A killed QLoRA stage resumes: quantisation constants are rebuilt, trained tensors come from the checkpoint."""
    stage = debug_stage(synth, trainable=["projector", "language_model"], max_steps=3, optim={"lr": 1e-2})
    config = config_from_dict(debug_config(tmp_path / "run", [stage], lora=QLORA))
    first = Trainer(config, 0, init_distributed(needs_process_group=False), build_train_data)
    first.build()
    stream = first.micro_batches()
    for _ in range(2):
        first.train_step([next(stream) for _ in range(first.plan.accumulation_steps)])
    checkpoint = first.save()
    saved = {n: p.detach().clone() for n, p in first.unwrapped.named_parameters() if p.requires_grad}
    # No base bytes: the checkpoint holds every model tensor but the packed 4-bit weights (rebuilt from the source).
    quantised = lora.quantised_params(first.unwrapped)
    assert quantised
    metadata = _SafeFileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    model_keys = {key.removeprefix("model.") for key in metadata if key.startswith("model.")}
    state = first.unwrapped.state_dict()
    packed = {id(param) for param in quantised}
    base = {name for name, param in first.unwrapped.named_parameters() if id(param) in packed}
    expected = {name for name in state if name not in base and not name.endswith(QUANT_CONSTANTS)}
    assert len(base) == len(quantised) and model_keys == expected
    stored = sum(metadata[f"model.{name}"].size.numel() * state[name].element_size() for name in expected)
    assert stored == sum(state[name].nbytes for name in expected)

    second = Trainer(config, 0, init_distributed(needs_process_group=False), build_train_data)
    second.build()
    assert second.resume()
    assert second.state.step == 2
    resumed = dict(second.unwrapped.named_parameters())
    assert all(torch.equal(resumed[n], tensor) for n, tensor in saved.items())
    # The base, not in the checkpoint, is the same 4-bit weights rebuilt from the model source.
    first_params = dict(first.unwrapped.named_parameters())
    assert all(torch.equal(resumed[name], first_params[name]) for name in base)


def _qlora_model(preset_parts) -> LlavaNextModel:
    """The debug model with its LLM in 4 bits and adapters whose ``lora_B`` is not zero (so merges add them)."""
    config = LoraConfig(enabled=True, bits=4, r=4, alpha=8, dropout=0.0)
    llm_kwargs = {"quantization_config": lora.quantization_config(config, torch.float32), "device_map": "cpu"}
    model = LlavaNextModel.from_parts(
        **preset_parts("debug-clip-llama").from_parts_kwargs(), llm_kwargs=llm_kwargs
    )
    lora.apply_lora(model, config)
    lora.initialise_adapters(model, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.train()


def _adapter_gradients(llm: torch.nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    llm.zero_grad()
    llm(input_ids=input_ids).logits.pow(2).mean().backward()
    return {name: p.grad.clone() for name, p in llm.named_parameters() if p.grad is not None}


def test_qlora_trains_and_merges_the_same_weights_after_an_eval_mode_forward(preset_parts):
    """An eval section or a generation runs the quantised LLM in eval mode without gradients: on a CPU with
    AVX512-BF16, bitsandbytes would repack its 4-bit layers for its inference kernel there (lossy), after which no
    gradient flows back through them and their bytes no longer dequantise to the trained weights. Training and the
    merged export must not change (on other machines bitsandbytes never repacks and this holds trivially)."""
    model = _qlora_model(preset_parts)
    input_ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    expected_merge = lora.merge_lora(copy.deepcopy(model)).llm.state_dict()
    expected_gradients = _adapter_gradients(model.llm, input_ids)
    model.eval()
    with torch.no_grad():
        model.llm(input_ids=input_ids)
    model.train()
    gradients = _adapter_gradients(model.llm, input_ids)
    assert gradients.keys() == expected_gradients.keys()
    for name, gradient in expected_gradients.items():
        torch.testing.assert_close(gradients[name], gradient, rtol=1e-5, atol=1e-7, msg=name)
    merged = lora.merge_lora(model).llm.state_dict()
    assert merged.keys() == expected_merge.keys()
    for name, tensor in expected_merge.items():
        assert torch.equal(merged[name], tensor), name


def test_qlora_merge_refuses_a_layer_repacked_for_the_cpu_kernel(preset_parts):
    """A layer bitsandbytes repacked (outside llavakit's training, which turns that off) cannot be dequantised
    exactly: its block scales were rounded to bf16. The merge names it instead of exporting wrong weights."""
    model = _qlora_model(preset_parts)
    layer = next(
        m for name, m in model.llm.named_modules() if isinstance(m, bnb.nn.Linear4bit) and "q_proj" in name
    )
    weight = layer.weight
    # What Linear4bit.forward does in eval mode on such a CPU (bitsandbytes 0.50).
    weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(
        weight.data, weight.quant_state
    )
    with pytest.raises(TrainingError, match=r"QLoRA layer .*q_proj.*repacked its 4-bit weight .* not merged"):
        lora.merge_lora(model)
