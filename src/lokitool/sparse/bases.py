"""Orthonormal bases for Loki's truncated scores, from a calibration file.

Every basis is [L, Hkv, D, D] with directions as columns; Loki scores with its first d columns.
With key covariance C (centered: a shift of all keys does not change one query's ranking) and
query second moment S = E[q q^T] (pooled over the query heads of the KV group), truncating to
the span of U (D x d, orthonormal, projector Pi = U U^T) leaves the score error

    E(U) = E_q Var_k[ q^T (I - Pi) k ] = tr((I - Pi) C (I - Pi) S).

- `pca` (Loki): the top-d eigenvectors of C. Optimal when queries weigh all directions alike (S = sI).
- `query-aware` (`qa`): U minimising E(U) itself (calib/query_aware.py: gradient descent on the
  Grassmann manifold from PCA and from the top eigenvectors of (CS + SC)/2, the exact answer when
  C and S commute); never worse than PCA. `calibrate` stores it for the usual budgets d; other d
  are fitted once per process. Same cache, same cost as Loki: keys are stored rotated and the
  first d dimensions are read.
- `selection-aware` (`sa-post`): fitted at calibrate time to the truncation error of the scores that
  carry the attention, on sampled rows, held near the query-aware error (calib/selection_aware.py); per
  head the best of PCA, query-aware and the fit by the attention mass on the top-k on held-out sample
  windows. Only stored budgets d exist (calibrate --sa-df).
- `random`: a Haar-random orthonormal basis: what any basis must beat.

`score_variance_captured` reports 1 - E(U)/tr(CS): the share of the per-query score variance over
keys that the truncated scores keep (1 means the truncated scores rank keys exactly as full ones).
"""

from __future__ import annotations

import torch

from ..calib.calibration import Calibration
from ..calib.query_aware import trace_product, truncation_error
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


def score_variance_captured(basis: torch.Tensor, c: torch.Tensor, s: torch.Tensor, d: int) -> torch.Tensor:
    """1 - E(U_d) / tr(CS) for the first d columns of `basis`: [...]."""
    total = trace_product(c, s).clamp_min(torch.finfo(c.dtype).tiny)
    return 1 - truncation_error(basis[..., :d], c, s, total) / total


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
    if name.startswith("sa-") and name.removeprefix("sa-") not in calibration.selection_aware:
        raise UserError(
            f"basis {name} needs a selection-aware fit, and this calibration file has none; recalibrate "
            "with --sa-df (e.g. --sa-df 0.25) and query statistics, or use --basis post or qa-post"
        )


def query_aware_basis(calibration: Calibration, kind: str, d: int) -> torch.Tensor:
    """The `qa` basis [L, Hkv, D, D] for a dimension budget d: stored in the file, else fitted once per process."""
    check_basis(f"qa-{kind}", calibration)
    return calibration.query_aware_basis(kind, d)


def basis_for(name: str, calibration: Calibration | None, d: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """Resolve a `--basis` value (pre, post, qa-pre, qa-post, sa-post, random) to bases [L, Hkv, D, D]."""
    if name == "random":
        return random_basis(*shape)
    if calibration is None:
        raise UserError(f"basis {name} needs --calibration FILE (make one with `lokitool calibrate`)")
    if name in ("pre", "post"):
        return pca_basis(calibration, name)
    if name in ("qa-pre", "qa-post"):
        return query_aware_basis(calibration, name.removeprefix("qa-"), d)
    if name == "sa-post":
        check_basis(name, calibration)
        return calibration.selection_aware_basis("post", d)
    raise UserError(f"unknown basis {name!r}; choose from {', '.join(BASES)}")
