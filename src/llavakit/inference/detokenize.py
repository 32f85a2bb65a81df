"""Token ids → text, one token at a time, so that a streamed answer equals the answer decoded at the end.

`llavakit.inference.generate.decode` turns a finished row into text: special tokens dropped, cut at the first stop
string, whitespace stripped. A stream must send the same characters in pieces, which takes three hold-backs:

- text that could still become a stop string (``"###"`` arriving as ``"#"``, ``"##"``, ...) is held until it
  either completes the stop string (it is then cut) or cannot any more;
- a trailing U+FFFD (a multi-byte character split across tokens) is held until the next token completes it;
- leading whitespace is dropped and trailing whitespace held until more text follows (the final answer is
  stripped, and a stream cannot take back what it sent).

Decoding the whole row every step is O(n²) in the answer length, which for answers of a few hundred tokens costs
far less than one model step, and avoids the per-tokenizer pitfalls of decoding tokens one by one (SentencePiece's
leading-space marker, byte-level merges).
"""

from __future__ import annotations

from collections.abc import Sequence

from llavakit.inference.generate import cut_at_stop

REPLACEMENT_CHARACTER = "\ufffd"


class IncrementalDetokenizer:
    """The text of a growing list of ids, released as safe-to-send deltas.

    Args:
        tokenizer: a transformers tokenizer.
        stop_strings: strings that end the answer (cut before them).
    """

    def __init__(self, tokenizer: object, stop_strings: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop for stop in stop_strings if stop)
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False
        self.answer: str | None = None

    def add(self, token_id: int) -> str:
        """Append one id; returns the newly releasable text (may be empty). Sets `stopped` at a stop string."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        cut = self._stop_position(text)
        if cut is not None:
            self.stopped = True
            return self._release(text[:cut].rstrip())
        return self._release(text[: len(text) - self._held(text)])

    def finish(self) -> str:
        """Close the answer once no token follows: sets `answer` (decoded at once, as
        `llavakit.inference.generate.decode` does) and returns what of it was not released yet."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.answer = cut_at_stop(text, self.stop_strings).strip()
        return "" if self.stopped else self._release(self.answer)

    @property
    def text(self) -> str:
        """Everything released so far."""
        return self.sent

    def _stop_position(self, text: str) -> int | None:
        positions = [text.find(stop) for stop in self.stop_strings if stop in text]
        return min(positions) if positions else None

    def _held(self, text: str) -> int:
        """How many trailing characters of ``text`` must wait."""
        held = len(text) - len(text.rstrip())
        if text.endswith(REPLACEMENT_CHARACTER):
            held = max(held, len(text) - len(text.rstrip(REPLACEMENT_CHARACTER)))
        for stop in self.stop_strings:
            for length in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:length]):
                    # whitespace before a stop string is stripped with it, so it waits too
                    before = text[: len(text) - length]
                    held = max(held, length + len(before) - len(before.rstrip()))
                    break
        return held

    def _release(self, text: str) -> str:
        if not text.startswith(self.sent):
            # The tokenizer re-merged earlier characters (rare byte-level cases): send nothing new until the
            # decoded text extends what was sent again.
            return ""
        delta = text[len(self.sent) :]
        self.sent = text
        return delta
