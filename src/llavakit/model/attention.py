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

Kernels: on CUDA in bf16/fp16 every sample of every row goes through one call of PyTorch's own variable-length
flash kernel (``torch.nn.attention.varlen.varlen_attn``, torch >= 2.9) over the flattened tokens; elsewhere (CPU,
fp32, dropout, older torch) each sample is one causal SDPA call. `varlen_kernel_name` says which runs. Both compute
the same function; the GPU tests compare them.

Sample boundaries cost a host sync to read. `varlen_kwargs` computes them once per forward pass, as the
``cu_seq_lens_q/k`` and ``max_length_q/k`` keywords that transformers passes through to every attention call (its
flash-attention integration reads the same names); without them each layer derives them from ``position_ids``.

Registering is an import side effect of ``llavakit.model.llava_next`` (`register`): transformers then accepts
``attn_implementation="sdpa_varlen"`` wherever it accepts ``"sdpa"``. Checkpoints do not record the choice.
"""

from __future__ import annotations

import inspect
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


def varlen_kwargs(position_ids: torch.Tensor, batch_size: int) -> dict[str, Any]:
    """The sample boundaries of a packed or padding-free batch, as transformers' flash-attention keywords.

    Args:
        position_ids: ``[B, T]`` (or ``[1, T]`` shared by every row), restarting at every sample.
        batch_size: ``B``.

    Returns:
        ``cu_seq_lens_q`` = ``cu_seq_lens_k``: ``[n + 1]`` int32 on ``position_ids``' device, the start of each of the
        ``n`` samples of all rows in the flattened ``[B * T]`` token order, then ``B * T``; ``max_length_q`` =
        ``max_length_k``: the longest sample (a Python int).
    """
    lengths = [length for row in sample_lengths(position_ids, batch_size) for length in row]
    bounds = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_seq_lens = bounds.to(position_ids.device, non_blocking=True)
    longest = max(lengths)
    return {
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def _torch_varlen_attn() -> tuple[Any, dict[str, Any]] | None:
    """PyTorch's varlen flash attention and the keywords that make it causal, or None on a torch without it.

    Earlier torch versions spell causality ``is_causal=True``, later ones ``window_size=(-1, 0)``.
    """
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    if "is_causal" in parameters:
        causal: dict[str, Any] = {"is_causal": True}
    elif "window_size" in parameters:
        causal = {"window_size": (-1, 0)}
    else:
        return None
    if "enable_gqa" in parameters:
        causal["enable_gqa"] = True
    return varlen_attn, causal


# Resolved once at import: under torch.compile the attention call reads a constant instead of tracing the lookup.
_VARLEN_ATTN = _torch_varlen_attn()


def varlen_kernel_name(query: torch.Tensor, dropout: float = 0.0) -> str:
    """Which kernel `varlen_attention_forward` runs for ``query``: ``varlen_attn`` or ``sdpa_per_sample``."""
    fused = query.is_cuda and _half_dtype(query) is not None and dropout == 0.0 and _VARLEN_ATTN is not None
    return "varlen_attn" if fused else "sdpa_per_sample"


def _half_dtype(query: torch.Tensor) -> torch.dtype | None:
    """The 16-bit dtype attention computes in: the query's own, or autocast's where autocast is on.

    Under bf16 autocast the query usually arrives in float32 (float32 RoPE tables promote it); SDPA would cast it
    to the autocast dtype itself, so the varlen kernel, which autocast does not know, is given that dtype too.
    """
    if query.dtype in (torch.float16, torch.bfloat16):
        return query.dtype
    device = query.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) in (
        torch.float16,
        torch.bfloat16,
    ):
        return torch.get_autocast_dtype(device)
    return None


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
        and (position_ids is not None or kwargs.get("cu_seq_lens_q") is not None)
        and getattr(module, "is_causal", True)
        and kwargs.get("is_causal", True) is not False
        and query.shape[2] > 1
        and query.shape[2] == key.shape[2]
    )
    if splittable and kwargs.get("cu_seq_lens_q") is None:
        kwargs = {**kwargs, **varlen_kwargs(position_ids, query.shape[0])}
    # One sample per row is plain causal attention over the batch.
    splittable = splittable and kwargs["cu_seq_lens_q"].numel() - 1 > query.shape[0]
    if not splittable:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if varlen_kernel_name(query, dropout) == "varlen_attn":
        return _flash_varlen(module, query, key, value, scaling, kwargs), None
    return _sdpa_per_sample(module, query, key, value, dropout, scaling, kwargs["cu_seq_lens_q"]), None


def _flash_varlen(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None,
    kwargs: dict[str, Any],
) -> torch.Tensor:
    """All samples in one ``varlen_attn`` call over the flattened ``[B * T, H, D]`` tokens -> ``[B, T, H, D]``."""
    varlen_attn, causal = _VARLEN_ATTN
    batch, heads, length, head_dim = query.shape
    dtype = _half_dtype(query)
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    if "enable_gqa" not in causal:
        groups = getattr(module, "num_key_value_groups", 1)
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)

    def flat(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.transpose(1, 2).reshape(batch * length, tensor.shape[1], head_dim)

    output = varlen_attn(
        flat(query),
        flat(key),
        flat(value),
        kwargs["cu_seq_lens_q"],
        kwargs["cu_seq_lens_k"],
        kwargs["max_length_q"],
        kwargs["max_length_k"],
        scale=scaling,
        **causal,
    )
    return output.reshape(batch, length, heads, head_dim)


def _sdpa_per_sample(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dropout: float,
    scaling: float | None,
    cu_seq_lens: torch.Tensor,
) -> torch.Tensor:
    """One causal SDPA call per sample -> ``[B, T, H, D]``."""
    batch, _, length, _ = query.shape
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    # Why split, not slicing: a slice's backward writes its gradient into a zero tensor of the whole input, once
    # per sample and tensor; split's backward is one concatenation.
    lengths = (cu_seq_lens[1:] - cu_seq_lens[:-1]).tolist()
    flat = [
        tensor.transpose(0, 1).reshape(tensor.shape[1], batch * length, -1).split(lengths, dim=1)
        for tensor in (query, key, value)
    ]
    outputs = [
        torch.nn.functional.scaled_dot_product_attention(
            q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), dropout_p=dropout, scale=scaling, is_causal=True
        )
        for q, k, v in zip(*flat, strict=True)
    ]
    heads = query.shape[1]
    return torch.cat(outputs, dim=2).reshape(heads, batch, length, -1).permute(1, 2, 0, 3).contiguous()


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
