"""Special-token strings in sample text (``</s>``, ``<|im_end|>``, ``<|im_start|>``...) are ordinary text, never
control tokens; samples without them tokenise exactly as one tokenizer call on the rendered prompt.

Oracles: the tokenizer itself (one call on the whole rendered text; ``split_special_tokens=True`` on a piece), and
the same sample with the special-token strings replaced by a plain word (the control tokens must be the same).
"""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llavakit.data.schema import ASSISTANT, USER, Conversation, Turn
from llavakit.data.templates import TEMPLATES, get_template
from llavakit.data.tokenize import IGNORE_INDEX, SampleEncoder
from llavakit.errors import ConfigError
from llavakit.model.tokenizer import ensure_image_token

SP_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. USER: What is the capital of "
    "France? ASSISTANT: Paris is the capital. The assistant gives helpful answers. [INST] <<SYS>> say now",
    "".join(chr(code) for code in range(32, 127)),  # every ASCII character: no <unk> in decoded text
] * 20


def _sentencepiece_like(legacy: bool) -> PreTrainedTokenizerFast:
    """A Llama-style tokenizer: Metaspace ``prepend_scheme="first"`` (transformers 5), or the legacy ``▁``-prepending
    normalizer (every piece between special tokens gets a ``▁``)."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    if legacy:
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = None
    else:
        backend.normalizer = normalizers.Replace(" ", "▁")
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    backend.train_from_iterator(SP_CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.pad_token = tokenizer.unk_token
    ensure_image_token(tokenizer)
    return tokenizer


@pytest.fixture(scope="module")
def all_tokenizers(tokenizers):
    return {
        **tokenizers,
        "sentencepiece": _sentencepiece_like(legacy=False),
        "sentencepiece_legacy": _sentencepiece_like(legacy=True),
    }


def _conversation(
    question: str = "What is in the image?", answer: str = "The image shows a red circle."
) -> Conversation:
    return Conversation(
        (
            Turn(USER, f"<image>\n{question}"),
            Turn(ASSISTANT, answer),
            Turn(USER, "How many shapes are there?"),
            Turn(ASSISTANT, "There are three."),
        )
    )


def _pairs(all_tokenizers) -> list[tuple[str, str, bool]]:
    """(template id, tokenizer name, upstream_quirks) for every template the tokenizer can serve."""
    pairs = []
    for template_id in sorted(TEMPLATES.names()):
        for name, tokenizer in all_tokenizers.items():
            for quirks in (True, False):
                try:
                    SampleEncoder(tokenizer, get_template(template_id, upstream_quirks=quirks))
                    get_template(template_id).render(_fit(template_id, _conversation()), tokenizer=tokenizer)
                except ConfigError:
                    continue
                pairs.append((template_id, name, quirks))
    return pairs


def _fit(template_id: str, conversation: Conversation, for_generation: bool = False) -> Conversation:
    """``conversation`` cut to what the template takes (plain: one round; generation: up to a user turn)."""
    turns = conversation.turns[:2] if get_template(template_id).id == "plain" else conversation.turns
    return Conversation(turns[: len(turns) - 1] if for_generation else turns, conversation.system)


def _encode(
    tokenizer, template_id: str, conversation: Conversation, quirks: bool = True, for_generation=False
):
    encoder = SampleEncoder(tokenizer, get_template(template_id, upstream_quirks=quirks))
    conv = _fit(template_id, conversation, for_generation)
    placeholders = sum(turn.text.count("<image>") for turn in conv.turns)
    return encoder, conv, encoder.encode(conv, [1] * placeholders, for_generation=for_generation)


def test_clean_samples_are_one_tokenizer_call_and_the_piecewise_path_agrees(all_tokenizers):
    """Every template id x tokenizer style: ids are those of one call on the rendered prompt (the encoding before
    this change), and tokenising the pieces between control tokens with special tokens split gives the same ids
    and offsets, so a sample that needs the piecewise path differs only where its special-token strings are."""
    pairs = _pairs(all_tokenizers)
    assert {template for template, _, _ in pairs} == set(TEMPLATES.names())
    assert {name for _, name, _ in pairs} == set(all_tokenizers)
    for template_id, name, quirks in pairs:
        tokenizer = all_tokenizers[name]
        for for_generation in (False, True):
            encoder, conv, encoded = _encode(tokenizer, template_id, _conversation(), quirks, for_generation)
            segments = encoder.template.render(conv, for_generation=for_generation, tokenizer=tokenizer)
            text = "".join(segment.text for segment in segments)
            whole = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            assert encoded.input_ids == encoder.bos_ids + whole["input_ids"], (template_id, name, quirks)
            starts = [start for start, _ in whole["offset_mapping"]]
            assert encoder._tokenize_pieces(text, {}) == (whole["input_ids"], starts), (
                template_id,
                name,
                quirks,
            )


def _control_set(tokenizer) -> set[int]:
    """Ids of added tokens but <unk> (which the model also emits for characters it does not know)."""
    return set(tokenizer.added_tokens_decoder) - {tokenizer.unk_token_id}


def _control_ids(tokenizer, ids: list[int]) -> list[int]:
    return [token for token in ids if token in _control_set(tokenizer)]


def _specials(tokenizer) -> list[str]:
    return [
        t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content != "<image>"
    ]


def test_special_token_strings_in_samples_stay_text_for_every_template(all_tokenizers):
    """The control tokens of a sample quoting every special-token string are exactly those of the same sample with
    a plain word instead, and the quoted strings come back verbatim when the ids are decoded."""
    for template_id, name, quirks in _pairs(all_tokenizers):
        tokenizer = all_tokenizers[name]
        quoted = " ".join(_specials(tokenizer))
        dirty = _conversation(f"Is {quoted} a token?", f"Type {quoted}<s></s> then stop.")
        clean = _conversation("Is word a token?", "Type word then stop.")
        _, _, dirty_encoded = _encode(tokenizer, template_id, dirty, quirks)
        _, _, clean_encoded = _encode(tokenizer, template_id, clean, quirks)
        context = (template_id, name, quirks)
        assert _control_ids(tokenizer, dirty_encoded.input_ids) == _control_ids(
            tokenizer, clean_encoded.input_ids
        ), context
        assert len(dirty_encoded.labels) == len(dirty_encoded.input_ids)
        if get_template(template_id).id != "plain" and "legacy" not in name:
            # The user text is dropped by plain; legacy SentencePiece decodes its prepended ▁ as spaces.
            assert f"Is {quoted} a token?" in tokenizer.decode(dirty_encoded.input_ids), context


@pytest.mark.parametrize(
    ("template_id", "name", "end_of_turn"),
    [
        ("vicuna_v1", "llama", "</s>"),
        ("vicuna_v1", "sentencepiece", "</s>"),
        ("llama_2", "sentencepiece_legacy", "</s>"),
        ("chatml_direct", "qwen2", "<|im_end|>"),
        ("qwen_2", "qwen2", "<|im_end|>"),
        ("llava_llama_3", "llama3", "<|eot_id|>"),
    ],
)
@pytest.mark.parametrize("quirks", [True, False])
def test_an_answer_quoting_the_end_of_turn_token_is_trained_to_the_end(
    all_tokenizers, template_id, name, end_of_turn, quirks
):
    tokenizer = all_tokenizers[name]
    answer = f"Write {end_of_turn} or </s> to end a turn, then <|im_start|>assistant<s> again."
    _, _, encoded = _encode(tokenizer, template_id, _conversation(answer=answer), quirks)
    eot = tokenizer.convert_tokens_to_ids(end_of_turn)
    runs, current = [], []
    for label in encoded.labels:
        if label == IGNORE_INDEX and current:
            runs.append(current)
            current = []
        elif label != IGNORE_INDEX:
            current.append(label)
    runs += [current] if current else []
    run = next(run for run in runs if "Write" in tokenizer.decode(run))
    # Quirk templates supervise control tokens around the answer too: start where the answer starts.
    start = next(index for index in range(len(run), -1, -1) if "Write" in tokenizer.decode(run[index:]))
    end = run.index(eot, start)
    assert answer in tokenizer.decode(run[start:end])
    assert not set(run[start:end]) & _control_set(tokenizer), "a quoted control string became a control token"


@pytest.mark.parametrize("name", ["sentencepiece", "sentencepiece_legacy"])
def test_special_token_text_is_tokenised_as_the_tokenizer_splits_it(all_tokenizers, name):
    """The piece holding the quoted string equals the tokenizer's own ``split_special_tokens=True`` tokenisation,
    at the start of the prompt and after a control token (no extra ``▁`` where the piece does not start the text)."""
    tokenizer = all_tokenizers[name]
    conv = Conversation((Turn(USER, "say </s> now"), Turn(ASSISTANT, "Paris"), Turn(USER, "say <s> now")))
    encoder = SampleEncoder(tokenizer, get_template("vicuna_v1"))
    encoded = encoder.encode(conv, [], for_generation=True)
    text = "".join(s.text for s in encoder.template.render(conv, for_generation=True, tokenizer=tokenizer))
    first, second = text.split("Paris</s>")
    split = tokenizer(first + "Paris", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    ids = encoded.input_ids[len(encoder.bos_ids) :]
    assert ids[: len(split) + 1] == split + [eos]
    # After a control token: as in one call on the same text with a plain word instead of the quoted string.
    clean = tokenizer(
        first.replace("</s>", "x") + "Paris</s>" + second.replace("<s>", "x"), add_special_tokens=False
    )
    after = ids[len(split) + 1 :]
    assert after[:3] == clean["input_ids"][clean["input_ids"].index(eos) + 1 :][:3]
    assert tokenizer.bos_token_id not in after and eos not in after
