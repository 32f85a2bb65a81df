"""What lmms-eval's multiple-choice tasks share: the option lettering of their prompts (ScienceQA, AI2D, MMMU;
SEED-Bench spells it out) and its letter extractor ``extract_mcq_answer`` (MMBench's last rule, RealWorldQA,
MMStar).

Each of those tasks' ``doc_to_text`` letters the options from ``A`` in order and writes one ``"<letter>. <option>"``
line per option; the rest of the answer parsing differs per task, so it stays in each benchmark's module.
"""

from __future__ import annotations

from collections.abc import Sequence

# extract_mcq_answer's table: the phrases a letter may follow, and each form's rank.
_ANSWER_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select",
    "i pick", "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选",
    "答えは",
)  # fmt: skip
MCQ_DEFAULT_LETTERS = ("A", "B", "C", "D", "E", "F", "G", "H")
_MCQ_EDGE_PUNCTUATION = (",", ".", "!", "?", ";", ":", "'", '"')
_MCQ_MARKED_FORMS = (("({})", 6), ("{}.", 5), ("{}:", 4), ("{})", 3), ("{} ", 2))
_RANK_PHRASE, _RANK_START, _RANK_END, _RANK_ANYWHERE = 7, 10, 9, 0


def option_letters(count: int) -> list[str]:
    """``A``, ``B``, ... for ``count`` options (lmms-eval counts on from ``A`` by code point)."""
    return [chr(ord("A") + number) for number in range(count)]


def lettered_options(options: Sequence[str]) -> str:
    """The options as lmms-eval writes them: ``"A. first\\nB. second"``."""
    return "\n".join(f"{letter}. {option}" for letter, option in zip(option_letters(len(options)), options))


def extract_mcq_answer(response: str, letters: Sequence[str]) -> str:
    """lmms-eval's ``extract_mcq_answer``: the best-ranked occurrence of one of ``letters``, or ``""``.

    The output is stripped of ``, . ! ? ; : ' "`` at its ends (one mark after the other); candidates: it starts
    (rank 10) or ends (9) with a letter not joined to another letter; each letter's first upper-case occurrence
    after an answer phrase ("the answer is", "答案是", ...), even inside a word (7); the last ``(X)`` (6), ``X.``
    (5), ``X:`` (4), ``X)`` (3), ``X `` (2); only when there is none of those, any occurrence (0: "Definitely"
    reads as D). The best rank wins, then the later position.
    """
    if not response.strip():
        return ""
    text = response.strip()
    for mark in _MCQ_EDGE_PUNCTUATION:
        text = text.strip(mark)
    text = f" {text} "
    found: list[tuple[int, int, str]] = []  # (rank, position, letter)
    for pattern, rank in _MCQ_MARKED_FORMS:
        for letter in letters:
            position = text.rfind(pattern.format(letter))
            if position >= 0:
                found.append((rank, position, letter))
    lowered = text.lower()
    for phrase in _ANSWER_PHRASES:
        start = lowered.find(phrase)
        if start >= 0:
            for letter in letters:
                position = text.find(letter, start + len(phrase))
                if position >= 0:
                    found.append((_RANK_PHRASE, position, letter))
    core = text.strip()
    for letter in letters:
        if core.startswith(letter) and (len(core) == 1 or not core[1].isalpha()):
            found.append((_RANK_START, 0, letter))
        if core.endswith(letter) and (len(core) == 1 or not core[-2].isalpha()):
            found.append((_RANK_END, len(text) - 1, letter))
    if not found:
        found = [(_RANK_ANYWHERE, text.rfind(letter), letter) for letter in letters if letter in text]
    # Equal (rank, position) pairs always carry the same letter, so max() needs no tie rule.
    return max(found, key=lambda item: (item[0], item[1]))[2] if found else ""
