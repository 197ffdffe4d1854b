"""The label gate: a declared class list passes one rule or refuses its source in one line; a class index is a sample's to lose."""

from __future__ import annotations

import pytest

from imgpipe.data.labelgate import MAX_CLASSES, check_class_list, class_index


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ({"0": "cat"}, "are a mapping, not a list of strings"),
        ("cat", "are a string, not a list of strings"),
        (None, "are null, not a list of strings"),
        (["cat", None], "class 1 is null, not a string"),
        (["cat", 3], "class 1 is a number, not a string"),
        (["cat", ["dog"]], "class 1 is a list, not a string"),
        (["cat", {"a": 1}], "class 1 is a mapping, not a string"),
        (["cat", "dog", "cat"], "class 2 repeats class 0 ('cat')"),
        (["cat", "dog\nx"], "class 1: the class name holds U+000A"),
        (["cat", "bidi\u202eevil"], "class 1: the class name holds U+202E"),
        (["cat", "a/b"], "class 1: the class name holds a path separator (U+002F)"),
        (["cat", "a\\b"], "class 1: the class name holds a path separator (U+005C)"),
        (["cat", ".."], "class 1: the class name is a path component"),
        (["cat", ""], "class 1: the class name is empty"),
        (["x" * 129], "class 0: the class name has 129 characters"),
        ([f"c{i}" for i in range(MAX_CLASSES + 1)], f"{MAX_CLASSES + 1} class names; at most {MAX_CLASSES}"),
    ],
)
def test_a_list_that_breaks_the_rule_is_refused_in_one_line_naming_the_file_and_the_rule(value, rule):
    with pytest.raises(ValueError) as caught:
        check_class_list(value, "file:///d/README.md")
    message = str(caught.value)
    assert message.startswith("file:///d/README.md: ") and rule in message
    assert "\n" not in message and len(message) < 300, "one line, never str() of the structure"


def test_a_list_that_passes_is_kept_whole_and_in_order():
    assert check_class_list(["dog", "cat", "Chat noir"], "x") == ("dog", "cat", "Chat noir")
    assert check_class_list((), "x") == ()


@pytest.mark.parametrize(
    ("value", "declared", "index", "why"),
    [
        ("0", 2, 0, ""),
        (" 1\n", 2, 1, ""),
        ("+1", None, 1, ""),
        ("007", None, 7, ""),
        (99_999, None, 99_999, ""),
        (99_999, 2, None, "99999 is outside the 2 class names"),
        ("2", 2, None, "2 is outside the 2 class names"),
        (MAX_CLASSES, None, None, f"past {MAX_CLASSES - 1}"),
        ("-1", None, None, "-1 is negative"),
        ("cat", None, None, "is not an integer"),
        ("1.0", None, None, "is not an integer"),
        ("\u0663", None, None, "is not an integer"),  # ARABIC-INDIC DIGIT THREE: int() reads it, a .cls holds ASCII
        ("9" * 5000, None, None, "has 5000 digits"),  # past Python's int-string limit: int() would raise
        ("0" * 60_000 + "1", None, 1, ""),
        (True, None, None, "is a boolean"),
    ],
)
def test_a_class_index_is_an_integer_below_its_bound_or_a_reason(value, declared, index, why):
    got, reason = class_index(value, declared, "the .cls class index")
    assert got == index
    assert (why in reason) if why else reason == ""
