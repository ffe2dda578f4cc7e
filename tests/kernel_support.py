"""Shared by the kernel tests (one file per kernel: test_kernel_score, _select, _attention, _decode).

Without a GPU (or with TRITON_INTERPRET=1 already set) the kernels run on Triton's CPU
interpreter, which this module switches on before triton is imported (import it first); on a GPU
they compile. Shapes are small and awkward: non-power-of-two lengths, GQA ratios, batch > 1,
ragged lengths, d and k at their edges. Inputs are float16/bfloat16; comparisons in float32.
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

from lokitool.kernels import (  # noqa: E402,F401
    LokiKeys,
    check_inputs,
    clear_plans,
    decode_budgets,
    joined,
    kept_mask,
    loki_decode,
    loki_scores,
    select_topk,
    sparse_decode_attention,
    split_keys,
)

from lokitool.sparse import reference as loki  # noqa: E402,F401
from lokitool.sparse.reference import LokiSpec  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _one_config_per_kernel(monkeypatch):
    """No autotuning on a GPU: one compile per shape; these tests check results, not speed."""
    monkeypatch.setenv("LOKITOOL_AUTOTUNE", "0")


# Output tolerances per input dtype (the kernels round softmax weights to the input dtype for P.V).
TOL = {torch.float16: dict(atol=2e-3, rtol=2e-3), torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}


# ----------------------------------------------------------------------------------------------
# Helpers


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, what: str) -> None:
    """Fail listing the first mismatches (index, actual, expected), not just a boolean."""
    actual, expected = actual.float().cpu(), expected.float().cpu()
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    bad = ~((actual - expected).abs() <= atol + rtol * expected.abs())
    bad |= actual.isnan() != expected.isnan()
    if bad.any():
        where = bad.nonzero()[:8].tolist()
        lines = [f"  {tuple(i)}: got {actual[tuple(i)].item():.6g}, expected {expected[tuple(i)].item():.6g}" for i in where]
        err = (actual - expected).abs().max().item()
        pytest.fail(f"{what}: {int(bad.sum())} of {bad.numel()} mismatched (max abs err {err:.3g}, atol {atol}, rtol {rtol}):\n" + "\n".join(lines))


def make_cache(b, h, hkv, s, dim, dtype, seed=0):
    """q_rot, k_rot, v with PCA-like decaying per-dim scales (the first dims carry the most)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(2.0, 0.3, dim)
    q = (torch.randn(b, h, dim, generator=g) * scale).to(dtype)
    k = (torch.randn(b, hkv, s, dim, generator=g) * scale).to(dtype)
    v = torch.randn(b, hkv, s, dim, generator=g).to(dtype)
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


def reference_scores(q, k, d, group):
    """Float64 scores [B, R, S] of the first d dims (the oracle's, summed per KV group for "kv")."""
    b, h, _ = q.shape
    hkv = k.shape[1]
    s = torch.einsum("bhd,bhsd->bhs", q[..., :d].double().cpu(), loki.expand_kv(k[..., :d].double().cpu(), h))
    return s.reshape(b, hkv, h // hkv, -1).sum(2) if group == "kv" else s


def stable_topk_mask(scores, lengths, budgets):
    """Exact top-k per row with ties broken towards lower token index (the kernels' rule)."""
    b, r, s = scores.shape
    valid = torch.arange(s)[None, :] < lengths.cpu()[:, None]
    order = torch.sort(scores.cpu().masked_fill(~valid[:, None], float("-inf")), dim=-1, descending=True, stable=True).indices
    rank_ok = torch.arange(s)[None, None, :] < budgets.cpu()[:, None, None]
    keep = torch.zeros(b, r, s, dtype=torch.bool)
    keep.scatter_(-1, order, rank_ok.expand(b, r, s))
    return keep & valid[:, None]


def check_recall(kept, ref_keep, scores64, budgets, what):
    """Recall of the oracle's kept set must be 1 up to near-ties: every disagreement must sit within
    rounding of the row's k-th largest float64 score."""
    kept, ref_keep = kept.cpu(), ref_keep.cpu()
    assert torch.equal(kept.sum(-1), budgets.cpu()[:, None].expand(kept.shape[:2])), f"{what}: rows keep exactly k"
    recall = (kept & ref_keep).sum() / ref_keep.sum()
    masked = scores64.masked_fill(~(ref_keep | kept), float("nan"))
    kth = torch.where(ref_keep, scores64, torch.tensor(float("inf"), dtype=scores64.dtype)).amin(-1, keepdim=True)
    differ = kept != ref_keep
    gap = (masked - kth).abs()[differ]
    scale = scores64.abs().amax(-1, keepdim=True).expand_as(scores64)[differ]
    assert bool((gap <= 1e-5 * scale + 1e-6).all()), f"{what}: recall {recall:.4f}, disagreements not near-ties: gaps {gap[:8].tolist()}"
    assert recall >= 0.99, f"{what}: recall {recall:.4f}"

