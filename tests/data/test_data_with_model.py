"""The data layer against the real model: batches run, text-only batches keep every vision parameter in the graph,
a packed batch gives each sample the same logits and loss as running it alone, and a padding-free row (sdpa_varlen)
the padded batch's loss and gradients (debug presets)."""

from __future__ import annotations

import copy

import pytest
import torch
from data_helpers import chat, write_image, write_json

from llavakit.data.collate import BOOKKEEPING_KEYS, build_collator
from llavakit.data.config import DataConfig
from llavakit.data.dataset import build_dataset
from llavakit.data.packing import PackingCollator, PaddingFreeCollator
from llavakit.data.tokenize import IGNORE_INDEX

PRESETS = ("debug-clip-llama", "debug-siglip-qwen2")


def model_inputs(batch):
    return {k: v for k, v in batch.items() if k not in BOOKKEEPING_KEYS and k != "num_samples"}


@pytest.fixture(params=PRESETS)
def model_and_data(request, tmp_path, preset_model):
    model = preset_model(request.param)
    write_image(tmp_path / "img" / "wide.png", 50, 120, (10, 200, 30))
    write_image(tmp_path / "img" / "square.png", 90, 70, (200, 10, 90))
    samples = [
        chat("<image>\nWhat is it?", "A green bar.", image="wide.png", sample_id="wide"),
        chat("Hello there", "Hi.", "And now?", "Bye.", sample_id="text"),
        chat(
            "Compare <image> with <image>",
            "They differ.",
            image=["wide.png", "square.png"],
            sample_id="multi",
        ),
        chat("<image>\nColour?", "Magenta.", image="square.png", sample_id="square"),
    ]
    path = write_json(tmp_path / "d.json", samples)
    data = DataConfig(data_path=str(path), image_folder=str(tmp_path / "img"), template=model.config.template)
    return model, build_dataset(data, model.tokenizer, model.config.image_spec)


def grads_after(model, batch):
    model.zero_grad(set_to_none=True)
    model(**model_inputs(batch)).loss.backward()
    return {
        name for name, p in model.named_parameters() if p.grad is not None and not name.startswith("llm.")
    }


def test_text_only_batch_reaches_every_vision_parameter(model_and_data):
    model, dataset = model_and_data
    model.train()
    collate = build_collator(model.tokenizer)
    with_images = grads_after(model, collate([dataset[0], dataset[3]]))
    text_only = grads_after(model, collate([dataset[1]]))
    assert with_images and with_images <= text_only


def test_packed_batch_equals_samples_one_by_one(model_and_data):
    model, dataset = model_and_data
    examples = [dataset[i] for i in range(len(dataset))]
    collate = build_collator(model.tokenizer)
    packed = PackingCollator(model.tokenizer.pad_token_id, attn_implementation="sdpa")(
        [examples[:2], examples[2:]]
    )
    with torch.no_grad():
        out = model(**model_inputs(packed), use_cache=False)
        total, count = 0.0, 0
        for row, pack in enumerate((examples[:2], examples[2:])):
            start = 0
            for example in pack:
                alone = model(**model_inputs(collate([example])))
                length = len(example["input_ids"])
                torch.testing.assert_close(
                    out.logits[row, start : start + length], alone.logits[0], atol=2e-5, rtol=1e-4
                )
                n = int((example["labels"][1:] != IGNORE_INDEX).sum())
                total, count = total + alone.loss * n, count + n
                start += length
    torch.testing.assert_close(out.loss, total / count, atol=2e-5, rtol=1e-4)


def test_padding_free_batch_gives_the_padded_batchs_loss_and_gradients(model_and_data):
    model, dataset = model_and_data
    model.train()
    examples = [dataset[i] for i in range(len(dataset))]
    padded = build_collator(model.tokenizer)(examples)
    varlen = copy.deepcopy(model)
    varlen.llm.set_attn_implementation("sdpa_varlen")
    rows = PackingCollator(model.tokenizer.pad_token_id, attn_implementation="sdpa_varlen")
    row = PaddingFreeCollator(rows)(examples)
    assert row["input_ids"].shape == (1, int(padded["attention_mask"].sum())) and row["num_padding"] == 0
    losses, grads = [], []
    for net, batch in ((model, padded), (varlen, row)):
        net.zero_grad(set_to_none=True)
        loss = net(**model_inputs(batch)).loss
        loss.backward()
        losses.append(loss)
        grads.append({name: p.grad for name, p in net.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and any(name.startswith("vision") for name in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-4, msg=name)
