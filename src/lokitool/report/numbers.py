"""rank-report's numbers: pure functions on calibrations, and the RankReport that the writers read.

Rank at a threshold v, for one (layer, KV head, pre/post RoPE): the smallest d >= 1 with
    (lambda_1 + ... + lambda_d) / (lambda_1 + ... + lambda_D) >= v   (within 1e-9, for float rounding)
where lambda are the eigenvalues, descending, of the covariance of that head's keys (centred on
their mean) and D is the head dimension. `pca.rank_at_variance` does the counting.

Comparing calibration A with calibration B (same model), per layer, KV head and kind, at
d = A's rank at the reference threshold (0.9 when asked for, else the middle one):
- agreement: mean squared cosine of the principal angles between A's and B's top-d subspaces,
  ||P_A P_B^T||_F^2 / d with P the top-d directions as rows: 1 for the same subspace, 0 for
  orthogonal ones, k/d when they share k directions and are otherwise orthogonal;
- captured variance: the share of B's key variance inside A's top-d subspace,
  trace(U_A^T C_B U_A) / trace(C_B), C_B rebuilt from B's eigenvalues and components;
- own variance: the same share for B's own top-d subspace, the most any d directions can capture.

Score variance captured (files calibrated with query statistics), per layer, KV head and kind, at
each d that Loki uses for the `--dims` fractions f (`sparse.reference.dims_for`, d = round(f * D)):
how much of what Loki ranks keys by survives truncating scores to the first d directions of a
basis U (see sparse/bases.py),
    1 - tr((I - U_d U_d^T) C (I - U_d U_d^T) S) / tr(CS),   C key covariance, S = E[q q^T],
for three bases (SCORE_BASES): `pca` (Loki's), `random` (Haar, seed 0) and `query_aware` (minimises
the error for that d; read from the file where `calibrate` stored it). 1 means the truncated scores
vary across keys exactly as the full ones; a basis that mixes high-variance key directions into the
queries' directions can score below 0. Next to them, `key_variance` is PCA's explained variance at
d, the cumulative eigenvalue share.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..calib.calibration import KINDS, Calibration
from ..calib.models import ModelFacts
from ..calib.pca import PCA, explained_variance_ratio, rank_at_variance
from ..errors import UserError
from ..sparse.bases import pca_basis, query_aware_basis, random_basis, score_variance_captured
from .labels import KIND_LABEL
from .settings import budget_dims, reference_threshold

SCORE_BASES = ("pca", "random", "query_aware")  # the bases whose score variance the report compares

Progress = Callable[[str], None]  # told what slow step starts next (the CLI shows it as a status line)


# ----------------------------------------------------------------------------------------------
# Ranks, subspace agreement, captured variance


def ranks_at(pca: PCA, variance: Sequence[float]) -> dict[float, torch.Tensor]:
    """Threshold -> rank per (layer, KV head), int64 [L, H]."""
    return {v: rank_at_variance(pca.eigenvalues, v) for v in variance}


def _top_rows(components: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """components [..., D, D] (rows = directions) with rows j >= d zeroed; d is [...]."""
    dim = components.shape[-1]
    keep = torch.arange(dim) < d.unsqueeze(-1)  # [..., D]
    return components.to(torch.float64) * keep.unsqueeze(-1)


def subspace_agreement(components_a: torch.Tensor, components_b: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine of the principal angles between the spans of the top-d rows of a and b.

    components_* [..., D, D] with orthonormal rows, d [...] int; returns float64 [...].
    The squared singular values of P_a P_b^T are the squared cosines, so their mean is ||P_a P_b^T||_F^2 / d.
    """
    overlap = _top_rows(components_a, d) @ _top_rows(components_b, d).transpose(-1, -2)  # [..., D, D]
    return overlap.square().sum((-1, -2)) / d.to(torch.float64)


