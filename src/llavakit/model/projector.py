"""Projectors from vision features to the LLM's hidden size, chosen by id; upstream ``mm_projector.bin`` I/O.

Ids follow upstream ``mm_projector_type``: ``linear``, ``mlp{N}x_gelu`` (``mlp2x_gelu`` is the standard) and
``identity``. Linear layers are named ``linear_1 … linear_N`` so that ``mlp2x_gelu`` has exactly the key layout of
transformers' ``LlavaNextMultiModalProjector``; upstream names the same weights ``mm_projector.0``,
``mm_projector.2``, ... (an ``nn.Sequential`` with GELUs in between), which `upstream_projector_state` and
`load_upstream_projector_state` translate.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from llavakit.errors import CheckpointError, ConfigError
from llavakit.model.tensor_files import read_tensor_file

_MLP = re.compile(r"^mlp(\d+)x_gelu$")
PROJECTOR_IDS = ("linear", "mlp{N}x_gelu", "identity")


class Projector(nn.Module):
    """``linear_1`` → (GELU → ``linear_k``)* — an MLP with ``depth`` linear layers, or the identity.

    Args:
        projector_id: ``linear``, ``mlp{N}x_gelu`` or ``identity``.
        in_features: vision feature size C.
        out_features: LLM hidden size D.
    """

    def __init__(self, projector_id: str, in_features: int, out_features: int) -> None:
        super().__init__()
        self.projector_id = projector_id
        self.depth = projector_depth(projector_id)
        if self.depth == 0 and in_features != out_features:
            raise ConfigError(
                f"projector 'identity' needs equal vision ({in_features}) and LLM ({out_features}) sizes; use mlp2x_gelu"
            )
        for index in range(1, self.depth + 1):
            width_in = in_features if index == 1 else out_features
            self.add_module(f"linear_{index}", nn.Linear(width_in, out_features))
        self.act = nn.GELU()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Project ``[..., C]`` vision features to ``[..., D]``."""
        for index in range(1, self.depth + 1):
            if index > 1:
                features = self.act(features)
            features = getattr(self, f"linear_{index}")(features)
        return features


def projector_depth(projector_id: str) -> int:
    """Number of linear layers of a projector id (0 for ``identity``)."""
    if projector_id == "identity":
        return 0
    if projector_id == "linear":
        return 1
    match = _MLP.match(projector_id)
    if match and int(match.group(1)) >= 1:
        return int(match.group(1))
    raise ConfigError(f"unknown projector {projector_id!r}; valid projector ids: {', '.join(PROJECTOR_IDS)}")


def upstream_projector_state(projector: Projector) -> dict[str, torch.Tensor]:
    """The projector's weights under upstream keys (``model.mm_projector.{0,2,4..}.{weight,bias}``)."""
    state = {}
    for index in range(1, projector.depth + 1):
        layer = getattr(projector, f"linear_{index}")
        prefix = f"model.mm_projector.{2 * (index - 1)}"
        state[f"{prefix}.weight"] = layer.weight.detach().cpu().clone()
        state[f"{prefix}.bias"] = layer.bias.detach().cpu().clone()
    return state


def read_upstream_projector_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an upstream ``mm_projector.bin`` (or a safetensors file) and return our ``linear_k`` keys."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"projector file {path} does not exist (expected upstream mm_projector.bin)")
    raw = read_tensor_file(path)
    state = {}
    for key, tensor in raw.items():
        match = re.search(r"mm_projector\.(\d+)\.(weight|bias)$", key)
        if match is None:
            continue
        position = int(match.group(1))
        if position % 2:
            raise CheckpointError(f"{path}: key {key!r} is not a linear layer of an mlp{{N}}x_gelu projector")
        state[f"linear_{position // 2 + 1}.{match.group(2)}"] = tensor
    if not state:
        raise CheckpointError(f"{path} holds no 'mm_projector.N.weight' keys (found: {sorted(raw)[:5]} ...)")
    return state


def load_upstream_projector_state(projector: Projector, path: str | Path) -> None:
    """Load upstream ``mm_projector.bin`` into ``projector``, checking keys and shapes before copying anything."""
    state = read_upstream_projector_file(path)
    expected = projector.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit projector {projector.projector_id!r}: missing {missing}, unexpected {unexpected}"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(tensor.shape)} but the model needs {tuple(expected[key].shape)} — "
                "the projector was trained for a different vision encoder or LLM size"
            )
    projector.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
