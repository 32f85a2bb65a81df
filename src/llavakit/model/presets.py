"""Tiny debug presets built offline: random weights, a locally trained tokenizer, saved as real folders.

Nothing can be downloaded on test machines, yet tests must exercise the real loading code. So a preset writes a
tiny vision encoder and a tiny causal LM (with its tokenizer) to folders through transformers' ``save_pretrained``,
and the model is then assembled by `LlavaNextModel.from_parts` exactly as a user assembles CLIP-L + Vicuna-7B.

Presets:

- ``debug-clip-llama``: CLIP-like encoder (CLS token, pre-layernorm, ``select_layer=-2``) + Llama (untied head),
  ``vicuna_v1`` template, LLaVA-1.6's five grids.
- ``debug-siglip-qwen2``: SigLIP-like encoder (no CLS, ``select_layer=-1``) + Qwen2 with **tied** embeddings (the
  Qwen2.5-0.5B case), ``qwen_2`` template, ``(1x1),...,(3x3)`` grids.

Real-shape presets, for GPU tests and benchmarks only: the published configs of public checkpoints (every width,
depth, head count, vocabulary and epsilon), random weights, and still the small local BPE tokenizer (its ids are all
below the real vocabulary, so the embedding tables keep their real size). They hold hundreds of millions to billions
of parameters: `build_parts` would write GBs, so build them in memory with `build_preset_in_memory` (e.g. inside
``with torch.device("cuda")``), or on the ``meta`` device to inspect shapes and parameter counts for free.

- ``qwen2.5-0.5b-siglip-shapes``: ``google/siglip-so400m-patch14-384`` vision tower + ``Qwen/Qwen2.5-0.5B-Instruct``
  (vocabulary 151936, tied), ``qwen_1_5`` template, ``select_layer=-2``, the qwen2.5-0.5b-siglip recipe's five grids.
- ``vicuna-7b-clip-l-slice``: ``openai/clip-vit-large-patch14-336`` vision tower + ``lmsys/vicuna-7b-v1.5``'s
  widths and heads (vocabulary 32000, untied) with 8 of its 32 decoder layers (one 7B layer costs as much as the
  full 7B model per layer; 8 keep a step's memory small), ``vicuna_v1`` template, LLaVA-1.6's five grids. For the
  whole depth pass ``llm_dims={**PRESETS.get("vicuna-7b-clip-l-slice").llm_dims, "num_hidden_layers": 32}``.
"""

from __future__ import annotations

import json
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
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from llavakit.anyres.spec import ImageSpec
from llavakit.model.config import LlavaKitConfig
from llavakit.model.family import family_for, set_pad_token
from llavakit.model.llava_next import LLAVA_16_GRIDS, LlavaNextModel
from llavakit.model.tokenizer import build_bpe_tokenizer, ensure_image_token
from llavakit.model.vision import VISION_BACKBONES
from llavakit.registry import Registry

_VISION_CLASSES = {
    "clip": (CLIPVisionConfig, CLIPVisionModel),
    "siglip": (SiglipVisionConfig, SiglipVisionModel),
}
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

# Published config.json values (hub ids in the module docstring); the memory planner reads them too.
SIGLIP_SO400M_384 = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
QWEN25_05B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "rope_theta": 1e6,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "max_position_embeddings": 32768,
}
CLIP_L_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
VICUNA_7B_SLICE = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 8,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "max_position_embeddings": 4096,
}
PRESETS.register(
    "qwen2.5-0.5b-siglip-shapes",
    Preset(
        "qwen2.5-0.5b-siglip-shapes",
        "siglip",
        "qwen2",
        "qwen_1_5",
        -2,
        # The recipe's "[(384, 768), (768, 384), (768, 768), (1152, 384), (384, 1152)]" (width, height), in order.
        ((2, 1), (1, 2), (2, 2), (1, 3), (3, 1)),
        tile_size=384,
        patch_size=14,
        vision_dims=SIGLIP_SO400M_384,
        llm_dims=QWEN25_05B,
    ),
)
PRESETS.register(
    "vicuna-7b-clip-l-slice",
    Preset(
        "vicuna-7b-clip-l-slice",
        "clip",
        "llama",
        "vicuna_v1",
        -2,
        LLAVA_16_GRIDS,
        tile_size=336,
        patch_size=14,
        vision_dims=CLIP_L_336,
        llm_dims=VICUNA_7B_SLICE,
    ),
)


def save_tiny_vision(
    kind: str, out_dir: str | Path, image_size: int, patch_size: int, seed: int = 0, **dims: Any
) -> Path:
    """Write a randomly initialised CLIP/SigLIP vision model to ``out_dir`` and return it."""
    torch.manual_seed(seed)
    _VISION_CLASSES[kind][1](vision_config(kind, image_size, patch_size, **dims)).save_pretrained(out_dir)
    return Path(out_dir)


