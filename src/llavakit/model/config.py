"""The model config: transformers' vision and text configs plus the fields llavakit adds.

On disk it is the ``config.json`` of a transformers ``LlavaNextConfig`` (``model_type: llava_next``) with one extra
section, ``"llavakit"``, holding what transformers has no field for: the vision-encoder and projector ids, the chat
template id (and the system prompt it was trained with) and the full image preprocessing spec. Training, evaluation
and serving all read these back, so a checkpoint is preprocessed and prompted the same way everywhere. A
transformers / llava-hf ``config.json`` has no such section: its fields are derived, and its chat template is the
one the checkpoint carries (template ``processor``) or, without one, the LLM family's default.

``anyres_max_N`` checkpoints are written as ``model_type: llava_onevision`` (transformers' class with the same
feature downsampling), and LLaVA-1.5-style ones (one ``pad`` or ``square`` tile per image, no ``image_newline``) as
``model_type: llava`` (``LlavaForConditionalGeneration``; the saved ``LlavaImageProcessor`` pads to a square with
the mean colour, ``do_pad``, exactly as upstream's ``expand2square``). A checkpoint whose settings transformers
cannot reproduce (``flat`` merge of AnyRes tiles, a ``linear`` projector) is written with ``model_type: llavakit``
instead, so that transformers refuses it loudly rather than loading it and computing something else.

A llava-hf ``llava`` checkpoint (e.g. ``llava-hf/llava-1.5-7b-hf``) has no AnyRes fields: its preprocessing is that
of its image processor config, ``do_pad`` true meaning ``pad`` and false (llava-hf's own ``CLIPImageProcessor``, a
shortest-edge resize and centre crop) meaning ``square``.

Video (``video_spec`` set, ``<video>`` in the vocabulary): the spec and the token id live in the ``"llavakit"``
section. transformers' LlavaOnevision runs videos one way only: bilinear pooling at stride 2 and ``one_token`` (one
newline after the video), frames squashed to the tile size. A ``llava_onevision`` checkpoint whose video spec pools
and lays out tokens that way also gets ``video_token_index`` (transformers' field), so
``LlavaOnevisionForConditionalGeneration`` runs its videos given frames preprocessed as llavakit does (the folder
holds no ``LlavaOnevisionProcessor`` with a video processor, so ``AutoProcessor`` and vLLM cannot feed it videos
from the folder alone); any other video spec keeps ``video_token_index: -1`` (images still run there, videos are refused for a token
count mismatch rather than computed differently). A llava-hf ``llava_onevision`` checkpoint with a
``video_token_index`` loads with exactly those transformers semantics (`TRANSFORMERS_VIDEO_SPEC`). A model without
video writes no video field: its ``config.json`` is byte for byte what it was before video existed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from llavakit.anyres.spec import ImageSpec
from llavakit.anyres.video_spec import VideoSpec
from llavakit.errors import CheckpointError, ConfigError

LLAVAKIT_KEY = "llavakit"
FORMAT_VERSION = 1
# transformers classes whose model unpads the tiled feature map (with round(x, 7))
_UNPADDING_CLASSES = ("LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration")
# How transformers' LlavaOnevision turns frames into video tokens (``get_video_features``, ``apply_pooling``) and
# its video processor resizes frames; it samples no frames by default (``do_sample_frames=False``), so the sampling
# fields keep VideoSpec's defaults.
TRANSFORMERS_VIDEO_SPEC = VideoSpec(frame_view="squash", pool_stride=2, pool_mode="bilinear", newline="one_token")


@dataclass
class LlavaKitConfig:
    """Everything needed to rebuild a `LlavaNextModel` without its weights.

    Attributes:
        vision_encoder: registry id of the vision backbone (``clip``, ``siglip``).
        vision_config: the transformers vision config as a dict.
        text_config: the transformers causal-LM config as a dict (``model_type`` included).
        projector: projector id (``mlp2x_gelu``, ``linear``, ``identity``, ``mlp{N}x_gelu``).
        select_layer: vision hidden-state index (recipes use -2).
        image_spec: preprocessing and feature-merge spec.
        template: chat template id used in training; inference reuses it.
        system_prompt: the system prompt training replaced the template's default with (None: the default).
        image_token_id: vocabulary id of ``<image>``.
        pad_token_id: id used to pad batches.
        padding_side: side training batches are padded on.
        video_spec: how frames become video tokens; None: the model takes no videos.
        video_token_id: vocabulary id of ``<video>``; set exactly when ``video_spec`` is.
    """

    vision_encoder: str
    vision_config: dict[str, Any]
    text_config: dict[str, Any]
    projector: str = "mlp2x_gelu"
    select_layer: int = -2
    image_spec: ImageSpec = field(default_factory=ImageSpec)
    template: str = "vicuna_v1"
    system_prompt: str | None = None
    image_token_id: int = 32000
    pad_token_id: int | None = None
    padding_side: str = "right"
    video_spec: VideoSpec | None = None
    video_token_id: int | None = None

    def __post_init__(self) -> None:
        if (self.video_spec is None) != (self.video_token_id is None):
            raise ConfigError(
                f"video_spec ({self.video_spec}) and video_token_id ({self.video_token_id}) must be set together "
                "(a video model) or both left None (no video)"
            )

    @property
    def family(self) -> str:
        """The LLM's transformers ``model_type`` (the key of `llavakit.model.family.FAMILIES`)."""
        return str(self.text_config["model_type"])

    @property
    def hidden_size(self) -> int:
        return int(self.text_config["hidden_size"])

    @property
    def tie_word_embeddings(self) -> bool:
        """Whether the LLM ties its head to its embeddings (the config class's default when the dict omits it)."""
        if "tie_word_embeddings" in self.text_config:
            return bool(self.text_config["tie_word_embeddings"])
        from transformers import AutoConfig

        return bool(AutoConfig.for_model(**self.text_config).tie_word_embeddings)

    def transformers_incompatibility(self) -> str | None:
        """Why no transformers class can reproduce this model, or None if one can (see `transformers_class`)."""
        spec = self.image_spec
        if self.projector != "mlp2x_gelu":
            return f"projector {self.projector!r} (transformers implements mlp2x_gelu only)"
        if not spec.uses_anyres:
            if spec.merge_type == "spatial_unpad":
                return "merge_type 'spatial_unpad' on single-tile images (transformers' Llava has no image_newline)"
            return None
        if spec.merge_type != "spatial_unpad":
            return f"merge_type {spec.merge_type!r} (transformers implements spatial_unpad only)"
        if spec.base_view != "squash":
            return f"base_view {spec.base_view!r} (transformers squashes the base view)"
        return None

    def unpad_rounding_caveat(self) -> str | None:
        """Why transformers / vLLM count some images' visual tokens differently from llavakit on this checkpoint,
        or None when they agree.

        A ``floor`` (upstream LLaVA-NeXT) checkpoint is still written for transformers rather than refused: the
        rules disagree on about one image size in 10^5, by two rows or columns, which is exactly how transformers
        and vLLM already run the published LLaVA-NeXT checkpoints (trained with ``int()``) in their llava-hf
        conversions. llavakit itself keeps the recorded ``floor``, so its evaluation matches upstream's.
        """
        spec = self.image_spec
        if spec.unpad_rounding == "round" or self.transformers_class() not in _UNPADDING_CLASSES:
            return None
        return (
            "image_spec.unpad_rounding is 'floor' (upstream LLaVA-NeXT's int()), but transformers and vLLM unpad "
            "with round(x, 7): on rare image sizes (about 1 in 10^5, where the float product lands just below a "
            "whole number) they keep two more rows or columns of the tiled feature map than llavakit, so their "
            "visual-token count differs (an image 88 wide and 55 high on LLaVA-NeXT's CLIP-336 anyres grids: "
            "976 tokens there, 926 here); llavakit keeps 'floor' when it loads this checkpoint"
        )

    def transformers_class(self) -> str | None:
        """The transformers class that reproduces this model: Llava for single-tile ``pad`` / ``square`` images,
        LlavaNext for ``anyres``, LlavaOnevision for ``anyres_max_N`` (its feature downsampling), or None."""
        if self.transformers_incompatibility() is not None:
            return None
        if not self.image_spec.uses_anyres:
            return "LlavaForConditionalGeneration"
        if self.image_spec.max_tiles is None:
            return "LlavaNextForConditionalGeneration"
        return "LlavaOnevisionForConditionalGeneration"

    def transformers_video_token_index(self) -> int:
        """``video_token_index`` for transformers' LlavaOnevision: ``<video>``'s id when transformers preprocesses
        frames, pools and lays out video tokens as this model does (`TRANSFORMERS_VIDEO_SPEC`; frame sampling
        aside), else -1 (never an input id: no video there)."""
        spec = self.video_spec
        if spec is None or self.video_token_id is None:
            return -1
        layout = ("pool_stride", "pool_mode", "newline", "frame_view")
        if any(getattr(spec, name) != getattr(TRANSFORMERS_VIDEO_SPEC, name) for name in layout):
            return -1
        return self.video_token_id

    def vision_feature_select_strategy(self, has_cls_token: bool) -> str:
        """transformers' name for our feature selection: ``default`` drops CLS, ``full`` keeps every token."""
        return "default" if has_cls_token and self.image_spec.select_feature == "patch" else "full"

    def llavakit_section(self) -> dict[str, Any]:
        """The ``config.json["llavakit"]`` section (video fields only for a video model)."""
        section = {
            "format_version": FORMAT_VERSION,
            "vision_encoder": self.vision_encoder,
            "projector": self.projector,
            "select_layer": self.select_layer,
            "image_spec": self.image_spec.to_dict(),
            "template": self.template,
            "system_prompt": self.system_prompt,
            "padding_side": self.padding_side,
        }
        if self.video_spec is not None:
            section.update(video_spec=self.video_spec.to_dict(), video_token_id=self.video_token_id)
        return section

    def to_config_json(self, has_cls_token: bool) -> dict[str, Any]:
        """The full ``config.json`` content (transformers ``LlavaNextConfig`` fields, or ``LlavaConfig`` fields for
        a ``llava`` checkpoint, + our section)."""
        spec = self.image_spec
        architecture = self.transformers_class()
        caveat = self.unpad_rounding_caveat()
        if caveat is not None:
            warnings.warn(
                f"{caveat}. To count as transformers does, train with image_spec.unpad_rounding: round", stacklevel=3
            )
        model_types = {
            "LlavaForConditionalGeneration": "llava",
            "LlavaNextForConditionalGeneration": "llava_next",
            "LlavaOnevisionForConditionalGeneration": "llava_onevision",
        }
        text = dict(self.text_config)
        data = {
            "architectures": [architecture or "LlavakitModel"],
            "model_type": model_types.get(architecture, "llavakit"),
            "vision_config": dict(self.vision_config),
            "text_config": text,
            "image_token_index": self.image_token_id,
            "projector_hidden_act": "gelu",
            "multimodal_projector_bias": True,
            "vision_feature_select_strategy": self.vision_feature_select_strategy(has_cls_token),
            "vision_feature_layer": self.select_layer,
            "image_grid_pinpoints": [list(p) for p in spec.pinpoints],
            "image_seq_length": spec.tokens_per_tile,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_image_newline_parameter": spec.merge_type == "spatial_unpad",
            "pad_token_id": self.pad_token_id,
            "dtype": text.get("dtype") or text.get("torch_dtype") or "float32",
            LLAVAKIT_KEY: self.llavakit_section(),
        }
        if architecture == "LlavaOnevisionForConditionalGeneration":
            # -1 never matches an input id: no video in transformers unless it pools as we do.
            data.update(vision_aspect_ratio=spec.aspect_ratio, video_token_index=self.transformers_video_token_index())
        if architecture == "LlavaForConditionalGeneration":
            # LlavaConfig has no AnyRes fields.
            del data["image_grid_pinpoints"], data["use_image_newline_parameter"]
        return data

    @classmethod
    def from_config_json(
        cls,
        data: dict[str, Any],
        source: str = "config.json",
        has_chat_template: bool = False,
        image_processor: dict[str, Any] | None = None,
    ) -> LlavaKitConfig:
        """Read our own ``config.json`` or a plain llava-hf one (then our fields are derived from its fields).

        Args:
            data: the parsed ``config.json``.
            source: where it came from, named in errors.
            has_chat_template: the checkpoint folder carries a chat template; a llava-hf checkpoint is then prompted
                with it (template ``processor``) rather than with the LLM family's default template.
            image_processor: the folder's image processor config (``preprocessor_config.json``), which sets a plain
                llava-hf ``llava`` checkpoint's preprocessing (see `llava_image_spec_fields`); None: the folder
                has none, and such a checkpoint is preprocessed as LLaVA-1.5 was trained (``pad``).
        """
        model_type = data.get("model_type")
        if model_type not in ("llava", "llava_next", "llava_onevision", "llavakit"):
            raise CheckpointError(
                f"{source}: model_type {model_type!r} is not a LLaVA checkpoint in the llava-hf layout "
                "(expected 'llava', 'llava_next' or 'llava_onevision'); original LLaVA checkpoints need "
                "`llavakit convert from-original` first (training reads them directly as model.path)"
            )
        if model_type == "llava" and "text_config" not in data and "mm_vision_tower" in data:
            raise CheckpointError(
                f"{source}: an original LLaVA checkpoint (model_type 'llava' with mm_* fields, no text_config); "
                "convert it with `llavakit convert from-original SRC OUT` first (training reads it directly as "
                "model.path)"
            )
        for key in ("vision_config", "text_config"):
            if not isinstance(data.get(key), dict):
                raise CheckpointError(f"{source}: field {key!r} is missing or not an object")
        section = data.get(LLAVAKIT_KEY)
        if section is not None:
            return cls._from_section(data, section, source)
        return cls._from_llava_hf(data, source, has_chat_template, image_processor)

    @classmethod
    def _from_section(cls, data: dict[str, Any], section: dict[str, Any], source: str) -> LlavaKitConfig:
        system_prompt = section.get("system_prompt")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise CheckpointError(
                f"{source}: llavakit.system_prompt must be a string or null, got {system_prompt!r}"
            )
        try:
            return cls(
                vision_encoder=section["vision_encoder"],
                vision_config=data["vision_config"],
                text_config=data["text_config"],
                projector=section["projector"],
                select_layer=int(section["select_layer"]),
                image_spec=ImageSpec.from_dict(section["image_spec"]),
                template=section["template"],
                system_prompt=system_prompt,
                image_token_id=int(data["image_token_index"]),
                pad_token_id=data.get("pad_token_id"),
                padding_side=section.get("padding_side", "right"),
                video_spec=VideoSpec.from_dict(section["video_spec"]) if "video_spec" in section else None,
                video_token_id=int(section["video_token_id"]) if "video_spec" in section else None,
            )
        except KeyError as err:
            raise CheckpointError(f"{source}: the 'llavakit' section lacks field {err}") from None
        except ConfigError as err:
            raise CheckpointError(f"{source}: {err}") from None

    @classmethod
    def _from_llava_hf(
        cls,
        data: dict[str, Any],
        source: str,
        has_chat_template: bool,
        image_processor: dict[str, Any] | None,
    ) -> LlavaKitConfig:
        from llavakit.model.family import family_for
        from llavakit.model.vision import backbone_for_model_type

        vision = data["vision_config"]
        backbone = backbone_for_model_type(vision.get("model_type", "clip_vision_model"))
        strategy = data.get("vision_feature_select_strategy", "default")
        layer = data.get("vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise CheckpointError(f"{source}: list-valued vision_feature_layer {layer} is not supported yet")
        fields: dict[str, Any] = {
            "aspect_ratio": data.get("vision_aspect_ratio", "anyres")
            if data["model_type"] == "llava_onevision"
            else "anyres",
            "tile_size": int(vision.get("image_size", 336)),
            "patch_size": int(vision.get("patch_size", 14)),
            "pinpoints": tuple(tuple(p) for p in data.get("image_grid_pinpoints", ImageSpec().pinpoints)),
            "image_mean": backbone.image_mean,
            "image_std": backbone.image_std,
            "select_feature": "patch" if strategy == "default" or not backbone.has_cls_token else "cls_patch",
            "merge_type": "spatial_unpad",
            # transformers and vLLM run a llava-hf checkpoint with their rule: llavakit must count tokens alike
            "unpad_rounding": "round",
        }
        if data["model_type"] == "llava":
            fields["merge_type"] = "flat"
            fields.update(llava_image_spec_fields(image_processor, fields["tile_size"], source))
        elif fields["select_feature"] == "cls_patch":
            raise CheckpointError(f"{source}: strategy 'full' on a CLS encoder cannot be merged spatially")
        spec = ImageSpec(**fields)
        family_template = family_for(data["text_config"].get("model_type", "llama")).default_template
        video_token_id = _llava_hf_video_token(data)
        return cls(
            vision_encoder=backbone.id,
            vision_config=vision,
            text_config=data["text_config"],
            projector="mlp2x_gelu",
            select_layer=int(layer),
            image_spec=spec,
            template="processor" if has_chat_template else family_template,
            image_token_id=int(data.get("image_token_index", data.get("image_token_id", 32000))),
            pad_token_id=data.get("pad_token_id"),
            video_spec=None if video_token_id is None else TRANSFORMERS_VIDEO_SPEC,
            video_token_id=video_token_id,
        )


def _llava_hf_video_token(data: dict[str, Any]) -> int | None:
    """``<video>``'s id in a llava-hf ``llava_onevision`` config (``video_token_index``, or ``video_token_id`` as
    transformers' attribute is called), or None: another model type, no field, or -1 (no video)."""
    if data["model_type"] != "llava_onevision":
        return None
    token = data.get("video_token_index", data.get("video_token_id"))
    return int(token) if token is not None and int(token) >= 0 else None


# PIL resampling filters by the integer transformers stores in ``resample`` (`PIL.Image.Resampling` values).
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def llava_image_spec_fields(
    image_processor: dict[str, Any] | None, tile_size: int, source: str
) -> dict[str, Any]:
    """The image-spec fields a llava-hf ``llava`` checkpoint's image processor config sets.

    ``do_pad`` (transformers' ``LlavaImageProcessor``: pad to a square with the mean colour ``int(m * 255)``, then
    resize) is our ``pad``; without it (llava-hf's ``CLIPImageProcessor``: shortest edge to the crop size, centre
    crop) it is our ``square``. Mean, std and resampling filter come from the config too.

    Args:
        image_processor: the parsed ``preprocessor_config.json``; None when the folder has none (then ``pad``, how
            LLaVA-1.5 was trained, with the vision encoder's mean and std).
        tile_size: the vision encoder's ``image_size``.
        source: the config file, named in errors.

    Raises:
        CheckpointError: a resize or crop to another size than the encoder's, or no resize or centre crop: no
            llavakit preprocessing reproduces it.
    """
    if image_processor is None:
        return {"aspect_ratio": "pad"}
    size = image_processor.get("size") or {}
    crop = image_processor.get("crop_size") or {}
    sides = {
        size.get("shortest_edge", tile_size),
        crop.get("height", tile_size),
        crop.get("width", tile_size),
    }
    steps = (image_processor.get("do_resize", True), image_processor.get("do_center_crop", True))
    if sides != {tile_size} or not all(steps):
        raise CheckpointError(
            f"{source}: the image processor (size {size}, crop_size {crop}, do_resize/do_center_crop {steps}) does "
            f"not resize and crop to the vision encoder's {tile_size} px; llavakit cannot reproduce it. Fix the "
            "preprocessor_config.json or load the folder with a matching vision config"
        )
    fields: dict[str, Any] = {"aspect_ratio": "pad" if image_processor.get("do_pad") else "square"}
    for name in ("image_mean", "image_std"):
        if name in image_processor:
            fields[name] = tuple(image_processor[name])
    resample = image_processor.get("resample")
    if resample is not None:
        if resample not in _PIL_RESAMPLE:
            raise CheckpointError(f"{source}: unknown image processor resample {resample!r} (expected 0-5)")
        fields["resample"] = _PIL_RESAMPLE[resample]
    return fields
