"""rank-report's numbers: ranks, subspace agreement, captured variance and score variance captured per
basis against hand-computed numbers and independent references."""

from __future__ import annotations

import math

import pytest
import torch
from report_toys import BLIND, HALVING, calibration, random_orthogonal, rotated_pair, with_queries

from lokitool.calib.pca import PCA, eig_descending
from lokitool.errors import UserError
from lokitool.report import numbers
from lokitool.sparse.bases import random_basis

# ----------------------------------------------------------------------------------------------
# ranks


def test_ranks_of_known_spectra():
    a, _, _ = rotated_pair()
    ranks = numbers.ranks_at(a.pca["pre"], (0.8, 0.9, 0.95, 1.0))
    assert ranks[0.8].tolist() == [[3, 7], [3, 7]]
    assert ranks[0.9].tolist() == [[4, 8], [4, 8]]
    assert ranks[0.95].tolist() == [[5, 8], [5, 8]]
    assert ranks[1.0].tolist() == [[8, 8], [8, 8]]


def test_rank_counts_reaching_the_threshold_exactly():
    # [1, 1, 0, 0]: the top direction holds exactly half, both hold all of it
    pca = PCA(mean=torch.zeros(1, 1, 4), components=torch.eye(4)[None, None], eigenvalues=torch.tensor([[[1.0, 1, 0, 0]]]))
    ranks = numbers.ranks_at(pca, (0.5, 0.51, 1.0))
    assert (ranks[0.5].item(), ranks[0.51].item(), ranks[1.0].item()) == (1, 2, 2)


# ----------------------------------------------------------------------------------------------
# subspace agreement


def test_agreement_identical_orthogonal_and_half():
    eye = torch.eye(4, dtype=torch.float64)
    two = torch.tensor(2)
    assert numbers.subspace_agreement(eye, eye, two).item() == pytest.approx(1.0)
    orthogonal = eye[[2, 3, 0, 1]]  # top 2 = e3, e4
    assert numbers.subspace_agreement(eye, orthogonal, two).item() == pytest.approx(0.0, abs=1e-12)
    shares_one = eye[[0, 2, 1, 3]]  # top 2 = e1, e3: shares e1 with e1, e2
    assert numbers.subspace_agreement(eye, shares_one, two).item() == pytest.approx(0.5)
    # rotated by the same orthogonal matrix, nothing changes
    q = random_orthogonal(4, torch.Generator().manual_seed(1))
    assert numbers.subspace_agreement(eye @ q, shares_one @ q, two).item() == pytest.approx(0.5)


def test_agreement_is_mean_squared_cosine_of_principal_angles():
    from scipy.linalg import subspace_angles

    g = torch.Generator().manual_seed(2)
    a = torch.stack([random_orthogonal(10, g) for _ in range(4)])  # [4, 10, 10]
    b = torch.stack([random_orthogonal(10, g) for _ in range(4)])
    d = torch.tensor([1, 3, 5, 10])
    got = numbers.subspace_agreement(a, b, d)
    for i, k in enumerate(d.tolist()):
        angles = subspace_angles(a[i, :k].T.numpy(), b[i, :k].T.numpy())
        assert got[i].item() == pytest.approx(float((torch.cos(torch.from_numpy(angles)) ** 2).mean()), abs=1e-10)
    assert got[3].item() == pytest.approx(1.0)  # d = D: both span everything


# ----------------------------------------------------------------------------------------------
# captured variance


def test_captured_variance_by_hand():
    cov = torch.diag(torch.tensor([4.0, 3, 2, 1], dtype=torch.float64))
    eye = torch.eye(4, dtype=torch.float64)
    assert numbers.captured_variance(eye[[0, 2, 1, 3]], torch.tensor(2), cov).item() == pytest.approx(0.6)  # (4+2)/10
    diagonal = eye.clone()
    diagonal[0] = torch.tensor([1.0, 1, 0, 0]) / math.sqrt(2)
    assert numbers.captured_variance(diagonal, torch.tensor(1), cov).item() == pytest.approx(0.35)  # (4+3)/2/10


def test_captured_variance_matches_projected_samples():
    g = torch.Generator().manual_seed(3)
    dim, d = 6, 3
    mix = torch.randn(dim, dim, generator=g, dtype=torch.float64) * torch.tensor([5.0, 3, 2, 1, 0.5, 0.1], dtype=torch.float64)
    samples = torch.randn(20000, dim, generator=g, dtype=torch.float64) @ mix.T + 4.0
    centred = samples - samples.mean(0)
    eigenvalues, rows = eig_descending(centred.T @ centred / len(samples))
    b = PCA(mean=samples.mean(0)[None, None], components=rows[None, None], eigenvalues=eigenvalues[None, None])
    basis_a = random_orthogonal(dim, g)
    direct = (centred @ basis_a[:d].T).square().sum() / centred.square().sum()
    got = numbers.captured_variance(basis_a[None, None], torch.tensor([[d]]), b.covariance())
    assert got.item() == pytest.approx(direct.item(), rel=1e-9)
    # B's own basis captures its top-d eigenvalue share, and more than any other basis
    own = numbers.own_variance(eigenvalues, torch.tensor(d))
    assert own.item() == pytest.approx((eigenvalues[:d].sum() / eigenvalues.sum()).item())
    assert own.item() > got.item()


# ----------------------------------------------------------------------------------------------
# comparisons


