"""Vision encoders: thin wrappers over transformers' CLIP and SigLIP vision models, chosen by id.

The wrapper returns the hidden states of ``select_layer`` (upstream ``mm_vision_select_layer``; recipes use -2)
and runs only the layers up to it: upstream and transformers run the whole tower with ``output_hidden_states``
and throw the last layer away. Layers after the selected one, ``post_layernorm`` and SigLIP's pooling head stay
in the module (so checkpoints keep every key transformers expects) but are frozen and never run, which also
keeps DDP and distributed checkpoints free of never-used trainable parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    PretrainedConfig,
    PreTrainedModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from llavakit.anyres.spec import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD
from llavakit.errors import ConfigError
from llavakit.registry import Registry


@dataclass(frozen=True)
class VisionBackbone:
    """A registered vision encoder family.

    Attributes:
        id: registry id (``clip``, ``siglip``), saved in the checkpoint.
        model_class: the transformers vision model class.
        config_class: its config class.
        model_types: ``config.model_type`` values this backbone loads (vision-only and full two-tower configs).
        has_cls_token: whether the sequence starts with a CLS token (dropped by ``select_feature="patch"``).
        has_pre_layernorm: CLIP normalises embeddings before the encoder; SigLIP does not.
        image_mean, image_std: the normalisation its processor uses.
    """

    id: str
    model_class: type[PreTrainedModel]
    config_class: type[PretrainedConfig]
    model_types: tuple[str, ...]
    has_cls_token: bool
    has_pre_layernorm: bool
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]


VISION_BACKBONES: Registry[VisionBackbone] = Registry("vision encoder")
VISION_BACKBONES.register(
    "clip",
    VisionBackbone("clip", CLIPVisionModel, CLIPVisionConfig, ("clip", "clip_vision_model"), True, True, CLIP_MEAN, CLIP_STD),
)
VISION_BACKBONES.register(
    "siglip",
    VisionBackbone(
        "siglip", SiglipVisionModel, SiglipVisionConfig, ("siglip", "siglip_vision_model"), False, False, SIGLIP_MEAN, SIGLIP_STD
    ),
)


def backbone_for_model_type(model_type: str) -> VisionBackbone:
    """The registered backbone that loads configs of ``model_type`` (a checkpoint field, not a path)."""
    for name in VISION_BACKBONES:
        backbone = VISION_BACKBONES.get(name)
        if model_type in backbone.model_types:
            return backbone
    raise ConfigError(
        f"no vision encoder is registered for model_type {model_type!r}; "
        f"registered: {', '.join(VISION_BACKBONES.names())} (pass vision_encoder=<id> to choose one)"
    )


class VisionEncoder(nn.Module):
    """Runs a vision tower up to ``select_layer`` and returns per-tile features.

    Args:
        backbone: the registered backbone record.
        model: the transformers vision model (``CLIPVisionModel`` / ``SiglipVisionModel``).
        select_layer: hidden-state index as in ``output_hidden_states`` (0 = embeddings, -1 = last layer,
            -2 = penultimate layer).
        select_feature: ``patch`` drops the CLS token, ``cls_patch`` keeps it.
    """

    def __init__(self, backbone: VisionBackbone, model: PreTrainedModel, select_layer: int, select_feature: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.model = model
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.num_layers_run = self._layers_to_run(select_layer)
        self._freeze_unused()

    @property
    def config(self) -> PretrainedConfig:
        """The transformers vision config."""
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def image_size(self) -> int:
        return int(self.model.config.image_size)

    @property
    def patch_size(self) -> int:
        return int(self.model.config.patch_size)

    @property
    def layers(self) -> nn.ModuleList:
        """The encoder layers (transformers ≥5 has no ``vision_model`` level; 4.x has one)."""
        return self._tower.encoder.layers

    @property
    def _tower(self) -> nn.Module:
        return getattr(self.model, "vision_model", self.model)

    def _layers_to_run(self, select_layer: int) -> int:
        total = len(self._tower.encoder.layers)
        count = select_layer if select_layer >= 0 else total + 1 + select_layer
        if not 0 <= count <= total:
            raise ConfigError(
                f"select_layer {select_layer} is out of range for a {total}-layer vision encoder "
                f"(use -{total + 1}..{total}; recipes use -2)"
            )
        return count

    def _freeze_unused(self) -> None:
        tower = self._tower
        for layer in tower.encoder.layers[self.num_layers_run :]:
            layer.requires_grad_(False)
        for name in ("post_layernorm", "head"):
            module = getattr(tower, name, None)
            if module is not None:
                module.requires_grad_(False)

    def unused_parameter_names(self) -> list[str]:
        """Names (relative to this module) of parameters that are never run."""
        used = {id(p) for p in self._used_modules_parameters()}
        return [name for name, p in self.named_parameters() if id(p) not in used]

    def _used_modules_parameters(self) -> list[nn.Parameter]:
        tower = self._tower
        modules = [tower.embeddings, *tower.encoder.layers[: self.num_layers_run]]
        if self.backbone.has_pre_layernorm:
            modules.append(tower.pre_layrnorm)
        return [p for m in modules for p in m.parameters()]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encode tiles.

        Args:
            pixel_values: ``[N, 3, S, S]`` normalised tiles.

        Returns:
            ``[N, T, C]`` features of the selected layer; T = (S/patch)² (+1 with ``cls_patch`` on CLIP).
        """
        tower = self._tower
        dtype = tower.embeddings.patch_embedding.weight.dtype
        hidden = tower.embeddings(pixel_values.to(dtype))
        if self.backbone.has_pre_layernorm:
            hidden = tower.pre_layrnorm(hidden)
        for layer in tower.encoder.layers[: self.num_layers_run]:
            hidden = layer(hidden, None)
        if self.backbone.has_cls_token and self.select_feature == "patch":
            hidden = hidden[:, 1:]
        return hidden


def build_vision_encoder(
    backbone_id: str, model: PreTrainedModel, select_layer: int, select_feature: str = "patch"
) -> VisionEncoder:
    """Wrap a loaded transformers vision model as a `VisionEncoder` of the registered ``backbone_id``."""
    backbone = VISION_BACKBONES.get(backbone_id)
    if not isinstance(model, backbone.model_class):
        raise ConfigError(
            f"vision encoder {backbone_id!r} expects a {backbone.model_class.__name__}, got {type(model).__name__}"
        )
    if select_feature not in ("patch", "cls_patch"):
        raise ConfigError(f"select_feature {select_feature!r} must be 'patch' or 'cls_patch'")
    return VisionEncoder(backbone, model, select_layer, select_feature)


def load_vision_model(backbone_id: str | None, source: str, **kwargs) -> tuple[VisionBackbone, PreTrainedModel]:
    """Load a vision tower from a hub id or folder through transformers' ``from_pretrained``.

    The backbone is ``backbone_id`` when given, else the one registered for the checkpoint's ``model_type``.
    Two-tower checkpoints (e.g. ``openai/clip-vit-large-patch14-336``) load their vision half.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    backbone = VISION_BACKBONES.get(backbone_id) if backbone_id else backbone_for_model_type(config.model_type)
    if backbone.id == "siglip":
        # LLaVA never uses SigLIP's attention-pooling head; without it there is nothing to freeze or skip.
        kwargs.setdefault("vision_use_head", False)
    return backbone, backbone.model_class.from_pretrained(source, **kwargs)
