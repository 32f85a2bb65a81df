"""The option lettering lmms-eval's multiple-choice prompts share (ScienceQA, AI2D, MMMU; SEED-Bench spells it out).

Each of those tasks' ``doc_to_text`` letters the options from ``A`` in order and writes one ``"<letter>. <option>"``
line per option; the answer parsing differs per task, so it stays in each benchmark's module.
"""

from __future__ import annotations

from collections.abc import Sequence


def option_letters(count: int) -> list[str]:
    """``A``, ``B``, ... for ``count`` options (lmms-eval counts on from ``A`` by code point)."""
    return [chr(ord("A") + number) for number in range(count)]


def lettered_options(options: Sequence[str]) -> str:
    """The options as lmms-eval writes them: ``"A. first\\nB. second"``."""
    return "\n".join(f"{letter}. {option}" for letter, option in zip(option_letters(len(options)), options))
