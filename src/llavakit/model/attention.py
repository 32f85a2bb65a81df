"""``sdpa_varlen``: PyTorch SDPA that runs packed rows sample by sample, as flash-attention's varlen kernel does.

Why our own: a packed or padding-free row of ``T`` tokens holding samples of lengths ``l_1..l_n`` needs causal
attention within each sample only. transformers' ``sdpa`` gets there with a ``[B, 1, T, T]`` block-diagonal mask, so
it computes and masks all ``T^2`` scores (and SDPA's fused kernels cannot skip masked blocks); ``flash_attention_2``
computes ``sum(l_i^2)`` but needs CUDA and the flash-attn package. This implementation computes ``sum(l_i^2)`` with
PyTorch's own SDPA on any device: each sample's block is one causal SDPA call.

Sample boundaries come from the restarting ``position_ids`` (every position 0 starts a sample), the rule
transformers applies to flash-attention. Everything that is not a packed row (a 2-D padding mask, a KV cache, one
query token, a bidirectional module) is exactly transformers' ``sdpa``, so one loaded model serves training,
batched generation and evaluation.

Registering is an import side effect (`register`, called by ``llavakit.model``): transformers then accepts
``attn_implementation="sdpa_varlen"`` wherever it accepts ``"sdpa"``. Checkpoints do not record the choice.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "sdpa_varlen"


def sample_starts(position_ids: torch.Tensor) -> list[list[int]]:
    """Where each row's samples start: the indices of position 0 (row start included).

    Args:
        position_ids: ``[B, T]`` (or ``[T]``), restarting at 0 for every sample.

    Returns:
        Per row, the sorted start indices; a row that does not start at position 0 still starts a sample at 0.
    """
    rows = position_ids.reshape(-1, position_ids.shape[-1])
    starts = []
    for row in rows:
        found = (row == 0).nonzero().flatten().tolist()
        starts.append(found if found[:1] == [0] else [0, *found])
    return starts


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature; ``query/key/value [B, H, T, D]`` -> ``([B, T, H, D], None)``.

    Raises:
        ValueError: a sliding-window module whose packed sample is longer than the window (the per-sample causal
            call would ignore the window); use ``sdpa``.
    """
    position_ids = kwargs.get("position_ids")
    packed = (
        attention_mask is None
        and position_ids is not None
        and getattr(module, "is_causal", True)
        and kwargs.get("is_causal", True) is not False
        and query.shape[2] > 1
        and query.shape[2] == key.shape[2]
    )
    starts = sample_starts(position_ids) if packed else []
    if not packed or all(len(row) == 1 for row in starts):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    length = query.shape[2]
    # Why split, not slicing: a slice's backward writes its gradient into a zero tensor of the whole input, once per
    # sample and tensor; split's backward is one concatenation.
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    rows = []
    for row_starts, *row_tensors in zip(starts, query.split(1), key.split(1), value.split(1), strict=True):
        lengths = [end - start for start, end in zip(row_starts, [*row_starts[1:], length], strict=True)]
        if window is not None and max(lengths) > window:
            raise ValueError(
                f"sdpa_varlen: a packed sample of {max(lengths)} tokens exceeds the sliding window {window}; use "
                "attn_implementation='sdpa' for this model"
            )
        samples = zip(*(tensor.split(lengths, dim=2) for tensor in row_tensors), strict=True)
        outputs = [
            torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True)
            for q, k, v in samples
        ]
        rows.append(torch.cat(outputs, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def varlen_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """The mask interface: no mask without a 2-D padding mask (the attention reads ``position_ids``), else sdpa's."""
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> None:
    """Make ``attn_implementation="sdpa_varlen"`` known to transformers (idempotent)."""
    AttentionInterface.register(NAME, varlen_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, varlen_mask)
