"""The model config: transformers' vision and text configs plus the fields llavakit adds.

On disk it is the ``config.json`` of a transformers ``LlavaNextConfig`` (``model_type: llava_next``) with one extra
section, ``"llavakit"``, holding what transformers has no field for: the vision-encoder and projector ids, the chat
template id (and the system prompt it was trained with) and the full image preprocessing spec. Training, evaluation
and serving all read these back, so a checkpoint is preprocessed and prompted the same way everywhere. A
transformers / llava-hf ``config.json`` has no such section: its fields are derived, and its chat template is the
one the checkpoint carries (template ``processor``) or, without one, the LLM family's default.

``anyres_max_N`` checkpoints are written as ``model_type: llava_onevision`` (transformers' class with the same
feature downsampling). A checkpoint whose settings transformers cannot reproduce (``flat`` merge, a ``linear``
projector, ``pad`` images) is written with ``model_type: llavakit`` instead, so that transformers refuses it
loudly rather than loading it and computing something else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llavakit.anyres.spec import ImageSpec
from llavakit.errors import CheckpointError, ConfigError

LLAVAKIT_KEY = "llavakit"
FORMAT_VERSION = 1


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
        if spec.aspect_ratio != "anyres" and spec.max_tiles is None:
            return f"aspect_ratio {spec.aspect_ratio!r} (transformers always tiles with anyres)"
        if spec.merge_type != "spatial_unpad":
            return f"merge_type {spec.merge_type!r} (transformers implements spatial_unpad only)"
        if spec.base_view != "squash" or spec.unpad_rounding != "round":
            return "base_view/unpad_rounding differ from transformers' (squash/round)"
        return None

    def transformers_class(self) -> str | None:
        """The transformers class that reproduces this model: LlavaNext for ``anyres``, LlavaOnevision for
        ``anyres_max_N`` (its feature downsampling), or None."""
        if self.transformers_incompatibility() is not None:
            return None
        if self.image_spec.max_tiles is None:
            return "LlavaNextForConditionalGeneration"
        return "LlavaOnevisionForConditionalGeneration"

    def vision_feature_select_strategy(self, has_cls_token: bool) -> str:
        """transformers' name for our feature selection: ``default`` drops CLS, ``full`` keeps every token."""
        return "default" if has_cls_token and self.image_spec.select_feature == "patch" else "full"

    def llavakit_section(self) -> dict[str, Any]:
        """The ``config.json["llavakit"]`` section."""
        return {
            "format_version": FORMAT_VERSION,
            "vision_encoder": self.vision_encoder,
            "projector": self.projector,
            "select_layer": self.select_layer,
            "image_spec": self.image_spec.to_dict(),
            "template": self.template,
            "system_prompt": self.system_prompt,
            "padding_side": self.padding_side,
        }

    def to_config_json(self, has_cls_token: bool) -> dict[str, Any]:
        """The full ``config.json`` content (transformers ``LlavaNextConfig`` fields + our section)."""
        spec = self.image_spec
        architecture = self.transformers_class()
        model_types = {
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
            # No video token in a LLaVA-NeXT model: -1 never matches an input id.
            data.update(vision_aspect_ratio=spec.aspect_ratio, video_token_index=-1)
        return data

    @classmethod
    def from_config_json(
        cls, data: dict[str, Any], source: str = "config.json", has_chat_template: bool = False
    ) -> LlavaKitConfig:
        """Read our own ``config.json`` or a plain llava-hf one (then our fields are derived from its fields).

        Args:
            data: the parsed ``config.json``.
            source: where it came from, named in errors.
            has_chat_template: the checkpoint folder carries a chat template; a llava-hf checkpoint is then prompted
                with it (template ``processor``) rather than with the LLM family's default template.
        """
        if data.get("model_type") not in ("llava_next", "llava_onevision", "llavakit"):
            raise CheckpointError(
                f"{source}: model_type {data.get('model_type')!r} is not a LLaVA-NeXT checkpoint "
                "(expected 'llava_next'); original LLaVA checkpoints need `llavakit convert` first"
            )
        for key in ("vision_config", "text_config"):
            if not isinstance(data.get(key), dict):
                raise CheckpointError(f"{source}: field {key!r} is missing or not an object")
        section = data.get(LLAVAKIT_KEY)
        if section is not None:
            return cls._from_section(data, section, source)
        return cls._from_llava_hf(data, source, has_chat_template)

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
            )
        except KeyError as err:
            raise CheckpointError(f"{source}: the 'llavakit' section lacks field {err}") from None
        except ConfigError as err:
            raise CheckpointError(f"{source}: {err}") from None

    @classmethod
    def _from_llava_hf(cls, data: dict[str, Any], source: str, has_chat_template: bool) -> LlavaKitConfig:
        from llavakit.model.family import family_for
        from llavakit.model.vision import backbone_for_model_type

        vision = data["vision_config"]
        backbone = backbone_for_model_type(vision.get("model_type", "clip_vision_model"))
        strategy = data.get("vision_feature_select_strategy", "default")
        layer = data.get("vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise CheckpointError(f"{source}: list-valued vision_feature_layer {layer} is not supported yet")
        spec = ImageSpec(
            aspect_ratio=data.get("vision_aspect_ratio", "anyres")
            if data["model_type"] == "llava_onevision"
            else "anyres",
            tile_size=int(vision.get("image_size", 336)),
            patch_size=int(vision.get("patch_size", 14)),
            pinpoints=tuple(tuple(p) for p in data.get("image_grid_pinpoints", ImageSpec().pinpoints)),
            image_mean=backbone.image_mean,
            image_std=backbone.image_std,
            select_feature="patch" if strategy == "default" or not backbone.has_cls_token else "cls_patch",
            merge_type="spatial_unpad",
        )
        if spec.select_feature == "cls_patch":
            raise CheckpointError(f"{source}: strategy 'full' on a CLS encoder cannot be merged spatially")
        family_template = family_for(data["text_config"].get("model_type", "llama")).default_template
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
        )