def test_self_comparison_agrees_fully():
    a, _, _ = rotated_pair()
    for kind, c in numbers.compare(a, a, 0.9).items():
        assert c.d.tolist() == [[4, 8], [4, 8]]
        assert torch.allclose(c.agreement, torch.ones(2, 2, dtype=torch.float64), atol=1e-6)
        assert torch.allclose(c.captured, c.own, atol=1e-6)
        assert c.own[:, 0].tolist() == pytest.approx([15 / 15.9375] * 2)


def test_comparison_of_partly_shared_subspaces():
    a, b, _ = rotated_pair()
    built = numbers.build_report([("a.safetensors", a), ("b.safetensors", b)], (0.8, 0.9, 0.95))
    assert [(p.a, p.b) for p in built.comparisons] == [(0, 1), (1, 0)]
    for pair in built.comparisons:
        c = pair.kinds["post"]
        # halving head: top 4 share 3 directions; B's variance in A's span: 8+4+2+0.5 of 15.9375
        assert c.agreement[:, 0].tolist() == pytest.approx([0.75, 0.75], abs=1e-6)
        assert c.captured[:, 0].tolist() == pytest.approx([14.5 / 15.9375] * 2, abs=1e-6)
        assert c.own[:, 0].tolist() == pytest.approx([15 / 15.9375] * 2, abs=1e-6)
        # flat head: d = 8 = D, everything agrees
        assert c.agreement[:, 1].tolist() == pytest.approx([1.0, 1.0], abs=1e-6)


# ----------------------------------------------------------------------------------------------
# score variance captured


def by_d(svs, kind="post") -> dict:
    return {sv.d: sv for sv in svs if sv.kind == kind}


def test_score_variance_when_queries_ignore_the_top_key_directions():
    cal, rows = with_queries(BLIND)
    calls = []
    svs = by_d(numbers.score_variances(cal, (2, 4, 6), progress=calls.append, name="toy"))
    assert len(calls) == 6 and calls[3] == "query-aware basis 4/6: toy post-RoPE, d = 2"
    total = 0.9375
    expected = {  # d: (key variance, PCA, query-aware)
        2: (12 / 15.9375, 0.0, 0.75 / total),  # PCA keeps e1, e2 (s = 0); the best two are e5, e6
        4: (15 / 15.9375, 0.0, 1.0),  # PCA keeps exactly what queries ignore; e5..e8 keep everything
        6: (15.75 / 15.9375, 0.75 / total, 1.0),  # PCA now keeps e5, e6 but drops e7, e8
    }
    for d, (key, pca, qa) in expected.items():
        sv = svs[d]
        assert sv.key_variance.flatten().tolist() == pytest.approx([key] * 4, abs=1e-6)
        assert sv.captured["pca"].flatten().tolist() == pytest.approx([pca] * 4, abs=1e-6)
        assert sv.captured["query_aware"].flatten().tolist() == pytest.approx([qa] * 4, abs=1e-6)
        # random: straight from the definition, with the projector formed explicitly
        u = random_basis(2, 2, 8)[..., :d]
        rest = torch.eye(8, dtype=torch.float64) - u @ u.transpose(-1, -2)
        c = cal.pca["post"].covariance()
        s = cal.query_moment["post"].double()
        direct = 1 - (rest @ c @ rest @ s).diagonal(dim1=-2, dim2=-1).sum(-1) / total
        assert torch.allclose(sv.captured["random"], direct, atol=1e-6)
        assert (sv.captured["random"] <= sv.captured["query_aware"] + 1e-9).all()  # nothing beats the optimum


def test_score_variance_with_isotropic_queries_is_key_variance():
    # S = 2I: the score error is 2 tr((I - P) C), so PCA is optimal and captures its key variance share;
    # any basis, random included, captures tr(U^T C U) / tr(C), in [0, 1]
    cal, _ = with_queries(torch.full((8,), 2.0))
    share = HALVING.cumsum(0) / HALVING.sum()
    for sv in numbers.score_variances(cal, (1, 3, 8)):
        assert torch.allclose(sv.key_variance, share[sv.d - 1].expand(2, 2), atol=1e-6)
        assert torch.allclose(sv.captured["pca"], sv.key_variance, atol=1e-6)
        assert torch.allclose(sv.captured["query_aware"], sv.key_variance, atol=1e-6)
        u = random_basis(2, 2, 8)[..., :sv.d]
        c = cal.pca[sv.kind].covariance()
        inside = (u.transpose(-1, -2) @ c @ u).diagonal(dim1=-2, dim2=-1).sum(-1) / 15.9375
        assert torch.allclose(sv.captured["random"], inside, atol=1e-6)
        assert ((sv.captured["random"] >= 0) & (sv.captured["random"] <= 1 + 1e-9)).all()
        if sv.d == 8:
            assert torch.allclose(sv.captured["random"], torch.ones(2, 2, dtype=torch.float64), atol=1e-6)


def test_refuses_different_models():
    a, _, rows = rotated_pair()
    other = calibration(a.pca["pre"].eigenvalues, rows, model_id="toy/other")
    with pytest.raises(UserError, match="toy/other.*toy/model.*one model"):
        numbers.build_report([("a", a), ("b", other)], (0.9,))
    narrow = calibration(torch.ones(2, 2, 4), torch.eye(4).expand(2, 2, 4, 4))
    with pytest.raises(UserError, match="head dim 4.*head dim 8"):
        numbers.build_report([("a", a), ("b", narrow)], (0.9,))
