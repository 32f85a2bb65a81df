"""The training loss from the supervised positions only.

Why not the LLM's own loss: it projects every position onto the vocabulary, ``[B, L, V]`` logits, and then ignores
all but the answer tokens. In LLaVA data the answers are a small share of the sequence (576-2880 image tokens and a
system prompt come first), so most of that projection, its float32 log-softmax and their backward are wasted: for a
Qwen2 LLM (V = 151,936) one 4k-token sample's float32 logits alone take 2.5 GB. Here the LLM is asked, through
transformers' own ``logits_to_keep``, for the logits of the supervised positions only, ``[N, V]``, so its family's
logit post-processing (soft-capping, scaling) still applies, and the loss is transformers' causal-LM loss on them:
the same value, the same gradients.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

IGNORE_INDEX = -100


def supervised_mask(labels: torch.Tensor) -> torch.Tensor:
    """Which positions predict a supervised token.

    Args:
        labels: ``[B, L]`` token ids, ``IGNORE_INDEX`` where not supervised (unshifted, transformers convention).

    Returns:
        ``[B, L]`` bool: position ``t`` is True when ``labels[:, t + 1]`` is supervised (the last never is).
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def supervised_lm_loss(
    llm: nn.Module,
    inputs_embeds: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    **llm_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal-LM loss of ``llm`` from the logits of the supervised positions only.

    Args:
        llm: a transformers causal LM whose forward takes ``logits_to_keep``.
        inputs_embeds: ``[B, L, D]``.
        labels: ``[B, L]``, as for the LLM's own loss.
        num_items_in_batch: divide the summed loss by this (gradient accumulation, transformers semantics);
            None: the mean over supervised tokens.
        llm_kwargs: ``attention_mask``, ``position_ids`` ... passed to the LLM.

    Returns:
        ``(loss, logits)``: the scalar loss and the ``[N, V]`` logits of the N supervised positions, in row-major
        order of `supervised_mask`.
    """
    mask = supervised_mask(labels)
    output = llm(inputs_embeds=inputs_embeds, logits_to_keep=mask, **{"use_cache": False, **llm_kwargs})
    logits = output.logits
    if logits.dim() != 2 or logits.shape[0] != int(mask.sum()):
        raise TypeError(
            f"{type(llm).__name__} returned logits of shape {tuple(logits.shape)} for a boolean logits_to_keep "
            f"mask of {int(mask.sum())} positions; it does not support supervised-only logits"
        )
    targets = labels[:, 1:][mask[:, :-1]]
    if num_items_in_batch is None:
        return F.cross_entropy(logits.float(), targets), logits
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch, logits
