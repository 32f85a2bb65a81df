"""The fused linear cross-entropy kernels give the loss and gradients of the supervised-positions logits path:
padded and packed (padding-free) batches, gradient-accumulation normalisation, chunk boundaries, bf16 autocast,
frozen and tied heads, a LoRA-wrapped LLM; and the refusals (logit post-processing, Liger on CPU or missing)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch.nn import functional as F
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
)

from llavakit.errors import ConfigError
from llavakit.model import fused_loss
from llavakit.model.attention import varlen_kwargs
from llavakit.model.fused_loss import chunked_linear_cross_entropy
from llavakit.model.llava_next import LlavaNextModel
from llavakit.model.loss import IGNORE_INDEX, supervised_lm_loss
from llavakit.training.config import LoraConfig
from llavakit.training.lora import apply_lora

PRESETS = ["debug-clip-llama", "debug-siglip-qwen2"]


@pytest.fixture
def varlen_model(preset_parts):
    """``varlen_model(name)`` → a preset model with ``sdpa_varlen`` attention, in train mode."""

    def build(name: str, seed: int = 0) -> LlavaNextModel:
        torch.manual_seed(seed)
        kwargs = preset_parts(name).from_parts_kwargs()
        return LlavaNextModel.from_parts(**kwargs, attn_implementation="sdpa_varlen").train()

    return build


def _spans(labels: torch.Tensor, ids: torch.Tensor, row: int, spans: list[tuple[int, int]]) -> None:
    for start, end in spans:
        labels[row, start:end] = ids[row, start:end]


def _padded_batch(vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded rows, each with several supervised spans (multi-turn answers) between unsupervised tokens."""
    generator = torch.Generator().manual_seed(seed)
    lengths, spans = (29, 21, 12), ([(5, 9), (14, 20), (24, 29)], [(3, 6), (10, 18)], [(6, 12)])
    ids = torch.randint(3, vocab_size, (len(lengths), max(lengths)), generator=generator)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
        _spans(labels, ids, row, spans[row])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _packed_batch(vocab_size: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """One padding-free row of three samples (positions restart) and the varlen keywords of its boundaries."""
    generator = torch.Generator().manual_seed(seed)
    lengths = (13, 9, 16)
    ids = torch.randint(3, vocab_size, (1, sum(lengths)), generator=generator)
    positions = torch.cat([torch.arange(length) for length in lengths]).unsqueeze(0)
    labels = torch.full_like(ids, IGNORE_INDEX)
    _spans(labels, ids, 0, [(4, 9), (10, 13), (17, 22), (28, 38)])
    return {"input_ids": ids, "position_ids": positions, "labels": labels, **varlen_kwargs(positions, 1)}


BATCHES = {"padded": _padded_batch, "packed": _packed_batch}


def _loss_and_grads(model, batch, kernel: str, **kwargs):
    model.zero_grad(set_to_none=True)
    output = model(**batch, supervised_logits_only=True, loss_kernel=kernel, **kwargs)
    output.loss.backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    return output, grads


def _assert_same(model, batch, rtol: float = 1e-5, grad_rtol: float = 1e-4, **kwargs) -> dict:
    reference, expected = _loss_and_grads(model, batch, "logits", **kwargs)
    output, grads = _loss_and_grads(model, batch, "chunked", **kwargs)
    assert output.logits is None and reference.logits is not None
    torch.testing.assert_close(output.loss, reference.loss, rtol=rtol, atol=1e-7)
    assert grads.keys() == expected.keys() and grads
    for key, grad in grads.items():
        torch.testing.assert_close(grad, expected[key], rtol=grad_rtol, atol=1e-6, msg=key)
    return grads


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("kind", sorted(BATCHES))
def test_chunked_gives_the_loss_and_gradients_of_the_logits(varlen_model, name, kind):
    model = varlen_model(name)
    batch = BATCHES[kind](model.llm.config.vocab_size)
    grads = _assert_same(model, batch)
    head = model.llm.get_output_embeddings().weight
    tied = head is model.llm.get_input_embeddings().weight
    assert tied == (name == "debug-siglip-qwen2")  # the tied case: head and embedding gradients summed
    assert any(key.startswith("llm.") and key.endswith("embed_tokens.weight") for key in grads)
    _assert_same(model, batch, num_items_in_batch=torch.tensor(40))


def test_num_items_in_batch_divides_the_summed_loss(varlen_model):
    model = varlen_model("debug-clip-llama")
    batch = _padded_batch(model.llm.config.vocab_size)
    supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    with torch.no_grad():
        mean = model(**batch, supervised_logits_only=True, loss_kernel="chunked").loss
        divided = model(**batch, supervised_logits_only=True, loss_kernel="chunked", num_items_in_batch=7)
    torch.testing.assert_close(divided.loss * 7, mean * supervised, rtol=1e-6, atol=0)


@pytest.mark.parametrize("budget_rows", [1, 5])
def test_many_chunks_through_the_model(varlen_model, monkeypatch, budget_rows):
    # 40 supervised rows in chunks of 1 (one chunk per row) and 5 (N a multiple) plus the check below for 7.
    model = varlen_model("debug-siglip-qwen2")
    monkeypatch.setattr(fused_loss, "CHUNK_LOGITS_BYTES", budget_rows * model.llm.config.vocab_size * 4)
    assert fused_loss.chunk_rows(model.llm.config.vocab_size) == budget_rows
    _assert_same(model, _padded_batch(model.llm.config.vocab_size))


def test_chunk_rows_fill_the_byte_budget_in_aligned_rows():
    budget = fused_loss.CHUNK_LOGITS_BYTES
    for vocab_size in (151936, 32000):
        rows = fused_loss.chunk_rows(vocab_size)
        assert rows % fused_loss.ROW_ALIGNMENT == 0
        assert rows * vocab_size * 4 <= budget < (rows + fused_loss.ROW_ALIGNMENT) * vocab_size * 4
    assert fused_loss.chunk_rows(100, budget_bytes=100 * 4 * 5) == 5  # small chunks stay exact
    assert fused_loss.chunk_rows(10**9, budget_bytes=1) == 1


@pytest.mark.parametrize("rows", [None, 1, 7, 37, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunk_boundaries_and_ignored_rows_match_plain_cross_entropy(rows, with_bias):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    bias = torch.randn(50, generator=generator, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 50, (37,), generator=generator)
    targets[[0, 8, 36]] = IGNORE_INDEX
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    expected = F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum")
    expected_grads = torch.autograd.grad(expected * 0.25, inputs)
    loss = chunked_linear_cross_entropy(hidden, weight, targets, bias=bias, rows=rows)
    grads = torch.autograd.grad(loss * 0.25, inputs)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for grad, reference in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-6)
    assert grads[0][[0, 8, 36]].abs().max() == 0


@pytest.mark.parametrize("name", PRESETS)
def test_bf16_autocast_within_rounding_of_the_logits(varlen_model, monkeypatch, name):
    # Both paths compute the head in bf16 and the softmax in fp32. In chunks of 7 rows the head-weight gradient is
    # summed from bf16 chunk products (0.2 % apart from one bf16 matmul here); every other gradient comes out the
    # same. Computing the head in fp32 instead (ignoring autocast) moves the gradients by 1-2 %.
    model = varlen_model(name)
    monkeypatch.setattr(fused_loss, "CHUNK_LOGITS_BYTES", 7 * model.llm.config.vocab_size * 4)
    batch = _padded_batch(model.llm.config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference, expected = _loss_and_grads(model, batch, "logits")
        output, grads = _loss_and_grads(model, batch, "chunked")
    torch.testing.assert_close(output.loss, reference.loss, rtol=1e-5, atol=0)
    head = model.llm.get_output_embeddings().weight
    head_key = next(key for key, param in model.named_parameters() if param is head)
    assert grads.keys() == expected.keys()
    for key, grad in grads.items():
        assert grad.dtype == expected[key].dtype == torch.float32
        error = (grad - expected[key]).norm() / expected[key].norm().clamp_min(1e-12)
        assert error < (5e-3 if key == head_key else 1e-4), key


def test_bf16_inputs_give_bf16_gradients_accumulated_in_float32():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1000, 32, generator=generator).bfloat16().requires_grad_()
    weight = (torch.randn(40, 32, generator=generator) / 4).bfloat16().requires_grad_()
    targets = torch.randint(0, 40, (1000,), generator=generator)
    loss = chunked_linear_cross_entropy(hidden, weight, targets, rows=1)
    loss.backward()
    assert loss.dtype == torch.float32 and hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    # The oracle: float32 math on the same bf16 values. Each gradient is within 0.3 % of it (its bf16 rounding);
    # summing the 1000 one-row weight-gradient chunks in bf16 instead would be ~3 % off.
    hidden32, weight32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    expected = F.cross_entropy(hidden32 @ weight32.t(), targets, reduction="sum")
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=0)
    assert (weight.grad.float() - weight32.grad).norm() / weight32.grad.norm() < 5e-3
    assert (hidden.grad.float() - hidden32.grad).norm() / hidden32.grad.norm() < 5e-3


def test_frozen_head_gets_no_weight_gradient(varlen_model, monkeypatch):
    model = varlen_model("debug-clip-llama")
    for param in model.llm.parameters():
        param.requires_grad_(False)  # an align stage: only the projector trains
    seen = []
    forward = fused_loss._chunked_forward

    def spy(*args):
        seen.append(args[-1])
        return forward(*args)

    monkeypatch.setattr(fused_loss, "_chunked_forward", spy)
    grads = _assert_same(model, _padded_batch(model.llm.config.vocab_size))
    assert seen == [(True, False, False)]
    assert any(key.startswith("projector.") for key in grads)
    assert not any(key.startswith("llm.") for key in grads)


def test_lora_wrapped_llm_gives_the_same_loss_and_gradients(varlen_model):
    model = varlen_model("debug-siglip-qwen2")
    apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    torch.manual_seed(1)
    # peft starts B at zero: make the adapters change the output, so that bypassing them would show.
    for name, param in model.llm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    batch = _padded_batch(model.llm.config.vocab_size)
    grads = _assert_same(model, batch)
    assert any("lora_A" in key for key in grads) and any("lora_B" in key for key in grads)
    with torch.no_grad():
        with model.llm.disable_adapter():
            plain = model(**batch, supervised_logits_only=True, loss_kernel="chunked").loss
        adapted = model(**batch, supervised_logits_only=True, loss_kernel="chunked").loss
    assert abs(float(plain) - float(adapted)) > 1e-3


def test_lora_on_the_head_is_refused(varlen_model):
    model = varlen_model("debug-clip-llama")
    apply_lora(model, LoraConfig(enabled=True, r=4, target_modules=("q_proj", "lm_head")))
    batch = _padded_batch(model.llm.config.vocab_size)
    with pytest.raises(ConfigError, match="not a plain nn.Linear.*strategy.loss_kernel=logits"):
        model(**batch, supervised_logits_only=True, loss_kernel="chunked")


def _tiny(config_class, model_class, **fields):
    config = config_class(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        attn_implementation="eager",
        **fields,
    )
    torch.manual_seed(0)
    return model_class(config).eval()


POST_PROCESSING = {
    "final_logit_softcapping": (Gemma2Config, Gemma2ForCausalLM, {"final_logit_softcapping": 0.5}),
    "logit_scale": (CohereConfig, CohereForCausalLM, {"logit_scale": 0.0625}),
    "logits_scaling": (GraniteConfig, GraniteForCausalLM, {"logits_scaling": 8.0}),
}


@pytest.mark.parametrize("field", sorted(POST_PROCESSING))
@pytest.mark.parametrize("kernel", ["chunked", "liger"])
def test_llms_that_post_process_their_logits_are_refused(field, kernel):
    config_class, model_class, fields = POST_PROCESSING[field]
    llm = _tiny(config_class, model_class, **fields)
    batch = _padded_batch(64)
    embeds = llm.get_input_embeddings()(batch["input_ids"])
    mask = batch["attention_mask"]
    with pytest.raises(ConfigError, match=f"{field}=.*use strategy.loss_kernel=logits"):
        supervised_lm_loss(llm, embeds, batch["labels"], kernel=kernel, attention_mask=mask)


def test_the_same_family_without_post_processing_is_accepted():
    llm = _tiny(Gemma2Config, Gemma2ForCausalLM, final_logit_softcapping=None).train()
    batch = _padded_batch(64)
    embeds = llm.get_input_embeddings()(batch["input_ids"])
    kwargs = {"attention_mask": batch["attention_mask"]}
    expected, _ = supervised_lm_loss(llm, embeds, batch["labels"], **kwargs)
    loss, logits = supervised_lm_loss(llm, embeds, batch["labels"], kernel="chunked", **kwargs)
    assert logits is None
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)


