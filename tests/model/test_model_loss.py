"""The supervised-positions loss equals transformers' own causal-LM loss: value and gradients, padded batches,
gradient-accumulation normalisation, tied embeddings, and a family whose logits are post-processed (soft-capping)."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, modeling_utils

from llavakit.model import loss as loss_module
from llavakit.model.loss import IGNORE_INDEX, supervised_lm_loss, supervised_mask


@pytest.fixture(params=[True, False], ids=["row-masks", "shared-positions"])
def row_masks(request, monkeypatch):
    """Both ways of asking transformers for supervised logits: a per-row mask (transformers >= 5.2x) and the union
    of the rows' positions (earlier 5.x), whichever the installed transformers takes."""
    if request.param and not hasattr(modeling_utils, "slice_logits_to_keep"):
        pytest.skip("this transformers release takes no per-row logits_to_keep mask")
    monkeypatch.setattr(loss_module, "_ROW_MASKS", request.param)
    return request.param


def _padded_batch(vocab_size: int, lengths=(23, 17, 9), seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded rows whose first third is unsupervised (a prompt) and whose padding is unsupervised."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, vocab_size, (len(lengths), width), generator=generator)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
        labels[row, length // 3 : length] = ids[row, length // 3 : length]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, **kwargs).loss
    loss.backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    return loss.detach(), grads


def test_supervised_mask_marks_positions_that_predict_a_label():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6, IGNORE_INDEX], [IGNORE_INDEX, 7, IGNORE_INDEX, 8, 9]])
    assert supervised_mask(labels).tolist() == [[False, True, True, False, False], [True, False, True, True, False]]


@pytest.mark.parametrize("name", ["debug-clip-llama", "debug-siglip-qwen2"])
@pytest.mark.parametrize("num_items", [None, 40])
def test_same_loss_and_gradients_as_the_full_logits(preset_model, name, num_items, row_masks):
    model = preset_model(name).train()
    batch = _padded_batch(model.llm.config.vocab_size)
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    full_loss, full_grads = _loss_and_grads(model, batch, **extra)
    loss, grads = _loss_and_grads(model, batch, supervised_logits_only=True, **extra)
    torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == full_grads.keys() and grads
    for key, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[key], rtol=1e-4, atol=1e-6, msg=key)


def test_logits_are_those_of_the_supervised_positions(preset_model, row_masks):
    model = preset_model("debug-clip-llama")
    batch = _padded_batch(model.llm.config.vocab_size)
    with torch.no_grad():
        full = model(**batch).logits
        kept = model(**batch, supervised_logits_only=True).logits
    mask = supervised_mask(batch["labels"])
    assert kept.shape == (int(mask.sum()), full.shape[-1])
    torch.testing.assert_close(kept, full[mask], rtol=1e-5, atol=1e-5)


def test_family_logit_softcapping_still_applies(row_masks):
    config = Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5, attn_implementation="eager",
    )
    torch.manual_seed(0)
    llm = Gemma2ForCausalLM(config).eval()
    batch = _padded_batch(config.vocab_size)
    embeds = llm.get_input_embeddings()(batch["input_ids"])
    with torch.no_grad():
        expected = llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss, logits = supervised_lm_loss(llm, embeds, batch["labels"], attention_mask=batch["attention_mask"])
    assert logits.abs().max() <= 0.5
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
