"""Orthonormal bases for Loki's truncated scores, from a calibration file.

Every basis is [L, Hkv, D, D] with directions as columns; Loki scores with its first d columns.
With key covariance C (centered: a shift of all keys does not change one query's ranking) and
query second moment S = E[q q^T] (pooled over the query heads of the KV group), truncating to
the span of U (D x d, orthonormal, projector Pi = U U^T) leaves the score error

    E(U) = E_q Var_k[ q^T (I - Pi) k ] = tr((I - Pi) C (I - Pi) S).

- `pca` (Loki): the top-d eigenvectors of C. Optimal when queries weigh all directions alike (S = sI).
- `query-aware` (`qa`): U minimising E(U) itself, found by gradient descent on the Stiefel manifold
  started from the better of PCA and the top eigenvectors of (CS + SC)/2 (the exact answer when
  C and S commute: keep the d directions with the largest c_i s_i); never worse than PCA. Same cache, same cost as Loki: keys are stored
  rotated and the first d dimensions are read.
- `random`: a Haar-random orthonormal basis: what any basis must beat.

`score_variance_captured` reports 1 - E(U)/tr(CS): the share of the per-query score variance over
keys that the truncated scores keep (1 means the truncated scores rank keys exactly as full ones).
"""

from __future__ import annotations

import torch

from ..calib.calibration import Calibration
from ..errors import UserError
from .reference import BASES


def pca_basis(calibration: Calibration, kind: str) -> torch.Tensor:
    return calibration.basis(kind).to(torch.float64)


