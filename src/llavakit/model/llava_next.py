"""`LlavaNextModel`: one composed model — vision encoder + projector + any causal LM + image newline.

Flow of one forward pass::

    pixel_values [N_tiles,3,S,S] ──vision_encoder──► [N_tiles,T,C] ──projector──► [N_tiles,T,D]
        ──split per image, anyres.features.merge_image_features──► [n_i, D] per image ──cat──► [Σn_i, D]
    input_ids [B,L] ──LLM embeddings──► [B,L,D] ──masked_scatter at <image> positions──► inputs_embeds
        ──llm(inputs_embeds, attention_mask, position_ids, labels)──► loss, logits [B,L,V]
                                         (training: logits of the N supervised positions only, [N,V])

The sequence already holds one ``<image>`` token per visual token (the data pipeline expands placeholders with
`llavakit.anyres.geometry.count_visual_tokens`), so placing features is a single masked scatter, and a count
mismatch is an error naming both numbers instead of a silent reuse of another image's features (upstream).

Videos (a model built with a `VideoSpec`) take the same road without AnyRes: ``pixel_values_videos [ΣF, 3, S, S]``
──vision_encoder, projector──► ``[ΣF, T, D]`` ──split by ``video_frames``, `anyres.video_features.merge_video_features`
(2D pooling, newlines from the same ``image_newline``)──► ``[count_tokens(F_v), D]`` per video ──masked_scatter at
the ``<video>`` positions. Images and videos mix freely in one batch and one sample; their tiles and frames go
through the vision encoder and projector in one call, as a text-only training batch's blank tile does, so
every forward makes exactly one (FSDP2 ranks holding different media must all-gather each vision layer
equally often).

LLM families differ only by data (`llavakit.model.family`); the class never branches on a model name. The model
knows nothing of distribution: `shard_units` only *declares* the modules a strategy may shard.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from llavakit.anyres import features as anyres_features
from llavakit.anyres import geometry
from llavakit.anyres.spec import ImageSpec
from llavakit.anyres.video_features import merge_video_features
from llavakit.anyres.video_spec import VideoSpec
from llavakit.errors import ConfigError, DataError
from llavakit.model import attention
from llavakit.model.config import LlavaKitConfig
from llavakit.model.family import family_for, set_pad_token
from llavakit.model.loss import supervised_lm_loss
from llavakit.model.projector import Projector
from llavakit.model.tokenizer import ensure_image_token, ensure_video_token
from llavakit.model.vision import (
    VISION_BACKBONES,
    VisionBackbone,
    VisionEncoder,
    build_vision_encoder,
    load_vision_model,
)

# LLaVA-1.6's five grids (1×2, 2×1, 2×2, 3×1, 1×3 tiles) as (rows, cols); scaled by the tile size.
LLAVA_16_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
# Every way of building a model accepts attn_implementation="sdpa_varlen"; transformers must know it first.
attention.register()


class LlavaNextModel(nn.Module):
    """A LLaVA-NeXT model composed of parts.

    Args:
        config: the model config (see `LlavaKitConfig`).
        vision_encoder: the wrapped vision tower.
        llm: any transformers causal LM.
        tokenizer: the tokenizer, saved with the model (optional for pure tensor use).
    """

    def __init__(
        self,
        config: LlavaKitConfig,
        vision_encoder: VisionEncoder,
        llm: nn.Module,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        super().__init__()
        _check_spec_matches_encoder(config.image_spec, vision_encoder)
        _check_video_spec(config)
        self.config = config
        self.vision_encoder = vision_encoder
        self.projector = Projector(config.projector, vision_encoder.hidden_size, config.hidden_size)
        self.llm = llm
        self.tokenizer = tokenizer
        if config.image_spec.merge_type == "spatial_unpad":
            embed_std = 1 / config.hidden_size**0.5
            self.image_newline = nn.Parameter(torch.randn(config.hidden_size) * embed_std)
        else:
            self.register_parameter("image_newline", None)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_parts(
        cls,
        vision: str,
        llm: str,
        projector: str = "mlp2x_gelu",
        image_spec: ImageSpec | None = None,
        template: str | None = None,
        select_layer: int = -2,
        vision_encoder: str | None = None,
        dtype: torch.dtype | None = None,
        attn_implementation: str | None = None,
        llm_kwargs: dict[str, Any] | None = None,
        system_prompt: str | None = None,
        load_parts: PartsLoader | None = None,
        video_spec: VideoSpec | None = None,
    ) -> LlavaNextModel:
        """Build a fresh model from a vision encoder and an LLM (hub ids or local folders) and a new projector.

        Both parts load through transformers' ``from_pretrained``. The tokenizer comes from the LLM; ``<image>`` is
        added to it (and the embeddings resized) when missing.

        Args:
            vision: vision checkpoint (e.g. ``openai/clip-vit-large-patch14-336``) or folder.
            llm: causal LM checkpoint (e.g. ``lmsys/vicuna-7b-v1.5``) or folder.
            projector: projector id.
            image_spec: preprocessing spec; default: anyres with LLaVA-1.6's five grids at the encoder's size.
            template: chat template id; default: the LLM family's.
            system_prompt: replaces the template's default system prompt (None keeps it); training stages that use
                the model's template inherit it.
            select_layer: vision hidden-state index (-2 in every published recipe).
            vision_encoder: registry id; default: chosen from the vision checkpoint's ``model_type``.
            dtype: parameter dtype (default float32).
            attn_implementation: ``sdpa`` (default), ``eager``, ``flash_attention_2`` or ``sdpa_varlen``
                (`llavakit.model.attention`).
            llm_kwargs: extra keywords for the LLM's ``AutoModelForCausalLM.from_pretrained`` only (they override
                ``dtype``/``attn_implementation``), e.g. ``quantization_config`` + ``device_map`` for QLoRA. Quantised
                (integer) weights are not floating point, so the final `cast_parameters` leaves them as loaded.
            load_parts: builds the two parts instead of transformers' ``from_pretrained`` (see `PartsLoader`), e.g.
                without weights (`llavakit.training.sharded_load.meta_model_from_parts`).
            video_spec: makes a video model: ``<video>`` is added to the tokenizer like ``<image>`` and videos are
                pooled and laid out as it says (None: images only, and nothing about the model changes).
        """
        load_kwargs: dict[str, Any] = {"dtype": dtype or torch.float32}
        tokenizer = AutoTokenizer.from_pretrained(llm)
        image_token_id = ensure_image_token(tokenizer)
        video_token_id = None if video_spec is None else ensure_video_token(tokenizer)
        backbone, vision_model, language_model = (load_parts or _load_parts)(
            vision_encoder, vision, llm, tokenizer, load_kwargs, attn_implementation, llm_kwargs or {}
        )
        family = family_for(language_model.config.model_type)
        set_pad_token(tokenizer, family)
        if len(tokenizer) > language_model.get_input_embeddings().weight.shape[0]:
            language_model.resize_token_embeddings(len(tokenizer))
        spec = image_spec or default_image_spec(vision_model.config, backbone.image_mean, backbone.image_std)
        config = LlavaKitConfig(
            vision_encoder=backbone.id,
            vision_config=_config_dict(vision_model.config),
            text_config=_config_dict(language_model.config),
            projector=projector,
            select_layer=select_layer,
            image_spec=spec,
            template=template or family.default_template,
            system_prompt=system_prompt,
            image_token_id=image_token_id,
            pad_token_id=tokenizer.pad_token_id,
            padding_side=family.padding_side,
            video_spec=video_spec,
            video_token_id=video_token_id,
        )
        encoder = build_vision_encoder(backbone.id, vision_model, select_layer, spec.select_feature)
        model = cls(config, encoder, language_model, tokenizer)
        return cast_parameters(model, load_kwargs["dtype"])

    @classmethod
    def from_config(
        cls,
        config: LlavaKitConfig,
        tokenizer: PreTrainedTokenizerBase | None = None,
        attn_implementation: str | None = None,
    ) -> LlavaNextModel:
        """Build a randomly initialised model from a config (the skeleton `from_pretrained` fills)."""
        backbone = VISION_BACKBONES.get(config.vision_encoder)
        vision_config = backbone.config_class(**_strip_meta(config.vision_config))
        text_config = AutoConfig.for_model(**config.text_config)
        if attn_implementation:
            vision_config._attn_implementation = attn_implementation
            text_config._attn_implementation = attn_implementation
        vision_model = backbone.model_class(vision_config)
        language_model = AutoModelForCausalLM.from_config(text_config)
        encoder = build_vision_encoder(backbone.id, vision_model, config.select_layer, config.image_spec.select_feature)
        return cls(config, encoder, language_model, tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | None = None,
        attn_implementation: str | None = None,
        device: str | torch.device | None = None,
    ) -> LlavaNextModel:
        """Load a checkpoint folder in the llava-hf layout (ours, or one written by transformers)."""
        from llavakit.model.checkpoint import load_checkpoint

        return load_checkpoint(cls, path, dtype=dtype, attn_implementation=attn_implementation, device=device)

    def save_pretrained(self, path: str | Path, max_shard_size: str = "5GB") -> Path:
        """Write safetensors + ``config.json`` (+ tokenizer and transformers processor) in the llava-hf layout."""
        from llavakit.model.checkpoint import save_checkpoint

        return save_checkpoint(self, path, max_shard_size=max_shard_size)

    # ------------------------------------------------------------------ forward

    @property
    def image_spec(self) -> ImageSpec:
        return self.config.image_spec

    def encode_images(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | list[tuple[int, int]],
        image_tiled: torch.Tensor | list[bool] | None = None,
    ) -> list[torch.Tensor]:
        """Visual tokens of each image.

        Args:
            pixel_values: ``[N_tiles, 3, S, S]`` (all tiles, images in order) or padded ``[N_images, max_tiles, 3, S, S]``.
            image_sizes: ``[N_images, 2]`` original (height, width).
            image_tiled: ``[N_images]`` — False for single-tile (pad/square) images; None = as the spec says.

        Returns:
            One ``[n_i, D]`` tensor per image, ``n_i = count_visual_tokens(size_i, spec, tiled_i)``.
        """
        images = self._image_tiles(pixel_values, image_sizes, image_tiled)
        return self._merge_images(self._encode_tiles(images.pixels), images)

    def _image_tiles(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | list[tuple[int, int]],
        image_tiled: torch.Tensor | list[bool] | None,
    ) -> _ImageTiles:
        """All tiles as one flat ``[N_tiles, 3, S, S]`` batch, with each image's size, flag and tile count."""
        sizes = [(int(h), int(w)) for h, w in (image_sizes.tolist() if torch.is_tensor(image_sizes) else image_sizes)]
        tiled = self._tiled_flags(len(sizes), image_tiled)
        counts = [self._tile_count(size, flag) for size, flag in zip(sizes, tiled)]
        return _ImageTiles(_flatten_tiles(pixel_values, counts), sizes, tiled, counts)

    def _merge_images(self, features: torch.Tensor, images: _ImageTiles) -> list[torch.Tensor]:
        """One ``[n_i, D]`` tensor per image from its tiles' projected features ``[N_tiles, T, D]``."""
        newline = self.image_newline
        return [
            anyres_features.merge_image_features(chunk, size, self.image_spec, newline, tiled=flag)
            for chunk, size, flag in zip(features.split(images.counts), images.sizes, images.tiled)
        ]

    def _tiled_flags(self, count: int, image_tiled: torch.Tensor | list[bool] | None) -> list[bool]:
        if image_tiled is None:
            return [self.image_spec.uses_anyres] * count
        flags = [bool(x) for x in (image_tiled.tolist() if torch.is_tensor(image_tiled) else image_tiled)]
        if len(flags) != count:
            raise DataError(f"image_tiled has {len(flags)} entries but image_sizes has {count}")
        return flags

    def _tile_count(self, size: tuple[int, int], tiled: bool) -> int:
        # The data pipeline flags single images as tiled; only an AnyRes spec tiles them.
        if not (tiled and self.image_spec.uses_anyres):
            return 1
        rows, cols = geometry.grid_shape(size, self.image_spec)
        return 1 + rows * cols

    def encode_videos(
        self, pixel_values_videos: torch.Tensor, video_frames: torch.Tensor | list[int]
    ) -> list[torch.Tensor]:
        """Video tokens of each video: frames through the vision encoder and projector (no AnyRes), then pooled
        and laid out with newlines as ``config.video_spec`` says (`anyres.video_features.merge_video_features`).

        Args:
            pixel_values_videos: ``[ΣF_v, 3, S, S]``, the frames of all videos, video after video, in time order.
            video_frames: ``[N_videos]`` frames per video, in the order of the videos' ``<video>`` runs.

        Returns:
            One ``[video_spec.count_tokens(F_v, grid_side), D]`` tensor per video.
        """
        videos = self._video_frames(pixel_values_videos, video_frames)
        return self._merge_videos(self._encode_tiles(videos.pixels), videos)

    def _video_frames(
        self, pixel_values_videos: torch.Tensor, video_frames: torch.Tensor | list[int]
    ) -> _VideoFrames:
        """A batch's checked frames ``[ΣF_v, 3, S, S]`` and frames per video (arguments: `encode_videos`)."""
        if self.config.video_spec is None:
            raise DataError(
                "this model takes no videos (config.video_spec is None): build it with "
                "LlavaNextModel.from_parts(..., video_spec=VideoSpec(...))"
            )
        frames = [int(n) for n in (video_frames.tolist() if torch.is_tensor(video_frames) else video_frames)]
        if any(n <= 0 for n in frames):
            raise DataError(f"video_frames {frames} must all be positive: every video needs at least one frame")
        if pixel_values_videos.dim() != 4 or pixel_values_videos.shape[0] != sum(frames):
            raise DataError(
                f"pixel_values_videos has shape {tuple(pixel_values_videos.shape)} but video_frames {frames} sum to "
                f"{sum(frames)} frames ([total_frames, 3, S, S], frames of all videos in placeholder order)"
            )
        return _VideoFrames(pixel_values_videos, frames)

    def _merge_videos(self, features: torch.Tensor, videos: _VideoFrames) -> list[torch.Tensor]:
        """One video-token tensor per video from its frames' projected features (``[ΣF_v, T, D]`` in all)."""
        spec = self.config.video_spec
        assert spec is not None  # guaranteed by _video_frames
        grid_side = self.image_spec.grid_side
        return [
            merge_video_features(chunk, grid_side, spec, self.image_newline)
            for chunk in features.split(videos.counts)
        ]

    def _encode_tiles(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` tiles or frames → projected features ``[N, T, D]`` (vision encoder, projector)."""
        return self.projector(self.vision_encoder(pixels))

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_tiled: torch.Tensor | None = None,
        image_features: Sequence[torch.Tensor] | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_frames: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings ``[B, L, D]`` with visual tokens placed at the ``<image>`` and ``<video>`` positions.

        The visual tokens come from ``pixel_values`` (encoded here) or, when given instead, from ``image_features``:
        one ``[n_i, D]`` tensor per image in placeholder order, as `encode_images` returns (e.g. from a cache).
        Video tokens come from ``pixel_values_videos`` and ``video_frames`` (see `encode_videos`).

        Image tiles and video frames go through the vision encoder and projector in ONE call
        (`_encode_media`), and a training batch with neither runs one blank tile instead: under FSDP2 each
        call of a sharded vision layer is an all-gather, so ranks holding different media must call equally.
        """
        embeds = self.llm.get_input_embeddings()(input_ids)
        images = self._batch_images(input_ids, pixel_values, image_sizes, image_tiled, image_features)
        videos = self._batch_videos(input_ids, pixel_values_videos, video_frames)
        image_tokens, video_tokens = self._encode_media(images, videos)
        if image_features is not None:
            image_tokens = list(image_features)
        if images is not None or image_features is not None:
            embeds = self._place_visual_tokens(embeds, input_ids == self.config.image_token_id, image_tokens)
        if videos is not None:
            embeds = self._place_video_tokens(embeds, input_ids, video_tokens)
        if self.training:
            has_images = images is not None or image_features is not None
            embeds = self._anchor_unused_vision(embeds, has_images, videos is not None)
        return embeds

    def _batch_images(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_sizes: torch.Tensor | None,
        image_tiled: torch.Tensor | None,
        image_features: Sequence[torch.Tensor] | None,
    ) -> _ImageTiles | None:
        """The batch's image tiles to encode (None: no images, or cached ``image_features``), checked."""
        placeholders = int((input_ids == self.config.image_token_id).sum())
        if image_features is not None:
            if pixel_values is not None:
                raise DataError("pass either pixel_values or image_features, not both")
            return None
        if pixel_values is None:
            if placeholders:
                raise DataError(f"the batch has {placeholders} <image> tokens but no pixel_values")
            return None
        if image_sizes is None:
            raise DataError("pixel_values were given without image_sizes ([N_images, 2], original height and width)")
        return self._image_tiles(pixel_values, image_sizes, image_tiled)

    def _batch_videos(
        self,
        input_ids: torch.Tensor,
        pixel_values_videos: torch.Tensor | None,
        video_frames: torch.Tensor | None,
    ) -> _VideoFrames | None:
        """The batch's video frames to encode (None: no videos); arguments checked as in `encode_videos`."""
        token = self.config.video_token_id
        placeholders = 0 if token is None else int((input_ids == token).sum())
        if pixel_values_videos is None:
            if placeholders:
                raise DataError(f"the batch has {placeholders} <video> tokens but no pixel_values_videos")
            if video_frames is not None:
                raise DataError("video_frames were given without pixel_values_videos")
            return None
        if video_frames is None:
            raise DataError("pixel_values_videos were given without video_frames ([N_videos], frames per video)")
        return self._video_frames(pixel_values_videos, video_frames)

    def _encode_media(
        self, images: _ImageTiles | None, videos: _VideoFrames | None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each image's and each video's tokens from one vision encoder + projector call on tiles and frames.

        Both are ``[*, 3, S, S]`` tiles read at the same select layer and feature, so ``[N_tiles + ΣF_v, 3, S,
        S]`` is encoded once and the features ``[N_tiles + ΣF_v, T, D]`` are split back: tiles, then frames.
        """
        pixels = [batch.pixels for batch in (images, videos) if batch is not None]
        if not pixels:
            return [], []
        features = self._encode_tiles(torch.cat(pixels) if len(pixels) > 1 else pixels[0])
        tile_count = 0 if images is None else images.pixels.shape[0]
        image_tokens = [] if images is None else self._merge_images(features[:tile_count], images)
        video_tokens = [] if videos is None else self._merge_videos(features[tile_count:], videos)
        return image_tokens, video_tokens

    def _place_video_tokens(
        self, embeds: torch.Tensor, input_ids: torch.Tensor, features: list[torch.Tensor]
    ) -> torch.Tensor:
        """``embeds`` with the videos' tokens (``[count_tokens(F_v), D]`` each, in order) at ``<video>``."""
        video_mask = input_ids == self.config.video_token_id
        placeholders = int(video_mask.sum())
        visual = torch.cat(features)
        if visual.shape[0] != placeholders:
            raise DataError(
                f"the batch has {placeholders} <video> tokens but its videos yield {visual.shape[0]} video tokens: "
                "expand each <video> to video_spec.count_tokens(frames, grid_side) and never truncate inside a video"
            )
        return embeds.masked_scatter(video_mask.unsqueeze(-1), visual.to(embeds.dtype))

    def _place_visual_tokens(
        self, embeds: torch.Tensor, image_mask: torch.Tensor, features: list[torch.Tensor]
    ) -> torch.Tensor:
        placeholders = int(image_mask.sum())
        visual = torch.cat(features) if features else embeds.new_zeros(0, embeds.shape[-1])
        if visual.shape[0] != placeholders:
            raise DataError(
                f"the batch has {placeholders} <image> tokens but its images yield {visual.shape[0]} visual tokens: "
                "expand each placeholder with anyres.geometry.count_visual_tokens and never truncate inside an image"
            )
        return embeds.masked_scatter(image_mask.unsqueeze(-1), visual.to(embeds.dtype))

    def _anchor_unused_vision(self, embeds: torch.Tensor, has_images: bool, has_videos: bool) -> torch.Tensor:
        """``embeds`` plus a zero that depends on the vision-side parameters this training batch left out.

        Every rank must use the same parameters (DDP raises on unused ones) and make the same collectives: a
        batch with neither images nor videos runs one blank tile (`_vision_graph_anchor`), and one whose
        layouts never append ``image_newline`` (only videos, newline ``no_token``) adds ``0 * image_newline``.
        """
        newline_used = has_images or (has_videos and self.config.video_spec.newline != "no_token")
        terms = [] if has_images or has_videos else [self._vision_graph_anchor()]
        if self.image_newline is not None and not newline_used:
            terms.append(self.image_newline.sum())
        if not terms:
            return embeds
        return embeds + (sum(terms) * 0).to(embeds.dtype)

    def _vision_graph_anchor(self) -> torch.Tensor:
        """The sum of one blank tile's projected features: makes a text-only batch use every vision/projector
        parameter in use (and make the one vision encoder call every forward makes). It costs little.
        """
        spec = self.image_spec
        device = self.llm.get_input_embeddings().weight.device
        blank = torch.zeros(1, 3, spec.tile_size, spec.tile_size, device=device)
        return self._encode_tiles(blank).sum()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_tiled: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        supervised_logits_only: bool = False,
        loss_kernel: str = "logits",
        pixel_values_videos: torch.Tensor | None = None,
        video_frames: torch.Tensor | None = None,
        **llm_kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Run the model.

        Args:
            input_ids: ``[B, L]`` with expanded ``<image>`` (and ``<video>``) tokens.
            attention_mask: ``[B, L]`` (1 = token) or a 4-D ``[B, 1, L, L]`` mask (packed samples).
            position_ids: ``[B, L]``; packed batches restart them per sample.
            pixel_values, image_sizes, image_tiled: see `encode_images`.
            labels: ``[B, L]``, -100 where not supervised; the LLM shifts them (transformers convention).
            inputs_embeds: precomputed embeddings instead of ``input_ids`` (generation steps).
            supervised_logits_only: with ``labels``, compute the logits of the supervised positions only (the same
                loss, much less work: see `llavakit.model.loss`); ``logits`` is then ``[N, V]``.
            loss_kernel: with ``supervised_logits_only``, how the loss is computed from the last hidden states:
                ``logits`` (the ``[N, V]`` logits, then cross-entropy), ``chunked`` or ``liger`` (fused linear
                cross-entropy that never holds the logits; ``logits`` is then None). See `llavakit.model.loss`.
            pixel_values_videos, video_frames: ``[ΣF_v, 3, S, S]`` and ``[N_videos]``, see `encode_videos`.
            llm_kwargs: passed to the LLM (``past_key_values``, ``use_cache``, ``num_items_in_batch`` ...).

        Returns:
            transformers' ``CausalLMOutputWithPast`` (``loss`` when labels are given, ``logits [B, L, V]``).
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise DataError("forward needs input_ids or inputs_embeds")
            inputs_embeds = self.embed_inputs(
                input_ids,
                pixel_values,
                image_sizes,
                image_tiled,
                pixel_values_videos=pixel_values_videos,
                video_frames=video_frames,
            )
        llm_kwargs = {**self._varlen_kwargs(attention_mask, position_ids, inputs_embeds.shape[0], llm_kwargs), **llm_kwargs}
        if supervised_logits_only and labels is not None:
            loss, logits = supervised_lm_loss(
                self.llm,
                inputs_embeds,
                labels,
                kernel=loss_kernel,
                attention_mask=attention_mask,
                position_ids=position_ids,
                **llm_kwargs,
            )
            return CausalLMOutputWithPast(loss=loss, logits=logits)
        return self.llm(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            **llm_kwargs,
        )

    def _varlen_kwargs(
        self,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        batch_size: int,
        llm_kwargs: dict[str, Any],
    ) -> dict[str, Any]:
        """Sample boundaries read once per forward for ``sdpa_varlen`` (`attention.varlen_kwargs`), else nothing.

        Only a maskless batch with ``position_ids`` and no cache is split into samples; that is when every layer
        would otherwise read the boundaries from ``position_ids`` itself (one host sync per layer).
        """
        if (
            getattr(self.llm.config, "_attn_implementation", None) != attention.NAME
            or attention_mask is not None
            or position_ids is None
            or llm_kwargs.get("past_key_values") is not None
        ):
            return {}
        return attention.varlen_kwargs(position_ids, batch_size)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_tiled: torch.Tensor | None = None,
        image_features: Sequence[torch.Tensor] | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_frames: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Generate with the LLM's ``generate`` from the multimodal embeddings (left-pad batches).

        Images and videos as in `forward` (or cached ``image_features`` as in `embed_inputs`).

        Returns:
            ``[B, new_tokens]`` generated ids (the prompt is not repeated).
        """
        embeds = self.embed_inputs(
            input_ids, pixel_values, image_sizes, image_tiled, image_features, pixel_values_videos, video_frames
        )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)

    # ------------------------------------------------------------------ training hooks

    def shard_units(self) -> list[nn.Module]:
        """Modules a sharding strategy may wrap one by one: LLM decoder layers and vision encoder layers."""
        decoder = self.llm.get_decoder()
        layers = getattr(decoder, "layers", None)
        if layers is None:
            raise ConfigError(f"{type(decoder).__name__} has no 'layers' list; cannot declare shard units")
        return [*layers, *self.vision_encoder.layers]

    def gradient_checkpointing_enable(self) -> None:
        """Recompute activations of LLM and vision layers in backward (non-reentrant)."""
        kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
        self.llm.gradient_checkpointing_enable(**kwargs)
        self.vision_encoder.model.gradient_checkpointing_enable(**kwargs)


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating-point parameters to ``dtype``, leaving buffers alone.

    ``nn.Module.to(dtype)`` would also cast RoPE's ``inv_freq`` buffers, which transformers keeps in fp32: in bf16
    the rotation angles of positions in the thousands come out wrong.
    """
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and param.is_floating_point() and param.dtype != dtype:
                module._parameters[name].data = param.data.to(dtype)
    return model


def default_image_spec(vision_config: Any, mean: tuple, std: tuple) -> ImageSpec:
    """LLaVA-1.6's spec (anyres, five grids, spatial_unpad) at the vision encoder's tile size."""
    tile = int(vision_config.image_size)
    return ImageSpec(
        tile_size=tile,
        patch_size=int(vision_config.patch_size),
        pinpoints=tuple((rows * tile, cols * tile) for rows, cols in LLAVA_16_GRIDS),
        image_mean=mean,
        image_std=std,
    )


def _check_spec_matches_encoder(spec: ImageSpec, encoder: VisionEncoder) -> None:
    if (spec.tile_size, spec.patch_size) != (encoder.image_size, encoder.patch_size):
        raise ConfigError(
            f"image_spec has tile {spec.tile_size}/patch {spec.patch_size} but the vision encoder takes "
            f"{encoder.image_size}px images with patch {encoder.patch_size}: make them equal"
        )
    if spec.select_feature != encoder.select_feature:
        raise ConfigError("image_spec.select_feature differs from the vision encoder's select_feature")
    if spec.select_feature == "cls_patch" and not encoder.backbone.has_cls_token:
        raise ConfigError(f"select_feature 'cls_patch' needs a CLS token, which {encoder.backbone.id} has not: use 'patch'")
    if (spec.image_mean, spec.image_std) != (encoder.backbone.image_mean, encoder.backbone.image_std):
        warnings.warn(
            f"image_spec normalises with mean {spec.image_mean} / std {spec.image_std}, but {encoder.backbone.id} "
            f"was trained with {encoder.backbone.image_mean} / {encoder.backbone.image_std}",
            stacklevel=3,
        )


def _check_video_spec(config: LlavaKitConfig) -> None:
    """A video model pools each frame's square patch grid and, unless ``no_token``, needs the learned newline."""
    spec = config.video_spec
    if spec is None:
        return
    if config.image_spec.select_feature != "patch":
        raise ConfigError("video needs image_spec.select_feature 'patch': a CLS token has no place in a frame's grid")
    if spec.newline != "no_token" and config.image_spec.merge_type != "spatial_unpad":
        raise ConfigError(
            f"video_spec.newline {spec.newline!r} appends the learned image_newline, which only merge_type "
            f"'spatial_unpad' models have (this one: {config.image_spec.merge_type!r}): use newline 'no_token' or "
            "merge_type 'spatial_unpad'"
        )
    if spec.pooled_side(config.image_spec.grid_side) == 0:
        raise ConfigError(
            f"video_spec.pool_stride {spec.pool_stride} with pool_mode {spec.pool_mode!r} pools the "
            f"{config.image_spec.grid_side}² frame grid to nothing: use a stride of at most the grid side"
        )


@dataclass(frozen=True)
class _ImageTiles:
    """A batch's images ready to encode: ``pixels [N_tiles, 3, S, S]`` (images in order), each image's
    original (height, width) ``sizes``, ``tiled`` flag and tile ``counts`` (summing to N_tiles)."""

    pixels: torch.Tensor
    sizes: list[tuple[int, int]]
    tiled: list[bool]
    counts: list[int]


@dataclass(frozen=True)
class _VideoFrames:
    """A batch's videos ready to encode: ``pixels [ΣF_v, 3, S, S]`` (videos in order) and frames per video."""

    pixels: torch.Tensor
    counts: list[int]


def _flatten_tiles(pixel_values: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """``[N_tiles, 3, S, S]`` from either the flat or transformers' padded ``[N_images, max_tiles, 3, S, S]`` form."""
    if pixel_values.dim() == 5:
        if pixel_values.shape[0] != len(counts):
            raise DataError(f"pixel_values holds {pixel_values.shape[0]} images but image_sizes {len(counts)}")
        too_few = [i for i, n in enumerate(counts) if n > pixel_values.shape[1]]
        if too_few:
            raise DataError(f"images {too_few} need more tiles than pixel_values holds ({pixel_values.shape[1]})")
        return torch.cat([pixel_values[i, :n] for i, n in enumerate(counts)])
    if pixel_values.dim() != 4 or pixel_values.shape[0] != sum(counts):
        raise DataError(
            f"pixel_values has shape {tuple(pixel_values.shape)} but the images' sizes imply {sum(counts)} tiles "
            "([N_tiles, 3, S, S], tiles of all images in placeholder order)"
        )
    return pixel_values


# (vision_encoder id or None, vision, llm, tokenizer with <image>, {"dtype": ...}, attn_implementation, llm_kwargs)
# -> (backbone, vision model, causal LM): how `LlavaNextModel.from_parts` builds its two parts.
PartsLoader = Callable[
    [str | None, str, str, PreTrainedTokenizerBase, dict[str, Any], str | None, dict[str, Any]],
    tuple[VisionBackbone, PreTrainedModel, PreTrainedModel],
]


def _load_parts(
    vision_encoder: str | None,
    vision: str,
    llm: str,
    tokenizer: PreTrainedTokenizerBase,
    load_kwargs: dict[str, Any],
    attn_implementation: str | None,
    llm_kwargs: dict[str, Any],
) -> tuple[VisionBackbone, PreTrainedModel, PreTrainedModel]:
    """Both parts through transformers' ``from_pretrained``; the vision tower keeps its default attention."""
    backbone, vision_model = load_vision_model(vision_encoder, vision, **load_kwargs)
    if attn_implementation:
        load_kwargs = {**load_kwargs, "attn_implementation": attn_implementation}
    language_model = AutoModelForCausalLM.from_pretrained(llm, **{**load_kwargs, **llm_kwargs})
    return backbone, vision_model, language_model


def _config_dict(config: Any) -> dict[str, Any]:
    data = config.to_dict()
    data.pop("transformers_version", None)
    return json.loads(json.dumps(data, default=str))


def _strip_meta(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in ("model_type", "transformers_version", "architectures")}
