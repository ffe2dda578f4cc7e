"""`lokitool bench` on the CPU: the no-GPU message, presets, flags, the CSV and the reference path."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import run_cli

from lokitool.bench import kernels as bench
from lokitool.bench import output, presets
from lokitool.errors import UserError
from lokitool.sparse.reference import LokiSpec


def test_without_gpu_says_so_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_cli(["bench", "--output-path", str(tmp_path)], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "--device cpu" in lines[0], err
    assert not (tmp_path / "bench.csv").exists()


def test_cpu_run_appends_rows_with_the_documented_columns(capsys, tmp_path):
    args = ["bench", "--device", "cpu", "--model", "smollm2-135m", "--batch-size", "2", "--seq-len", "48,100",
            "--output-path", str(tmp_path)]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    with (tmp_path / "bench.csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == output.CSV_COLUMNS
        rows = list(reader)
    required = {"gpu", "method", "batch", "heads", "kv_heads", "head_dim", "seq_len", "kf", "df", "dtype",
                "median_ms", "plain_ms", "gbps", "speedup_vs_sdpa", "plain_speedup_vs_sdpa", "byte_ceiling", "torch", "triton"}
    assert required <= set(output.CSV_COLUMNS)
    assert [(r["method"], r["seq_len"]) for r in rows] == [
        (m, s) for s in ("48", "100") for m in ("sdpa", "loki-torch", "loki-triton")
    ]
    for r in rows:
        assert (r["heads"], r["kv_heads"], r["head_dim"], r["batch"], r["dtype"]) == ("9", "3", "64", "2", "float16")
        assert r["torch"] == torch.__version__ and r["gpu"].startswith("cpu")
        if r["method"] == "loki-triton":
            assert r["note"] == "skipped: needs a CUDA GPU" and r["median_ms"] == ""
        else:
            assert float(r["median_ms"]) > 0 and float(r["p10_ms"]) <= float(r["median_ms"]) <= float(r["p90_ms"])
            assert float(r["gbps"]) > 0
    torch_rows = [r for r in rows if r["method"] == "loki-torch"]
    assert all(float(r[c]) > 0 for r in torch_rows for c in ("score_ms", "select_ms", "attn_ms"))
    assert all(r["speedup_vs_sdpa"] for r in torch_rows)
    assert (tmp_path / "bench.png").stat().st_size > 1000
    assert json.loads((tmp_path / "bench.json").read_text())["config"]["num_kv_heads"] == 3

    code, _, err = run_cli(args + ["--methods", "sdpa", "--no-plot"], capsys)
    assert code == 0, err
    with (tmp_path / "bench.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows) + 2  # appended, header once


def test_presets_and_overrides():
    shape = presets.attention_shape
    assert shape("llama3-8b", None, None, None) == (32, 8, 128)
    assert shape("smollm2-135m", None, None, None) == (9, 3, 64)
    assert shape(None, None, None, None) == presets.PRESETS["llama2-13b"].attention_shape == (40, 40, 128)
    assert shape("mistral-7b", 16, None, None) == (16, 8, 128)
    assert shape(None, 12, None, 64) == (12, 12, 64)  # --num-heads alone: MHA
    with pytest.raises(UserError, match="choose one of"):
        shape("gpt-5", None, None, None)


def test_one_preset_table_holds_every_shape_bench_and_e2e_name():
    """The attention shapes bench used and the LlamaConfig fields bench-e2e used, from one table."""
    want = {"llama2-7b": (32, 32, 128), "llama2-13b": (40, 40, 128), "llama2-70b": (64, 8, 128), "llama3-8b": (32, 8, 128),
            "llama3-70b": (64, 8, 128), "mistral-7b": (32, 8, 128), "qwen2.5-7b": (28, 4, 128), "smollm2-135m": (9, 3, 64),
            "smollm2-1.7b": (32, 32, 64), "llama3.2-1b": (32, 8, 64), "tiny": (4, 2, 16)}
    assert {name: p.attention_shape for name, p in presets.PRESETS.items()} == want
    assert presets.PRESETS["llama3.2-1b"].vocab_size == presets.PRESETS["smollm2-135m"].vocab_size == 49152
    assert presets.PRESETS["llama3-8b"].llama_fields() == dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0)
    assert "rope_theta" not in presets.PRESETS["tiny"].llama_fields()  # LlamaConfig's default
    loaded = presets.random_model("tiny", torch.device("cpu"), torch.float32)
    facts = loaded.facts
    assert (facts.num_heads, facts.num_kv_heads, facts.head_dim, facts.num_layers) == (4, 2, 16, 2)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--batch-size", "1,x"], "--batch-size takes comma-separated integers"),
        (["--methods", "sdpa,flash"], "unknown method flash"),
        (["--num-heads", "10", "--num-kv-heads", "4"], "not a multiple"),
        (["--kf", "1.5"], "--kf must be in (0, 1], got 1.5"),
        (["--dtype", "float8"], "--dtype float8 is not supported"),
        (["--group", "layer"], "--group must be one of head, kv, union, got 'layer'"),
    ],
)
def test_bad_flags_fail_in_one_line(args, message, capsys, tmp_path):
    code, _, err = run_cli(["bench", "--device", "cpu", "--output-path", str(tmp_path), *args], capsys)
    assert code == 2 and message in err, err


def test_csv_with_other_columns_is_not_mixed(tmp_path):
    (tmp_path / "bench.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="other columns"):
        output.append_csv(tmp_path / "bench.csv", [])


def test_byte_model_matches_the_issue():
    """At kf = df = 0.25 with MHA Loki moves 0.375 of the bytes of full attention."""
    p = bench.Point(16, 40, 40, 128, 4096, LokiSpec(kf=0.25, df=0.25), torch.float16)
    assert p.loki_bytes / p.kv_bytes == pytest.approx(0.375)
    assert p.kv_bytes == 16 * 40 * 4096 * 128 * 2 * 2
    assert p.byte_ceiling == pytest.approx(1 / 0.375)


def test_per_query_head_selection_on_gqa_has_a_ceiling_below_one():
    """llama3-8b (G = 4), kf = df = 0.25: each query head reads its own kept rows, 1.125x the bytes
    of full attention; shared per KV head (group kv) the ceiling is MHA's 2.67x again."""
    head = bench.Point(16, 32, 8, 128, 16384, LokiSpec(kf=0.25, df=0.25, group="head"), torch.float16)
    kv = bench.Point(16, 32, 8, 128, 16384, LokiSpec(kf=0.25, df=0.25, group="kv"), torch.float16)
    assert head.byte_ceiling == pytest.approx(1 / 1.125)
    assert kv.byte_ceiling == pytest.approx(1 / 0.375)


