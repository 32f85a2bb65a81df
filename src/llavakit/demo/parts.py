"""The demo's tiny model parts: a CLIP-like vision encoder and a Llama-like LLM, random, written to folders.

``llavakit demo`` must build its model the way a user builds CLIP-L + Vicuna-7B: two checkpoint folders composed by
`LlavaNextModel.from_parts` with a fresh projector. Nothing can be downloaded, so the parts are written here through
`llavakit.model.presets.build_parts` (the ``debug-clip-llama`` preset, resized), with a byte-level BPE tokenizer
trained on the synthetic training texts plus the chat template's system prompt and role names, so every answer word
is one token.

Sizes (calibrated to learn the synthetic tasks within minutes on 2 CPU cores): 32 px tiles of 8 px patches
(16 tokens per tile), a 3-layer 96-wide vision encoder read at layer -2, a 3-layer 128-wide LLM with 8 heads.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from llavakit.data.synth import CELL, TEXT_GRID
from llavakit.model.presets import PresetParts, build_parts

PRESET = "debug-clip-llama"
TEMPLATE = "vicuna_v1"
# The finetune stage's system prompt (recipes/demo-tiny.yaml), upstream's chatml_direct one: 4 tokens where vicuna_v1's
# own is 39. Finetune samples average 164 tokens instead of 205, and the random LLM has no use for the long prompt.
SYSTEM_PROMPT = "Answer the questions."
# The synthetic scenes are drawn for this encoder: one 32 px cell per tile, letters on the 8 px patch grid.
TILE_SIZE = CELL
PATCH_SIZE = TEXT_GRID
# AnyRes grids (rows, cols): the synthetic canvases are 64x64, 64x128 and 128x64, each an exact 2x2, 2x4 or 4x2 grid.
GRIDS = ((1, 2), (2, 1), (2, 2), (2, 4), (4, 2))
VISION_DIMS = {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 3, "num_attention_heads": 4}
# Note: 8 heads of 16 dims. With 4 heads (2 key/value heads) the LLM learned to read the words or to tell the shapes
# apart, never both: words 1.00 but shapes 0.22-0.28 up to finetune step 1600 (held-out, teacher-forced). With 8 heads
# it learns both: words 1.00, shapes 0.97 (held-out exact match after 2600 finetune steps). One run each.
# Note: 3 layers since the shape-vs-word position question (synth v5). With 2 layers the LLM learnt the positions
# (0.69) but lost the words (0.16); 192 wide with 12 heads it had learnt neither by step 1200 (0.58, 0.17); with
# 3 layers it learnt all five types (2000 finetune steps, one run each: position 0.73-0.75, words 1.00, shapes
# 0.91-0.96), at ~1.3x the training time of 2 layers.
LLM_DIMS = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "max_position_embeddings": 1024,
}
VOCAB_SIZE = 512


def build_demo_parts(out_dir: str | Path, corpus: Iterable[str], seed: int = 0) -> PresetParts:
    """Write the demo's ``vision/`` and ``llm/`` folders under ``out_dir``.

    Args:
        out_dir: parent folder of the two parts.
        corpus: tokenizer training texts (the synthetic training split; never the held-out one).
        seed: weight-initialisation seed.

    Returns:
        The written parts; ``from_parts_kwargs()`` rebuilds the model with `LlavaNextModel.from_parts`.
    """
    texts = [*corpus, SYSTEM_PROMPT, "USER: ASSISTANT:"]
    return build_parts(
        PRESET,
        out_dir,
        seed=seed,
        corpus=texts,
        vocab_size=VOCAB_SIZE,
        template=TEMPLATE,
        tile_size=TILE_SIZE,
        patch_size=PATCH_SIZE,
        grids=GRIDS,
        vision_dims=VISION_DIMS,
        llm_dims=LLM_DIMS,
    )
