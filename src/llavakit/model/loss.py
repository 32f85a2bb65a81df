"""The training loss from the supervised positions only.

Why not the LLM's own loss: it projects every position onto the vocabulary, ``[B, L, V]`` logits, and then ignores
all but the answer tokens. In LLaVA data the answers are a small share of the sequence (576-2880 image tokens and a
system prompt come first), so most of that projection, its float32 log-softmax and their backward are wasted: for a
Qwen2 LLM (V = 151,936) one 4k-token sample's float32 logits alone take 2.5 GB. Here the LLM is asked, through
transformers' own ``logits_to_keep``, for the logits of the supervised positions only, ``[N, V]``, so its family's
logit post-processing (soft-capping, scaling) still applies, and the loss is transformers' causal-LM loss on them:
the same value, the same gradients.

With a fused kernel (``strategy.loss_kernel`` ``chunked`` or ``liger``, `llavakit.model.fused_loss`) even the
``[N, V]`` logits are never held: the LLM's decoder gives the last hidden states, the supervised rows ``[N, D]`` are
selected, and the cross-entropy against the LM head is computed chunk by chunk. That bypasses the LLM's own head
code, so LLMs whose head post-processes the logits (a config field in `HEAD_TRANSFORMS`) are refused.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers import modeling_utils

from llavakit.errors import ConfigError
from llavakit.model.fused_loss import FUSED_KERNELS, IGNORE_INDEX

LOSS_KERNELS = ("logits", *FUSED_KERNELS)
# Whether this transformers takes a per-row boolean [B, L] logits_to_keep (see `_supervised_logits`).
_ROW_MASKS = hasattr(modeling_utils, "slice_logits_to_keep")

# transformers causal-LM config fields that change the logits after (or the hidden states before) the LM-head matmul,
# with their neutral values. Found in transformers 5.25's causal LMs: soft-capping in Gemma 2/3, RecurrentGemma and
# xLSTM; logit scales in Cohere, Granite, MiniCPM3, HyperCLOVAX, FalconH1, Muse and Inkling (which also cuts the
# vocabulary to its unpadded size).
HEAD_TRANSFORMS: dict[str, tuple[object, ...]] = {
    "final_logit_softcapping": (None,),
    "logits_soft_cap": (None,),
    "output_logit_soft_cap": (None,),
    "logit_scale": (None, 1),
    "logits_scaling": (None, 1),
    "lm_head_multiplier": (None, 1),
    "output_multiplier": (None, 1),
    "logits_mup_width_multiplier": (None, 1),
    "unpadded_vocab_size": (None,),
}


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
    kernel: str = "logits",
    **llm_kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal-LM loss of ``llm`` from the supervised positions only.

    Args:
        llm: a transformers causal LM whose forward takes ``logits_to_keep`` (or a peft model around one).
        inputs_embeds: ``[B, L, D]``.
        labels: ``[B, L]``, as for the LLM's own loss.
        num_items_in_batch: divide the summed loss by this (gradient accumulation, transformers semantics);
            None: the mean over supervised tokens.
        kernel: one of `LOSS_KERNELS`: ``logits`` (the ``[N, V]`` logits, then cross-entropy), ``chunked`` or
            ``liger`` (fused linear cross-entropy, `llavakit.model.fused_loss`).
        llm_kwargs: ``attention_mask``, ``position_ids`` ... passed to the LLM (to its decoder with a fused kernel).

    Returns:
        ``(loss, logits)``: the scalar loss and the ``[N, V]`` logits of the N supervised positions, in row-major
        order of `supervised_mask`; logits is None with a fused kernel.

    Raises:
        ConfigError: an unknown kernel, or a fused kernel for an LLM whose head post-processes the logits or is
            not a plain linear layer.
    """
    if kernel not in LOSS_KERNELS:
        raise ConfigError(f"strategy.loss_kernel {kernel!r} is not one of {LOSS_KERNELS}")
    if kernel != "logits":
        return _fused_lm_loss(llm, inputs_embeds, labels, num_items_in_batch, kernel, llm_kwargs), None
    mask = supervised_mask(labels)
    logits = _supervised_logits(llm, inputs_embeds, mask, llm_kwargs)
    targets = labels[:, 1:][mask[:, :-1]]
    if num_items_in_batch is None:
        return F.cross_entropy(logits.float(), targets), logits
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch, logits


