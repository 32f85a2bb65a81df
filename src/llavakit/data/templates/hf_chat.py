"""``tokenizer`` and ``processor``: render with a Jinja chat template shipped with the tokenizer or checkpoint.

``tokenizer`` uses the tokenizer's own ``chat_template`` with string contents (``<image>`` placeholders inside the
text). ``processor`` uses the chat template a transformers / llava-hf checkpoint carries for its processor (loaded
into the tokenizer by `llavakit.model.checkpoint.load_checkpoint`); such templates usually expect OpenAI-style
content part lists (``[{"type": "image"}, {"type": "text", "text": "Q"}]``), so user text is split on ``<image>``
into parts (`content_parts`, the inverse of the "parts joined by a newline" rule of the exported templates, see
`llavakit.data.templates.jinja`). Whether a template takes part lists is decided the way vLLM decides it: the
template loops over a message's ``content`` (`iterates_message_content`); otherwise contents stay strings.

The supervised span of assistant message *k* is found by rendering twice with ``apply_chat_template``: the
messages before *k* with the generation prompt, and the messages up to *k* without it; the second must extend
the first, and the extension (reply plus whatever end-of-turn text the template writes) is trainable. A template
whose renders are not prefixes of each other (e.g. one that rewrites earlier turns) cannot be split this way and
raises `DataError` rather than guessing.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes

from llavakit.data.formats import IMAGE_PLACEHOLDER
from llavakit.data.schema import Conversation
from llavakit.data.templates.base import ChatTemplate, Segment, check_generation_turns
from llavakit.errors import ConfigError, DataError

Content = str | list[dict[str, str]]


@dataclass(frozen=True)
class TokenizerChatTemplate(ChatTemplate):
    """Delegates rendering to ``tokenizer.apply_chat_template``; the BOS is whatever that template writes."""

    add_bos: bool = False

    def render(
        self, conversation: Conversation, *, for_generation: bool = False, tokenizer: Any = None
    ) -> list[Segment]:
        check_generation_turns(conversation, self.id, for_generation)
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ConfigError(self._missing_template_message())
        # self.system is empty unless a system_prompt is configured; without one the tokenizer's template decides.
        system = conversation.system if conversation.system is not None else (self.system or None)
        messages = [] if system is None else [self.message(tokenizer, "system", system)]
        segments, rendered = [], ""
        for turn in conversation.turns:
            if turn.role == "assistant":
                prompt = self._apply(tokenizer, messages, generation=True)
                rendered = self._extend(segments, rendered, prompt, trainable=False)
            messages.append(self.message(tokenizer, turn.role, turn.text))
            if turn.role == "assistant":
                full = self._apply(tokenizer, messages, generation=False)
                rendered = self._extend(segments, rendered, full, trainable=True)
        final = self._apply(tokenizer, messages, generation=for_generation)
        self._extend(segments, rendered, final, trainable=False)
        return segments

    def ignores_system_prompt(self) -> str | None:
        if not self.system:
            return (
                "an empty one sends no system message, so the tokenizer's chat_template picks its default; set a "
                "non-empty system prompt, or none"
            )
        return None

    def _missing_template_message(self) -> str:
        return "template 'tokenizer' needs a tokenizer with a chat_template; pick a named template"

    def message(self, tokenizer: Any, role: str, text: str) -> dict[str, Content]:
        """The chat message of ``text`` as this template hands it to the Jinja (string content)."""
        return {"role": role, "content": text}

    @staticmethod
    def _apply(tokenizer: Any, messages: list[dict[str, Content]], generation: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    @staticmethod
    def _extend(segments: list[Segment], rendered: str, text: str, trainable: bool) -> str:
        if not text.startswith(rendered):
            raise DataError(
                "the tokenizer's chat_template renders earlier turns differently once later turns are added, so "
                "assistant spans cannot be located; use a named llavakit template instead"
            )
        if len(text) > len(rendered):
            segments.append(Segment(text[len(rendered) :], trainable))
        return text


@dataclass(frozen=True)
class ProcessorChatTemplate(TokenizerChatTemplate):
    """The checkpoint's own chat template (llava-hf's processor template), fed OpenAI-style content parts when it
    loops over message contents.

    The BOS follows transformers' processor, which tokenises a rendered prompt with the tokenizer's special tokens
    unless the prompt starts with the BOS text: the encoder prepends the BOS id (``add_bos``, when the tokenizer adds
    one by itself), and a BOS text the template writes at the start is that BOS, so it is left out of the text.
    """

    add_bos: bool = True

    def render(
        self, conversation: Conversation, *, for_generation: bool = False, tokenizer: Any = None
    ) -> list[Segment]:
        segments = super().render(conversation, for_generation=for_generation, tokenizer=tokenizer)
        bos = tokenizer.bos_token
        if not (bos and segments and segments[0].text.startswith(bos) and _adds_bos(tokenizer)):
            return segments
        rest = segments[0].text[len(bos) :]
        return ([Segment(rest, segments[0].trainable)] if rest else []) + segments[1:]

    def _missing_template_message(self) -> str:
        return (
            "template 'processor' needs the checkpoint's chat template (chat_template.jinja, chat_template.json or "
            "tokenizer_config.json's chat_template), and this checkpoint has none; pick a named template"
        )

    def message(self, tokenizer: Any, role: str, text: str) -> dict[str, Content]:
        parts = iterates_message_content(tokenizer.chat_template)
        return {"role": role, "content": content_parts(text) if parts else text}


def _adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` adds a BOS to every encoding by itself (as `llavakit.data.tokenize.SampleEncoder`
    checks)."""
    bos = tokenizer.bos_token_id
    return bos is not None and bos in tokenizer("", add_special_tokens=True)["input_ids"]


