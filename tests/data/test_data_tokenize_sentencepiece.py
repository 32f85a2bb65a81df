"""SentencePiece-style tokenizers (Llama-2, Vicuna, Mistral) get the ids of the whole prompt, reply starts included.

Such tokenizers prepend ``▁`` to the start of every call, so tokenising a reply on its own (``" Paris</s>"``) yields
an extra ``▁`` token that never occurs when the model generates after ``ASSISTANT:``. Labels must come from one
tokenisation of the whole prompt.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llavakit.data.schema import Conversation, Turn
from llavakit.data.templates import get_template
from llavakit.data.tokenize import IGNORE_INDEX, SampleEncoder


def _sentencepiece_like_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    corpus = ["A chat between a curious user and an artificial intelligence assistant. USER: What is the capital of "
              "France? ASSISTANT: Paris is the capital. The assistant gives helpful answers."] * 20
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<image>"], show_progress=False)
    backend.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def _conversation() -> Conversation:
    return Conversation(turns=(Turn("user", "<image>\nWhat is the capital of France?"), Turn("assistant", "Paris")))


def test_reply_tokens_are_those_of_the_whole_prompt():
    tokenizer = _sentencepiece_like_tokenizer()
    # Precondition: the trap exists for this tokenizer (a reply tokenised alone starts differently).
    alone = tokenizer(" Paris", add_special_tokens=False).input_ids
    in_context = tokenizer("ASSISTANT: Paris", add_special_tokens=False).input_ids
    assert alone[0] not in in_context

    template = get_template("vicuna_v1")
    encoded = SampleEncoder(tokenizer, template).encode(_conversation(), [3])
    segments = template.render(_conversation(), tokenizer=tokenizer)
    whole = tokenizer("".join(s.text for s in segments), add_special_tokens=False).input_ids
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    expanded = [t for token in whole for t in ([image_id] * 3 if token == image_id else [token])]
    assert encoded.input_ids[-len(expanded):] == expanded
    supervised = [t for t in encoded.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(supervised).strip() == "Paris</s>"
    assert supervised[0] in in_context, "the first supervised token must be the in-context reply token"
