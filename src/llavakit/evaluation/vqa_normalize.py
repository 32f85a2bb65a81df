"""The official VQA answer normalisation (EvalAI's), as lmms-eval's ``EvalAIAnswerProcessor`` applies it.

TextVQA (and any VQA-accuracy benchmark) compares answers only after this normalisation. The steps, in order,
with the quirks of lmms-eval's copy (from MMF's ``EvalAIAnswerProcessor``), each reproduced:

1. lower-case; delete every ``,`` and ``?``; ``'s`` becomes ``" 's"`` (so ``"it's"`` is two words); strip;
   newlines and tabs become spaces; strip again;
2. punctuation ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``: each mark is deleted when it touches a space
   somewhere in the (step-1) text, otherwise replaced by a space, everywhere in the text. The official
   "digit,digit" exception (delete every mark when a comma sits between digits) can never fire here, since
   step 1 already deleted the commas;
3. periods: every ``.`` not followed by a digit is deleted ("3.5" keeps its point) -- but only the first 32 of
   them, because lmms-eval passes ``re.UNICODE`` (32) where ``re.sub`` expects its ``count``; its look-behind
   ``(?!<=\\d)`` is a typo'd negative look-ahead that never excludes anything;
4. words (split on whitespace): number words ``none``/``zero`` .. ``ten`` become digits (``none`` is ``0``),
   the articles ``a``/``an``/``the`` are dropped (after the number mapping), then the contraction table
   restores apostrophes (``dont`` -> ``don't``; its capitalised keys such as ``Im`` never match lower-cased
   words, and ``somebody'd`` maps to ``somebodyd``, both as in the official table); the words are joined by
   single spaces.

An answer made only of articles (``"the"``, ``"a"``) normalises to the empty string, which an empty prediction
then matches.
"""

from __future__ import annotations

import re

# Deleted or turned into a space by step 2 (the official list; "." is PERIOD's, "'" and ":" are kept).
PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip
# A period not followed by a digit.
PERIOD = re.compile(r"\.(?!\d)")
# lmms-eval deletes at most this many periods (re.UNICODE's value, passed as re.sub's count).
MAX_PERIODS = 32
NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
CONTRACTIONS = {
    'aint': "ain't", 'arent': "aren't", 'cant': "can't", 'couldve': "could've", 'couldnt': "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", 'didnt': "didn't", 'doesnt': "doesn't",
    'dont': "don't", 'hadnt': "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    'hasnt': "hasn't", 'havent': "haven't", 'hed': "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    'hes': "he's", 'howd': "how'd", 'howll': "how'll", 'hows': "how's", "Id've": "I'd've",
    "I'dve": "I'd've", 'Im': "I'm", 'Ive': "I've", 'isnt': "isn't", 'itd': "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", 'itll': "it'll", "let's": "let's", 'maam': "ma'am", 'mightnt': "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", 'mightve': "might've", 'mustnt': "mustn't",
    'mustve': "must've", 'neednt': "needn't", 'notve': "not've", 'oclock': "o'clock",
    'oughtnt': "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    'shant': "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    'shouldve': "should've", 'shouldnt': "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": 'somebodyd', "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", 'somebodyll': "somebody'll", 'somebodys': "somebody's",
    'someoned': "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    'someonell': "someone'll", 'someones': "someone's", 'somethingd': "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", 'somethingll': "something'll",
    'thats': "that's", 'thered': "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    'therere': "there're", 'theres': "there's", 'theyd': "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", 'theyll': "they'll", 'theyre': "they're", 'theyve': "they've",
    'twas': "'twas", 'wasnt': "wasn't", "wed've": "we'd've", "we'dve": "we'd've", 'weve': "we've",
    'werent': "weren't", 'whatll': "what'll", 'whatre': "what're", 'whats': "what's", 'whatve': "what've",
    'whens': "when's", 'whered': "where'd", 'wheres': "where's", 'whereve': "where've", 'whod': "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", 'wholl': "who'll", 'whos': "who's", 'whove': "who've",
    'whyll': "why'll", 'whyre': "why're", 'whys': "why's", 'wont': "won't", 'wouldve': "would've",
    'wouldnt': "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", 'yall': "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", 'youd': "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    'youll': "you'll", 'youre': "you're", 'youve': "you've",
}  # fmt: skip


def normalize_answer(answer: str) -> str:
    """``answer`` normalised by the four steps in the module docstring."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = process_punctuation(text)
    text = PERIOD.sub("", text, count=MAX_PERIODS)
    return process_digit_article(text)


def process_punctuation(text: str) -> str:
    """Step 2: each mark deleted if it touches a space anywhere in ``text``, else replaced by a space."""
    out = text
    for mark in PUNCTUATION:
        # The test reads the text as it was before any mark was replaced, as the official code does.
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if touches_space else " ")
    return out


def process_digit_article(text: str) -> str:
    """Step 4: number words to digits, articles dropped, contractions restored."""
    words = [NUMBERS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)
