"""report.json's writer: number lists stay on one line and the text stays valid JSON."""

from __future__ import annotations

import json

from lokitool.report import document


def test_dumps_keeps_number_lists_on_one_line():
    obj = {"a": [1, 2, 3], "b": [{"c": [0.5, None]}], "s": ["x, y", "z"]}
    text = document.dumps(obj)
    assert json.loads(text) == obj
    assert '"a": [1, 2, 3]' in text and '"c": [0.5, null]' in text
