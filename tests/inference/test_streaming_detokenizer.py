"""`IncrementalDetokenizer`: the concatenated deltas equal `generate.decode`'s text for every prefix length, and
nothing that becomes a stop string is ever sent."""

from __future__ import annotations

import pytest
import torch

from llavakit.data.templates import get_template
from llavakit.inference.detokenize import IncrementalDetokenizer
from llavakit.inference.generate import decode
from llavakit.model.tokenizer import build_bpe_tokenizer

TEXTS = [
    "  The red circle is left of the word ### and more",
    "Yes.\n\nThe answer: 3 shapes ## # ###",
    "ünïcödé – ✓ 日本 and ###",
    "trailing spaces   ",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_bpe_tokenizer("llama", corpus=TEXTS * 3, vocab_size=300)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_to_the_decoded_answer(tokenizer, text):
    template = get_template("v0")  # stop string "###", several tokens long
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for length in range(1, len(ids) + 1):
        detokenizer = IncrementalDetokenizer(tokenizer, template.stop_strings)
        sent = ""
        for token in ids[:length]:
            sent += detokenizer.add(token)
            assert "###" not in sent and not sent.startswith(" ")
            if detokenizer.stopped:
                break
        sent += detokenizer.finish()
        expected = decode(tokenizer, torch.tensor([ids[:length]]), template)[0]
        assert sent == expected == detokenizer.text == detokenizer.answer


def test_partial_stop_string_is_held_then_released(tokenizer):
    ids = tokenizer("ab #", add_special_tokens=False)["input_ids"]
    detokenizer = IncrementalDetokenizer(tokenizer, ("#x",))
    sent = "".join(detokenizer.add(token) for token in ids)
    assert sent == "ab"  # "#" may start "#x", and the space before it would then be stripped: both held
    assert detokenizer.finish() == " #"


def test_whitespace_before_a_completed_stop_string_is_never_sent(tokenizer):
    ids = tokenizer("ab #x", add_special_tokens=False)["input_ids"]
    detokenizer = IncrementalDetokenizer(tokenizer, ("#x",))
    sent = "".join(detokenizer.add(token) for token in ids) + detokenizer.finish()
    assert sent == "ab" == detokenizer.text and detokenizer.stopped