def vision_config(kind: str, image_size: int, patch_size: int, **dims: Any) -> PretrainedConfig:
    """The transformers config of a ``kind`` (``clip`` | ``siglip``) vision tower: tiny sizes unless ``dims`` say."""
    extra = {"vision_use_head": False} if kind == "siglip" else {}
    return _VISION_CLASSES[kind][0](
        image_size=image_size, patch_size=patch_size, **{**_TINY_VISION, **extra, **dims}
    )


def save_tiny_llm(
    family: str, tokenizer: PreTrainedTokenizerFast, out_dir: str | Path, seed: int = 0, **dims: Any
) -> Path:
    """Write a randomly initialised causal LM sized to ``tokenizer`` (and the tokenizer) to ``out_dir``."""
    torch.manual_seed(seed)
    _LLM_CLASSES[family][1](llm_config(family, tokenizer, **dims)).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


def llm_config(family: str, tokenizer: PreTrainedTokenizerFast, **dims: Any) -> PretrainedConfig:
    """The transformers config of a ``family`` causal LM with ``tokenizer``'s special ids; tiny sizes and a vocabulary
    of ``len(tokenizer)`` unless ``dims`` say otherwise (``dims["vocab_size"]`` must not be below ``len(tokenizer)``)."""
    special = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return _LLM_CLASSES[family][0](**{**_TINY_LLM, **special, **dims})


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
        preset.vision,
        out_dir / "vision",
        preset.tile_size,
        preset.patch_size,
        seed=seed,
        **preset.vision_dims,
    )
    tokenizer = build_bpe_tokenizer(preset.llm, corpus=corpus, vocab_size=vocab_size)
    llm_dir = save_tiny_llm(preset.llm, tokenizer, out_dir / "llm", seed=seed + 1, **preset.llm_dims)
    return PresetParts(preset, vision_dir, llm_dir)


def build_preset_model(name: str, out_dir: str | Path, seed: int = 0, **overrides: Any) -> LlavaNextModel:
    """Write preset ``name``'s parts under ``out_dir`` and assemble them with `LlavaNextModel.from_parts`."""
    parts = build_parts(name, out_dir, seed=seed, **overrides)
    torch.manual_seed(seed + 2)
    return LlavaNextModel.from_parts(**parts.from_parts_kwargs())


def preset_model_config(preset: Preset, tokenizer: PreTrainedTokenizerFast) -> LlavaKitConfig:
    """The `LlavaKitConfig` that `build_parts` + `LlavaNextModel.from_parts` would produce for ``preset``, without
    weights. Adds ``<image>`` (and a pad token) to ``tokenizer`` as ``from_parts`` does; the LLM's vocabulary grows
    to the tokenizer's when smaller (``from_parts`` resizes the embeddings then)."""
    text = llm_config(preset.llm, tokenizer, **preset.llm_dims)
    family = family_for(text.model_type)
    image_token_id = ensure_image_token(tokenizer)
    set_pad_token(tokenizer, family)
    text.vocab_size = max(text.vocab_size, len(tokenizer))
    vision = vision_config(preset.vision, preset.tile_size, preset.patch_size, **preset.vision_dims)
    return LlavaKitConfig(
        vision_encoder=preset.vision,
        vision_config=_plain_dict(vision),
        text_config=_plain_dict(text),
        projector=preset.projector,
        select_layer=preset.select_layer,
        image_spec=preset.image_spec(),
        template=preset.template,
        image_token_id=image_token_id,
        pad_token_id=tokenizer.pad_token_id,
        padding_side=family.padding_side,
    )


def build_preset_in_memory(
    name: str,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 512,
    attn_implementation: str | None = None,
    **overrides: Any,
) -> LlavaNextModel:
    """Preset ``name`` with random fp32 weights, built in memory: no folders are written.

    For the real-shape presets, whose parts would take GBs on disk. Parameters are created on the current default
    device: ``with torch.device("cuda"):`` builds directly on the GPU, ``with torch.device("meta"):`` allocates
    nothing (shapes and parameter counts only). Arguments as in `build_parts`.
    """
    preset = replace(PRESETS.get(name), **overrides)
    tokenizer = build_bpe_tokenizer(preset.llm, corpus=corpus, vocab_size=vocab_size)
    config = preset_model_config(preset, tokenizer)
    torch.manual_seed(seed)
    return LlavaNextModel.from_config(config, tokenizer, attn_implementation=attn_implementation)


def _plain_dict(config: PretrainedConfig) -> dict[str, Any]:
    """``config`` as the JSON-safe dict a `LlavaKitConfig` stores (what ``from_parts`` records)."""
    data = config.to_dict()
    data.pop("transformers_version", None)
    return json.loads(json.dumps(data, default=str))
