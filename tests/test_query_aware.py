"""The query-aware subspace: the fit against the slower fit it replaced and against PCA, with the objective
evaluated from its definition; and its storage in the calibration file (version 2), fitted once."""

from __future__ import annotations

import json

import pytest
import torch

from lokitool.calib import calibration as calibration_module
from lokitool.calib import query_aware as qa
from lokitool.calib.calibration import FORMAT_VERSION, QA_FRACTIONS, Calibration
from lokitool.calib.models import ModelFacts
from lokitool.calib.moments import Statistics
from lokitool.calib.run import build_calibration
from lokitool.errors import UserError
from lokitool.sparse.bases import query_aware_basis
from lokitool.sparse.reference import dims_for


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
    with qa.one_cpu_thread():
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


# ----------------------------------------------------------------------------------------------
# Stored in the calibration file


def toy_facts() -> ModelFacts:
    return ModelFacts(
        model_id="toy/qa", revision=None, architecture="llama", num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, rope=True, max_positions=256, bos_token_id=1,
    )


def toy_statistics(with_queries: bool = True) -> Statistics:
    """Keys and queries of 2 layers x 2 KV heads, D = 16, with different dominant directions."""
    facts = toy_facts()
    stats = Statistics.zeros(facts, "cpu", with_queries)
    g = torch.Generator().manual_seed(7)
    key_scale = torch.logspace(0.5, -1, 16)
    query_scale = torch.logspace(-1, 0.5, 16)
    for layer in range(2):
        for kind in ("pre", "post"):
            stats.keys[kind].add(layer, torch.randn(2, 2, 96, 16, generator=g) * key_scale + 0.3)
            if with_queries:
                stats.queries[kind].add(layer, torch.randn(2, 2, 96, 16, generator=g) @ torch.diag(query_scale))
    return stats


def projector(basis: torch.Tensor, d: int) -> torch.Tensor:
    u = basis[..., :d]
    return u @ u.transpose(-1, -2)


def rewrite_as_version_1(path, target):
    """The same file as lokitool wrote it before query-aware subspaces were stored."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if ".qa_basis." not in k}
    save_file(tensors, str(target), metadata={**meta, "format_version": "1"})


def count_fits(monkeypatch) -> list:
    calls = []
    real = calibration_module.query_aware_subspace

    def counted(c, s, d, *args, **kwargs):
        calls.append(d)
        return real(c, s, d, *args, **kwargs)

    monkeypatch.setattr(calibration_module, "query_aware_subspace", counted)
    return calls


@pytest.fixture(scope="module")
def v2_file(tmp_path_factory):
    """A calibration written by `calibrate`'s own builder, with queries: version 2, subspaces stored."""
    cal = build_calibration(toy_statistics(), toy_facts(), {"dataset": "toy"})
    return cal.save(tmp_path_factory.mktemp("qa") / "v2.safetensors")


def test_calibration_stores_the_subspaces_for_the_usual_budgets(v2_file):
    from safetensors import safe_open

    dims = sorted({dims_for(f, 16) for f in QA_FRACTIONS})
    assert FORMAT_VERSION == 2 and dims == [2, 4, 8]
    path = v2_file

    with safe_open(str(path), "pt") as f:
        assert f.metadata()["format_version"] == "2"
        assert f.get_slice("layers.1.post.qa_basis.d4").get_shape() == [2, 4, 16]  # rows, like components
    back = Calibration.load(path)
    for kind in ("pre", "post"):
        assert sorted(back.query_aware[kind]) == dims
        c = back.pca[kind].covariance()
        s = back.query_moment[kind].double()
        for d in dims:
            rows = back.query_aware[kind][d].double()  # [L, H, d, D]
            torch.testing.assert_close(rows @ rows.transpose(-1, -2), torch.eye(d, dtype=torch.float64).expand(2, 2, d, d), atol=1e-6, rtol=0)
            fresh = qa.query_aware_subspace(c, s, d)  # a fit from the file's own C and S
            torch.testing.assert_close(rows.transpose(-1, -2) @ rows, fresh @ fresh.transpose(-1, -2), atol=1e-6, rtol=0)


def test_stored_subspaces_are_read_not_refitted(v2_file, monkeypatch):
    calls = count_fits(monkeypatch)
    back = Calibration.load(v2_file)
    for kind in ("pre", "post"):
        for d in (2, 4, 8):
            basis = query_aware_basis(back, kind, d)  # [L, H, D, D]
            torch.testing.assert_close(basis.transpose(-1, -2) @ basis, torch.eye(16, dtype=torch.float64).expand(2, 2, 16, 16), atol=1e-10, rtol=0)
            rows = back.query_aware[kind][d].double()
            torch.testing.assert_close(projector(basis, d), rows.transpose(-1, -2) @ rows, atol=1e-6, rtol=0)
    assert calls == []
    query_aware_basis(back, "post", 3)  # a budget the file does not hold is fitted, once
    query_aware_basis(back, "post", 3)
    assert calls == [3]


def test_version_1_file_loads_and_fits_the_same_basis_once(v2_file, tmp_path, monkeypatch):
    v2 = Calibration.load(v2_file)
    rewrite_as_version_1(v2_file, tmp_path / "v1.safetensors")
    calls = count_fits(monkeypatch)
    v1 = Calibration.load(tmp_path / "v1.safetensors")
    assert v1.query_aware == {} and set(v1.query_moment) == {"pre", "post"}
    for d in (2, 4):
        fitted = query_aware_basis(v1, "post", d)
        assert query_aware_basis(v1, "post", d) is fitted  # cached: one fit per (kind, d) in a process
        torch.testing.assert_close(projector(fitted, d), projector(query_aware_basis(v2, "post", d), d), atol=1e-6, rtol=0)
    assert calls == [2, 4]


def test_no_queries_file_has_no_query_aware_subspaces(tmp_path):
    from safetensors import safe_open

    cal = build_calibration(toy_statistics(with_queries=False), toy_facts(), {"dataset": "toy"})
    assert cal.query_aware == {}
    path = cal.save(tmp_path / "keys.safetensors")
    with safe_open(str(path), "pt") as f:
        assert not [k for k in f.keys() if "qa_basis" in k or "query_moment" in k]
        assert json.loads(f.metadata()["lokitool"])["model"]["model_id"] == "toy/qa"
    with pytest.raises(UserError, match="needs query statistics, and this calibration file has none"):
        query_aware_basis(Calibration.load(path), "post", 4)
