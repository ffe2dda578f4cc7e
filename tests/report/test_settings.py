"""rank-report's settings: thresholds and dimension budgets parsed, checked, and turned into d."""

from __future__ import annotations

import re

import pytest

from lokitool.errors import UserError
from lokitool.report import settings
from lokitool.sparse.reference import dims_for

# ----------------------------------------------------------------------------------------------
# thresholds


def test_parse_variance_sorts_and_dedupes():
    assert settings.parse_variance("0.95, 0.8,0.9,0.9") == (0.8, 0.9, 0.95)
    assert settings.parse_variance("1") == (1.0,)


@pytest.mark.parametrize("text, words", [
    ("0.8,abc", "'abc' is not a number"),
    ("0", "outside (0, 1]"),
    ("90", "not percentages"),
    ("1.01", "outside (0, 1]"),
    ("-0.5", "outside (0, 1]"),
    ("nan", "outside (0, 1]"),
    (" , ", "no variance threshold"),
])
def test_parse_variance_refuses(text, words):
    with pytest.raises(UserError) as err:
        settings.parse_variance(text)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_parse_dims_and_rounding():
    assert settings.parse_dims("0.5, 0.25,0.5") == (0.25, 0.5)
    assert settings.budget_dims((0.25, 0.5), 64) == (16, 32)
    assert settings.budget_dims((0.25, 0.3, 1.0), 8) == (2, 8)  # 2.4 rounds to 2: one d
    # a tie (2.5) rounds as Loki rounds it (sparse.reference.dims_for decides how); never below 1
    assert settings.budget_dims((0.3125, 0.01), 8) == (1, dims_for(0.3125, 8))
    for text, words in (("16", "outside (0, 1]"), ("a", "'a' is not a number; give fractions such as --dims"), ("", "no dimension fraction")):
        with pytest.raises(UserError, match=re.escape(words)):
            settings.parse_dims(text)


def test_reference_threshold_prefers_0_9_else_middle():
    assert settings.reference_threshold((0.8, 0.9, 0.95)) == 0.9
    assert settings.reference_threshold((0.5, 0.7, 0.99)) == 0.7
    assert settings.reference_threshold((0.6,)) == 0.6


