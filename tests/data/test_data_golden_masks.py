"""Golden tests: training ``input_ids`` and labels against upstream LLaVA / LLaVA-NeXT's own ``preprocess_*``.

The oracle is ``golden/upstream_masks.json``, written by ``scripts/golden_templates.py`` from upstream checkouts (the
file records their commits and the command): for every template id upstream trains through a ``preprocess_*``
function, upstream's data path (``preprocess_multimodal`` then ``preprocess``) ran on a fixed set of conversations
with the tokenizers named per case. Here the same conversations go through llavakit's path (the LLaVA-JSON reader,
the template with ``upstream_quirks=True``, `SampleEncoder`) with the same tokenizers, and the ids and labels must be
identical, token for token, except where a named divergence below applies; each is checked to be exactly what it
names (the extra token removed, the unwrapped image restored, upstream's empty mask, overlapping shifted spans).
``upstream_quirks`` changes only the Qwen / Llama-3 masks, and its default (on) is what is compared here.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from llavakit.data.formats import Record, parse_sample
from llavakit.data.templates import ALIASES, get_template
from llavakit.data.tokenize import IGNORE_INDEX, EncodedSample, SampleEncoder

GOLDEN_DIR = Path(__file__).parent / "golden"
GOLDEN = json.loads((GOLDEN_DIR / "upstream_masks.json").read_text())
CONVERSATIONS = GOLDEN["conversations"]
# Templates whose training quirks take a system prompt only from the sample (check_system_prompt).
SAMPLE_SYSTEM = {"qwen_1_5", "qwen_2", "qwen_2_5", "llava_llama_3"}
NEXT = "LLaVA-VL/LLaVA-NeXT"

# Named divergences: where llavakit deliberately differs from upstream's output, and why.
UPSTREAM_MISMATCH = (
    "upstream's round-length arithmetic (its -1/-2 offsets and legacy flag) does not fit this tokenizer: it prints "
    "'tokenization mismatch' and masks the whole sample, so it trains nothing; llavakit labels the tokens of one "
    "tokenisation by their characters and supervises every reply"
)
IMAGE_CHUNK_PREFIX = (
    "upstream's tokenizer_image_token tokenises the text after each <image> as a call of its own, so a non-legacy "
    "SentencePiece tokenizer (no ``▁`` after special tokens) gets an extra ``▁`` token there (LLaVA-1.5's id 29871 "
    "after the image); llavakit tokenises the prompt once, as transformers and vLLM prompt the model"
)
SHIFTED_SPANS = (
    "(where they differ) upstream's preprocess_mpt counts each round's tokens apart from the text around it; where the tokenizer merges "
    "across the cut (``\\n`` + reply, no <|im_end|> in the counted round) its spans shift by a token or more, "
    "supervising part of the header or leaving reply tokens out; llavakit supervises exactly reply + separator"
)
NEXT_MMTAG_IMAGE_FIRST = (
    "LLaVA-NeXT's preprocess_multimodal wraps <image> as <Image><image></Image> only when it moved it to the front "
    "of its turn, so a turn that starts with <image> stays unwrapped; llavakit wraps every image of an *_mmtag "
    "template, as LLaVA's preprocess_multimodal does"
)


def _cases() -> list[tuple[str, dict]]:
    return [(source["repository"], case) for source in GOLDEN["sources"] for case in source["cases"]]


def _case_id(item: tuple[str, dict]) -> str:
    repository, case = item
    return f"{repository.split('/')[1]}:{case['template']}:{case['conversation']}:{case['tokenizer']}"


@pytest.fixture(scope="module")
def golden_tokenizers(tokenizers) -> dict:
    """The fixture tokenizers plus the SentencePiece-style one the generator wrote, non-legacy and legacy."""
    spec = json.loads((GOLDEN_DIR / "upstream_masks_tokenizer.json").read_text())
    out = dict(tokenizers)
    for name, scheme in (("sentencepiece", "first"), ("sentencepiece_legacy", "always")):
        for part in ("pre_tokenizer", "decoder"):
            spec[part]["prepend_scheme"] = scheme
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
            unk_token="<unk>",
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<unk>",
        )
        tokenizer.model_max_length = 4096
        out[name] = tokenizer
    return out


def llavakit_encode(case: dict, tokenizer, mmtag: bool | None = None) -> EncodedSample:
    """The case's conversation through llavakit's reader, template (upstream quirks on) and encoder, one token per
    image; ``mmtag`` overrides the template's image wrapping."""
    spec = CONVERSATIONS[case["conversation"]]
    template_id = ALIASES.get(case["template"], case["template"])
    turns = [{"from": ("human", "gpt")[n % 2], "value": text} for n, text in enumerate(spec["turns"])]
    system = spec["system"]
    if system is not None and template_id in SAMPLE_SYSTEM:
        turns.insert(0, {"from": "system", "value": system})
        system = None
    record = {"id": "golden", "conversations": turns, **({"image": "image.png"} if spec["image"] else {})}
    sample = parse_sample(Record("golden", record))
    template = get_template(template_id, upstream_quirks=True, system_prompt=system)
    if mmtag is not None:
        template = replace(template, mmtag=mmtag)
    return SampleEncoder(tokenizer, template).encode(sample.conversation, [1] * len(sample.images))


