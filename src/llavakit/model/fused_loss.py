"""Fused linear cross-entropy: the summed loss of ``hidden @ weight.T`` against targets, never holding the logits.

Why: `llavakit.model.loss` already projects only the N supervised positions onto the vocabulary, but those
``[N, V]`` logits, their float32 copy for the softmax and their gradient still dominate the memory of a step when
the vocabulary is large: for a Qwen2 LLM (V = 151,936) 8k supervised tokens are 4.6 GiB of float32 logits, several
times the LLM's own activations. A fused linear cross-entropy (as in Liger-Kernel) computes the logits a chunk of
rows at a time and, since the loss is a scalar, the gradients with respect to the hidden states and the head weight
right away in the forward pass; only those (``[N, D]`` and ``[V, D]``) outlive a chunk, and the backward pass just
scales them by the incoming gradient.

Two kernels:

- ``chunked`` (`chunked_linear_cross_entropy`): our own, in plain PyTorch, so it runs on any device (the CPU tests
  compare it with the logits path) and needs no extra package. Each chunk's logits are computed in the compute dtype
  (the autocast dtype under autocast, else the inputs' dtype, as the LM head's ``F.linear`` would), the softmax and
  the loss in float32, and the weight (and bias) gradients are accumulated in float32 over the chunks.
- ``liger`` (`liger_linear_cross_entropy`): Liger-Kernel's Triton implementation, where installed
  (``pip install liger-kernel``); CUDA only.

Both take the supervised rows only, so no row is normally ignored; rows whose target is ``IGNORE_INDEX`` are still
skipped (no loss, no gradient).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional as F

from llavakit.errors import ConfigError

IGNORE_INDEX = -100

# Bytes of one chunk's float32 logits. A chunk holds them plus a half-size copy in the compute dtype (first the
# logits, then their gradient), so ~0.75 GiB at most (and one [V, D] product), against 4.6 GiB of float32 logits
# alone for 8k supervised tokens of Qwen2 (V = 151,936) in the logits path. Smaller chunks would save little more
# and cost time: every chunk adds its product into the [V, D] float32 weight gradient, a memory-bound pass whose
# cost does not shrink with the chunk. By estimate (H100: ~500 TFLOP/s bf16, ~3 TB/s) that pass takes ~40 % of the
# time of a chunk's three matmuls at Qwen2's 832 rows and narrow D = 896, and ~8 % at Llama's 4,160 rows (32k
# vocabulary, usually a single chunk).
CHUNK_LOGITS_BYTES = 512 * 2**20
# Chunks of 64 rows or more are cut to a multiple of 64, keeping matmul shapes and chunk offsets tensor-core aligned.
ROW_ALIGNMENT = 64


def chunk_rows(vocab_size: int, budget_bytes: int | None = None) -> int:
    """Rows per chunk so that a chunk's ``[rows, V]`` float32 logits stay within ``budget_bytes`` (at least 1).

    ``budget_bytes`` defaults to `CHUNK_LOGITS_BYTES`.
    """
    rows = max(1, (budget_bytes or CHUNK_LOGITS_BYTES) // (vocab_size * 4))
    return rows - rows % ROW_ALIGNMENT if rows >= ROW_ALIGNMENT else rows


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the LM head's matmul runs in: autocast's where autocast is on for ``hidden``'s device."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias``, gradients computed chunk by chunk in the forward."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        rows: int,
        dtype: torch.dtype,
        needs_grad: tuple[bool, bool, bool],
    ) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            loss, grads = _chunked_forward(hidden, weight, bias, targets, rows, dtype, needs_grad)
        ctx.has_grad = tuple(grad is not None for grad in grads)
        ctx.save_for_backward(*(grad for grad in grads if grad is not None))
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = iter(ctx.saved_tensors)
        # Scaled in float32: rounding the scale (e.g. 1 / num_items_in_batch) to bf16 would bias every gradient.
        grads = [_scaled(next(saved), grad_output) if has else None for has in ctx.has_grad]
        grad_hidden, grad_weight, grad_bias = grads
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _scaled(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (grad.float() * scale.float()).to(grad.dtype)


def _chunked_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    rows: int,
    dtype: torch.dtype,
    needs_grad: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """The summed loss and its gradients (None where not needed) w.r.t. ``hidden``, ``weight``, ``bias``.

    The gradients come in their inputs' dtypes; the weight and bias ones are summed over the chunks in float32.
    """
    weight_c = weight.to(dtype)
    bias_c = None if bias is None else bias.to(dtype)
    wants_hidden, wants_weight, wants_bias = needs_grad
    grad_hidden = torch.empty_like(hidden) if wants_hidden else None
    grad_weight = (
        torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if wants_weight else None
    )
    grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if wants_bias else None
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], rows):
        chunk = hidden[start : start + rows].to(dtype)
        target = targets[start : start + rows]
        valid = target != IGNORE_INDEX
        safe_target = target.masked_fill(~valid, 0).unsqueeze(1)
        logits = F.linear(chunk, weight_c, bias_c).float()
        log_norm = torch.logsumexp(logits, dim=-1)
        loss += ((log_norm - logits.gather(1, safe_target).squeeze(1)) * valid).sum()
        if not any(needs_grad):
            continue
        # d loss / d logits = softmax - one_hot(target), zero on ignored rows; built in place in the float32 logits.
        grad_logits = logits.sub_(log_norm.unsqueeze(1)).exp_()
        grad_logits.scatter_add_(1, safe_target, torch.full_like(safe_target, -1, dtype=torch.float32))
        grad_logits.mul_(valid.unsqueeze(1))
        grad_logits = grad_logits.to(dtype)
        del logits  # the float32 buffer: free it before the next chunk's logits
        if grad_hidden is not None:
            grad_hidden[start : start + rows] = grad_logits @ weight_c
        if grad_weight is not None:
            grad_weight += grad_logits.t() @ chunk
        if grad_bias is not None:
            grad_bias += grad_logits.sum(0, dtype=torch.float32)
    return loss, [grad_hidden, _cast(grad_weight, weight), _cast(grad_bias, bias)]


def _cast(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    return None if grad is None or like is None else grad.to(like.dtype)


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    rows: int | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T + bias`` against ``targets``, in row chunks.

    Gradients are computed for the inputs that need them only (a frozen head gets no weight gradient computed), in
    the forward pass; a weight shared with the input embeddings receives the sum of both gradients, as autograd
    accumulates it.

    Args:
        hidden: ``[N, D]`` hidden states.
        weight: ``[V, D]`` LM-head weight.
        targets: ``[N]`` int64 token ids, ``IGNORE_INDEX`` for rows that carry no loss.
        bias: ``[V]`` LM-head bias, if any.
        rows: rows per chunk; default `chunk_rows` of ``V``.

    Returns:
        The scalar float32 summed loss.
    """
    if rows is not None and rows <= 0:
        raise ValueError(f"rows per chunk must be positive, got {rows}")
    grad_on = torch.is_grad_enabled()
    needs_grad = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    rows = rows or chunk_rows(weight.shape[0])
    return _ChunkedLinearCrossEntropy.apply(
        hidden, weight, bias, targets, rows, compute_dtype(hidden), needs_grad
    )


