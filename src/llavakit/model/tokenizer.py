"""Tokenizer helpers: the image placeholder token, and small tokenizers trained locally.

The placeholder is a real special token (``<image>``), expanded by the data pipeline to one token per visual
token — the transformers convention. Upstream LLaVA instead splices a sentinel id (-200) that is not in the
vocabulary and that every consumer must special-case; a real token lets the checkpoint load in transformers and
vLLM unchanged. Video models add ``<video>`` the same way (transformers' LlavaOnevision placeholder).

`build_bpe_tokenizer` trains a byte-level BPE on a given corpus in well under a second, so tests and the demo get
a real `transformers` fast tokenizer without any download.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from llavakit.errors import ConfigError

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"

# Special tokens and chat template per tokenizer style. Llama-style tokenizers add a BOS; Qwen2 ones do not.
_LLAMA_SPECIALS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
_QWEN2_SPECIALS = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
_QWEN2_EXTRA = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DEFAULT_CORPUS = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions. "
    "USER: ASSISTANT: Human: Assistant: system user assistant "
    "What is in the image? Describe the picture in detail. The image shows a red circle, a blue square, "
    "a green triangle and a yellow star on a white background. How many shapes are there? There are three. "
    "Answer the question using a single word or phrase. Yes. No. left right top bottom above below "
    "0 1 2 3 4 5 6 7 8 9 10 . , ? ! : ; ' \" ( ) [ ] < > / \n"
)


def ensure_image_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add ``<image>`` as a special token if the tokenizer lacks it; return its id.

    The caller must resize the LLM's embeddings when the vocabulary grew (`LlavaNextModel.from_parts` does).
    """
    return _ensure_special_token(tokenizer, IMAGE_TOKEN)


def ensure_video_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add ``<video>`` (transformers' LlavaOnevision placeholder) as a special token if missing; return its id.

    Only video models get it, so image-only tokenizers and checkpoints stay as they were. Resize as for `<image>`.
    """
    return _ensure_special_token(tokenizer, VIDEO_TOKEN)


def _ensure_special_token(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        tokenizer.add_tokens([token], special_tokens=True)
        token_id = tokenizer.convert_tokens_to_ids(token)
    return int(token_id)


def build_bpe_tokenizer(
    style: str = "llama",
    corpus: Iterable[str] | None = None,
    vocab_size: int = 512,
    extra_special_tokens: Iterable[str] = (),
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer locally and wrap it as a transformers fast tokenizer.

    Args:
        style: ``"llama"`` (``<s>`` BOS added to every encoding, ``</s>`` EOS, ``<unk>``, ``<pad>``) or
            ``"qwen2"`` (no BOS, ChatML specials, Qwen2's chat template).
        corpus: training text; defaults to a small built-in English corpus.
        vocab_size: target vocabulary size (the corpus may yield fewer merges).
        extra_special_tokens: more special tokens (e.g. ``[INST]``) added after training.

    Returns:
        A tokenizer whose vocabulary contains ``<image>`` as a special token.
    """
    if style not in ("llama", "qwen2"):
        raise ConfigError(f"unknown tokenizer style {style!r}; use 'llama' or 'qwen2'")
    specials = _LLAMA_SPECIALS if style == "llama" else _QWEN2_SPECIALS
    initial = list(dict.fromkeys([*specials.values(), *(_QWEN2_EXTRA if style == "qwen2" else []), IMAGE_TOKEN]))
    initial += [t for t in extra_special_tokens if t not in initial]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=initial,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(corpus) if corpus is not None else [DEFAULT_CORPUS], trainer=trainer)
    if style == "llama":
        bos_id = backend.token_to_id("<s>")
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
    # add_tokens(special_tokens=True) is the spelling that works in transformers 4.x and 5.x alike.
    tokenizer.add_tokens([t for t in initial if t not in specials.values()], special_tokens=True)
    if style == "qwen2":
        tokenizer.chat_template = QWEN2_CHAT_TEMPLATE
    tokenizer.model_max_length = 4096
    return tokenizer