def spans(labels: list[int]) -> list[list[int]]:
    """``[start, end)`` of every run of supervised labels (the golden's ``supervised`` format)."""
    out: list[list[int]] = []
    for index, label in enumerate(labels):
        if label == IGNORE_INDEX:
            continue
        if out and out[-1][1] == index:
            out[-1][1] = index + 1
        else:
            out.append([index, index + 1])
    return out


def next_mmtag_image_first(repository: str, case: dict) -> bool:
    """Whether `NEXT_MMTAG_IMAGE_FIRST` applies: LLaVA-NeXT, an *_mmtag template, a turn starting with <image>."""
    spec = CONVERSATIONS[case["conversation"]]
    return repository == NEXT and "mmtag" in case["template"] and spec["turns"][0].startswith("<image>")


def without_image_chunk_prefix(case: dict) -> tuple[list[str], list[bool]]:
    """Upstream's tokens and supervision with the ``▁`` that `IMAGE_CHUNK_PREFIX` adds after each image removed."""
    supervised = [False] * len(case["tokens"])
    for start, end in case["supervised"]:
        supervised[start:end] = [True] * (end - start)
    if case["tokenizer"] != "sentencepiece":
        return case["tokens"], supervised
    keep = [
        i
        for i, token in enumerate(case["tokens"])
        if not (i and token == "▁" and case["tokens"][i - 1] == "<image>")
    ]
    assert len(keep) < len(case["tokens"]) or not CONVERSATIONS[case["conversation"]]["image"]
    assert not any(supervised[i] for i in set(range(len(supervised))) - set(keep))
    return [case["tokens"][i] for i in keep], [supervised[i] for i in keep]


def assert_replies_supervised(encoded: EncodedSample, tokenizer, case: dict) -> None:
    """One supervised run per reply, each ending with that reply (a tokenizer that merges a header's last character
    with the reply's first, as the SentencePiece one does with ``\nA``, leaves that token to the header)."""
    replies = CONVERSATIONS[case["conversation"]]["turns"][1::2]
    runs = [
        tokenizer.decode(encoded.input_ids[a:b], skip_special_tokens=True).strip()
        for a, b in spans(encoded.labels)
    ]
    assert len(runs) == len(replies)
    assert all(run and reply.endswith(run) for reply, run in zip(replies, runs)), runs


def test_golden_covers_every_preprocess_function():
    functions = {case["function"] for _, case in _cases()}
    assert functions == {
        "preprocess_v1",
        "preprocess_llama_2",
        "preprocess_mpt",
        "preprocess_plain",
        "preprocess_qwen",
        "preprocess_llama3",
        "preprocess_gemma",
    }
    assert {case["tokenizer"] for _, case in _cases()} >= {"sentencepiece", "sentencepiece_legacy"}


@pytest.mark.parametrize("item", _cases(), ids=_case_id)
def test_ids_and_labels_equal_upstream_preprocess(item, golden_tokenizers):
    repository, case = item
    tokenizer = golden_tokenizers[case["tokenizer"]]
    encoded = llavakit_encode(case, tokenizer)
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(encoded.labels, encoded.input_ids))
    expected_tokens, expected_supervised = without_image_chunk_prefix(case)  # IMAGE_CHUNK_PREFIX
    if next_mmtag_image_first(repository, case):  # NEXT_MMTAG_IMAGE_FIRST
        assert tokenizer.convert_ids_to_tokens(encoded.input_ids) != expected_tokens
        encoded = llavakit_encode(case, tokenizer, mmtag=False)
    assert tokenizer.convert_ids_to_tokens(encoded.input_ids) == expected_tokens
    supervised = [label != IGNORE_INDEX for label in encoded.labels]
    if case["mismatch_warning"]:  # UPSTREAM_MISMATCH
        assert not any(expected_supervised)
        assert_replies_supervised(encoded, tokenizer, case)
    elif case["function"] == "preprocess_mpt" and case["tokenizer"].startswith(
        "sentencepiece"
    ):  # SHIFTED_SPANS
        ours, theirs = (
            spans([int(not s) * IGNORE_INDEX for s in supervised]),
            spans([int(not s) * IGNORE_INDEX for s in expected_supervised]),
        )
        assert len(ours) == len(theirs)
        assert all(a < d and c < b for (a, b), (c, d) in zip(ours, theirs))  # each pair overlaps
        assert_replies_supervised(encoded, tokenizer, case)
    else:
        assert supervised == expected_supervised


@pytest.mark.parametrize("template_id", ["llava_v1_mmtag", "llava_llama_2_mmtag", "llava_v0_mmtag"])
def test_mmtag_templates_wrap_images_in_training_and_generation(template_id, tokenizers):
    """Training and generation prompts both show the image as upstream's training does (its eval scripts do not:
    see `llavakit.data.templates.llama2`)."""
    sample = parse_sample(
        Record(
            "t", {"image": "a.png", "conversations": [{"from": "human", "value": "Describe it.\n<image>"}]}
        )
    )
    template = get_template(template_id)
    text = "".join(s.text for s in template.render(sample.conversation, for_generation=True))
    assert "<Image><image></Image>\nDescribe it." in text and text.count("<image>") == 1
    plain = replace(template, mmtag=False).render(sample.conversation, for_generation=True)
    assert "".join(s.text for s in plain) == text.replace("<Image><image></Image>", "<image>")