def test_cli_prints_the_selection_mode_and_gqa_ceiling(capsys, tmp_path):
    args = ["bench", "--device", "cpu", "--model", "smollm2-135m", "--batch-size", "1", "--seq-len", "64", "--methods",
            "sdpa,loki-torch", "--no-plot", "--output-path", str(tmp_path)]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert "selection: group head, 9 rows (one per query head)" in out and "ceiling" in out
    code, out, err = run_cli(args + ["--group", "kv"], capsys)
    assert code == 0, err
    assert "selection: group kv, 3 rows (one per KV head, shared by its 3 query heads)" in out and "ceiling" not in out


def test_l2_flush_setting_is_checked(monkeypatch):
    """time_ms takes flush "read" or "write" (or LOKITOOL_L2_FLUSH); anything else is refused before timing."""
    from lokitool.bench.timing import time_ms

    calls = []
    with pytest.raises(UserError, match="'read' or 'write'"):
        time_ms(lambda: calls.append(1), torch.device("cpu"), flush="dirty")
    monkeypatch.setenv("LOKITOOL_L2_FLUSH", "zero")
    with pytest.raises(UserError, match="LOKITOOL_L2_FLUSH"):
        time_ms(lambda: calls.append(1), torch.device("cpu"))
    assert not calls
    monkeypatch.setenv("LOKITOOL_L2_FLUSH", "read")
    p10, p50, p90 = time_ms(lambda: calls.append(1), torch.device("cpu"), rep_ms=5)
    assert calls and 0 <= p10 <= p50 <= p90
