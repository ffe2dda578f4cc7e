"""The query-aware subspace: the d directions that keep most of the score variance, fitted from C and S.

With key covariance C and query second moment S = E[q q^T] (one pair per layer and KV head),
truncating Loki's scores to the span of U (D x d, orthonormal, projector P = U U^T) leaves the error

    E(U) = E_q Var_k[ q^T (I - P) k ] = tr((I - P) C (I - P) S),

and `query_aware_subspace` returns a U that minimises it; sparse/bases.py turns it into a basis.
E depends on U only through P (a point of the Grassmann manifold), and it is not convex there:
the descent runs from two starts and keeps the better end.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Descent settings. The error is measured as a fraction of tr(CS); a problem stops when its best
# error fell by less than STALL over the last WINDOW steps (or after MAX_STEPS).
MAX_STEPS = 300  # as many as the fit this one replaced took, each about a fifth of the work
WINDOW = 20
STALL = 1e-5
_ARMIJO = 1e-4  # sufficient decrease, against the non-monotone reference value
_MEMORY = 0.85  # weight of the past in that reference (Zhang & Hager)


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


def complete_basis(u: torch.Tensor) -> torch.Tensor:
    """Extend orthonormal columns U [..., D, d] to a full orthonormal basis [..., D, D], U first."""
    dim, d = u.shape[-2], u.shape[-1]
    if d == dim:
        return u
    eye = torch.eye(dim, dtype=u.dtype, device=u.device).expand(*u.shape[:-2], dim, dim)
    rest = eye - u @ u.transpose(-1, -2)  # projector onto the complement
    return torch.cat([u, torch.linalg.eigh(rest)[1][..., -(dim - d):]], dim=-1)


def _top(m: torch.Tensor, d: int) -> torch.Tensor:
    """Eigenvectors of the d largest eigenvalues of symmetric m [..., D, D]: [..., D, d]."""
    return torch.linalg.eigh(m)[1].flip(-1)[..., :d]


def orthonormalize(w: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns with the span of w [..., D, d] (QR, signs fixed so that nearly orthonormal w barely moves)."""
    q, r = torch.linalg.qr(w)
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def query_aware_subspace(
    c: torch.Tensor, s: torch.Tensor, d: int, max_steps: int = MAX_STEPS, window: int = WINDOW, stall: float = STALL
) -> torch.Tensor:
    """Orthonormal U [..., D, d] (float64, on C's device) minimising E(U), batched over leading dims.

    Riemannian gradient descent on the Grassmann manifold in C's eigenbasis (where C is diagonal, so a
    step costs one [D, D] x [D, 2d] product), with Barzilai-Borwein steps under a non-monotone
    sufficient-decrease test and a Cholesky-QR retraction. It starts from the top-d eigenvectors of
    (CS + SC)/2 (the exact answer when C and S commute) and from PCA (C's top d); a start leaves the
    batch once it stalls (see STALL). Both ends and both starts are then scored in float64 and the best
    is returned, so the result is never worse than PCA. The steps run in float32 on the CPU (half the
    time of float64) and in float64 on a GPU, where float32 products may run as TF32, too coarse here.
    On the CPU the fit runs on one thread: thousands of small products, whose hand-offs between threads
    cost more than they save (five to ten times the single-thread time when other jobs share the cores).
    """
    with one_cpu_thread():
        return _fit(c, s, d, max_steps, window, stall)


def _fit(c: torch.Tensor, s: torch.Tensor, d: int, max_steps: int, window: int, stall: float) -> torch.Tensor:
    """query_aware_subspace's work, on the threads it was given."""
    lead, dim = c.shape[:-2], c.shape[-1]
    c = c.to(torch.float64).reshape(-1, dim, dim)  # [N, D, D]
    s = s.to(device=c.device, dtype=torch.float64).reshape(-1, dim, dim)
    if d == dim:
        return _top(c @ s + s @ c, d).reshape(*lead, dim, d)
    # In C's eigenbasis V (descending) C is diag(lam) and PCA is the first d coordinate axes. Scaling
    # by tr(CS) makes the error a fraction of it, so one step size and one stall test suit every problem.
    lam, v = torch.linalg.eigh(c / trace_product(c, s).clamp_min(1e-30)[:, None, None])
    lam, v = lam.flip(-1).clamp_min(0), v.flip(-1)  # [N, D], [N, D, D]
    s_rot = v.transpose(-1, -2) @ s @ v  # S in C's eigenbasis, with tr(diag(lam) s_rot) = 1
    pca = torch.eye(dim, d, dtype=torch.float64, device=c.device).expand(len(c), dim, d)
    tilted = _top(s_rot * (lam[:, :, None] + lam[:, None, :]) / 2, d)  # (CS + SC)/2 in that basis
    ends = _descend(lam.repeat(2, 1), s_rot.repeat(2, 1, 1), torch.cat([tilted, pca]), max_steps, window, stall)
    candidates = orthonormalize(torch.stack([*ends.to(torch.float64).chunk(2), tilted, pca]))  # [4, N, D, d]
    lam_diag = torch.diag_embed(lam)
    best = truncation_error(candidates, lam_diag, s_rot).argmin(0)  # [N]
    u = candidates.gather(0, best[None, :, None, None].expand(1, *candidates.shape[1:]))[0]
    return (v @ u).reshape(*lead, dim, d)


