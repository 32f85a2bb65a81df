"""Packing: plans respect the budget and are deterministic; a packed batch gives every sample exactly the logits
and loss it gets alone (sdpa and eager 4-D masks, and position_ids-only as flash-attention's varlen uses)."""

from __future__ import annotations

import pytest
import torch
from data_helpers import chat, write_image, write_json
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from llavakit.anyres.geometry import count_visual_tokens
from llavakit.data.config import DataConfig
from llavakit.data.dataset import build_dataset
from llavakit.data.packing import (
    PackedDataset,
    PackingCollator,
    PaddingFreeCollator,
    padding_fraction,
    plan_packs,
)
from llavakit.data.tokenize import IGNORE_INDEX
from llavakit.errors import ConfigError

VOCAB = 97


def tiny_llm(family: str, attn: str):
    torch.manual_seed(0)
    dims = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**dims, attn_implementation=attn))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**dims, attn_implementation=attn))
    return model.eval()


def fake_examples(lengths):
    generator = torch.Generator().manual_seed(1)
    examples = []
    for number, length in enumerate(lengths):
        ids = torch.randint(3, VOCAB, (length,), generator=generator)
        labels = ids.clone()
        labels[: length // 3] = IGNORE_INDEX  # a masked prompt, as templates produce
        examples.append(
            {
                "id": f"s{number}",
                "input_ids": ids,
                "labels": labels,
                "pixel_values": None,
                "image_sizes": [],
                "image_tiled": [],
            }
        )
    return examples


def alone(model, example):
    with torch.no_grad():
        out = model(input_ids=example["input_ids"][None], labels=example["labels"][None])
    return out.logits[0], out.loss, int((example["labels"][1:] != IGNORE_INDEX).sum())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager", "position_ids"])
def test_packed_logits_and_loss_equal_unpacked(family, attn):
    model = tiny_llm(family, "sdpa" if attn == "position_ids" else attn)
    examples = fake_examples([9, 7, 5, 3, 11])
    packs = [[examples[0], examples[1]], [examples[2], examples[3]], [examples[4]]]
    collator = PackingCollator(
        pad_token_id=0, attn_implementation="flash_attention_2" if attn == "position_ids" else attn
    )
    batch = collator(packs)
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch["position_ids"],
            labels=batch["labels"],
            use_cache=False,
        )
    total_loss, total_tokens = 0.0, 0
    for row, pack in enumerate(packs):
        start = 0
        for example in pack:
            logits, loss, count = alone(model, example)
            length = len(example["input_ids"])
            torch.testing.assert_close(
                packed.logits[row, start : start + length], logits, atol=1e-5, rtol=1e-4
            )
            total_loss, total_tokens = total_loss + loss * count, total_tokens + count
            start += length
    torch.testing.assert_close(packed.loss, total_loss / total_tokens, atol=1e-5, rtol=1e-4)


def test_packed_batch_layout():
    batch = PackingCollator(pad_token_id=0)([fake_examples([4, 3]), fake_examples([2])])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4]]
    assert batch["labels"][0, 4] == IGNORE_INDEX  # first token of the second sample
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 7, 7) and mask.dtype == torch.bool
    assert not mask[0, 0, 4, :4].any() and mask[0, 0, 6, 4:7].all()
    assert batch["num_tokens"] == 9 and batch["num_padding"] == 5 and batch["num_samples"] == 3


def test_plan_packs_fits_budget_and_is_deterministic():
    lengths = torch.randint(10, 300, (500,), generator=torch.Generator().manual_seed(0)).tolist()
    packs = plan_packs(lengths, budget=1024, seed=3, epoch=0)
    assert sorted(i for pack in packs for i in pack) == list(range(500))
    assert all(sum(lengths[i] for i in pack) <= 1024 for pack in packs)
    assert packs == plan_packs(lengths, budget=1024, seed=3, epoch=0)
    assert packs != plan_packs(lengths, budget=1024, seed=3, epoch=1)
    fill = [sum(lengths[i] for i in pack) for pack in packs]
    assert padding_fraction(fill, 1024) < 0.03


def test_sample_longer_than_budget_is_an_error():
    with pytest.raises(ConfigError, match="longer than the pack budget"):
        plan_packs([10, 2000], budget=1024, seed=0, epoch=0)


def test_packed_dataset_through_a_dataloader(tmp_path, tokenizers, tiny_spec):
    write_image(tmp_path / "a.png", 40, 70)
    samples = [chat("<image>\nWhat?", f"Answer {i}.", image="a.png", sample_id=f"i{i}") for i in range(4)]
    samples += [chat(f"Question {i}", "Yes.", sample_id=f"t{i}") for i in range(4)]
    config = DataConfig(data_path=str(write_json(tmp_path / "d.json", samples)), image_folder=str(tmp_path))
    dataset = build_dataset(config, tokenizers["llama"], tiny_spec)
    packed = PackedDataset(dataset, budget=3 * max(dataset.lengths), seed=0)
    loader = DataLoader(packed, batch_size=2, collate_fn=PackingCollator(tokenizers["llama"].pad_token_id))
    batches = list(loader)
    assert sorted(i for b in batches for i in b["sample_ids"]) == sorted(s["id"] for s in samples)
    assert sum(b["num_tokens"] for b in batches) == sum(dataset.lengths)
    image_id = tokenizers["llama"].convert_tokens_to_ids("<image>")
    for batch in batches:
        sizes = batch["image_sizes"].tolist() if "image_sizes" in batch else []
        expected = sum(count_visual_tokens(tuple(size), tiny_spec) for size in sizes)
        assert int((batch["input_ids"] == image_id).sum()) == expected


def test_padding_free_collates_one_row_and_needs_varlen_attention():
    batch = PaddingFreeCollator(PackingCollator(pad_token_id=0, attn_implementation="sdpa_varlen"))(
        fake_examples([4, 3, 5])
    )
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]]
    assert "attention_mask" not in batch and batch["num_padding"] == 0 and batch["num_samples"] == 3
    with pytest.raises(ConfigError, match="padding_free needs varlen attention"):
        PaddingFreeCollator(PackingCollator(pad_token_id=0, attn_implementation="sdpa"))
