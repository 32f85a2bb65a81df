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


def test_varlen_kwargs_number_the_samples_of_all_rows_in_flattened_order():
    kwargs = attention.varlen_kwargs(torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]), 2)
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 5, 10]
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32 and kwargs["cu_seq_lens_k"] is kwargs["cu_seq_lens_q"]
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 5


def test_cpu_and_fp32_run_one_sdpa_call_per_sample():
    query = torch.zeros(1, 2, 4, 8)
    assert attention.varlen_kernel_name(query) == "sdpa_per_sample"
    assert attention.varlen_kernel_name(query.bfloat16()) == "sdpa_per_sample"


def test_precomputed_boundaries_give_the_same_outputs_and_are_read_once(monkeypatch):
    packs = [examples([9, 7, 5]), examples([11, 3], seed=2)]
    batch = PackingCollator(pad_token_id=0, attn_implementation="sdpa_varlen")(packs)
    model = tiny_llm("qwen2", "sdpa_varlen").eval()
    inputs = {key: batch[key] for key in ("input_ids", "position_ids")}
    derived = _logits(model, **inputs, use_cache=False)
    calls = []
    original = attention.sample_lengths
    monkeypatch.setattr(attention, "sample_lengths", lambda *args: calls.append(args) or original(*args))
    given = _logits(model, **inputs, **attention.varlen_kwargs(batch["position_ids"], 2), use_cache=False)
    torch.testing.assert_close(given, derived)
    assert len(calls) == 1  # the varlen_kwargs call above; no layer reads position_ids again


def test_llava_forward_reads_sample_boundaries_once_per_pass(preset_model, monkeypatch):
    model = preset_model("debug-siglip-qwen2")
    model.llm.config._attn_implementation = "sdpa_varlen"
    packs = [examples([9, 7, 5]), examples([11, 3], seed=2)]
    batch = PackingCollator(pad_token_id=0, attn_implementation="sdpa_varlen")(packs)
    text_only = batch["input_ids"].masked_fill(batch["input_ids"] == model.config.image_token_id, 1)
    calls = []
    original = attention.sample_lengths
    monkeypatch.setattr(attention, "sample_lengths", lambda *args: calls.append(args) or original(*args))
    with torch.no_grad():
        packed = model(input_ids=text_only, position_ids=batch["position_ids"], use_cache=False).logits
    assert len(calls) == 1
    alone = text_only[:1, :9]
    with torch.no_grad():
        reference = model(input_ids=alone, use_cache=False).logits
    torch.testing.assert_close(packed[:1, :9], reference, atol=1e-5, rtol=1e-4)


def _reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, **causal):
    """varlen_attn's documented contract on ``[T, H, D]`` tokens, computed sample by sample with SDPA (CPU)."""
    assert causal.get("is_causal", False) or causal.get("window_size") == (-1, 0)
    assert torch.equal(cu_seq_q, cu_seq_k) and max_q == max_k == int((cu_seq_q[1:] - cu_seq_q[:-1]).max())
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        assert causal.get("enable_gqa"), "fewer key/value heads need enable_gqa"
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    bounds = cu_seq_q.tolist()
    outputs = [
        torch.nn.functional.scaled_dot_product_attention(
            *(t[start:end].transpose(0, 1) for t in (query, key, value)), is_causal=True, scale=scale
        ).transpose(0, 1)
        for start, end in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outputs)


@pytest.mark.parametrize("causal", [{"window_size": (-1, 0), "enable_gqa": True}, {"is_causal": True}])
def test_the_flash_varlen_call_flattens_rows_and_heads_as_the_kernel_expects(monkeypatch, causal):
    # varlen_attn runs on CUDA only; its documented contract, emulated here, checks how llavakit calls it (both
    # spellings of causality across torch versions, grouped key/value heads repeated where enable_gqa is absent).
    monkeypatch.setattr(attention, "_VARLEN_ATTN", (_reference_varlen_attn, causal))
    packs = [examples([9, 7, 5]), examples([11, 3], seed=2)]
    batch = PackingCollator(pad_token_id=0, attn_implementation="sdpa_varlen")(packs)
    model = tiny_llm("qwen2", "sdpa_varlen").eval()
    layer = model.model.layers[0].self_attn
    generator = torch.Generator().manual_seed(7)
    query = torch.randn(2, 4, 21, 8, generator=generator)
    key, value = torch.randn(2, 2, 21, 8, generator=generator), torch.randn(2, 2, 21, 8, generator=generator)
    kwargs = attention.varlen_kwargs(batch["position_ids"], 2)
    flash = attention._flash_varlen(layer, query, key, value, 0.3, kwargs)
    per_sample = attention._sdpa_per_sample(layer, query, key, value, 0.0, 0.3, kwargs["cu_seq_lens_q"])
    torch.testing.assert_close(flash, per_sample)


def test_the_flash_varlen_call_computes_in_autocasts_dtype(monkeypatch):
    # Under bf16 autocast, RoPE's float32 tables promote query and key to float32 while value stays bf16; SDPA
    # would cast all three to bf16 itself, and the varlen kernel (unknown to autocast) must get bf16 too.
    seen = []

    def spy(query, key, value, *args, **kwargs):
        seen.append((query.dtype, key.dtype, value.dtype))
        return _reference_varlen_attn(query, key, value, *args, **kwargs)

    monkeypatch.setattr(attention, "_VARLEN_ATTN", (spy, {"window_size": (-1, 0), "enable_gqa": True}))
    layer = tiny_llm("qwen2", "sdpa_varlen").model.layers[0].self_attn
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    query, key = torch.randn(1, 4, 7, 8), torch.randn(1, 2, 7, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention._half_dtype(query) == torch.bfloat16
        out = attention._flash_varlen(
            layer, query, key, key.bfloat16(), None, attention.varlen_kwargs(positions, 1)
        )
    assert seen == [(torch.bfloat16,) * 3] and out.dtype == torch.bfloat16
    assert attention._half_dtype(query) is None  # float32 outside autocast: one SDPA call per sample