def captured_variance(components_a: torch.Tensor, d: torch.Tensor, covariance_b: torch.Tensor) -> torch.Tensor:
    """trace(U^T C U) / trace(C), U = the top-d rows of components_a as columns: float64 [...]."""
    rows = _top_rows(components_a, d)  # [..., D, D]
    cov = covariance_b.to(torch.float64)
    inside = (rows @ cov @ rows.transpose(-1, -2)).diagonal(dim1=-2, dim2=-1).sum(-1)
    total = cov.diagonal(dim1=-2, dim2=-1).sum(-1)
    return inside / total.clamp_min(torch.finfo(torch.float64).tiny)


def own_variance(eigenvalues: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Cumulative explained-variance ratio at d (the share of the top-d directions): float64 [...]."""
    return explained_variance_ratio(eigenvalues).gather(-1, (d - 1).unsqueeze(-1)).squeeze(-1)


@dataclass(frozen=True)
class KindComparison:
    d: torch.Tensor  # [L, H] int64, A's rank at the reference threshold
    agreement: torch.Tensor  # [L, H]
    captured: torch.Tensor  # [L, H], share of B's variance in A's top-d subspace
    own: torch.Tensor  # [L, H], share of B's variance in B's own top-d subspace


def compare(a: Calibration, b: Calibration, threshold: float) -> dict[str, KindComparison]:
    """How well A's top-d subspaces (d = A's rank at `threshold`) match B's, per kind."""
    out = {}
    for kind in KINDS:
        pa, pb = a.pca[kind], b.pca[kind]
        d = rank_at_variance(pa.eigenvalues, threshold)
        out[kind] = KindComparison(
            d=d,
            agreement=subspace_agreement(pa.components, pb.components, d),
            captured=captured_variance(pa.components, d, pb.covariance()),
            own=own_variance(pb.eigenvalues, d),
        )
    return out


# ----------------------------------------------------------------------------------------------
# Score variance captured per basis


@dataclass(frozen=True)
class ScoreVariance:
    kind: str
    d: int
    key_variance: torch.Tensor  # [L, H], PCA's explained variance at d
    captured: dict[str, torch.Tensor]  # basis (SCORE_BASES) -> [L, H], score variance captured at d


def has_query_statistics(calibration: Calibration) -> bool:
    return all(kind in calibration.query_moment for kind in KINDS)


def score_variances(
    calibration: Calibration, dims: Sequence[int], progress: Progress | None = None, name: str = ""
) -> tuple[ScoreVariance, ...]:
    """Score variance captured by each basis at each d, per kind; the query-aware bases come from the file
    (or one fit per (kind, d) where it has none)."""
    facts = calibration.facts
    random = random_basis(facts.num_layers, facts.num_kv_heads, facts.head_dim)  # [L, H, D, D]
    out, step = [], 0
    for kind in KINDS:
        c = calibration.pca[kind].covariance()  # [L, H, D, D] float64
        s = calibration.query_moment[kind].to(torch.float64)
        pca = pca_basis(calibration, kind)
        share = explained_variance_ratio(calibration.pca[kind].eigenvalues)  # [L, H, D]
        for d in dims:
            step += 1
            if progress is not None:
                progress(f"query-aware basis {step}/{len(KINDS) * len(dims)}: {name} {KIND_LABEL[kind]}, d = {d}")
            bases = {"pca": pca, "random": random, "query_aware": query_aware_basis(calibration, kind, d)}
            out.append(ScoreVariance(
                kind=kind,
                d=d,
                key_variance=share[..., d - 1],
                captured={b: score_variance_captured(bases[b], c, s, d) for b in SCORE_BASES},
            ))
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# The report: loading, checking, building


@dataclass(frozen=True)
class Entry:
    file: str
    calibration: Calibration
    ranks: dict[str, dict[float, torch.Tensor]]  # kind -> threshold -> [L, H]
    score_variance: tuple[ScoreVariance, ...] | None = None  # None: the file has no query statistics


