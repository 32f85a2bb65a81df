"""Model FLOPs of a training step, for MFU: the convention of the performance reference (§1), counted from the model.

Why our own count: the ``6 × parameters × tokens`` of `llavakit.training.metrics` ignores attention (quadratic in
the sample length: thousands of visual tokens per sample), the vision tower's own token count (tiles × tokens per
tile, not the LLM's sequence) and frozen parts. MFU figures are compared with published runs, so the count follows
the published convention exactly (model FLOPs, no recomputation: gradient checkpointing does not raise them):

- LLM, per sample of ``s`` tokens (visual tokens included; a packed row is several samples, each attending only to
  itself): ``c·N·s`` for the weights plus causal attention ``a·2·L·d·s²`` (``2·L·d·s`` per token forward: QKᵀ and
  AV over on average ``s/2`` keys, ``d`` = heads × head dim).
- Vision tower, per tile of ``t`` tokens (CLS included): ``c·Nv·t`` plus bidirectional attention ``a·4·Lv·dv·t²``;
  only the layers up to ``select_layer`` run and are counted.
- Projector, per tile: ``c·Np`` × visual tokens per tile.

``c`` is 6 for a trained part (forward 2, input gradients 2, weight gradients 2), 4 for a frozen part that gradients
flow through to a trained part before it (the LLM of the align stage: ``4·N``), 2 for a frozen part nothing before it
trains (forward only). ``a`` is 3 (forward + backward) where gradients flow through the attention, else 1.

Which parameters count (``N``, ``Nv``, ``Np``): those that multiply every token: all LLM parameters except an
*untied* input embedding table (a lookup; tied, the shared matrix is counted once, as the LM head). This gives the
published 0.494B for Qwen2.5-0.5B (tied); for Vicuna-7B it gives 6.61B, the 6.74B total minus its 0.13B lookup table.
Vision: the layers that run, the patch embedding and the pre-layernorm, without the position-embedding table. The
LM head is counted at every position although llavakit computes logits only at supervised ones
(`llavakit.model.loss`): MFU measures the standard model's FLOPs, so two stacks compare on the same count.
Padding tokens and the blank tile run for text-only batches (`LlavaNextModel._vision_graph_anchor`) are not counted.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llavakit.errors import ConfigError, DataError
from llavakit.model.llava_next import LlavaNextModel
from llavakit.training.config import TRAINABLE_PARTS


@dataclass(frozen=True)
class PartCost:
    """What one part costs per token it processes.

    Attributes:
        params: parameters that multiply every token.
        layers, width: attention layers and attention width (heads × head dim); 0 layers = no attention.
        causal: causal (LLM) or bidirectional (vision) attention.
        weight_factor: FLOPs per parameter per token (6 trained, 4 frozen with gradients through, 2 forward only).
        attention_factor: 3 with gradients through the attention, else 1.
    """

    params: int
    layers: int
    width: int
    causal: bool
    weight_factor: int
    attention_factor: int

    def sequence_flops(self, length: int) -> float:
        """FLOPs of one sequence of ``length`` tokens that attend to each other."""
        per_pair = 2 if self.causal else 4  # causal: half the QKᵀ/AV pairs of a full square
        attention = self.attention_factor * per_pair * self.layers * self.width * length * length
        return float(self.weight_factor * self.params * length + attention)


@dataclass(frozen=True)
class FlopCounter:
    """Model FLOPs of a training step of one `LlavaNextModel` with a given set of trained parts.

    Attributes:
        llm, vision, projector: the parts' costs.
        vision_tokens: tokens per tile in the vision tower (CLS included).
        visual_tokens: tokens per tile entering the projector (`ImageSpec.tokens_per_tile`).
        pad_token_id: id of packed rows' trailing padding (see `sample_lengths`).
    """

    llm: PartCost
    vision: PartCost
    projector: PartCost
    vision_tokens: int
    visual_tokens: int
    pad_token_id: int | None

    @classmethod
    def from_model(cls, model: LlavaNextModel, trainable: Collection[str]) -> FlopCounter:
        """Count ``model``'s parameters and shapes; ``trainable`` ⊆ ``vision_tower``, ``projector``,
        ``language_model`` (a stage's ``trainable``).

        Raises:
            ConfigError: an unknown part name.
        """
        unknown = sorted(set(trainable) - set(TRAINABLE_PARTS))
        if unknown:
            raise ConfigError(
                f"unknown trainable part(s) {unknown}; valid parts: {', '.join(TRAINABLE_PARTS)}"
            )
        vision_trained = "vision_tower" in trainable
        projector_trained = "projector" in trainable
        llm_trained = "language_model" in trainable
        vision_factor = 6 if vision_trained else 2
        projector_factor = 6 if projector_trained else (4 if vision_trained else 2)
        grads_into_llm = vision_trained or projector_trained
        llm_factor = 6 if llm_trained else (4 if grads_into_llm else 2)
        encoder = model.vision_encoder
        vision_config = encoder.config
        text_config = model.llm.config
        spec = model.config.image_spec
        patches = (spec.tile_size // spec.patch_size) ** 2
        return cls(
            llm=PartCost(
                params=_llm_params(model),
                layers=int(text_config.num_hidden_layers),
                width=int(text_config.num_attention_heads) * _head_dim(text_config),
                causal=True,
                weight_factor=llm_factor,
                attention_factor=3 if llm_factor > 2 else 1,
            ),
            vision=PartCost(
                params=_vision_params(model),
                layers=encoder.num_layers_run,
                width=int(vision_config.hidden_size),
                causal=False,
                weight_factor=vision_factor,
                attention_factor=3 if vision_trained else 1,
            ),
            projector=PartCost(
                params=sum(p.numel() for p in model.projector.parameters()),
                layers=0,
                width=0,
                causal=False,
                weight_factor=projector_factor,
                attention_factor=1,
            ),
            vision_tokens=patches + (1 if encoder.backbone.has_cls_token else 0),
            visual_tokens=spec.tokens_per_tile,
            pad_token_id=model.config.pad_token_id,
        )

    def tile_flops(self) -> float:
        """FLOPs of one tile through the vision tower and the projector."""
        projector = self.projector.weight_factor * self.projector.params * self.visual_tokens
        return self.vision.sequence_flops(self.vision_tokens) + projector

    def step_flops(self, sample_lengths: Sequence[int], tiles: int) -> float:
        """FLOPs of a step over samples of ``sample_lengths`` LLM tokens holding ``tiles`` image tiles in all."""
        return sum(self.llm.sequence_flops(length) for length in sample_lengths) + tiles * self.tile_flops()

    def batch_flops(self, batch: dict[str, Any]) -> float:
        """FLOPs of a collated micro-batch (padded, packed or padding-free; see `sample_lengths`)."""
        return self.step_flops(sample_lengths(batch, self.pad_token_id), batch_tiles(batch))


def sample_lengths(batch: dict[str, Any], pad_token_id: int | None) -> list[int]:
    """Tokens of each sample of a collated batch, padding excluded.

    Padded batches (2-D ``attention_mask``) hold one sample per row. Packed and padding-free rows hold samples whose
    ``position_ids`` restart at 0; the trailing padding of a short row restarts them too, and is told apart by
    being all ``pad_token_id`` (a real sample starts with its prompt). The count is checked against the batch's
    ``sample_ids`` when present.

    Raises:
        DataError: neither a 2-D attention mask nor position ids, or the count disagrees with ``sample_ids``.
    """
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        lengths = [int(n) for n in mask.sum(dim=1).tolist()]
    elif batch.get("position_ids") is not None:
        lengths = []
        for ids, positions in zip(batch["input_ids"], batch["position_ids"]):
            starts = [*torch.nonzero(positions == 0).flatten().tolist(), len(positions)]
            for start, end in zip(starts[:-1], starts[1:]):
                if pad_token_id is None or not bool((ids[start:end] == pad_token_id).all()):
                    lengths.append(end - start)
    else:
        raise DataError(
            "cannot find sample boundaries: the batch has neither a 2-D attention_mask nor position_ids"
        )
    expected = batch.get("sample_ids")
    if expected is not None and len(expected) != len(lengths):
        raise DataError(f"found {len(lengths)} samples in the batch but it lists {len(expected)} sample_ids")
    return lengths


def batch_tiles(batch: dict[str, Any]) -> int:
    """Tiles through the vision tower in a collated batch: image tiles (``pixel_values [N_tiles, 3, S, S]``) and
    video frames (``pixel_values_videos [ΣF, 3, S, S]``, one tile each); 0 without either."""
    tiles = 0
    for key in ("pixel_values", "pixel_values_videos"):
        pixels = batch.get(key)
        if pixels is None:
            continue
        if pixels.dim() != 4:
            raise DataError(f"expected {key} [N, 3, S, S], got shape {tuple(pixels.shape)}")
        tiles += int(pixels.shape[0])
    return tiles


def _llm_params(model: LlavaNextModel) -> int:
    llm = model.llm
    total = sum(p.numel() for p in llm.parameters())  # a tied matrix is listed once
    embeddings = llm.get_input_embeddings().weight
    head = llm.get_output_embeddings()
    tied = head is not None and head.weight is embeddings
    return total if tied else total - embeddings.numel()


def _vision_params(model: LlavaNextModel) -> int:
    encoder = model.vision_encoder
    unused = set(encoder.unused_parameter_names())
    return sum(
        p.numel()
        for name, p in encoder.named_parameters()
        if name not in unused and "position_embedding" not in name
    )


def _head_dim(config: Any) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else int(config.hidden_size) // int(config.num_attention_heads)