def test_unknown_kernel_is_refused(preset_model):
    model = preset_model("debug-clip-llama")
    batch = _padded_batch(model.llm.config.vocab_size)
    with pytest.raises(ConfigError, match="strategy.loss_kernel 'fused' is not one of"):
        model(**batch, supervised_logits_only=True, loss_kernel="fused")


def test_liger_without_the_package_says_how_to_install_it(preset_model, monkeypatch):
    for module in ("liger_kernel", "liger_kernel.transformers", "liger_kernel.transformers.functional"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails even where liger-kernel is installed
    model = preset_model("debug-clip-llama")
    batch = _padded_batch(model.llm.config.vocab_size)
    with pytest.raises(ConfigError, match=r"pip install liger-kernel"):
        model(**batch, supervised_logits_only=True, loss_kernel="liger")


def test_liger_on_cpu_is_refused_before_any_triton_call(preset_model, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("Liger's kernel was called on CPU tensors")

    functional = types.ModuleType("liger_kernel.transformers.functional")
    functional.liger_fused_linear_cross_entropy = never
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, functional.__name__, functional)
    model = preset_model("debug-clip-llama")
    batch = _padded_batch(model.llm.config.vocab_size)
    with pytest.raises(ConfigError, match="need a CUDA device.*strategy.loss_kernel=chunked"):
        model(**batch, supervised_logits_only=True, loss_kernel="liger")
