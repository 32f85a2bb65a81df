"""lmms-eval's registered ``exact_match`` metric as GQA and AI2D configure it (``ignore_case`` and
``ignore_punctuation``): both sides lower-cased, then every ASCII punctuation character deleted, then compared."""

from __future__ import annotations

import string

_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def exact_match_text(text: str) -> str:
    """``text`` as that metric compares it (no stripping: the metric strips nothing)."""
    return text.lower().translate(_NO_PUNCTUATION)
