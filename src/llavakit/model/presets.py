"""Tiny debug presets built offline: random weights, a locally trained tokenizer, saved as real folders.

Nothing can be downloaded on test machines, yet tests must exercise the real loading code. So a preset writes a
tiny vision encoder and a tiny causal LM (with its tokenizer) to folders through transformers' ``save_pretrained``,
and the model is then assembled by `LlavaNextModel.from_parts` exactly as a user assembles CLIP-L + Vicuna-7B.

Presets:

- ``debug-clip-llama``: CLIP-like encoder (CLS token, pre-layernorm, ``select_layer=-2``) + Llama (untied head),
  ``vicuna_v1`` template, LLaVA-1.6's five grids.
- ``debug-siglip-qwen2``: SigLIP-like encoder (no CLS, ``select_layer=-1``) + Qwen2 with **tied** embeddings (the
  Qwen2.5-0.5B case), ``qwen_2`` template, ``(1x1),...,(3x3)`` grids.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from llavakit.anyres.spec import ImageSpec
from llavakit.model.llava_next import LlavaNextModel
from llavakit.model.tokenizer import build_bpe_tokenizer
from llavakit.model.vision import VISION_BACKBONES
from llavakit.registry import Registry

_VISION_CLASSES = {"clip": (CLIPVisionConfig, CLIPVisionModel), "siglip": (SiglipVisionConfig, SiglipVisionModel)}
_LLM_CLASSES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


@dataclass(frozen=True)
class Preset:
    """A tiny model recipe.

    Attributes:
        name: registry id.
        vision: vision backbone id (``clip`` | ``siglip``).
        llm: LLM family (``llama`` | ``qwen2``); also the tokenizer style.
        template: chat template id.
        select_layer: vision hidden-state index.
        grids: AnyRes grids as (rows, cols), scaled by the tile size into pinpoints.
        tile_size, patch_size: vision input geometry.
        vision_dims: extra vision config fields (hidden size, layers, heads...).
        llm_dims: extra LLM config fields.
    """

    name: str
    vision: str
    llm: str
    template: str
    select_layer: int
    grids: tuple[tuple[int, int], ...]
    tile_size: int = 32
    patch_size: int = 8
    projector: str = "mlp2x_gelu"
    vision_dims: dict[str, Any] = field(default_factory=dict)
    llm_dims: dict[str, Any] = field(default_factory=dict)

    def image_spec(self) -> ImageSpec:
        """The preset's preprocessing spec."""
        backbone = VISION_BACKBONES.get(self.vision)
        return ImageSpec(
            tile_size=self.tile_size,
            patch_size=self.patch_size,
            pinpoints=tuple((r * self.tile_size, c * self.tile_size) for r, c in self.grids),
            image_mean=backbone.image_mean,
            image_std=backbone.image_std,
        )


@dataclass(frozen=True)
class PresetParts:
    """Folders written by `build_parts`, ready for `LlavaNextModel.from_parts`."""

    preset: Preset
    vision_dir: Path
    llm_dir: Path

    def from_parts_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `LlavaNextModel.from_parts` that reproduce the preset."""
        return {
            "vision": str(self.vision_dir),
            "llm": str(self.llm_dir),
            "projector": self.preset.projector,
            "image_spec": self.preset.image_spec(),
            "template": self.preset.template,
            "select_layer": self.preset.select_layer,
            "vision_encoder": self.preset.vision,
        }


_TINY_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
_TINY_LLM = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}

PRESETS: Registry[Preset] = Registry("preset")
PRESETS.register(
    "debug-clip-llama",
    Preset("debug-clip-llama", "clip", "llama", "vicuna_v1", -2, ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))),
)
PRESETS.register(
    "debug-siglip-qwen2",
    Preset(
        "debug-siglip-qwen2",
        "siglip",
        "qwen2",
        "qwen_2",
        -1,
        tuple((r, c) for r in range(1, 4) for c in range(1, 4)),
        llm_dims={"tie_word_embeddings": True},
    ),
)


def save_tiny_vision(kind: str, out_dir: str | Path, image_size: int, patch_size: int, seed: int = 0, **dims: Any) -> Path:
    """Write a randomly initialised CLIP/SigLIP vision model to ``out_dir`` and return it."""
    config_class, model_class = _VISION_CLASSES[kind]
    torch.manual_seed(seed)
    extra = {"vision_use_head": False} if kind == "siglip" else {}
    config = config_class(image_size=image_size, patch_size=patch_size, **{**_TINY_VISION, **extra, **dims})
    model_class(config).save_pretrained(out_dir)
    return Path(out_dir)


def save_tiny_llm(
    family: str, tokenizer: PreTrainedTokenizerFast, out_dir: str | Path, seed: int = 0, **dims: Any
) -> Path:
    """Write a randomly initialised causal LM sized to ``tokenizer`` (and the tokenizer) to ``out_dir``."""
    config_class, model_class = _LLM_CLASSES[family]
    torch.manual_seed(seed)
    special = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = config_class(**{**_TINY_LLM, **special, **dims})
    model_class(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


def build_parts(
    name: str,
    out_dir: str | Path,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 512,
    **overrides: Any,
) -> PresetParts:
    """Write the vision and LLM folders of preset ``name`` under ``out_dir``.

    Args:
        name: preset id.
        out_dir: parent folder; ``vision/`` and ``llm/`` are written inside.
        seed: weight-initialisation seed.
        corpus: tokenizer training text (default: a small built-in corpus).
        vocab_size: tokenizer vocabulary size.
        overrides: `Preset` fields to replace (e.g. ``tile_size``, ``vision_dims``, ``llm_dims``, ``template``).
    """
    preset = replace(PRESETS.get(name), **overrides)
    out_dir = Path(out_dir)
    vision_dir = save_tiny_vision(
        preset.vision, out_dir / "vision", preset.tile_size, preset.patch_size, seed=seed, **preset.vision_dims
    )
    tokenizer = build_bpe_tokenizer(preset.llm, corpus=corpus, vocab_size=vocab_size)
    llm_dir = save_tiny_llm(preset.llm, tokenizer, out_dir / "llm", seed=seed + 1, **preset.llm_dims)
    return PresetParts(preset, vision_dir, llm_dir)


def build_preset_model(name: str, out_dir: str | Path, seed: int = 0, **overrides: Any) -> LlavaNextModel:
    """Write preset ``name``'s parts under ``out_dir`` and assemble them with `LlavaNextModel.from_parts`."""
    parts = build_parts(name, out_dir, seed=seed, **overrides)
    torch.manual_seed(seed + 2)
    return LlavaNextModel.from_parts(**parts.from_parts_kwargs())
