"""Final-number extraction: GSM8K's marker, the documented last-number fallback, and normalisation."""

import pytest

from prefpipe.answers import extract_answer, gold_answer, normalize_number


@pytest.mark.parametrize("text, value, rule", [
    ("5 + 7 = 12\n#### 12", "12", "marker"),
    ("#### 12\n#### 13", "12", "marker"),  # the first marker with a number wins
    ("#### \n12 apples, so #### 14", "14", "marker"),  # a marker with no number is passed over
    ("####12", "12", "marker"),  # no space after the marker
    ("#### 1,234", "1234", "marker"),  # thousands separators
    ("#### $5", "5", "marker"),
    ("#### -3", "-3", "marker"),
    ("#### 12.50", "12.5", "marker"),
    ("#### 12.0", "12", "marker"),
    ("#### 7.", "7", "marker"),  # a trailing full stop
    ("She has 3 left, so the answer is 7.", "7", "last_number"),  # fallback: the last number
    ("Total: 1,234.50 dollars", "1234.5", "last_number"),
    ("#### twelve, so 3 are left", "3", "last_number"),  # marker without a number: fallback
    ("It is -4 degrees", "-4", "last_number"),
    ("3/4 of the cake and 5 more", "5", "last_number"),  # fractions are not numbers
    ("x2 and y", None, "none"),  # digits glued to letters on the left are not numbers
    ("no number at all", None, "none"),
    ("", None, "none"),
])
def test_extract_answer(text, value, rule):
    assert extract_answer(text) == (value, rule)


def test_glued_digits_on_the_right_still_count():
    # "12kg" is a number followed by a unit; "a12" is an identifier.
    assert extract_answer("weighs 12kg")[0] == "12"
    assert extract_answer("item a12")[0] is None


@pytest.mark.parametrize("raw, value", [
    ("1,000", "1000"), ("$3", "3"), ("0.50", "0.5"), ("-0", "0"), ("007", "7"), ("12.", "12"),
    ("abc", None), ("", None), ("1.2.3", None),
])
def test_normalize_number(raw, value):
    assert normalize_number(raw) == value


def test_gold_answer_reads_the_gsm8k_field():
    assert gold_answer("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72") == "72"
    assert gold_answer("so $1,200\n#### 1,200") == "1200"
    assert gold_answer("no marker here 5") is None
    assert gold_answer("#### ") is None


def test_marker_and_gold_agree_on_the_same_text():
    answer = "3 + 4 = 7\n#### 7"
    assert extract_answer(answer)[0] == gold_answer(answer) == "7"
