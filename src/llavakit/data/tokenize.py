"""Segments → ``input_ids`` + ``labels``: tokenise each segment once, concatenate, expand image placeholders.

`SampleEncoder.encode` renders a conversation with a chat template, splits the untrained text at each ``<image>``
placeholder, tokenises every piece once (one batched tokenizer call per sample, no special tokens), and
concatenates. Each placeholder becomes exactly ``image_token_counts[i]`` copies of the ``<image>`` token id — the
transformers convention the model expects — with label -100. Trainable pieces get their own ids as labels,
everything else -100; the template's ``always_trained_tokens`` (an upstream quirk) are then unmasked.

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
        pieces = self._pieces(segments)
        num_placeholders = sum(text == IMAGE_PLACEHOLDER for text, _ in pieces)
        if num_placeholders != len(image_token_counts):
            raise DataError(
                f"the rendered prompt has {num_placeholders} {IMAGE_PLACEHOLDER} placeholders but "
                f"{len(image_token_counts)} images were given"
            )
        texts = [text for text, _ in pieces if text != IMAGE_PLACEHOLDER]
        token_lists = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        return self._assemble(pieces, token_lists, list(image_token_counts))

    def _pieces(self, segments: list[Segment]) -> list[tuple[str, bool]]:
        """(text, trainable) pieces with each ``<image>`` placeholder as a piece of its own."""
        pieces: list[tuple[str, bool]] = []
        for segment in segments:
            parts = segment.text.split(IMAGE_PLACEHOLDER)
            if segment.trainable and len(parts) > 1:
                raise DataError(
                    f"template {self.template.id}: an image placeholder landed in a supervised span"
                )
            for number, part in enumerate(parts):
                if number:
                    pieces.append((IMAGE_PLACEHOLDER, False))
                if not part:
                    continue
                # Neighbouring text with the same flag is tokenised as one piece, so BPE merges across template
                # boundaries (" USER") come out as they would for the whole prompt.
                if pieces and pieces[-1][0] != IMAGE_PLACEHOLDER and pieces[-1][1] == segment.trainable:
                    pieces[-1] = (pieces[-1][0] + part, segment.trainable)
                else:
                    pieces.append((part, segment.trainable))
        return pieces

    def _assemble(
        self, pieces: list[tuple[str, bool]], token_lists: Any, image_counts: list[int]
    ) -> EncodedSample:
        input_ids = list(self.bos_ids)
        labels = [IGNORE_INDEX] * len(input_ids)
        spans = []
        for text, trainable in pieces:
            if text == IMAGE_PLACEHOLDER:
                count = image_counts[len(spans)]
                spans.append((len(input_ids), count))
                input_ids.extend([self.image_token_id] * count)
                labels.extend([IGNORE_INDEX] * count)
                continue
            ids = list(next(token_lists))
            input_ids.extend(ids)
            labels.extend(ids if trainable else [IGNORE_INDEX] * len(ids))
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
