"""Reading answers out of model output: shared by the GRPO rewards and the evaluation metrics.

- ``extract_choice``: the option letter of a multiple-choice answer (dental: A..K). The original scripts upper-cased the
  output before searching ``\\b[A-F]\\b``, so the article "a" read as option A and options past F never
  matched; here a letter counts only in forms that mean an option: ``C``, ``C.``, ``(C)``, ``Answer: C``,
  ``option C``, ``C) ...`` at the start, or a standalone capital that is not the article/pronoun starting a
  phrase ("A small effusion", "I think").
- ``label_set`` / ``set_f1``: a multi-label answer as a set of labels split on the dataset's separator,
  compared case- and whitespace-insensitively.
- ``parse_number``: the first number in a regression answer: ``22.9``, ``22.9%``, ``1,234``, ``about 20
  percent``, ``1e1`` (10: the exponent is part of the number), ``1_000`` (1000, as ``float()``), a typeset,
  small or full-width minus sign as "-" (a dash is no sign, nor a hyphen after a letter: ``grade-2`` is 2); none
  in ``12,5``, ``0,250`` or ``40\u066b5`` (a decimal comma), ``1 000`` (thousands grouped by a space),
  ``12.5.3``, a fraction (``1/2``, ``1\u00bd``) or a separator float() does not take (a full-width point,
  ``1'000``).
"""
from __future__ import annotations

import re


def extract_choice(text: str, letters: str = "ABCDEFGHIJK") -> str | None:
    if not isinstance(text, str):
        return None
    s = text.strip()
    cls = f"[{letters}]"
    patterns = [
        rf"^\(?({cls})\)?[.):]?$",                                             # the whole answer: "C", "(C)", "C."
        rf"(?i:\b(?:answer|option|choice)\b(?:\s+is)?\s*[:\-]?\s*)\(?({cls}|{cls.lower()})\)?(?![\w])",
        rf"\(({cls})\)",                                                       # "(C)"
        rf"^({cls})[.):]\s",                                                   # "C. Caries", "C) ..."
    ]
    for pat in patterns:
        m = re.search(pat, s, flags=re.M)
        if m:
            return m.group(1).upper()
    if len(s) == 1 and s.upper() in letters:  # a lone lower-case letter
        return s.upper()
    for m in re.finditer(rf"(?<![\w'-])({cls})(?![\w'-])", s):
        letter = m.group(1)
        following = s[m.end():m.end() + 2]
        if letter in "AI" and re.match(r"\s[a-z]", following):  # "A small ...", "I think ..."
            continue
        return letter
    return None


def label_set(text, separator: str) -> set[str]:
    if not isinstance(text, str):
        return set()
    parts = text.split(separator)
    return {re.sub(r"\s+", " ", p).strip(" .\n\t").lower() for p in parts} - {""}


def set_f1(pred: set, gold: set) -> float:
    if not pred and not gold:
        return 1.0
    if not pred or not gold:
        return 0.0
    return 2 * len(pred & gold) / (len(pred) + len(gold))


# thousands groups ("1,234": never "0,250", a decimal comma), or digits with float()'s underscores ("1_000")
# A sign only where no letter or digit stands right before it: "grade-2" is 2, "x-3" 3.
_SIGN = r"(?:(?<![^\W_])[-+])?"
_NUMBER = re.compile(rf"(?:{_SIGN}(?:(?!0,)\d{{1,3}}(?:,\d{{3}})+(?!\d)|\d+(?:_\d+)*)(?:\.\d+(?:_\d+)*)?|{_SIGN}\.\d+)"
                     r"(?:[eE][-+]?\d+(?:_\d+)*)?")
# a minus sign written otherwise (typeset, small or full-width hyphen-minus) is the number's sign; a dash (en, em,
# figure) is not taken for one: "Answer \u2013 30%" is 30
MINUS_SIGNS = str.maketrans(dict.fromkeys("\u2212\ufe63\uff0d", "-"))
DECIMAL_COMMA = re.compile(r"[,\u066b]\d")  # "12,5", Arabic "40\u066b5": a decimal comma, not a whole number
# after the number: thousands grouped by a space ("1 000", a no-break or thin space too: not 1), a second
# decimal point ("12.5.3", a version or a typo: not 12.5), or a fraction ("1/2", "1\u00bd", "1 1/2": the first
# number is not its value); unreadable, as FLARE's float() finds them
_SPACES = "[ \u00a0\u2009\u202f]"
UNREADABLE_AFTER = re.compile(rf"{_SPACES}\d{{3}}(?!\d)|\.\d")
VULGAR_FRACTION = "[\u00bc-\u00be\u2150-\u215e]"  # one character: "\u00bd" is a number float() cannot read
FRACTION_AFTER = re.compile(rf"(?:{_SPACES}?\d+)?[/\u2044]\d|{_SPACES}?{VULGAR_FRACTION}")
# a separator float() does not take between digits: a full-width point or comma ("\uff14\uff10\uff0e\uff15"), the
# Arabic thousands separator ("\u0662\u066c\u0665\u0660\u0660"), an apostrophe ("1'000"), a run of underscores
# ("1__000"), a hexadecimal "0x1A": the first digits are not the number
OTHER_SEPARATOR_AFTER = re.compile(r"[\uff0e\uff0c\u066c'\u2019]\d|_+\d|(?<=0)[xX][0-9a-fA-F]")


def _unreadable_after(m: re.Match) -> bool:
    """A space and three digits after a whole number of 1-3 digits (space-grouped thousands), a decimal
    point and a digit after a number (a second decimal point), or a fraction after it."""
    if FRACTION_AFTER.match(m.string, m.end()) or OTHER_SEPARATOR_AFTER.match(m.string, m.end()):
        return True
    after = UNREADABLE_AFTER.match(m.string, m.end())
    if after is None:
        return False
    return after.group(0).startswith(".") or re.fullmatch(r"[-+]?\d{1,3}", m.group(0)) is not None


def parse_number(text) -> float | None:
    """The first number in the answer; None for none, for one past a float's range ("1e309", a 400-digit
    integer: no error is measurable from it) or NaN, and for one written with a decimal comma ("12,5", "0,25":
    read as 12 and 0 it counted as readable; FLARE's float() refuses it, as prepare refuses such an answer)."""
    import math

    if isinstance(text, (int, float)) and not isinstance(text, bool):
        try:
            number = float(text)
        except OverflowError:
            return None
    elif not isinstance(text, str):
        return None
    else:
        text = text.translate(MINUS_SIGNS)
        m = _NUMBER.search(text)
        if m and (DECIMAL_COMMA.match(text, m.end()) or _unreadable_after(m)):  # not read as a part
            return None
        if re.search(VULGAR_FRACTION, text[:m.start()] if m else text):  # "\u00bd mm": the first number, unread
            return None
        number = float(m.group(0).replace(",", "").replace("_", "")) if m else math.nan
    return number if math.isfinite(number) else None