@contextlib.contextmanager
def one_cpu_thread() -> Iterator[None]:
    """Torch on one CPU thread inside (small fits: more threads only add hand-offs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _error_and_gradient(lam: torch.Tensor, s: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E(U) [N] and its Riemannian gradient [N, D, d] for C = diag(lam) with tr(CS) = 1, orthonormal U."""
    d = u.shape[-1]
    cu = lam[:, :, None] * u  # C U
    prod = s @ torch.cat([u, cu], -1)  # [S U, S C U]: the only D x D product of a step
    su, scu = prod[..., :d], prod[..., d:]
    a, b = u.transpose(-1, -2) @ cu, u.transpose(-1, -2) @ su  # U^T C U, U^T S U
    err = 1 - 2 * (cu * su).sum((-1, -2)) + (a * b).sum((-1, -2))
    grad = 2 * (cu @ b + su @ a - lam[:, :, None] * su - scu)  # Euclidean gradient
    return err, grad - u @ (u.transpose(-1, -2) @ grad)  # horizontal part: U^T g = 0


def _descend(lam: torch.Tensor, s: torch.Tensor, u: torch.Tensor, max_steps: int, window: int, stall: float) -> torch.Tensor:
    """Best U [N, D, d] reached from each start; problems that stall leave the batch."""
    work = torch.float32 if u.device.type == "cpu" else torch.float64
    lam, s, u = lam.to(work), s.to(work), u.to(work)
    out = u.clone()
    live = torch.arange(len(u), device=u.device)  # rows of `out` still descending
    err, g = _error_and_gradient(lam, s, u)
    best_err, best_u, mark = err, u, err
    step = torch.ones_like(err)
    ref, weight = err, torch.ones_like(err)  # non-monotone reference value and its weight
    for k in range(1, max_steps + 1):
        x = u - step[:, None, None] * g  # tangent step; U^T g = 0 makes x^T x = I + step^2 g^T g
        chol = torch.linalg.cholesky_ex(x.transpose(-1, -2) @ x)[0]
        cand = torch.linalg.solve_triangular(chol.transpose(-1, -2), x, upper=True, left=False)
        cand_err, cand_g = _error_and_gradient(lam, s, cand)
        ok = cand_err <= ref - _ARMIJO * step * (g * g).sum((-1, -2))
        ds, dg = cand - u, cand_g - g
        sy = (ds * dg).sum((-1, -2)).abs().clamp_min(1e-30)
        # Barzilai-Borwein step for the next try, the long and the short form in turn
        bb = (ds * ds).sum((-1, -2)) / sy if k % 2 else sy / (dg * dg).sum((-1, -2)).clamp_min(1e-30)
        u = torch.where(ok[:, None, None], cand, u)
        g = torch.where(ok[:, None, None], cand_g, g)
        step = torch.where(ok, bb.clamp(1e-6, 1e6), step / 2)
        new_weight = _MEMORY * weight + 1
        ref = torch.where(ok, (_MEMORY * weight * ref + cand_err) / new_weight, ref)
        weight = torch.where(ok, new_weight, weight)
        better = ok & (cand_err < best_err)
        best_err = torch.where(better, cand_err, best_err)
        best_u = torch.where(better[:, None, None], cand, best_u)
        if k % window and k < max_steps:
            continue
        done = (mark - best_err < stall) | (k == max_steps)
        if bool(done.any()):
            out[live[done]] = best_u[done]
            if bool(done.all()):
                break
            keep = ~done
            live, lam, s, u, g, step, ref, weight, best_err, best_u = (
                t[keep] for t in (live, lam, s, u, g, step, ref, weight, best_err, best_u)
            )
        mark = best_err
    return out