def liger_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed cross-entropy through Liger-Kernel's fused linear cross-entropy (shapes as in the chunked kernel).

    Raises:
        ConfigError: liger-kernel is not installed, or ``hidden`` is not on a CUDA device (Liger is Triton).
    """
    function = _liger_function()
    if hidden.device.type != "cuda":
        raise ConfigError(
            f"strategy.loss_kernel=liger runs Liger-Kernel's Triton kernels, which need a CUDA device; the hidden "
            f"states are on {hidden.device.type}: use strategy.loss_kernel=chunked (any device) or logits"
        )
    options: dict[str, Any] = {"bias": bias, "ignore_index": IGNORE_INDEX, "reduction": "sum"}
    if "accum_dtype" in inspect.signature(function).parameters:
        options["accum_dtype"] = torch.float32  # weight/bias gradients summed over chunks in float32, as ours
    return function(hidden, weight, targets, **options)


def _liger_function() -> Callable[..., torch.Tensor]:
    """Liger-Kernel's functional fused linear cross-entropy, or a `ConfigError` saying how to install it."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as error:
        raise ConfigError(
            "strategy.loss_kernel=liger needs the liger-kernel package (pip install liger-kernel); or use "
            f"strategy.loss_kernel=chunked, its PyTorch equivalent ({error})"
        ) from None
    return liger_fused_linear_cross_entropy


FUSED_KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "chunked": chunked_linear_cross_entropy,
    "liger": liger_linear_cross_entropy,
}
