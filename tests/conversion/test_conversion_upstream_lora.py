"""Upstream LLaVA LoRA checkpoints (adapter + non_lora_trainables.bin) → llavakit: merged weights, safe unpickling.

The upstream folder is written here the way upstream's ``train.py`` saves it (peft key prefixes, random LoRA factors,
a trained projector and image_newline), onto a preset's LLM folder as ``--model-base``. The oracle is the preset model
with the same weights assembled by hand: W + (lora_alpha / r) · B @ A on every targeted linear, and the projector.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llavakit.conversion.original import export_original
from llavakit.conversion.upstream_lora import import_upstream_lora
from llavakit.errors import CheckpointError

TARGETS = ("q_proj", "v_proj", "down_proj")
RANK, ALPHA = 4, 8
PREFIX = "base_model.model."


def _write_upstream_lora(model, parts, folder: Path, adapter_suffix: str = ".safetensors") -> Path:
    """Write an upstream LoRA output folder whose base is ``parts.llm_dir`` and whose tower is ``parts.vision_dir``."""
    generator = torch.Generator().manual_seed(1)
    folder.mkdir(parents=True)
    config = json.loads((export_original(model, folder.parent / "export") / "config.json").read_text())
    base_config = json.loads((parts.llm_dir / "config.json").read_text())
    config["vocab_size"] = base_config[
        "vocab_size"
    ]  # upstream's model.config is the base's (no <image> token)
    (folder / "config.json").write_text(json.dumps(config))
    adapter = {}
    for name, module in model.llm.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS:
            out_features, in_features = module.weight.shape
            adapter[f"{PREFIX}{name}.lora_A.weight"] = torch.randn(RANK, in_features, generator=generator)
            adapter[f"{PREFIX}{name}.lora_B.weight"] = torch.randn(out_features, RANK, generator=generator)
    _save(adapter, folder / f"adapter_model{adapter_suffix}")
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.05,
        "target_modules": list(TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
        "init_lora_weights": True,
        "revision": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "base_model_name_or_path": str(parts.llm_dir),
    }
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config))
    non_lora = {
        f"{PREFIX}model.mm_projector.{index}.{kind}": torch.randn(param.shape, generator=generator)
        for index, layer in ((0, model.projector.linear_1), (2, model.projector.linear_2))
        for kind, param in (("weight", layer.weight), ("bias", layer.bias))
    }
    if model.image_newline is not None:
        non_lora[f"{PREFIX}model.image_newline"] = torch.randn(model.image_newline.shape, generator=generator)
    torch.save(non_lora, folder / "non_lora_trainables.bin")
    return folder


def _save(state: dict[str, torch.Tensor], file: Path) -> None:
    if file.suffix == ".safetensors":
        save_file(state, str(file))
    else:
        torch.save(state, file)


def _load(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(file)) if file.suffix == ".safetensors" else torch.load(file, weights_only=True)


def _by_hand(model, folder: Path, merge: bool = True):
    """``model`` (the preset: base LLM + tower) with the LoRA delta merged (if ``merge``) and the projector set."""
    adapter = _load(next(folder.glob("adapter_model.*")))
    non_lora = torch.load(folder / "non_lora_trainables.bin", weights_only=True)
    modules = dict(model.llm.named_modules())
    with torch.no_grad():
        for key, lora_a in adapter.items():
            if merge and key.endswith(".lora_A.weight"):
                name = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
                lora_b = adapter[key.replace(".lora_A.", ".lora_B.")]
                modules[name].weight += (lora_b @ lora_a) * (ALPHA / RANK)
        for index, layer in ((0, model.projector.linear_1), (2, model.projector.linear_2)):
            layer.weight.copy_(non_lora[f"{PREFIX}model.mm_projector.{index}.weight"])
            layer.bias.copy_(non_lora[f"{PREFIX}model.mm_projector.{index}.bias"])
        if model.image_newline is not None:
            model.image_newline.copy_(non_lora[f"{PREFIX}model.image_newline"])
    return model


def _logits(model) -> torch.Tensor:
    """Logits for text + a tiled image (vision tower, projector, image_newline and LLM all run)."""
    from llavakit.anyres.geometry import count_visual_tokens, grid_shape

    spec = model.config.image_spec
    rows, cols = grid_shape((40, 90), spec)
    ids = torch.tensor(
        [[5, 6] + [model.config.image_token_id] * count_visual_tokens((40, 90), spec) + [7, 8]]
    )
    tiles = torch.randn(
        1 + rows * cols, 3, spec.tile_size, spec.tile_size, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=tiles, image_sizes=torch.tensor([[40, 90]])).logits


def _assert_matches_hand_assembly(converted, preset_model, name: str, folder: Path) -> None:
    oracle = _by_hand(preset_model(name), folder)
    assert converted.config.image_token_id == oracle.config.image_token_id
    got = _logits(converted)
    torch.testing.assert_close(got, _logits(oracle), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, _logits(_by_hand(preset_model(name), folder, merge=False)), atol=1e-3)


@pytest.mark.parametrize(
    ("name", "adapter_suffix"), [("debug-clip-llama", ".bin"), ("debug-siglip-qwen2", ".safetensors")]
)
def test_import_equals_base_plus_merged_lora_plus_projector(
    name, adapter_suffix, preset_model, preset_parts, tmp_path
):
    parts = preset_parts(name)
    folder = _write_upstream_lora(preset_model(name), parts, tmp_path / "lora", adapter_suffix)
    converted = import_upstream_lora(folder, parts.llm_dir, vision=str(parts.vision_dir))
    assert all("lora_" not in key for key in converted.state_dict())
    _assert_matches_hand_assembly(converted, preset_model, name, folder)


def test_cli_writes_a_llava_hf_checkpoint(preset_model, preset_parts, tmp_path):
    from llavakit.cli.main import main
    from llavakit.model.llava_next import LlavaNextModel

    parts = preset_parts("debug-clip-llama")
    folder = _write_upstream_lora(preset_model("debug-clip-llama"), parts, tmp_path / "lora")
    argv = [
        "convert",
        "from-upstream-lora",
        str(folder),
        "--model-base",
        str(parts.llm_dir),
        "--out",
        str(tmp_path / "hf"),
    ]
    assert main([*argv, "--vision", str(parts.vision_dir)]) == 0
    _assert_matches_hand_assembly(
        LlavaNextModel.from_pretrained(tmp_path / "hf"), preset_model, "debug-clip-llama", folder
    )


class _CreatesMarker:
    """Unpickling this opens (so creates) a file: stands for any code a hostile pickle would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("file", ["non_lora_trainables.bin", "adapter_model.bin"])
