"""`eval --ppl`: the sweep a config expands to, and the results file it writes (schema, nulls,
provenance), on a tiny calibrated model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import random_tokens, tiny_calibrated

from lokitool.errors import UserError
from lokitool.evals import ppl
from lokitool.evals.config import EvalConfig

RESULT_FIELDS = {
    "method", "kf", "df", "variance", "basis", "budget", "sink", "group", "perplexity", "nll", "tokens",
    "kept_fraction", "jaccard", "jaccard_per_layer", "seconds", "backend", "torch_layers", "d", "page", "r", "bytes",
}


def test_sweep_expands_every_point_once_full_first():
    config = EvalConfig(
        methods=("exact-topk", "full", "loki", "random-basis"), kf=(0.25, 0.5), df=(0.125, 0.25),
        basis=("post", "qa-pre"), sink=(0, 1), calibration=Path("cal.safetensors"),
    )
    specs = config.specs()
    assert specs[0].method == "full" and specs[0].loki is None
    assert sum(s.method == "full" for s in specs) == 1
    # per (sink, kf): exact-topk once, loki per basis per df, random-basis per df
    assert len(specs) == 1 + 2 * 2 * (1 + 2 * 2 + 2)
    loki = [s for s in specs if s.method == "loki"]
    assert {(s.loki.kf, s.loki.df, s.loki.basis, s.loki.sink) for s in loki} == {
        (kf, df, b, sink) for kf in (0.25, 0.5) for df in (0.125, 0.25) for b in ("post", "qa-pre") for sink in (0, 1)
    }
    assert all(s.basis == "random" for s in specs if s.method == "random-basis")
    topk = next(s for s in specs if s.method == "exact-topk")
    assert topk.fields()["df"] is None and topk.fields()["basis"] is None  # not a low-rank method


def test_variance_sweep_replaces_df():
    specs = EvalConfig(methods=("loki",), df=(), variance=(0.8, 0.9), calibration=Path("c")).specs()
    assert [(s.loki.df, s.loki.variance) for s in specs] == [(None, 0.8), (None, 0.9)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(methods=()), "--methods is empty"),
        (dict(methods=("full", "magic")), "unknown method 'magic'"),
        (dict(methods=("loki",)), "needs --calibration"),
        (dict(methods=("exact-topk",), kf=()), "at least one --kf"),
        (dict(methods=("random-basis",), df=(), variance=()), "--df or --variance"),
        (dict(methods=("exact-topk",), kf=(1.5,)), r"--kf must be in \(0, 1\]"),
        (dict(methods=("exact-topk",), budget=("all",)), "--budget"),
        (dict(methods=("loki",), basis=("nope",), calibration=Path("c")), "unknown basis"),
    ],
)
def test_config_refuses_bad_sweeps(kwargs, message):
    with pytest.raises(UserError, match=message):
        EvalConfig(**kwargs)


def test_results_file_schema_and_numbers(tmp_path):
    loaded, cal = tiny_calibrated()
    tokens = random_tokens(2, 40, seed=4)
    config = EvalConfig(methods=("full", "loki", "h2o"), kf=(0.25,), df=(0.5,), calibration=tmp_path / "cal.safetensors",
                        output_path=tmp_path / "out", seq_len=40, num_tokens=80)
    results = ppl.run(config, loaded, tokens, cal)
    dated = ppl.write_results(config, loaded, cal, "random", results)
    newest = json.loads((tmp_path / "out" / "results.json").read_text())
    assert json.loads(dated.read_text()) == newest and dated.name.startswith("results_")
    assert {"config", "model", "calibration", "results", "versions", "git_hash", "date"} <= set(newest)
    assert newest["config"]["dataset"] == "random" and newest["model"]["num_kv_heads"] == 2
    assert set(newest["versions"]) >= {"lokitool", "torch", "transformers"}
    rows = {r["method"]: r for r in newest["results"]}
    assert all(set(r) == RESULT_FIELDS for r in rows.values())
    full, loki, h2o = rows["full"], rows["loki"], rows["h2o"]
    assert all(full[k] is None for k in ("kf", "df", "d", "variance", "basis", "budget", "sink", "group", "backend"))
    assert (loki["kf"], loki["df"], loki["d"], loki["basis"], loki["backend"]) == (0.25, 0.5, 8, "post", "torch")
    assert h2o["df"] is None and h2o["basis"] is None and h2o["jaccard"] is None
    # bytes per step: full 1; loki reads d = 8 of 16 dims of K (0.25) and 3 query heads' kept rows (3 x 0.25)
    assert (full["bytes"], loki["bytes"], loki["r"], h2o["bytes"]) == (1.0, 1.0, 8, 0.75)
    assert full["tokens"] == loki["tokens"] == 2 * 39
    # perplexity is exp of the mean NLL, and full attention's equals the model's own cross entropy
    with torch.no_grad():
        logits = loaded.model(input_ids=tokens).logits[:, :-1]
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    assert full["nll"] == pytest.approx(float(want), rel=1e-5)
    assert full["perplexity"] == pytest.approx(math.exp(full["nll"]))
    # per-row budgets keep floor(0.25 (t+1)) (at least 1) of t+1 keys; loki does select
    per_row = sum(max(1, math.floor(0.25 * n)) / n for n in range(1, 41)) / 40
    assert loki["kept_fraction"] == pytest.approx(per_row, rel=1e-9)
    assert loki["perplexity"] != pytest.approx(full["perplexity"], rel=1e-6)
    assert len(loki["jaccard_per_layer"]) == loaded.facts.num_layers
