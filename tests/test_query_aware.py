"""The query-aware subspace: the fit against the slower fit it replaced and against PCA, with the objective
evaluated from its definition."""

from __future__ import annotations

import contextlib

import pytest
import torch

from lokitool.calib import query_aware as qa


@contextlib.contextmanager
def one_thread():
    """Tiny problems: threads only add hand-offs (many times the work when other jobs share the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def objective(u: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """tr((I - UU^T) C (I - UU^T) S) with the projector formed explicitly: [...]."""
    rest = torch.eye(c.shape[-1], dtype=torch.float64) - u @ u.transpose(-1, -2)
    return (rest @ c @ rest @ s).diagonal(dim1=-2, dim2=-1).sum(-1)


def previous_fit(c: torch.Tensor, s: torch.Tensor, d: int, steps: int = 300) -> torch.Tensor:
    """The fit this one replaced: 300 Riemannian steps on the Stiefel manifold from the same two starts,
    QR retraction, a step that grows by 1.2 on success and halves on failure; the better end wins."""
    scale = (c * s).sum((-1, -2))[..., None, None]
    c = c / scale
    m = c @ s + s @ c
    u = torch.stack([torch.linalg.eigh(x)[1].flip(-1)[..., :d] for x in (m / 2, c)])
    err = objective(u, c, s)
    step = torch.ones_like(err)
    for _ in range(steps):
        a, b = u.transpose(-1, -2) @ c @ u, u.transpose(-1, -2) @ s @ u
        grad = -2 * (m @ u) + 2 * (c @ u @ b + s @ u @ a)
        sym = u.transpose(-1, -2) @ grad
        q, r = torch.linalg.qr(u - step[..., None, None] * (grad - u @ ((sym + sym.transpose(-1, -2)) / 2)))
        candidate = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
        cand_err = objective(candidate, c, s)
        better = cand_err < err
        u = torch.where(better[..., None, None], candidate, u)
        err = torch.where(better, cand_err, err)
        step = torch.where(better, step * 1.2, step / 2)
    return torch.where((err[0] <= err[1])[..., None, None], u[0], u[1])


def random_problems(count: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key covariances with decaying spectra and query moments with their own, in random frames."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(count, dim, dim, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, dim, dtype=torch.float64)
    b = torch.randn(count, dim, dim, generator=g, dtype=torch.float64) * torch.logspace(0, -0.5, dim, dtype=torch.float64)
    return a @ a.transpose(-1, -2), b @ b.transpose(-1, -2)


@pytest.mark.parametrize("count, dim, d, seed", [(6, 16, 4, 0), (4, 24, 6, 1), (4, 12, 9, 2), (3, 16, 1, 3)])
def test_fit_beats_pca_and_matches_the_previous_fit(count, dim, d, seed):
    c, s = random_problems(count, dim, seed)
    u = qa.query_aware_subspace(c, s, d)
    torch.testing.assert_close(u.transpose(-1, -2) @ u, torch.eye(d, dtype=torch.float64).expand(count, d, d), atol=1e-10, rtol=0)
    total = (c * s).sum((-1, -2))
    fit = objective(u, c, s) / total
    pca = objective(torch.linalg.eigh(c)[1].flip(-1)[..., :d], c, s) / total
    with one_thread():
        before = objective(previous_fit(c, s, d), c, s) / total
    assert bool((fit <= pca + 1e-12).all())
    assert bool((fit <= before + 1e-4).all()), (fit - before).max()
    torch.testing.assert_close(qa.truncation_error(u, c, s) / total, fit, atol=1e-12, rtol=0)  # the expanded form


def test_fit_keeps_leading_dims_and_runs_where_the_input_is():
    c, s = random_problems(6, 8, 4)
    u = qa.query_aware_subspace(c.reshape(2, 3, 8, 8), s.reshape(2, 3, 8, 8), 3)
    assert u.shape == (2, 3, 8, 3) and u.device == c.device
    torch.testing.assert_close(u.reshape(6, 8, 3), qa.query_aware_subspace(c, s, 3), atol=0, rtol=0)
    single = qa.query_aware_subspace(c[0].float(), s[0].float(), 3)
    assert single.shape == (8, 3) and single.dtype == torch.float64
    whole = qa.query_aware_subspace(c, s, 8)  # d = D: every basis spans everything
    torch.testing.assert_close(objective(whole, c, s), torch.zeros(6, dtype=torch.float64), atol=1e-9, rtol=0)
