"""Trainable parts → ``requires_grad``, parameter by parameter.

Why: upstream decides what trains through five interacting flags (``tune_mm_mlp_adapter``,
``freeze_mm_mlp_adapter``, ``unfreeze_mm_vision_tower``, ``mm_tunable_parts``, ``freeze_backbone``), and a
projector that silently trains (or not) is a frequent confusion (haotian-liu/LLaVA#948). Here a stage names its
parts and every parameter of the model belongs to exactly one part by its name:

    vision_encoder.*            -> vision_tower
    projector.*, image_newline  -> projector   (the newline embedding is new with the projector, as upstream)
    llm.*                       -> language_model

Parameters the model itself froze (vision layers after the selected one, ``post_layernorm``, the SigLIP head) stay
frozen whatever the stage says: they receive no gradient, and training them would break DDP and DCP resume. So do
integer tensors (a QLoRA LLM's quantised weights), which cannot hold a gradient.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from llavakit.errors import ConfigError

_PART_PREFIXES = (
    ("vision_encoder.", "vision_tower"),
    ("projector.", "projector"),
    ("image_newline", "projector"),
    ("llm.", "language_model"),
)


def part_of(name: str) -> str:
    """The trainable part a parameter name belongs to.

    Raises:
        ConfigError: the name is outside ``vision_encoder``, ``projector``, ``image_newline`` and ``llm``.
    """
    for prefix, part in _PART_PREFIXES:
        if name.startswith(prefix):
            return part
    raise ConfigError(
        f"parameter {name!r} belongs to no trainable part: llavakit models keep all weights under "
        "vision_encoder, projector, image_newline and llm"
    )


def model_frozen_names(model: nn.Module) -> frozenset[str]:
    """Names of the parameters the model froze itself (call before any stage changes ``requires_grad``)."""
    return frozenset(name for name, param in model.named_parameters() if not param.requires_grad)


def apply_trainable_parts(
    model: nn.Module, parts: Iterable[str], always_frozen: frozenset[str] = frozenset()
) -> list[str]:
    """Set ``requires_grad`` on every parameter: True iff its part is in ``parts`` and the model did not freeze it.

    Args:
        model: a `LlavaNextModel` (unwrapped).
        parts: subset of ``vision_tower``, ``projector``, ``language_model``.
        always_frozen: parameter names that stay frozen (from `model_frozen_names`).

    Returns:
        The names of the trainable parameters, in model order.
    """
    parts = set(parts)
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(
            part_of(name) in parts and name not in always_frozen and param.is_floating_point()
        )
        if param.requires_grad:
            trainable.append(name)
    if not trainable:
        raise ConfigError(f"trainable parts {sorted(parts)} select no parameter of the model")
    return trainable
