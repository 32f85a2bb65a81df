"""Segments → ``input_ids`` + ``labels``: tokenise each segment once, concatenate, expand image placeholders.

`SampleEncoder.encode` renders a conversation with a chat template into segments, tokenises the concatenated text
**once** (one tokenizer call, no special tokens added) and labels every token by the segment its first character
belongs to, using the fast tokenizer's offsets. So the ids are exactly those of the whole prompt — what the model
sees when it generates — for every tokenizer family: tokenising segments separately would give SentencePiece
tokenizers (Llama-2, Vicuna, Mistral) an extra ``▁`` at each reply start. Each ``<image>`` token becomes exactly
``image_token_counts[i]`` copies — the transformers convention the model expects — with label -100, and each
``<video>`` token (models with video) ``video_token_counts[i]`` copies of itself. Trainable
segments get their own ids as labels, everything else -100; the template's ``always_trained_tokens`` (an upstream
quirk) are then unmasked.

Because labels are built alongside ids, a template/tokenizer mismatch cannot silently mask a whole sample (the
upstream "tokenization mismatch" bug); a sample that ends up with no supervised token is reported by the dataset.
`render_for_display` shows an encoded sample with its supervised spans marked, for ``llavakit data inspect --show``.

Sample text never becomes a control token. A turn's text (or a sample's system prompt) that spells one of the
tokenizer's special tokens (``</s>``, ``<s>``, ``<|im_end|>``, ``<|im_start|>``, ``<|eot_id|>``...) is tokenised as
ordinary text, as transformers' ``split_special_tokens=True`` does, while the template's own control text keeps its
tokens: otherwise a reply quoting ``</s>`` would teach the model to stop mid-answer, and a served user could open a
new turn (``<|im_start|>assistant``). ``<image>`` and ``<video>`` are the exceptions: they stay the placeholders,
counted against the sample's images and videos. Text the tokenizer does not hold as special tokens cannot be told apart from a template's
(``[INST]`` or ``USER:`` in a Llama-2 / Vicuna tokenizer, non-special added tokens such as Qwen2.5's
``<tool_call>``); that is the format's own ambiguity. Upstream LLaVA tokenises the rendered prompt with special tokens
parsed everywhere, so the few samples that spell a special token train differently from upstream; this is not a
named quirk because no published checkpoint depends on it (it only corrupts those samples' labels), and serving
must never parse user text. Samples without such strings tokenise exactly as before, in one call.

How: before rendering, each special-token string in the conversation's texts is replaced by a private-use
character absent from them (templates copy content verbatim, or strip its whitespace), so that after rendering the
template's control tokens are exactly the special tokens found in the text. The text between two control tokens is
what the tokenizer would have tokenised as one piece anyway; those pieces are tokenised again with the strings put
back and special tokens split (`_PlainPieces`), and concatenated with the control tokens.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from tokenizers import Tokenizer

from llavakit.data.formats import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from llavakit.data.schema import Conversation
from llavakit.data.templates.base import ChatTemplate, Segment
from llavakit.errors import ConfigError, DataError

IGNORE_INDEX = -100
SUPERVISED_OPEN = "⟦"
SUPERVISED_CLOSE = "⟧"
# Stand-ins for special-token strings in sample text while a template renders it (Unicode's private-use area).
PRIVATE_USE = range(0xE000, 0xF900)


@dataclass(frozen=True)
class EncodedSample:
    """One tokenised sample.

    Attributes:
        input_ids: ``[T]`` token ids, each image expanded to one ``<image>`` id per visual token.
        labels: ``[T]`` the id where supervised, -100 elsewhere (prompts, images, padding).
        image_spans: ``(start, length)`` of each image's tokens in ``input_ids``, in placeholder order.
        video_spans: the same for each video's tokens.
    """

    input_ids: list[int]
    labels: list[int]
    image_spans: list[tuple[int, int]]
    video_spans: list[tuple[int, int]] = field(default_factory=list)

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
        # Only models built with video hold <video> as one token; elsewhere it is ordinary text.
        video_ids = tokenizer(VIDEO_PLACEHOLDER, add_special_tokens=False)["input_ids"]
        self.video_token_id = int(video_ids[0]) if len(video_ids) == 1 else None
        self.always_trained_ids = frozenset(
            _single_token_id(tokenizer, token, f"the template {template.id!r} needs it as one token")
            for token in template.always_trained_tokens()
        )
        # Mirror upstream's tokenizer(prompt): a BOS only when this tokenizer adds one by itself.
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and bos in tokenizer("", add_special_tokens=True)["input_ids"]
        self.bos_ids = [bos] if template.add_bos and adds_bos else []
        self.added_tokens = {int(i): token.content for i, token in tokenizer.added_tokens_decoder.items()}
        self.special_text = _special_text_pattern(tokenizer)

    def encode(
        self,
        conversation: Conversation,
        image_token_counts: Sequence[int],
        *,
        for_generation: bool = False,
        video_token_counts: Sequence[int] = (),
    ) -> EncodedSample:
        """Render and tokenise ``conversation``; ``image_token_counts[i]`` is the token count of image ``i`` and
        ``video_token_counts[i]`` that of video ``i``."""
        if video_token_counts and self.video_token_id is None:
            raise ConfigError(
                f"videos were given, but the tokenizer has no {VIDEO_PLACEHOLDER} token: the model was built "
                "without video (build it with a video_spec)"
            )
        guarded, restore = self._guard(conversation)
        segments = self.template.render(guarded, for_generation=for_generation, tokenizer=self.tokenizer)
        text, trainable_chars = self._concatenate(segments)
        ids, starts = self._tokenize_pieces(text, restore) if restore else self._tokenize(text)
        for token, placeholder, counts, what in (
            (self.image_token_id, IMAGE_PLACEHOLDER, image_token_counts, "images"),
            (self.video_token_id, VIDEO_PLACEHOLDER, video_token_counts, "videos"),
        ):
            found = ids.count(token) if token is not None else 0
            if found != len(counts):
                raise DataError(
                    f"the rendered prompt has {found} {placeholder} placeholders but {len(counts)} {what} were given"
                )
        trainable = [bool(trainable_chars[min(i, len(text) - 1)]) for i in starts]
        return self._assemble(ids, trainable, list(image_token_counts), list(video_token_counts))

    def _guard(self, conversation: Conversation) -> tuple[Conversation, dict[str, str]]:
        """``conversation`` with every special-token string in its texts replaced by a private-use character
        absent from them, and the map from those characters back to the strings (empty when none occurs, the
        conversation then unchanged)."""
        texts = [turn.text for turn in conversation.turns] + [conversation.system or ""]
        pattern = self.special_text
        found = sorted({match for text in texts for match in pattern.findall(text)}) if pattern else []
        if not found:
            return conversation, {}
        taken = set("".join(texts)) | set(self.template.system)
        free = [chr(code) for code in PRIVATE_USE if chr(code) not in taken][: len(found)]
        if len(free) < len(found):
            raise DataError(
                f"the sample spells {len(found)} distinct special tokens and uses most of Unicode's private-use "
                "characters, so they cannot be kept as text; remove the special-token strings from the sample"
            )
        hidden = dict(zip(found, free))

        def hide(text: str) -> str:
            return pattern.sub(lambda match: hidden[match.group(0)], text)

        turns = tuple(replace(turn, text=hide(turn.text)) for turn in conversation.turns)
        system = None if conversation.system is None else hide(conversation.system)
        return replace(conversation, turns=turns, system=system), {
            char: text for text, char in hidden.items()
        }

    def _tokenize(self, text: str) -> tuple[list[int], list[int]]:
        """One tokenizer call: the ids of ``text`` (special tokens parsed) and each token's first character."""
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return encoding["input_ids"], [int(start) for start, _ in encoding["offset_mapping"]]

    def _tokenize_pieces(self, text: str, restore: Mapping[str, str]) -> tuple[list[int], list[int]]:
        """`_tokenize` of ``text`` with each character of ``restore`` put back as its string, as ordinary text;
        first characters index ``text`` (a put-back string's tokens point at its stand-in).

        The control tokens are the added tokens matched by one call on ``text``, where no put-back string can be
        one; the text between two of them is then tokenised again with the strings restored and special tokens
        split. With an empty ``restore`` this equals `_tokenize` token for token (tested on every template and
        tokenizer style).
        """
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        tokens = zip(encoding["input_ids"], encoding["offset_mapping"])
        # An added token's id from the model (an unknown character's <unk>) is not a control token: its text is not
        # the token's (the text of a matched one can hold whitespace besides, stripped by lstrip/rstrip).
        controls = [
            (token, span)
            for token, span in tokens
            if self.added_tokens.get(token, "\0") in text[span[0] : span[1]]
        ]
        bounds = [0, *(int(edge) for _, span in controls for edge in span), len(text)]
        pieces = [_restored(text, start, end, restore) for start, end in zip(bounds[::2], bounds[1::2])]
        encoded = self._plain.encode([piece for piece, _ in pieces])
        out_ids, out_starts = [], []
        for index, ((_, origin), (piece_ids, piece_starts)) in enumerate(zip(pieces, encoded)):
            out_ids.extend(piece_ids)
            out_starts.extend(origin[min(start, len(origin) - 1)] for start in piece_starts)
            if index < len(controls):
                out_ids.append(controls[index][0])
                out_starts.append(int(controls[index][1][0]))
        return out_ids, out_starts

    @cached_property
    def _plain(self) -> _PlainPieces:
        return _PlainPieces(self.tokenizer)

    def _concatenate(self, segments: list[Segment]) -> tuple[str, bytearray]:
        """The prompt text and, per character, 1 where it belongs to a trainable segment."""
        parts, flags = [], bytearray()
        # <video> is a placeholder only for tokenizers holding it as a token; elsewhere it is ordinary text.
        placeholders = (IMAGE_PLACEHOLDER,) if self.video_token_id is None else (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)
        for segment in segments:
            if segment.trainable and any(placeholder in segment.text for placeholder in placeholders):
                raise DataError(
                    f"template {self.template.id}: an image or video placeholder landed in a supervised span"
                )
            parts.append(segment.text)
            flags.extend((1 if segment.trainable else 0,) * len(segment.text))
        return "".join(parts), flags

    def _assemble(
        self, ids: list[int], trainable: list[bool], image_counts: list[int], video_counts: list[int]
    ) -> EncodedSample:
        input_ids = list(self.bos_ids)
        labels = [IGNORE_INDEX] * len(input_ids)
        spans: dict[int | None, list[tuple[int, int]]] = {self.image_token_id: [], self.video_token_id: []}
        counts = {self.image_token_id: image_counts, self.video_token_id: video_counts}
        for token, supervised in zip(ids, trainable):
            if token in counts and token is not None:
                count = counts[token][len(spans[token])]
                spans[token].append((len(input_ids), count))
                input_ids.extend([token] * count)
                labels.extend([IGNORE_INDEX] * count)
                continue
            input_ids.append(token)
            labels.append(token if supervised else IGNORE_INDEX)
        if self.always_trained_ids:
            labels = [i if i in self.always_trained_ids else label for i, label in zip(input_ids, labels)]
        return EncodedSample(input_ids, labels, spans[self.image_token_id], spans[self.video_token_id])

    def render_for_display(self, encoded: EncodedSample) -> str:
        """Decoded text with supervised spans wrapped in ⟦ ⟧ and each image (video) shown as ``<image×N>``
        (``<video×N>``)."""
        out, run, run_supervised = [], [], False
        starts = {start: (IMAGE_PLACEHOLDER, length) for start, length in encoded.image_spans}
        starts.update({start: (VIDEO_PLACEHOLDER, length) for start, length in encoded.video_spans})
        position = 0
        while position < len(encoded.input_ids):
            if position in starts:
                out.append(self._flush(run, run_supervised))
                run = []
                placeholder, length = starts[position]
                out.append(f"{placeholder[:-1]}×{length}>")
                position += length
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


