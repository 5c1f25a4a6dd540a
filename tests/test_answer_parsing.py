"""Every rule of the answer parsers with a case that only that rule resolves: without the rule (or with the
rules in another order) the case reads as another answer."""
import math

import pytest

from flare_exp.metrics.answers import extract_choice, parse_number

DENTAL = "ABCDEFGHIJK"  # options up to K: "I" is an option too


@pytest.mark.parametrize("text,expected,rule", [
    # 1. the whole answer (on a line of its own) comes first: the keyword rule would read "Option B"
    ("Option B is wrong.\nC", "C", "whole answer"),
    ("C\nOption B is less likely.", "C", "whole answer"),  # any line, not only the last
    ("(D)", "D", "whole answer"),
    # 2. a keyword with a lower-case letter: no other rule reads lower case inside a sentence
    ("The answer is c", "C", "keyword"),
    ("my choice: (e)", "E", "keyword"),
    # 3. "(C)" anywhere: the standalone-capital rule would take the first capital, B
    ("B is unlikely; (C) fits best", "C", "parenthesised"),
    # 4. "C. ..." at the start of a line: the standalone-capital rule would take B from the first line
    ("Comparing B and D:\nC. Caries", "C", "line start"),
    # 5. a lone lower-case letter
    ("c", "C", "lone lower case"),
    # 6. a standalone capital, skipping "I"/"A" that start a phrase: "I think" is not option I
    ("I think it is D", "D", "standalone capital"),
    ("A small effusion; B", "B", "standalone capital"),
    ("It is I", "I", "standalone capital"),  # I at the end is the option
    ("K", "K", "whole answer"),  # options past F (the original scripts stopped at F)
])
def test_each_choice_rule(text, expected, rule):
    assert extract_choice(text, DENTAL) == expected, rule


def test_choice_refusals():
    assert extract_choice("E", "ABCD") is None  # not an option of this question
    assert extract_choice("a small effusion", DENTAL) is None  # the article, lower case
    assert extract_choice("I think so", DENTAL) is None
    assert extract_choice(None, DENTAL) is None and extract_choice("", DENTAL) is None
    assert extract_choice("Bilateral", DENTAL) is None  # a capital inside a word


@pytest.mark.parametrize("text,expected", [
    ("1e1", 10.0),              # the exponent is part of the number
    ("1.5e-2 cm", 0.015),
    (".5", 0.5),                # a leading decimal point (not 5)
    ("-.5", -0.5),
    ("22.9%", 22.9),            # the decimals (not 22), the percent sign left
    ("1,234.5 mm", 1234.5),     # a thousands separator (not 1)
    ("12,34", None),            # not a thousands group: a decimal comma, unreadable (it read as 12)
    ("12,5", None), ("0,25 %", None), ("1,2345", None),
    ("12, 5", 12.0),            # a comma and a space: two numbers, the first read
    ("\u22125 mm", -5.0),       # a typeset minus sign is the sign (it read as 5)
    ("\uff0d5", -5.0), ("\ufe633", -3.0),  # full-width and small hyphen-minus too
    ("Answer \u2013 30%", 30.0), ("\u201312", 12.0),  # a dash is no minus sign (a separator, a range)
    ("1_000", 1000.0), ("2_5.0_1", 25.01), ("1e1_0", 1e10),  # digit groups as float() reads them (it read 1, 2, 10)
    ("0,250", None), ("40\u066b5", None),  # a decimal comma, not 250 or 40
    ("1 000", None), ("1\u202f000 mm", None), ("12 345.6", None), ("1\u00a0000", None),  # space-grouped
    ("2 teeth", 2.0), ("5 mm, 100 um", 5.0), ("1 0000", 1.0),  # thousands (it read 1, 12): unreadable, not these
    ("12.5.3", None), ("12.5. Next", 12.5), ("12. 5", 12.0),  # a second decimal point (it read 12.5)
    ("1/2", None), ("12.5/100", None), ("1 1/2", None), ("1\u00bd", None), ("\u00bd", None),  # fractions (it
    ("\u00be of 30", None), ("1\u20442", None), ("30 / 40", 30.0), ("3 mm/year", 3.0),  # read 1, 12.5, 1, 1, 30)
    ("\uff14\uff10\uff0e\uff15", None), ("\uff11\uff0c\uff10\uff10\uff10", None), ("\u0662\u066c\u0665\u0660\u0660", None),  # separators
    ("1'000", None), ("1\u2019000", None), ("1__000", None), ("0x1A", None),  # float() refuses (it read 40, 1, 2, 1)
    ("\uff14\uff10", 40.0), ("\u0664\u0660.\u0665", 40.5), ("it's 5", 5.0), ("5 x 3", 5.0),  # float() reads these
    ("grade-2", 2.0), ("x-3", 3.0), ("=-5", -5.0), ("(-5)", -5.0), ("3-4", 3.0),  # a hyphen after a letter: no sign
    ("about 20 percent", 20.0),  # the first number anywhere in the text
    ("-3.5 mm", -3.5),          # the sign is kept
    ("+3", 3.0),
    (7, 7.0), (2.5, 2.5),       # numbers as they are
])
def test_each_number_rule(text, expected):
    assert parse_number(text) == expected


def test_negative_zero_and_refusals():
    zero = parse_number("-0")
    assert zero == 0.0 and math.copysign(1.0, zero) == -1.0  # read, and read with its sign
    assert parse_number("0") == 0.0 and zero is not None
    assert parse_number(True) is None  # a boolean is not a number
    assert parse_number(None) is None and parse_number("no number") is None and parse_number([1]) is None
    # past a float's range, or NaN: no error is measurable from it, so it is unparseable (not Infinity)
    assert parse_number("1e309") is None and parse_number("9" * 400) is None and parse_number(10 ** 400) is None
    assert parse_number(float("nan")) is None and parse_number(float("inf")) is None
