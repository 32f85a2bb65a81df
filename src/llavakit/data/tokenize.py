"""Segments → ``input_ids`` + ``labels``: tokenise each segment once, concatenate, expand image placeholders.

`SampleEncoder.encode` renders a conversation with a chat template into segments, tokenises the concatenated text
**once** (one tokenizer call, no special tokens added) and labels every token by the segment its first character
belongs to, using the fast tokenizer's offsets. So the ids are exactly those of the whole prompt — what the model
sees when it generates — for every tokenizer family: tokenising segments separately would give SentencePiece
tokenizers (Llama-2, Vicuna, Mistral) an extra ``▁`` at each reply start. Each ``<image>`` token becomes exactly
``image_token_counts[i]`` copies — the transformers convention the model expects — with label -100. Trainable
segments get their own ids as labels, everything else -100; the template's ``always_trained_tokens`` (an upstream
quirk) are then unmasked.

Because labels are built alongside ids, a template/tokenizer mismatch cannot silently mask a whole sample (the
upstream "tokenization mismatch" bug); a sample that ends up with no supervised token is reported by the dataset.
`render_for_display` shows an encoded sample with its supervised spans marked, for ``llavakit data inspect --show``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llavakit.data.formats import IMAGE_PLACEHOLDER
from llavakit.data.schema import Conversation
from llavakit.data.templates.base import ChatTemplate, Segment
from llavakit.errors import ConfigError, DataError

IGNORE_INDEX = -100
SUPERVISED_OPEN = "⟦"
SUPERVISED_CLOSE = "⟧"


@dataclass(frozen=True)
class EncodedSample:
    """One tokenised sample.

    Attributes:
        input_ids: ``[T]`` token ids, each image expanded to one ``<image>`` id per visual token.
        labels: ``[T]`` the id where supervised, -100 elsewhere (prompts, images, padding).
        image_spans: ``(start, length)`` of each image's tokens in ``input_ids``, in placeholder order.
    """

    input_ids: list[int]
    labels: list[int]
    image_spans: list[tuple[int, int]]

    @property
    def num_supervised(self) -> int:
        """Number of supervised tokens."""
        return len(self.labels) - self.labels.count(IGNORE_INDEX)


class SampleEncoder:
    """Renders and tokenises conversations for one (tokenizer, template) pair.

    Args:
        tokenizer: a transformers tokenizer holding ``<image>`` as a token (`llavakit.model.tokenizer.
            ensure_image_token`).
        template: the chat template.
    """

    def __init__(self, tokenizer: Any, template: ChatTemplate) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError(
                f"{type(tokenizer).__name__} is not a fast tokenizer: labels are assigned by character offsets, "
                "which only fast (tokenizers-backed) tokenizers provide; load it with use_fast=True"
            )
        self.tokenizer = tokenizer
        self.template = template
        self.image_token_id = _single_token_id(
            tokenizer, IMAGE_PLACEHOLDER, "call llavakit.model.tokenizer.ensure_image_token"
        )
        self.always_trained_ids = frozenset(
            _single_token_id(tokenizer, token, f"the template {template.id!r} needs it as one token")
            for token in template.always_trained_tokens()
        )
        # Mirror upstream's tokenizer(prompt): a BOS only when this tokenizer adds one by itself.
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and bos in tokenizer("", add_special_tokens=True)["input_ids"]
        self.bos_ids = [bos] if template.add_bos and adds_bos else []

    def encode(
        self, conversation: Conversation, image_token_counts: Sequence[int], *, for_generation: bool = False
    ) -> EncodedSample:
        """Render and tokenise ``conversation``; ``image_token_counts[i]`` is the token count of image ``i``."""
        segments = self.template.render(conversation, for_generation=for_generation, tokenizer=self.tokenizer)
        text, trainable_chars = self._concatenate(segments)
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoding["input_ids"]
        num_placeholders = ids.count(self.image_token_id)
        if num_placeholders != len(image_token_counts):
            raise DataError(
                f"the rendered prompt has {num_placeholders} {IMAGE_PLACEHOLDER} placeholders but "
                f"{len(image_token_counts)} images were given"
            )
        starts = [start for start, _ in encoding["offset_mapping"]]
        return self._assemble(ids, [bool(trainable_chars[min(i, len(text) - 1)]) for i in starts], list(image_token_counts))

    def _concatenate(self, segments: list[Segment]) -> tuple[str, bytearray]:
        """The prompt text and, per character, 1 where it belongs to a trainable segment."""
        parts, flags = [], bytearray()
        for segment in segments:
            if segment.trainable and IMAGE_PLACEHOLDER in segment.text:
                raise DataError(f"template {self.template.id}: an image placeholder landed in a supervised span")
            parts.append(segment.text)
            flags.extend((1 if segment.trainable else 0,) * len(segment.text))
        return "".join(parts), flags

    def _assemble(self, ids: list[int], trainable: list[bool], image_counts: list[int]) -> EncodedSample:
        input_ids = list(self.bos_ids)
        labels = [IGNORE_INDEX] * len(input_ids)
        spans = []
        for token, supervised in zip(ids, trainable):
            if token == self.image_token_id:
                count = image_counts[len(spans)]
                spans.append((len(input_ids), count))
                input_ids.extend([self.image_token_id] * count)
                labels.extend([IGNORE_INDEX] * count)
                continue
            input_ids.append(token)
            labels.append(token if supervised else IGNORE_INDEX)
        if self.always_trained_ids:
            labels = [i if i in self.always_trained_ids else label for i, label in zip(input_ids, labels)]
        return EncodedSample(input_ids, labels, spans)

    def render_for_display(self, encoded: EncodedSample) -> str:
        """Decoded text with supervised spans wrapped in ⟦ ⟧ and each image shown as ``<image×N>``."""
        out, run, run_supervised = [], [], False
        starts = {start: length for start, length in encoded.image_spans}
        position = 0
        while position < len(encoded.input_ids):
            if position in starts:
                out.append(self._flush(run, run_supervised))
                run = []
                out.append(f"{IMAGE_PLACEHOLDER[:-1]}×{starts[position]}>")
                position += starts[position]
                continue
            supervised = encoded.labels[position] != IGNORE_INDEX
            if supervised != run_supervised:
                out.append(self._flush(run, run_supervised))
                run, run_supervised = [], supervised
            run.append(encoded.input_ids[position])
            position += 1
        out.append(self._flush(run, run_supervised))
        return "".join(out)

    def _flush(self, ids: list[int], supervised: bool) -> str:
        if not ids:
            return ""
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        return f"{SUPERVISED_OPEN}{text}{SUPERVISED_CLOSE}" if supervised else text


def _single_token_id(tokenizer: Any, token: str, fix: str) -> int:
    """The id of ``token`` if the tokenizer encodes it as exactly one token; `ConfigError` otherwise."""
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ConfigError(f"the tokenizer encodes {token!r} as {len(ids)} tokens {ids}, not one: {fix}")
    return int(ids[0])