def _special_text_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    """A pattern matching the tokenizer's special-token strings but ``<image>`` and ``<video>``, longest first (as the tokenizer
    matches them); None when it has none."""
    strings = {
        token.content
        for token in tokenizer.added_tokens_decoder.values()
        if token.special and token.content and token.content not in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)
    }
    if not strings:
        return None
    return re.compile("|".join(re.escape(string) for string in sorted(strings, key=lambda s: (-len(s), s))))


def _restored(text: str, start: int, end: int, restore: Mapping[str, str]) -> tuple[str, list[int]]:
    """``text[start:end]`` with ``restore``'s characters put back, and for each of its characters the index in
    ``text`` it comes from."""
    pieces, origin = [], []
    for index in range(start, end):
        piece = restore.get(text[index], text[index])
        pieces.append(piece)
        origin.extend([index] * len(piece))
    return "".join(pieces), origin


class _PlainPieces:
    """Tokenises the pieces of a prompt between its control tokens with special tokens split into ordinary text,
    each exactly as the tokenizer tokenises that piece inside the whole prompt.

    A tokenizer call cuts its text at added tokens and normalises, pre-tokenises and tokenises each piece on its
    own, so a piece tokenised alone gives the same ids, with one exception: a Metaspace pre-tokenizer with
    ``prepend_scheme="first"`` (SentencePiece-style tokenizers in transformers 5) prepends ``▁`` only to the piece at
    the very start of the text. So pieces are tokenised by private copies of the tokenizer's backend (special
    tokens split, no truncation or padding): the piece at the start by a faithful copy, the others by one whose
    scheme is ``"never"``. The copies are made once per encoder, from the backend's own JSON (tokenizer.json).

    Args:
        tokenizer: a transformers fast tokenizer.
    """

    def __init__(self, tokenizer: Any) -> None:
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        spec["truncation"] = spec["padding"] = None
        self.at_start = _split_special_backend(spec)
        _never_prepend(spec.get("pre_tokenizer"))
        self.elsewhere = _split_special_backend(spec)

    def encode(self, pieces: list[str]) -> list[tuple[list[int], list[int]]]:
        """Ids and first-character offsets of each piece, ``pieces[0]`` being at the start of the prompt."""
        encodings = [self.at_start.encode(pieces[0], add_special_tokens=False)] + self.elsewhere.encode_batch(
            pieces[1:], add_special_tokens=False
        )
        return [(list(e.ids), [start for start, _ in e.offsets]) for e in encodings]


def _split_special_backend(spec: dict[str, Any]) -> Tokenizer:
    backend = Tokenizer.from_str(json.dumps(spec))
    if not hasattr(backend, "encode_special_tokens"):
        raise ConfigError(
            "this tokenizers version cannot split special tokens in sample text (Tokenizer.encode_special_tokens); "
            "install tokenizers >= 0.15"
        )
    backend.encode_special_tokens = True
    return backend


def _never_prepend(node: Any) -> None:
    """Set every Metaspace ``prepend_scheme="first"`` under ``node`` (a tokenizer.json pre_tokenizer) to "never"."""
    if isinstance(node, dict):
        if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
            node["prepend_scheme"] = "never"
        for value in node.values():
            _never_prepend(value)
    elif isinstance(node, list):
        for value in node:
            _never_prepend(value)
