"""Bases for Loki's truncated scores: PCA, random, and the query-aware basis, on known answers."""

from __future__ import annotations

import pytest
import torch

from lokitool.calib import query_aware as qa
from lokitool.sparse import bases
from lokitool.sparse import reference as loki
from lokitool.sparse.reference import LokiSpec


def rotated_problem(c_diag, s_diag, seed=0):
    d = len(c_diag)
    r = bases.random_basis(1, 1, d, seed=seed)[0, 0]
    c = r @ torch.diag(torch.tensor(c_diag, dtype=torch.float64)) @ r.T
    s = r @ torch.diag(torch.tensor(s_diag, dtype=torch.float64)) @ r.T
    return c, s, r


def top_eigvecs(m, d):
    return torch.linalg.eigh(m)[1].flip(-1)[:, :d]


def test_truncation_error_matches_sampled_score_variance():
    """E(U) = E_q Var_k[q^T (I - UU^T) k], estimated from samples."""
    g = torch.Generator().manual_seed(0)
    dim, n = 6, 200_000
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    b = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    keys = torch.randn(n, dim, generator=g, dtype=torch.float64) @ a.T + 2.0  # mean does not matter
    queries = torch.randn(400, dim, generator=g, dtype=torch.float64) @ b.T + 0.5
    u = torch.linalg.qr(torch.randn(dim, 2, generator=g, dtype=torch.float64))[0]
    residual = torch.eye(dim, dtype=torch.float64) - u @ u.T
    sampled = ((queries @ residual) @ keys.T).var(dim=1, correction=0).mean()
    c = torch.cov(keys.T, correction=0)
    s = queries.T @ queries / len(queries)
    assert float(qa.truncation_error(u, c, s)) == pytest.approx(float(sampled), rel=0.02)


def test_query_aware_finds_the_directions_queries_use():
    # keys vary most along directions 0, 1, which the queries ignore entirely
    c, s, r = rotated_problem([10, 9, 1, 1, 0.5, 0.5, 0.1, 0.1], [0, 0, 1, 1, 1, 1, 1, 1])
    u = qa.query_aware_subspace(c, s, 2)
    # optimum: keep two of the c_i s_i = 1 directions; the error left is 0.5 + 0.5 + 0.1 + 0.1 = 1.2
    assert float(qa.truncation_error(u, c, s)) == pytest.approx(1.2, abs=1e-6)
    assert float(qa.truncation_error(top_eigvecs(c, 2), c, s)) == pytest.approx(3.2, abs=1e-6)  # PCA gains nothing
    # U spans directions 2 and 3 of the hidden frame
    proj = r.T @ u @ u.T @ r
    assert float(proj[2, 2] + proj[3, 3]) == pytest.approx(2.0, abs=1e-6)


def test_query_aware_never_worse_than_its_start_or_pca_on_random_problems():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(12, 16, 16, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, 16, dtype=torch.float64)
    c = a @ a.transpose(-1, -2)
    b = torch.randn(12, 16, 16, generator=g, dtype=torch.float64)
    s = b @ b.transpose(-1, -2)
    u = qa.query_aware_subspace(c, s, 4)
    start = torch.linalg.eigh((c @ s + s @ c) / 2)[1].flip(-1)[..., :4]
    pca = torch.linalg.eigh(c)[1].flip(-1)[..., :4]
    e_qa = qa.truncation_error(u, c, s)
    assert bool((e_qa <= qa.truncation_error(start, c, s) + 1e-12).all())
    assert bool((e_qa <= qa.truncation_error(pca, c, s) + 1e-12).all())
    assert float(e_qa.mean()) < 0.9 * float(qa.truncation_error(pca, c, s).mean())
    torch.testing.assert_close(u.transpose(-1, -2) @ u, torch.eye(4, dtype=torch.float64).expand(12, 4, 4), atol=1e-10, rtol=0)


def test_completed_basis_is_orthonormal_and_starts_with_subspace():
    c, s, _ = rotated_problem([5, 4, 3, 2, 1, 1], [1, 2, 3, 1, 1, 1])
    u = qa.query_aware_subspace(c, s, 3)
    full = qa.complete_basis(u)
    torch.testing.assert_close(full.T @ full, torch.eye(6, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(full[:, :3], u)
    assert float(bases.score_variance_captured(full, c, s, 6)) == pytest.approx(1.0, abs=1e-12)


def test_query_aware_selection_recovers_exact_topk_where_pca_fails():
    """Keys whose largest variance lies where queries do not look: PCA's kept sets miss the exact
    top-k; the query-aware basis's kept sets match it."""
    g = torch.Generator().manual_seed(2)
    dim, n = 8, 96
    scale_k = torch.tensor([6.0, 6.0, 1.0, 1.0, 0.3, 0.3, 0.3, 0.3], dtype=torch.float64)
    scale_q = torch.tensor([0.0, 0.0, 3.0, 3.0, 0.3, 0.3, 0.3, 0.3], dtype=torch.float64)
    r = bases.random_basis(1, 1, dim, seed=5)[0, 0]
    k = (torch.randn(1, 1, n, dim, generator=g, dtype=torch.float64) * scale_k) @ r.T
    q = (torch.randn(1, 1, n, dim, generator=g, dtype=torch.float64) * scale_q) @ r.T
    c = torch.cov(k[0, 0].T, correction=0)
    s = q[0, 0].T @ q[0, 0] / n
    pca_basis = torch.linalg.eigh(c)[1].flip(-1)[None].float()
    qa_basis = qa.complete_basis(qa.query_aware_subspace(c, s, 2))[None].float()
    jaccard = {}
    for name, basis in (("pca", pca_basis), ("qa", qa_basis)):
        stats = loki.SelectionStats()
        loki.sparse_attention(q.float(), k.float(), k.float(), selector=loki.loki_selector(basis, 2), spec=LokiSpec(kf=0.25),
                              scaling=0.3, stats=stats, compare_exact=True)
        jaccard[name] = stats.mean_jaccard
    assert jaccard["qa"] > 0.8
    assert jaccard["pca"] < 0.6