def random_basis(num_layers: int, num_kv_heads: int, head_dim: int, seed: int = 0) -> torch.Tensor:
    """Haar-random orthonormal bases [L, Hkv, D, D] (QR of a Gaussian with the sign fix)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(num_layers, num_kv_heads, head_dim, head_dim, generator=g, dtype=torch.float64)
    qm, r = torch.linalg.qr(a)
    return qm * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def trace_product(c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """tr(CS) for symmetric C, S: [...]."""
    return (c * s).sum((-1, -2))


def truncation_error(u: torch.Tensor, c: torch.Tensor, s: torch.Tensor, total: torch.Tensor | None = None) -> torch.Tensor:
    """E(U) = tr((I - UU^T) C (I - UU^T) S) for U [..., D, d]: [...].

    Expanded so that only D x d products are formed:
    tr(CS) - tr(U^T CS U) - tr(U^T SC U) + tr(U^T C U U^T S U)."""
    cu, su = c @ u, s @ u  # [..., D, d]
    ut_cu, ut_su = u.transpose(-1, -2) @ cu, u.transpose(-1, -2) @ su  # [..., d, d]
    total = trace_product(c, s) if total is None else total
    cross = (cu * su).sum((-1, -2))  # tr(U^T C S U) = tr(U^T SC U) for symmetric C, S
    return total - 2 * cross + (ut_cu * ut_su.transpose(-1, -2)).sum((-1, -2))


def score_variance_captured(basis: torch.Tensor, c: torch.Tensor, s: torch.Tensor, d: int) -> torch.Tensor:
    """1 - E(U_d) / tr(CS) for the first d columns of `basis`: [...]."""
    total = trace_product(c, s).clamp_min(torch.finfo(c.dtype).tiny)
    return 1 - truncation_error(basis[..., :d], c, s, total) / total


def _complete(u: torch.Tensor) -> torch.Tensor:
    """Extend orthonormal columns U [..., D, d] to a full orthonormal basis [..., D, D], U first."""
    dim, d = u.shape[-2], u.shape[-1]
    eye = torch.eye(dim, dtype=u.dtype, device=u.device).expand(*u.shape[:-2], dim, dim)
    rest = eye - u @ u.transpose(-1, -2)  # projector onto the complement
    values, vectors = torch.linalg.eigh(rest)
    return torch.cat([u, vectors[..., -(dim - d):]], dim=-1) if d < dim else u


def _orthonormalize(w: torch.Tensor) -> torch.Tensor:
    q, r = torch.linalg.qr(w)
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def query_aware_subspace(c: torch.Tensor, s: torch.Tensor, d: int, steps: int = 300) -> torch.Tensor:
    """Orthonormal U [..., D, d] minimising tr((I-UU^T) C (I-UU^T) S), batched over leading dims.

    Riemannian gradient descent on the Stiefel manifold with a QR retraction and a per-problem
    step that halves on any increase, run from two starting points, the top-d eigenvectors of
    (CS + SC)/2 and of C (PCA); the better end point is returned, so it is never worse than PCA."""
    c, s = c.to(torch.float64), s.to(torch.float64)
    scale = trace_product(c, s).clamp_min(1e-30)[..., None, None]
    c = c / scale  # the error becomes a fraction of tr(CS): one step size suits every problem
    m = c @ s + s @ c
    if d == c.shape[-1]:
        return torch.linalg.eigh(m / 2)[1].flip(-1)
    total = trace_product(c, s)  # = 1 after scaling, up to rounding
    # Descend from both closed forms at once (leading dim 2) and keep the better end point: a
    # tilted start can sit far above PCA, and PCA itself can be a poor stationary point.
    u = torch.stack([torch.linalg.eigh(x)[1].flip(-1)[..., :d] for x in (m / 2, c)])
    c, s, m, total = c[None], s[None], m[None], total[None]
    err = truncation_error(u, c, s, total)
    step = torch.ones_like(err)
    for _ in range(steps):
        cu, su = c @ u, s @ u
        a, b = u.transpose(-1, -2) @ cu, u.transpose(-1, -2) @ su
        grad = -2 * (m @ u) + 2 * (cu @ b + su @ a)  # Euclidean gradient of E
        sym = u.transpose(-1, -2) @ grad
        rgrad = grad - u @ ((sym + sym.transpose(-1, -2)) / 2)  # projected onto the tangent space
        candidate = _orthonormalize(u - step[..., None, None] * rgrad)
        cand_err = truncation_error(candidate, c, s, total)
        better = cand_err < err
        u = torch.where(better[..., None, None], candidate, u)
        err = torch.where(better, cand_err, err)
        step = torch.where(better, step * 1.2, step / 2)
    return torch.where((err[0] <= err[1])[..., None, None], u[0], u[1])
    return u


def check_basis(name: str, calibration: Calibration | None) -> None:
    """Refuse, before any slow work, a basis the calibration (or its absence) cannot provide."""
    if name not in BASES:
        raise UserError(f"unknown basis {name!r}; choose from {', '.join(BASES)}")
    if name == "random":
        return
    if calibration is None:
        raise UserError(f"basis {name} needs --calibration FILE (make one with `lokitool calibrate`)")
    if name.startswith("qa-") and name.removeprefix("qa-") not in calibration.query_moment:
        raise UserError(
            f"basis {name} needs query statistics, and this calibration file has none; recalibrate "
            "without --no-queries (queries are collected by default), or use --basis pre or post"
        )


def query_aware_basis(calibration: Calibration, kind: str, d: int) -> torch.Tensor:
    """The `qa` basis [L, Hkv, D, D] for a dimension budget d, from the file's C and S."""
    check_basis(f"qa-{kind}", calibration)
    c = calibration.pca[kind].covariance()
    s = calibration.query_moment[kind].to(torch.float64)
    return _complete(query_aware_subspace(c, s, d))


def basis_for(name: str, calibration: Calibration | None, d: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """Resolve a `--basis` value (pre, post, qa-pre, qa-post, random) to bases [L, Hkv, D, D]."""
    if name == "random":
        return random_basis(*shape)
    if calibration is None:
        raise UserError(f"basis {name} needs --calibration FILE (make one with `lokitool calibrate`)")
    if name in ("pre", "post"):
        return pca_basis(calibration, name)
    if name in ("qa-pre", "qa-post"):
        return query_aware_basis(calibration, name.removeprefix("qa-"), d)
    raise UserError(f"unknown basis {name!r}; choose from {', '.join(BASES)}")
