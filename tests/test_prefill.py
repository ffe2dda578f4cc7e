"""The Triton path of `eval --ppl` (kernels/loki_prefill.py) against the oracle loki.sparse_attention.

Runs on Triton's CPU interpreter without a GPU (switched on before triton is imported), compiled on
a GPU. Scores come from the oracle's own selector code, so with distinct scores both paths keep the
same keys: outputs must agree to the kernels' fp16/bf16 tolerance and the selection statistics
(kept fraction, Jaccard with exact top-k) exactly.
"""

from __future__ import annotations

import os

import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

import pytest  # noqa: E402

pytest.importorskip("triton")

from conftest import random_tokens, tiny_calibrated  # noqa: E402
from lokitool.kernels.loki_prefill import sparse_prefill  # noqa: E402

from lokitool.errors import UserError  # noqa: E402
from lokitool.sparse import reference as loki  # noqa: E402
from lokitool.sparse.attention import MethodSpec, patched, resolve_backend  # noqa: E402
from lokitool.sparse.reference import LokiSpec  # noqa: E402

TOL = {torch.float16: dict(atol=2e-3, rtol=2e-3), torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}


@pytest.fixture(autouse=True)
def _one_config_per_kernel(monkeypatch):
    monkeypatch.setenv("LOKITOOL_AUTOTUNE", "0")


def _qkv(b, h, hkv, sq, sk, dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(2.0, 0.3, dim)
    q = (torch.randn(b, h, sq, dim, generator=g) * scale).to(dtype)
    k = (torch.randn(b, hkv, sk, dim, generator=g) * scale).to(dtype)
    v = torch.randn(b, hkv, sk, dim, generator=g).to(dtype)
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


def _basis(hkv, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(hkv, dim, dim, generator=g, dtype=torch.float64))[0].float().to(DEVICE)


CASES = [
    # b, h, hkv, sq, sk, dim, d, kf, budget, sink, group, block_rows, dtype
    (1, 4, 4, 37, 37, 32, 8, 0.25, "per-row", 0, "head", 16, torch.float16),  # MHA, blocks of 16 rows
    (2, 4, 2, 23, 23, 32, 5, 0.3, "window", 0, "head", 64, torch.float16),  # GQA 2, batch 2, the paper's budget
    (1, 6, 2, 21, 50, 16, 16, 0.2, "per-row", 3, "kv", 8, torch.bfloat16),  # queries after a cache, sinks, d = D
    (2, 4, 1, 33, 33, 16, 1, 0.5, "per-row", 2, "kv", 512, torch.float16),  # MQA, d = 1, one block
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"h{c[1]}kv{c[2]}-{c[8]}-sink{c[9]}-{c[10]}-{str(c[12])[6:]}")
def test_prefill_matches_oracle(case):
    b, h, hkv, sq, sk, dim, d, kf, budget, sink, group, block_rows, dtype = case
    q, k, v = _qkv(b, h, hkv, sq, sk, dim, dtype, seed=sq)
    selector = loki.loki_selector(_basis(hkv, dim, seed=dim), d)
    spec = LokiSpec(kf=kf, budget=budget, sink=sink, group=group)
    common = dict(selector=selector, spec=spec, scaling=dim**-0.5, block_rows=block_rows, compare_exact=True)
    ref_stats, got_stats = loki.SelectionStats(), loki.SelectionStats()
    want = loki.sparse_attention(q, k, v, stats=ref_stats, **common)
    got = sparse_prefill(q, k, v, stats=got_stats, **common)
    err = (got - want).abs()
    tol = TOL[dtype]
    assert bool((err <= tol["atol"] + tol["rtol"] * want.abs()).all()), f"max abs err {err.max():.3g}"
    assert got_stats.mean_kept_fraction == pytest.approx(ref_stats.mean_kept_fraction, rel=1e-9)
    assert got_stats.mean_jaccard == pytest.approx(ref_stats.mean_jaccard, rel=1e-9)
    if d < dim:  # a low-rank selection differs from exact top-k somewhere; all dims: the same keys
        assert got_stats.mean_jaccard < 1.0
    else:
        assert got_stats.mean_jaccard == pytest.approx(1.0)


def test_prefill_exact_topk_keeps_what_dense_attention_would():
    """kf = 1 keeps every causal key: the output is plain causal attention (independent of loki.py)."""
    q, k, v = _qkv(1, 4, 2, 24, 24, 32, torch.float16, seed=7)
    got = sparse_prefill(q, k, v, selector=loki.exact_topk_selector(), spec=LokiSpec(kf=1.0), scaling=32**-0.5, block_rows=10)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(2, dim=1), v.float().repeat_interleave(2, dim=1), is_causal=True
    )
    err = (got - want).abs().max()
    assert err < 2e-3, f"max abs err {err:.3g}"


def test_patched_model_same_logits_on_both_backends():
    loaded, cal = tiny_calibrated()
    model = loaded.model.to(device=DEVICE, dtype=torch.float16)
    tokens = random_tokens(1, 24, seed=3).to(DEVICE)
    spec = MethodSpec("loki", LokiSpec(kf=0.25, df=0.25, basis="post", sink=1))
    logits = {}
    for backend in ("torch", "triton"):
        with torch.inference_mode(), patched(model, loaded.facts, spec, cal, backend) as recorder:
            logits[backend] = model(input_ids=tokens, use_cache=False).logits.float()
        logits[backend + " jaccard"] = recorder.mean_jaccard()
    assert (logits["torch"] - logits["triton"]).abs().max() < 2e-2
    assert logits["triton jaccard"] == pytest.approx(logits["torch jaccard"], abs=0.02)


def test_backend_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu, torch.float16) == "torch"
    assert resolve_backend("auto", cuda, torch.bfloat16) == "triton"
    assert resolve_backend("auto", cuda, torch.float32) == "torch"
    with pytest.raises(UserError, match="--dtype bfloat16"):
        resolve_backend("triton", cuda, torch.float32)
    with pytest.raises(UserError, match="auto, torch or triton"):
        resolve_backend("cuda", cpu, torch.float16)


def test_triton_backend_on_cpu_says_how(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(UserError, match="needs a CUDA device"):
        resolve_backend("triton", torch.device("cpu"), torch.float16)
