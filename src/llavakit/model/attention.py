"""``sdpa_varlen``: PyTorch SDPA that runs packed rows sample by sample, as flash-attention's varlen kernel does.

Why our own: a packed or padding-free row of ``T`` tokens holding samples of lengths ``l_1..l_n`` needs causal
attention within each sample only. transformers' ``sdpa`` gets there with a ``[B, 1, T, T]`` block-diagonal mask, so
it computes and masks all ``T^2`` scores (and SDPA's fused kernels cannot skip masked blocks); ``flash_attention_2``
computes ``sum(l_i^2)`` but needs CUDA and the flash-attn package. This implementation computes ``sum(l_i^2)`` with
PyTorch's own SDPA on any device: each sample's block is one causal SDPA call.

Sample boundaries come from ``position_ids``, by transformers' own packed-sequence rule for sdpa: a position that is
not one more than the previous one starts a sample. The split happens only where transformers would build no mask
but a causal one over the whole row: no 2-D padding mask, no cached tokens before the row, no sliding window shorter
than the row, no mask overlay. In every other case the mask function builds sdpa's mask and the attention is
transformers' ``sdpa`` itself, so one loaded model serves training, batched generation and evaluation. One
difference remains on purpose: a row whose positions restart is split even where transformers' sdpa, given an
all-ones padding mask or an empty cache object, lets its samples see each other.

Registering is an import side effect of ``llavakit.model.llava_next`` (`register`): transformers then accepts
``attn_implementation="sdpa_varlen"`` wherever it accepts ``"sdpa"``. Checkpoints do not record the choice.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "sdpa_varlen"


def sample_lengths(position_ids: torch.Tensor, batch_size: int) -> list[list[int]]:
    """Each row's sample lengths: a new sample starts wherever a position is not the previous one plus one.

    Args:
        position_ids: ``[B, T]``, ``[1, T]`` (shared by every row, as transformers allows) or ``[T]``.
        batch_size: ``B``.

    Returns:
        Per row, the lengths of its samples in order (they sum to ``T``).
    """
    rows = position_ids.reshape(-1, position_ids.shape[-1]).expand(batch_size, -1)
    starts = (rows[:, 1:] - rows[:, :-1] != 1).nonzero().tolist()
    bounds: list[list[int]] = [[0] for _ in range(batch_size)]
    for row, index in starts:
        bounds[row].append(index + 1)
    length = rows.shape[1]
    return [[end - start for start, end in zip(b, [*b[1:], length], strict=True)] for b in bounds]


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
    """transformers' attention-interface signature; ``query/key/value [B, H, T, D]`` -> ``([B, T, H, D], None)``."""
    position_ids = kwargs.get("position_ids")
    splittable = (
        attention_mask is None
        and position_ids is not None
        and getattr(module, "is_causal", True)
        and kwargs.get("is_causal", True) is not False
        and query.shape[2] > 1
        and query.shape[2] == key.shape[2]
    )
    lengths = sample_lengths(position_ids, query.shape[0]) if splittable else []
    if not splittable or all(len(row) == 1 for row in lengths):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    rows = []
    for row_lengths, *row_tensors in zip(lengths, query.split(1), key.split(1), value.split(1), strict=True):
        # Why split, not slicing: a slice's backward writes its gradient into a zero tensor of the whole input,
        # once per sample and tensor; split's backward is one concatenation.
        samples = zip(*(tensor.split(row_lengths, dim=2) for tensor in row_tensors), strict=True)
        outputs = [
            torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True)
            for q, k, v in samples
        ]
        rows.append(torch.cat(outputs, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def varlen_mask(**kwargs: Any) -> torch.Tensor | None:
    """The mask interface (transformers calls it with keywords): None where the attention may split rows itself.

    That is a plain causal row: no padding mask, nothing cached before it, no sliding window shorter than it
    (``local_size``), no or/and mask overlay (``use_vmap``). Otherwise sdpa's own mask, so the attention is sdpa's.
    """
    q_length, window = kwargs["q_length"], kwargs.get("local_size")
    plain = (
        kwargs.get("attention_mask") is None
        and not kwargs.get("use_vmap", False)
        and kwargs.get("q_offset", 0) == 0
        and kwargs["kv_length"] == q_length
        and (window is None or q_length <= window)
    )
    return None if plain else sdpa_mask(**kwargs)


def register() -> None:
    """Make ``attn_implementation="sdpa_varlen"`` known to transformers (idempotent)."""
    AttentionInterface.register(NAME, varlen_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, varlen_mask)
