"""report.json's writer: number lists stay on one line and the text stays valid JSON."""

from __future__ import annotations

import json

import torch

from lokitool.report import document


def test_dumps_keeps_number_lists_on_one_line():
    obj = {"a": [1, 2, 3], "b": [{"c": [0.5, None]}], "s": ["x, y", "z"]}
    text = document.dumps(obj)
    assert json.loads(text) == obj
    assert '"a": [1, 2, 3]' in text and '"c": [0.5, null]' in text


def test_markdown_shows_the_selection_aware_check_next_to_score_variance():
    """The calibration header's held-out masses appear per layer (means over heads), with the score
    variance of PCA and query-aware at the same d, and nothing when no file has a fit."""
    from dataclasses import replace

    from report_toys import with_queries

    from lokitool.report import markdown, numbers

    cal, _ = with_queries(torch.tensor([1.0, 2, 4, 8, 1, 1, 1, 1], dtype=torch.float64))
    record = {"choice": [["qa", "sa"], ["pca", "pca"]], "kf": [0.125, 0.25],
              "heldout_mass": {"pca": [[0.5, 0.7], [0.9, 0.8]], "qa": [[0.6, 0.6], [0.1, 0.2]], "sa": [[0.4, 0.9], [0.3, 0.3]]}}
    fitted = replace(cal, info={**cal.info, "selection_aware": {"2": record}})
    report = numbers.build_report([("fit.safetensors", fitted)], (0.9,))
    text = "\n".join(markdown._md_selection_aware(report, ["fit"]))
    assert "### fit: selection-aware basis (sa-post), d = 2" in text and "mean over kf 0.125, 0.25" in text
    sv = next(v for v in report.entries[0].score_variance if v.kind == "post" and v.d == 2)
    row0 = f"| 0 | qa / sa | 0.6000 | 0.6000 | 0.6500 | {float(sv.captured['pca'][0].mean()):.3f} | {float(sv.captured['query_aware'][0].mean()):.3f} |"
    assert row0 in text
    assert "| 1 | pca / pca | 0.8500 | 0.1500 | 0.3000 |" in text
    assert markdown._md_selection_aware(numbers.build_report([("plain.safetensors", cal)], (0.9,)), ["plain"]) == []
