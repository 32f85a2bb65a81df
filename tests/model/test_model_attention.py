"""``sdpa_varlen``: packed rows get exactly the outputs and gradients of transformers' block-diagonal-mask sdpa;
everything else (padding masks, KV-cache generation) is transformers' sdpa itself."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from llavakit.data.packing import PackingCollator
from llavakit.data.tokenize import IGNORE_INDEX
from llavakit.model import attention

VOCAB = 61
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def tiny_llm(family: str, attn: str, **extra):
    attention.register()
    config_class, model_class = FAMILIES[family]
    torch.manual_seed(0)
    config = config_class(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention: key/value heads are repeated
        max_position_embeddings=64,
        attn_implementation=attn,
        **extra,
    )
    return model_class(config)


def examples(lengths, seed=1):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for length in lengths:
        ids = torch.randint(1, VOCAB, (length,), generator=generator)
        labels = ids.clone()
        labels[: length // 3] = IGNORE_INDEX
        out.append(
            {"id": str(length), "input_ids": ids, "labels": labels, "pixel_values": None, "image_sizes": [], "image_tiled": []}
        )
    return out


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**{k: batch[k] for k in ("input_ids", "labels", "position_ids")}, **_mask(batch), use_cache=False)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters()}


def _mask(batch):
    return {"attention_mask": batch["attention_mask"]} if "attention_mask" in batch else {}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_rows_match_block_diagonal_sdpa_in_outputs_and_gradients(family):
    packs = [examples([9, 7, 5]), examples([11, 3], seed=2)]  # the second row ends in trailing padding
    masked = PackingCollator(pad_token_id=0, attn_implementation="sdpa")(packs)
    varlen = PackingCollator(pad_token_id=0, attn_implementation="sdpa_varlen")(packs)
    assert "attention_mask" in masked and "attention_mask" not in varlen
    reference, reference_grads = loss_and_grads(tiny_llm(family, "sdpa").train(), masked)
    out, grads = loss_and_grads(tiny_llm(family, "sdpa_varlen").train(), varlen)
    real = masked["input_ids"] != 0
    torch.testing.assert_close(out.logits[real], reference.logits[real], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.loss, reference.loss, atol=1e-6, rtol=1e-5)
    assert reference_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_samples_do_not_see_each_other():
    model = tiny_llm("llama", "sdpa_varlen").eval()
    first, second = examples([6, 8])
    changed = {**first, "input_ids": torch.randint(1, VOCAB, (6,), generator=torch.Generator().manual_seed(9))}
    collate = PackingCollator(pad_token_id=0, attn_implementation="sdpa_varlen")
    with torch.no_grad():
        a = model(**{k: v for k, v in collate([[first, second]]).items() if k in ("input_ids", "position_ids")})
        b = model(**{k: v for k, v in collate([[changed, second]]).items() if k in ("input_ids", "position_ids")})
    torch.testing.assert_close(a.logits[0, 6:], b.logits[0, 6:])
    assert not torch.allclose(a.logits[0, :6], b.logits[0, :6])


def test_padded_generation_is_sdpas():
    prompts = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(prompts)
    prompts[0, :3], mask[0, :3] = 0, 0  # left padding, as batched generation uses
    outputs = []
    for attn in ("sdpa", "sdpa_varlen"):
        model = tiny_llm("llama", attn).eval()
        generated = model.generate(
            input_ids=prompts,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
        outputs.append(generated)
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    for sdpa_scores, varlen_scores in zip(outputs[0].scores, outputs[1].scores, strict=True):
        torch.testing.assert_close(varlen_scores, sdpa_scores)


def _logits(model, **inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_sliding_window_shorter_than_the_row_is_sdpas_mask():
    # A window of 4: a lone 10-token sample, and a packed row whose samples are longer than the window.
    models = [tiny_llm("mistral", attn, sliding_window=4).eval() for attn in ("sdpa", "sdpa_varlen")]
    lone = torch.randint(1, VOCAB, (1, 10), generator=torch.Generator().manual_seed(4))
    row = PackingCollator(pad_token_id=0, attn_implementation="sdpa_varlen")([examples([6, 7])])
    for inputs in ({"input_ids": lone}, {"input_ids": row["input_ids"], "position_ids": row["position_ids"]}):
        reference, ours = (_logits(model, **inputs, use_cache=False) for model in models)
        torch.testing.assert_close(ours, reference)


def test_cached_continuation_without_a_mask_is_sdpas():
    ids = torch.randint(1, VOCAB, (1, 10), generator=torch.Generator().manual_seed(5))
    for attn in ("sdpa", "sdpa_varlen"):
        model = tiny_llm("llama", attn).eval()
        with torch.no_grad():
            cache = model(input_ids=ids[:, :6], use_cache=True).past_key_values
            chunked = model(input_ids=ids[:, 6:], past_key_values=cache, use_cache=True).logits
        torch.testing.assert_close(chunked[0], _logits(model, input_ids=ids)[0, 6:], atol=1e-5, rtol=1e-4)


def test_shared_position_ids_split_every_row():
    # position_ids [1, T] for a batch of 2 rows, as transformers accepts: both rows hold the samples 0..3 and 0..2.
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(6))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    reference, ours = (
        _logits(tiny_llm("llama", attn).eval(), input_ids=ids, position_ids=positions, use_cache=False)
        for attn in ("sdpa", "sdpa_varlen")
    )
    torch.testing.assert_close(ours, reference)
    alone = _logits(tiny_llm("llama", "sdpa").eval(), input_ids=ids[:, 4:])
    torch.testing.assert_close(ours[:, 4:], alone, atol=1e-5, rtol=1e-4)


def test_sample_lengths():
    assert attention.sample_lengths(torch.tensor([[0, 1, 2, 0, 1, 0]]), 1) == [[3, 2, 1]]
    assert attention.sample_lengths(torch.tensor([[0, 1], [0, 0]]), 2) == [[2], [1, 1]]
    assert attention.sample_lengths(torch.tensor([4, 5, 0, 1]), 1) == [[2, 2]]
    # transformers' rule for sdpa: any jump other than +1 starts a sample, not only a return to 0.
    assert attention.sample_lengths(torch.tensor([[0, 1, 2, 3, 10, 11]]), 1) == [[4, 2]]
    assert attention.sample_lengths(torch.tensor([[0, 1, 0]]), 2) == [[2, 1], [2, 1]]