def test_a_pickle_holding_code_is_refused_without_running_it(file, preset_model, preset_parts, tmp_path):
    parts = preset_parts("debug-clip-llama")
    folder = _write_upstream_lora(preset_model("debug-clip-llama"), parts, tmp_path / "lora", ".bin")
    marker = tmp_path / "pwned"
    torch.save(
        {"model.mm_projector.0.weight": torch.zeros(1), "payload": _CreatesMarker(marker)}, folder / file
    )
    with pytest.raises(
        CheckpointError,
        match=rf"{file} holds Python objects besides tensors, so it was refused .*it needs \S*open",
    ):
        import_upstream_lora(folder, parts.llm_dir, vision=str(parts.vision_dir))
    assert not marker.exists()
    torch.load(folder / file, weights_only=False)  # the payload is live: a plain load runs it
    assert marker.exists()


def test_a_pickle_that_is_not_a_dict_of_tensors_is_refused(preset_model, preset_parts, tmp_path):
    parts = preset_parts("debug-clip-llama")
    folder = _write_upstream_lora(preset_model("debug-clip-llama"), parts, tmp_path / "lora")
    torch.save([torch.zeros(2)], folder / "non_lora_trainables.bin")
    with pytest.raises(
        CheckpointError, match="non_lora_trainables.bin holds a list, not a dict of named tensors"
    ):
        import_upstream_lora(folder, parts.llm_dir, vision=str(parts.vision_dir))


def _edit(file: Path, change) -> None:
    state = _load(file)
    change(state)
    _save(state, file)


LORA_A0 = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize(
    ("file", "change", "message"),
    [
        (
            "non_lora_trainables.bin",
            lambda state: state.pop(f"{PREFIX}model.mm_projector.2.weight"),
            r"missing \['model\.mm_projector\.2\.weight'\] in all of .*non_lora_trainables\.bin",
        ),
        (
            "non_lora_trainables.bin",
            lambda state: state.update({f"{PREFIX}model.mm_resampler.weight": torch.zeros(2)}),
            r"unexpected keys \['model\.mm_resampler\.weight \(.*non_lora_trainables\.bin\)'\]",
        ),
        (
            "non_lora_trainables.bin",
            lambda state: state.update({f"{PREFIX}model.image_newline": torch.zeros(3)}),
            r"non_lora_trainables\.bin: model\.image_newline has shape \(3,\) but",
        ),
        (
            "adapter_model.safetensors",
            lambda state: state.pop(LORA_A0.replace("lora_A", "lora_B")),
            r"adapter_model\.safetensors does not match .*missing \['model\.layers\.0\.self_attn\.q_proj\.lora_B",
        ),
        (
            "adapter_model.safetensors",
            lambda state: state.update({LORA_A0.replace("layers.0", "layers.9"): torch.zeros(RANK, 64)}),
            r"unexpected \['model\.layers\.9\.self_attn\.q_proj\.lora_A\.weight'\]",
        ),
        (
            "adapter_model.safetensors",
            lambda state: state.update({LORA_A0: torch.zeros(RANK + 1, 64)}),
            r"q_proj\.lora_A\.weight has shape \(5, 64\) but r=4",
        ),
    ],
    ids=[
        "missing-projector",
        "unexpected-trainable",
        "newline-shape",
        "missing-lora",
        "unexpected-lora",
        "lora-shape",
    ],
)
def test_key_mismatches_are_named(file, change, message, preset_model, preset_parts, tmp_path):
    parts = preset_parts("debug-clip-llama")
    folder = _write_upstream_lora(preset_model("debug-clip-llama"), parts, tmp_path / "lora")
    _edit(folder / file, change)
    with pytest.raises(CheckpointError, match=message):
        import_upstream_lora(folder, parts.llm_dir, vision=str(parts.vision_dir))


def test_a_base_that_is_neither_a_folder_nor_on_the_hub_fails_clearly(preset_model, preset_parts, tmp_path):
    parts = preset_parts("debug-clip-llama")
    folder = _write_upstream_lora(preset_model("debug-clip-llama"), parts, tmp_path / "lora")
    with pytest.raises(CheckpointError, match="--model-base 'nobody/no-such-llm' is not a folder"):
        import_upstream_lora(folder, "nobody/no-such-llm", vision=str(parts.vision_dir))
