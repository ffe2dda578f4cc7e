"""Hand-built calibrations with known answers, shared by the rank-report tests."""

from __future__ import annotations

import torch

from lokitool.calib.calibration import Calibration
from lokitool.calib.models import ModelFacts
from lokitool.calib.pca import PCA

HALVING = torch.tensor([8.0, 4, 2, 1, 0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)  # sum 15.9375
# cumulative ratio: .502 .753 .878 .941 .973 .988 .996 1 -> rank 3 at 0.8, 4 at 0.9, 5 at 0.95
FLAT = torch.ones(8, dtype=torch.float64)  # rank ceil(8 v): 7 at 0.8, 8 at 0.9 and 0.95


def random_orthogonal(dim: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # rows (and columns) orthonormal


def facts(num_layers: int = 2, num_kv_heads: int = 2, head_dim: int = 8, model_id: str = "toy/model") -> ModelFacts:
    return ModelFacts(
        model_id=model_id, revision=None, architecture="llama", num_layers=num_layers, num_heads=2 * num_kv_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, rope=True, max_positions=256, bos_token_id=1,
    )


def calibration(eigenvalues: torch.Tensor, components: torch.Tensor, dataset: str = "toy:a", **fact_args) -> Calibration:
    """eigenvalues [L, H, D], components [L, H, D, D] (rows); the same PCA before and after RoPE."""
    num_layers, num_heads, dim = eigenvalues.shape

    def pca() -> PCA:  # a copy per kind: safetensors refuses to save tensors that share memory
        mean = torch.zeros(num_layers, num_heads, dim)
        return PCA(mean=mean, components=components.float().clone(), eigenvalues=eigenvalues.float().clone())

    return Calibration(
        facts=facts(num_layers, num_heads, dim, **fact_args),
        info={"dataset": dataset, "num_tokens": 4096, "seq_len": 512},
        pca={"pre": pca(), "post": pca()},
    )


def rotated_pair(seed: int = 0) -> tuple[Calibration, Calibration, torch.Tensor]:
    """A: halving spectrum (head 0) and flat spectrum (head 1) in random orthonormal bases, 2 layers.
    B: the same, but B's 4th and 5th directions are A's 5th and 4th, so B's top 4 shares 3 of A's top 4."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.stack([torch.stack([random_orthogonal(8, g) for _ in range(2)]) for _ in range(2)])  # [2, 2, 8, 8]
    eigenvalues = torch.stack([HALVING, FLAT]).expand(2, 2, 8).clone()
    swapped = rows[:, :, [0, 1, 2, 4, 3, 5, 6, 7]]
    a = calibration(eigenvalues, rows, dataset="toy:older")
    b = calibration(eigenvalues, swapped, dataset="toy:newer")
    return a, b, rows


def with_queries(query_eigenvalues: torch.Tensor, seed: int = 4, dataset: str = "toy:queries") -> tuple[Calibration, torch.Tensor]:
    """Keys with the halving spectrum and queries with E[q q^T] = R^T diag(query_eigenvalues) R, where R
    (rows) is the keys' own principal basis, random per (layer, head): 2 layers, 2 KV heads, D = 8."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.stack([torch.stack([random_orthogonal(8, g) for _ in range(2)]) for _ in range(2)])  # [2, 2, 8, 8]
    keys = calibration(HALVING.expand(2, 2, 8).clone(), rows, dataset=dataset)
    moment = rows.transpose(-1, -2) @ (query_eigenvalues.to(torch.float64).unsqueeze(-1) * rows)  # [2, 2, 8, 8]
    cal = Calibration(facts=keys.facts, info=keys.info, pca=keys.pca,
                      query_moment={"pre": moment.float().clone(), "post": moment.float().clone()})
    return cal, rows


# Queries blind to the keys' top 4 directions: S = diag(0, 0, 0, 0, 1, 1, 1, 1) in the keys' basis, so
# c_i s_i = (0, 0, 0, 0, .5, .25, .125, .0625), tr(CS) = .9375. Both diagonal: the best d directions
# are those with the largest c_i s_i, and the error is the sum of the c_i s_i left out.
BLIND = torch.tensor([0.0, 0, 0, 0, 1, 1, 1, 1])
