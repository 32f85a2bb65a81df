"""Fixtures for data-layer tests: locally trained tokenizers with each family's real special tokens, tiny images
and LLaVA JSON files written to temporary folders. The file writers live in `data_helpers` (a uniquely named module:
``from conftest import`` would name whichever folder's conftest pytest loaded last)."""

from __future__ import annotations

import pytest

from llavakit.anyres.spec import ImageSpec
from llavakit.model.tokenizer import DEFAULT_CORPUS, build_bpe_tokenizer

LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CORPUS = [
    DEFAULT_CORPUS,
    "[INST] [/INST] <<SYS>> <</SYS>> model Answer the questions. You are Qwen, created by Alibaba",
]


@pytest.fixture(scope="session")
def tokenizers():
    """``tokenizers[family]`` for llama (Llama-2/Vicuna/Mistral style, adds <s>), qwen2, llama3 and gemma."""
    llama = build_bpe_tokenizer("llama", corpus=CORPUS)
    qwen = build_bpe_tokenizer("qwen2", corpus=CORPUS)
    llama3 = build_bpe_tokenizer(
        "qwen2",
        corpus=CORPUS,
        extra_special_tokens=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    )
    llama3.bos_token = "<|begin_of_text|>"
    llama3.eos_token = "<|eot_id|>"
    llama3.chat_template = LLAMA3_CHAT_TEMPLATE
    gemma = build_bpe_tokenizer(
        "llama", corpus=CORPUS, extra_special_tokens=["<start_of_turn>", "<end_of_turn>"]
    )
    return {"llama": llama, "qwen2": qwen, "llama3": llama3, "gemma": gemma}


@pytest.fixture(scope="session")
def tiny_spec() -> ImageSpec:
    """A 32-px-tile AnyRes spec (4 tokens per tile side) so token counts stay small."""
    return ImageSpec(tile_size=32, patch_size=8, pinpoints=((32, 64), (64, 32), (64, 64)))
