"""Reading weight files that may come from anyone: safetensors, or ``.bin`` pickles holding only named tensors.

Upstream LLaVA saves ``mm_projector.bin``, ``non_lora_trainables.bin`` and ``pytorch_model*.bin`` with
``torch.save`` and reads them back with a plain ``torch.load``, which runs whatever a pickle names. Every ``.bin``
llavakit reads goes through :func:`read_tensor_file`: ``torch.load(weights_only=True)``, and a refusal becomes a
`CheckpointError` that names the file and what it wanted to import. The message never suggests
``weights_only=False``: a file from someone else is exactly where that would run their code.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from llavakit.errors import CheckpointError


def read_tensor_file(file: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file, or a ``.bin`` pickle holding only a dict of tensors (nothing else is run).

    Raises:
        CheckpointError: the file is missing, or a ``.bin`` holds any object other than named tensors.
    """
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"GLOBAL (\S+)", str(err))
        raise CheckpointError(
            f"{file} holds Python objects besides tensors, so it was refused without running anything in it "
            f"({'it needs ' + refused.group(1) if refused else 'not a weights-only pickle'}). If you trust its "
            f"source, re-save it as a dict of tensors (or as safetensors) and convert again"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise CheckpointError(f"{file} holds a {type(state).__name__}, not a dict of named tensors")
    return state
