"""rank-report end to end on small hand-built calibration files: report.json, report.md, the figures,
the terminal tables, and one-line errors."""

from __future__ import annotations

import json

import pytest
from report_toys import BLIND, calibration, rotated_pair, with_queries

# ----------------------------------------------------------------------------------------------
# the command


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from lokitool.cli.main import main

    with pytest.raises(SystemExit) as done:
        main(argv)
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


@pytest.fixture()
def two_files(tmp_path):
    a, b, _ = rotated_pair()
    paths = [tmp_path / "older.safetensors", tmp_path / "newer.safetensors"]
    a.save(paths[0])
    b.save(paths[1])
    return [str(p) for p in paths]


def test_cli_writes_report_with_the_right_numbers(tmp_path, two_files, capsys):
    out_dir = tmp_path / "reports" / "rank"
    code, out, err = run_cli(["rank-report", *two_files, "--output-dir", str(out_dir)], capsys)
    assert code == 0, err

    data = json.loads((out_dir / "report.json").read_text())
    assert data["files"] == two_files and data["variance"] == [0.8, 0.9, 0.95]
    first = data["calibrations"][0]
    assert first["model"] == "toy/model" and first["dataset"] == "toy:older"
    assert first["model_facts"]["head_dim"] == 8 and first["info"]["num_tokens"] == 4096
    assert first["layers"][1] == {
        "layer": 1,
        "pre": {"0.8": [3, 7], "0.9": [4, 8], "0.95": [5, 8]},
        "post": {"0.8": [3, 7], "0.9": [4, 8], "0.95": [5, 8]},
    }
    assert first["mean_rank"]["post"]["0.9"] == 6.0

    assert [(c["a"], c["b"]) for c in data["comparisons"]] == [tuple(two_files), tuple(reversed(two_files))]
    layer = data["comparisons"][0]["layers"][1]
    assert (layer["layer"], layer["kind"], layer["d"]) == (0, "post", [4, 8])
    assert layer["agreement"] == pytest.approx([0.75, 1.0], abs=1e-5)
    assert layer["captured_variance"] == pytest.approx([14.5 / 15.9375, 1.0], abs=1e-5)

    md = (out_dir / "report.md").read_text()
    # layer 0 of older: means of heads (3, 7), (4, 8), (5, 8) pre and post, then the heads at 90%
    assert "| 0 | 5.0 | 6.0 | 6.5 | 5.0 | 6.0 | 6.5 | 4 / 8 | 4 / 8 |" in md
    assert "| older | newer | post-RoPE | 6.0 | 0.875 (min 0.750) |" in md
    for name in ("rank_per_layer.png", "comparison.png", "1-older-heatmap.png", "2-newer-spectrum.png"):
        assert f"]({name})" in md
        png = (out_dir / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert not [p.name for p in out_dir.iterdir() if p.name.startswith(".")]  # no temp files left
    assert "rank at 90% per layer" in out and "0.875" in out


def test_cli_single_file_has_no_comparisons(tmp_path, two_files, capsys):
    code, _, err = run_cli(["rank-report", two_files[0], "--output-dir", str(tmp_path / "one"), "--variance", "0.5"], capsys)
    assert code == 0, err
    data = json.loads((tmp_path / "one" / "report.json").read_text())
    # rank at 0.5: 1 for the halving spectrum (8 of 15.94), 4 for the flat one
    assert data["comparisons"] == [] and data["calibrations"][0]["mean_rank"]["pre"] == {"0.5": 2.5}
    assert not (tmp_path / "one" / "comparison.png").exists()


def test_cli_score_variance_section(tmp_path, capsys):
    cal, _ = with_queries(BLIND)
    plain, _, _ = rotated_pair()
    files = [str(tmp_path / "queries.safetensors"), str(tmp_path / "keys-only.safetensors")]
    cal.save(files[0])
    plain.save(files[1])
    out_dir = tmp_path / "out"
    code, out, err = run_cli(["rank-report", *files, "--output-dir", str(out_dir), "--dims", "0.5,0.25"], capsys)
    assert code == 0, err

    data = json.loads((out_dir / "report.json").read_text())
    assert data["dims"] == [0.25, 0.5] and data["d"] == [2, 4]
    with_q, without = data["calibrations"]
    rows = with_q["score_variance"]
    assert [(r["layer"], r["kind"], r["d"]) for r in rows[:4]] == [(0, "pre", 2), (0, "pre", 4), (0, "post", 2), (0, "post", 4)]
    assert len(rows) == 2 * 2 * 2 and "score_variance_note" not in with_q
    last = rows[-1]
    assert (last["layer"], last["kind"], last["d"]) == (1, "post", 4)
    assert last["key_variance"] == pytest.approx([15 / 15.9375] * 2, abs=1e-5)
    assert last["pca"] == pytest.approx([0.0, 0.0], abs=1e-5)
    assert last["query_aware"] == pytest.approx([1.0, 1.0], abs=1e-5)
    assert len(last["random"]) == 2
    mean = {(m["kind"], m["d"]): m for m in with_q["score_variance_mean"]}
    assert mean[("pre", 2)]["query_aware"] == pytest.approx(0.8, abs=1e-5)
    assert without["score_variance"] is None and "--no-queries" in without["score_variance_note"]

    md = (out_dir / "report.md").read_text()
    assert "## Score variance captured by truncated scores" in md
    assert "| queries | post-RoPE | 4 | 0.941 | 0.000 |" in md
    assert "](1-queries-score_variance.png)" in md and (out_dir / "1-queries-score_variance.png").is_file()
    assert f"- keys-only (`{files[1]}`): no query statistics" in md
    assert not (out_dir / "2-keys-only-score_variance.png").exists()
    assert "score variance captured" in out and "keys-only: no query statistics" in out


@pytest.mark.parametrize("case", ["missing", "foreign", "variance", "dims", "unwritable", "other-model", "twice"])
def test_cli_bad_input_is_one_line(tmp_path, two_files, capsys, case):
    target = tmp_path / "out"
    args = [*two_files, "--output-dir", str(target)]
    expected = {
        "missing": "does not exist",
        "foreign": "not a calibration file",
        "variance": "outside (0, 1]",
        "dims": "dimension fraction 32 is outside (0, 1]",
        "unwritable": "cannot create directory",
        "other-model": "one model",
        "twice": "given twice",
    }[case]
    if case == "missing":
        args[1] = str(tmp_path / "nope.safetensors")
    elif case == "foreign":
        (tmp_path / "notes.safetensors").write_text("hello")
        args[1] = str(tmp_path / "notes.safetensors")
    elif case == "variance":
        args += ["--variance", "0.9,95"]
    elif case == "dims":
        args += ["--dims", "0.25,32"]
    elif case == "unwritable":
        (tmp_path / "plain-file").write_text("")
        target = tmp_path / "plain-file" / "report"
        args[-1] = str(target)
    elif case == "other-model":
        a, _, rows = rotated_pair()
        calibration(a.pca["pre"].eigenvalues, rows, model_id="toy/other").save(tmp_path / "other.safetensors")
        args[1] = str(tmp_path / "other.safetensors")
    elif case == "twice":
        args[1] = args[0]
    code, _, err = run_cli(["rank-report", *args], capsys)
    assert code == 2
    assert err.startswith("error:") and expected in err and err.count("\n") == 1
    assert not (target / "report.json").exists()


def test_cli_reads_stored_query_aware_bases_instead_of_fitting(tmp_path, capsys, monkeypatch):
    from dataclasses import replace

    from lokitool.calib import calibration as calibration_module
    from lokitool.report.numbers import score_variances

    cal, _ = with_queries(BLIND)
    fitted = {(sv.kind, sv.d): sv.captured["query_aware"] for sv in score_variances(cal, (2, 4))}
    stored = replace(cal, query_aware={kind: {d: cal.fit_query_aware(kind, d) for d in (2, 4)} for kind in ("pre", "post")})
    stored.save(tmp_path / "stored.safetensors")

    def refuse(*args, **kwargs):
        raise AssertionError("fitted a query-aware basis that the file stores")

    monkeypatch.setattr(calibration_module, "query_aware_subspace", refuse)
    code, _, err = run_cli(["rank-report", str(tmp_path / "stored.safetensors"), "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "out" / "report.json").read_text())["calibrations"][0]["score_variance"]
    assert len(rows) == 2 * 2 * 2
    for row in rows:  # the same numbers as with bases fitted in this process
        assert row["query_aware"] == pytest.approx(fitted[(row["kind"], row["d"])][row["layer"]].tolist(), abs=1e-5)
