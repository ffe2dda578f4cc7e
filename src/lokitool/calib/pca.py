"""Streamed moments -> PCA: mean, principal directions, eigenvalues; ranks at a variance threshold."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .moments import MomentSums


@dataclass(frozen=True)
class PCA:
    """Per-(layer, head) PCA. `components[l, h, j]` is the j-th principal direction (unit vector)."""

    mean: torch.Tensor  # [L, H, D]
    components: torch.Tensor  # [L, H, D, D], rows are directions, by descending eigenvalue
    eigenvalues: torch.Tensor  # [L, H, D], descending, >= 0

    def covariance(self) -> torch.Tensor:
        """C = P^T diag(lambda) P, rebuilt from the stored decomposition: [L, H, D, D]."""
        p = self.components.to(torch.float64)
        return p.transpose(-1, -2) @ (self.eigenvalues.to(torch.float64).unsqueeze(-1) * p)

    def basis(self) -> torch.Tensor:
        """Directions as columns, ready for x @ basis: [L, H, D, D]."""
        return self.components.transpose(-1, -2)


def covariance(sums: MomentSums) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [L, H, D] and population covariance [L, H, D, D] from streamed sums (float64)."""
    n = sums.count.clamp_min(1).unsqueeze(-1)  # [L, H, 1]
    mean = sums.total / n
    cov = sums.outer / n.unsqueeze(-1) - mean.unsqueeze(-1) * mean.unsqueeze(-2)
    return mean, (cov + cov.transpose(-1, -2)) / 2


def _fix_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Make the largest-magnitude entry of each direction positive, so results are reproducible."""
    idx = vectors.abs().argmax(dim=-1, keepdim=True)
    signs = torch.sign(torch.gather(vectors, -1, idx))
    return vectors * torch.where(signs == 0, torch.ones_like(signs), signs)


def eig_descending(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of symmetric matrices [..., D, D]: (eigenvalues [..., D] descending,
    directions [..., D, D] as rows)."""
    values, vectors = torch.linalg.eigh(matrix.to(torch.float64))
    values = values.flip(-1).clamp_min(0)
    rows = _fix_signs(vectors.flip(-1).transpose(-1, -2))
    return values, rows


def fit(sums: MomentSums) -> PCA:
    mean, cov = covariance(sums)
    values, rows = eig_descending(cov.cpu())
    return PCA(mean=mean.cpu(), components=rows, eigenvalues=values)


def explained_variance_ratio(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Cumulative explained-variance ratio [..., D]: entry d-1 is the share of the top d directions."""
    ev = eigenvalues.to(torch.float64)
    total = ev.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return ev.cumsum(-1) / total


def rank_at_variance(eigenvalues: torch.Tensor, threshold: float) -> torch.Tensor:
    """Smallest d whose cumulative explained-variance ratio reaches `threshold`: int64 [...].

    A relative slack of 1e-9 absorbs float rounding of a sum that should reach the threshold exactly.
    """
    cum = explained_variance_ratio(eigenvalues)
    reached = cum >= threshold - 1e-9
    return reached.to(torch.int64).argmax(-1) + 1