@dataclass(frozen=True)
class PairComparison:
    a: int  # index into RankReport.entries
    b: int
    kinds: dict[str, KindComparison]


@dataclass(frozen=True)
class RankReport:
    variance: tuple[float, ...]
    threshold: float  # reference threshold: d for comparisons, heatmaps
    entries: tuple[Entry, ...]
    comparisons: tuple[PairComparison, ...]  # every ordered pair of distinct files
    dim_fractions: tuple[float, ...] = ()  # --dims
    dims: tuple[int, ...] = ()  # d for the score variance, from dim_fractions and D

    @property
    def facts(self) -> ModelFacts:
        return self.entries[0].calibration.facts


def _describe(facts: ModelFacts) -> str:
    revision = f"@{facts.revision}" if facts.revision else ""
    return (
        f"{facts.model_id}{revision} ({facts.architecture}, {facts.num_layers} layers, "
        f"{facts.num_kv_heads} KV heads, head dim {facts.head_dim})"
    )


def check_same_model(calibrations: Sequence[tuple[str, Calibration]]) -> None:
    """Refuse calibrations of different models (other weights or another attention shape)."""
    first_file, first = calibrations[0]
    for file, cal in calibrations[1:]:
        same_weights = (cal.facts.model_id, cal.facts.revision) == (first.facts.model_id, first.facts.revision)
        if not (same_weights and cal.facts.same_architecture(first.facts)):
            raise UserError(
                f"{file} is a calibration of {_describe(cal.facts)}, but {first_file} is of "
                f"{_describe(first.facts)}; rank-report compares calibrations of one model: report each model separately"
            )


def load_calibrations(paths: Sequence[str | Path]) -> list[tuple[str, Calibration]]:
    if not paths:
        raise UserError("no calibration file given; create one with `lokitool calibrate`")
    seen: dict[Path, str] = {}
    for path in paths:
        resolved = Path(path).resolve()
        if resolved in seen:
            raise UserError(f"{path} is given twice (also as {seen[resolved]}); give each calibration file once")
        seen[resolved] = str(path)
    loaded = [(str(path), Calibration.load(path)) for path in paths]
    check_same_model(loaded)
    return loaded


def build_report(
    calibrations: Sequence[tuple[str, Calibration]],
    variance: Sequence[float],
    dim_fractions: Sequence[float] = (0.25, 0.5),
    progress: Progress | None = None,
) -> RankReport:
    check_same_model(calibrations)
    variance = tuple(sorted(variance))
    threshold = reference_threshold(variance)
    dims = budget_dims(dim_fractions, calibrations[0][1].facts.head_dim)
    entries = tuple(
        Entry(
            file=file,
            calibration=cal,
            ranks={kind: ranks_at(cal.pca[kind], variance) for kind in KINDS},
            score_variance=score_variances(cal, dims, progress, Path(file).stem) if has_query_statistics(cal) else None,
        )
        for file, cal in calibrations
    )
    comparisons = tuple(
        PairComparison(a=i, b=j, kinds=compare(entries[i].calibration, entries[j].calibration, threshold))
        for i in range(len(entries))
        for j in range(len(entries))
        if i != j
    )
    return RankReport(
        variance=variance, threshold=threshold, entries=entries, comparisons=comparisons,
        dim_fractions=tuple(sorted(dim_fractions)), dims=dims,
    )


# ----------------------------------------------------------------------------------------------
# Views shared by the writers


def mean_rank(entry: Entry, kind: str, v: float) -> torch.Tensor:
    """Mean over KV heads per layer: float64 [L]."""
    return entry.ranks[kind][v].double().mean(-1)


def file_labels(report: RankReport) -> list[str]:
    """Short name per file: the file stem, or the path where stems repeat."""
    stems = [Path(e.file).stem for e in report.entries]
    return [s if stems.count(s) == 1 else e.file for s, e in zip(stems, report.entries)]


def dataset(entry: Entry) -> str:
    return str(entry.calibration.info.get("dataset", "unknown dataset"))