def _supervised_logits(
    llm: nn.Module, inputs_embeds: torch.Tensor, mask: torch.Tensor, llm_kwargs: dict
) -> torch.Tensor:
    """The ``[N, V]`` logits at ``mask`` (``[B, L]``), in row-major order, through the LLM's own head code.

    transformers takes a ``[B, L]`` boolean ``logits_to_keep`` from 5.2x on (`slice_logits_to_keep`); earlier 5.x
    releases take only positions shared by every row. There the logits are asked for at the union of the rows'
    supervised positions, ``[B, K, V]``, and each row's own are kept: the same values, more head work only when
    the rows of a padded batch supervise different positions (never for one row: packing, padding-free,
    micro-batches of 1).
    """
    kwargs = {"use_cache": False, **llm_kwargs}
    if _ROW_MASKS:
        logits = llm(inputs_embeds=inputs_embeds, logits_to_keep=mask, **kwargs).logits
    else:
        columns = mask.any(dim=0).nonzero().squeeze(1)
        logits = llm(inputs_embeds=inputs_embeds, logits_to_keep=columns, **kwargs).logits[mask[:, columns]]
    if logits.dim() != 2 or logits.shape[0] != int(mask.sum()):
        raise TypeError(
            f"{type(llm).__name__} returned logits of shape {tuple(logits.shape)} for {int(mask.sum())} "
            "supervised positions; it does not support supervised-only logits (logits_to_keep)"
        )
    return logits


def _fused_lm_loss(
    llm: nn.Module,
    inputs_embeds: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None,
    kernel: str,
    llm_kwargs: dict,
) -> torch.Tensor:
    """The loss of `supervised_lm_loss` from the decoder's last hidden states through a fused kernel."""
    decoder, head = _decoder_and_head(llm, kernel)
    mask = supervised_mask(labels)
    output = decoder(inputs_embeds=inputs_embeds, **{"use_cache": False, **llm_kwargs})
    hidden = output.last_hidden_state[mask]
    targets = labels[:, 1:][mask[:, :-1]]
    loss = FUSED_KERNELS[kernel](hidden, head.weight, targets, bias=head.bias)
    if num_items_in_batch is None:
        return loss / targets.numel()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def _decoder_and_head(llm: nn.Module, kernel: str) -> tuple[nn.Module, nn.Linear]:
    """The module giving ``llm``'s last hidden states and its plain linear LM head (through a peft wrapper).

    Raises:
        ConfigError: the LLM's config post-processes the logits, or its head is not a plain floating-point
            ``nn.Linear`` (e.g. LoRA or quantisation on the head), or it has no separate decoder module.
    """
    model = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    config = model.config.get_text_config()
    fix = f"strategy.loss_kernel={kernel} bypasses the LLM's own head code: use strategy.loss_kernel=logits"
    for name, neutral in HEAD_TRANSFORMS.items():
        value = getattr(config, name, None)
        if value not in neutral:
            raise ConfigError(
                f"{type(model).__name__} post-processes its logits ({config.model_type} config {name}={value}); {fix}"
            )
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or not head.weight.is_floating_point():
        raise ConfigError(
            f"{type(model).__name__}'s LM head is a {type(head).__name__}, not a plain nn.Linear (LoRA or "
            f"quantisation on the head?); {fix}"
        )
    decoder = model.get_decoder()
    if decoder is model:
        raise ConfigError(f"{type(model).__name__} has no decoder module apart from its head; {fix}")
    return decoder, head
