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
    """The calibration header's held-out measures appear per layer and KV head, with the score
    variance of PCA and query-aware at the same d; a file from before recall and output error were
    recorded shows - there; nothing when no file has a fit."""
    from dataclasses import replace

    from report_toys import with_queries

    from lokitool.report import markdown, numbers

    cal, _ = with_queries(torch.tensor([1.0, 2, 4, 8, 1, 1, 1, 1], dtype=torch.float64))
    mass = {"pca": [[0.5, 0.7], [0.9, 0.8]], "qa": [[0.6, 0.6], [0.1, 0.2]], "sa": [[0.4, 0.9], [0.3, 0.3]]}
    recall = {"pca": [[0.25, 0.5], [0.75, 0.125]], "qa": [[0.5, 0.5], [0.5, 0.5]], "sa": [[0.625, 1.0], [0.0, 0.375]]}
    error = {"pca": [[0.1, 0.2], [0.3, 0.4]], "qa": [[0.05, 0.5], [0.6, 0.7]], "sa": [[0.5, 0.01], [0.8, 0.9]]}
    record = {"choice": [["qa", "sa"], ["pca", "pca"]], "kf": [0.125, 0.25], "chosen_by": "heldout_output_error",
              "heldout_mass": mass, "heldout_recall": recall, "heldout_output_error": error}
    fitted = replace(cal, info={**cal.info, "selection_aware": {"2": record}})
    report = numbers.build_report([("fit.safetensors", fitted)], (0.9,))
    text = "\n".join(markdown._md_selection_aware(report, ["fit"]))
    assert "### fit: selection-aware basis (sa-post), d = 2" in text and "mean over kf 0.125, 0.25" in text
    assert "the best output error" in text
    sv = next(v for v in report.entries[0].score_variance if v.kind == "post" and v.d == 2)
    variance = lambda i, h: f"{float(sv.captured['pca'][i][h]):.3f} | {float(sv.captured['query_aware'][i][h]):.3f}"
    row01 = f"| 0 | 1 | sa | 0.7000 | 0.6000 | 0.9000 | 0.5000 | 0.5000 | 1.0000 | 0.2000 | 0.5000 | 0.0100 | {variance(0, 1)} |"
    assert row01 in text
    assert "| 1 | 0 | pca | 0.9000 | 0.1000 | 0.3000 | 0.7500 | 0.5000 | 0.0000 | 0.3000 | 0.6000 | 0.8000 |" in text
    old = {"choice": record["choice"], "kf": [0.125, 0.25], "heldout_mass": mass}  # an earlier file: mass only
    report = numbers.build_report([("old.safetensors", replace(cal, info={**cal.info, "selection_aware": {"2": old}}))], (0.9,))
    text = "\n".join(markdown._md_selection_aware(report, ["old"]))
    assert "| 1 | 1 | pca | 0.8000 | 0.2000 | 0.3000 | - | - | - | - | - | - |" in text and "the best mass" in text
    assert markdown._md_selection_aware(numbers.build_report([("plain.safetensors", cal)], (0.9,)), ["plain"]) == []