def content_parts(text: str) -> list[dict[str, str]]:
    """``text`` with ``<image>`` placeholders → OpenAI-style parts (``{"type": "image"}`` / ``{"type": "text",
    "text": ...}``), in order.

    The inverse of joining parts with ``"\\n"`` (an image part written as ``<image>``): one newline next to each
    placeholder is the joiner and is dropped, so ``"<image>\\n<image>\\nQ"`` → image, image, text ``"Q"``. Empty
    text between placeholders yields no part. (A placeholder glued to text, ``"<image>Q"``, also becomes
    image + text; joining those back writes the newline.)
    """
    pieces = text.split(IMAGE_PLACEHOLDER)
    parts: list[dict[str, str]] = []
    for index, piece in enumerate(pieces):
        if index:
            parts.append({"type": "image"})
            piece = piece.removeprefix("\n")
        if index < len(pieces) - 1:
            piece = piece.removesuffix("\n")
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


class _GenerationTag(jinja2.ext.Extension):
    """Parses transformers' ``{% generation %}...{% endgeneration %}`` assistant markers (templates are only
    parsed here, never rendered)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


_PARSER = jinja2.Environment(extensions=[_GenerationTag, jinja2.ext.loopcontrols])


@lru_cache(maxsize=32)
def iterates_message_content(chat_template: str) -> bool:
    """Whether ``chat_template`` loops over a message's ``content`` (``{% for part in message['content'] %}``,
    filters allowed), i.e. expects part lists. vLLM's content-format detection makes the same test: such a template
    is served OpenAI-style parts, any other one strings.

    Raises:
        ConfigError: the template is not valid Jinja.
    """
    try:
        tree = _PARSER.parse(chat_template)
    except jinja2.TemplateSyntaxError as err:
        raise ConfigError(
            f"the chat template is not valid Jinja (line {err.lineno}: {err.message})"
        ) from None
    message_lists = _aliases(tree, "messages")
    loops = list(tree.find_all(nodes.For))
    message_names = {
        loop.target.name
        for loop in loops
        if isinstance(loop.target, nodes.Name) and _reads_name(loop.iter, message_lists)
    }
    return any(_reads_content(loop.iter, message_names) for loop in loops)


def _aliases(tree: nodes.Template, name: str) -> set[str]:
    """``name`` and every variable assigned from it (``{% set loop_messages = messages[1:] %}``)."""
    names, grew = {name}, True
    while grew:
        grew = False
        for assign in tree.find_all(nodes.Assign):
            target = assign.target
            if (
                isinstance(target, nodes.Name)
                and target.name not in names
                and _reads_name(assign.node, names)
            ):
                names.add(target.name)
                grew = True
    return names


def _unwrap(node: nodes.Node) -> nodes.Node:
    """The expression under filters, tests and slices (``messages | selectattr(...)``, ``messages[1:]``)."""
    while True:
        if isinstance(node, (nodes.Filter, nodes.Test)) and node.node is not None:
            node = node.node
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice):
            node = node.node
        else:
            return node


def _reads_name(node: nodes.Node, names: set[str]) -> bool:
    node = _unwrap(node)
    return isinstance(node, nodes.Name) and node.name in names


def _reads_content(node: nodes.Node, message_names: set[str]) -> bool:
    node = _unwrap(node)
    if isinstance(node, nodes.Getitem):
        is_content = isinstance(node.arg, nodes.Const) and node.arg.value == "content"
    elif isinstance(node, nodes.Getattr):
        is_content = node.attr == "content"
    else:
        return False
    return is_content and _reads_name(node.node, message_names)


TOKENIZER = TokenizerChatTemplate(id="tokenizer")
PROCESSOR = ProcessorChatTemplate(id="processor")
