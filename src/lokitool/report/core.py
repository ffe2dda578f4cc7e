"""`lokitool rank-report`: how many principal directions keys need, and whether they carry over.

Numbers first (pure functions on calibrations), then the writers (report.json, report.md, figures).

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
each d = round(f * D) for the `--dims` fractions f: how much of what Loki ranks keys by survives
truncating scores to the first d directions of a basis U (see bases.py),
    1 - tr((I - U_d U_d^T) C (I - U_d U_d^T) S) / tr(CS),   C key covariance, S = E[q q^T],
for three bases: `pca` (Loki's), `random` (Haar, seed 0) and `query_aware` (minimises the error
for that d). 1 means the truncated scores vary across keys exactly as the full ones; a basis that
mixes high-variance key directions into the queries' directions can score below 0. Next to them,
`key_variance` is PCA's explained variance at d, the cumulative eigenvalue share.
report.json, per calibration: `"score_variance"`, a list over layer, then kind, then d of
    {"layer": 0, "kind": "post", "d": 16, "key_variance": [per head], "pca": [per head],
     "random": [per head], "query_aware": [per head]}
with `"score_variance_mean"` (means over layers and heads per kind and d); both are null, with a
one-line `"score_variance_note"`, for a file without query statistics.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..calib.calibration import KINDS, Calibration
from ..calib.models import ModelFacts
from ..calib.pca import PCA, explained_variance_ratio, rank_at_variance
from ..errors import UserError
from ..fileio import atomic_path, ensure_writable_dir, write_text_atomic
from ..results import git_hash
from ..sparse.bases import pca_basis, query_aware_basis, random_basis, score_variance_captured

DEFAULT_VARIANCE = "0.8,0.9,0.95"
DEFAULT_DIMS = "0.25,0.5"
KIND_LABEL = {"pre": "pre-RoPE", "post": "post-RoPE"}
BASES = ("pca", "random", "query_aware")
BASIS_LABEL = {"pca": "PCA (Loki)", "random": "random", "query_aware": "query-aware"}

RANK_DEFINITION = (
    "rank at v = smallest d >= 1 such that (lambda_1 + ... + lambda_d) / (lambda_1 + ... + lambda_D) >= v "
    "(within 1e-9), lambda = eigenvalues, descending, of the covariance of one KV head's keys (centred on "
    "their mean) in one layer, before (pre) or after (post) RoPE; D = head dimension"
)
AGREEMENT_DEFINITION = (
    "mean squared cosine of the principal angles between A's and B's top-d subspaces, ||P_A P_B^T||_F^2 / d; "
    "d = A's rank at the reference threshold, per head"
)
CAPTURED_DEFINITION = "share of B's key variance inside A's top-d subspace: trace(U_A^T C_B U_A) / trace(C_B)"
OWN_DEFINITION = "share of B's key variance inside B's own top-d subspace: the most any d directions can capture"
SCORE_VARIANCE_DEFINITION = (
    "1 - tr((I - U_d U_d^T) C (I - U_d U_d^T) S) / tr(CS): share of the per-query variance of attention "
    "scores over keys kept by scores truncated to the first d directions U_d of a basis; C = key covariance, "
    "S = E[q q^T] over the query heads of the KV group; d = round(f * D) for each --dims fraction f; "
    "bases: pca (Loki), random (Haar, seed 0), query_aware (minimises the truncation error for that d)"
)
KEY_VARIANCE_DEFINITION = "PCA's explained variance at d: (lambda_1 + ... + lambda_d) / (lambda_1 + ... + lambda_D)"
NO_QUERIES_NOTE = (
    "no query statistics in this file (calibrated with --no-queries): score variance not reported; "
    "recalibrate without --no-queries to get it"
)

Progress = Callable[[str], None]  # told what slow step starts next (the CLI shows it as a status line)


# ----------------------------------------------------------------------------------------------
# Settings


def _parse_fractions(text: str, what: str, flag: str, default: str, example: str) -> tuple[float, ...]:
    """'0.8,0.9' -> (0.8, 0.9): sorted, without repeats, each in (0, 1]; errors name `flag`."""
    values = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise UserError(f"{what} {part!r} is not a number; give fractions such as {flag} {default}") from None
        if not 0 < value <= 1:
            raise UserError(f"{what} {part} is outside (0, 1]; give fractions such as {example} (not percentages)")
        values.add(value)
    if not values:
        raise UserError(f"no {what} given; use for example {flag} {default}")
    return tuple(sorted(values))


def parse_variance(text: str) -> tuple[float, ...]:
    """'0.8,0.9,0.95' -> (0.8, 0.9, 0.95): sorted, without repeats, each in (0, 1]."""
    return _parse_fractions(text, "variance threshold", "--variance", DEFAULT_VARIANCE, "0.9")


def parse_dims(text: str) -> tuple[float, ...]:
    """'0.25,0.5' -> (0.25, 0.5): fractions of the head dimension, sorted, without repeats, each in (0, 1]."""
    return _parse_fractions(text, "dimension fraction", "--dims", DEFAULT_DIMS, "0.25")


def dims_for(fractions: Sequence[float], head_dim: int) -> tuple[int, ...]:
    """Fractions of D -> distinct d = round(f * D) (halves up), at least 1: (0.25, 0.5), 64 -> (16, 32)."""
    return tuple(sorted({max(1, math.floor(f * head_dim + 0.5)) for f in fractions}))


def reference_threshold(variance: Sequence[float]) -> float:
    """The threshold that sets d for comparisons and heatmaps: 0.9 if asked for, else the middle one."""
    return 0.9 if 0.9 in variance else sorted(variance)[len(variance) // 2]


def _key(v: float) -> str:
    return f"{v:g}"


# ----------------------------------------------------------------------------------------------
# Numbers


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


@dataclass(frozen=True)
class ScoreVariance:
    kind: str
    d: int
    key_variance: torch.Tensor  # [L, H], PCA's explained variance at d
    captured: dict[str, torch.Tensor]  # basis (BASES) -> [L, H], score variance captured at d


def has_query_statistics(calibration: Calibration) -> bool:
    return all(kind in calibration.query_moment for kind in KINDS)


def score_variances(
    calibration: Calibration, dims: Sequence[int], progress: Progress | None = None, name: str = ""
) -> tuple[ScoreVariance, ...]:
    """Score variance captured by each basis at each d, per kind; one query-aware fit per (kind, d)."""
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
                captured={b: score_variance_captured(bases[b], c, s, d) for b in BASES},
            ))
    return tuple(out)


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
    dims = dims_for(dim_fractions, calibrations[0][1].facts.head_dim)
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


def mean_rank(entry: Entry, kind: str, v: float) -> torch.Tensor:
    """Mean over KV heads per layer: float64 [L]."""
    return entry.ranks[kind][v].double().mean(-1)


# ----------------------------------------------------------------------------------------------
# report.json


def _generated() -> dict[str, Any]:
    from .. import __version__

    return {
        "lokitool": __version__,
        "torch": torch.__version__,
        "git_commit": git_hash(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _rounded(values: torch.Tensor, places: int = 6) -> list[float] | float:
    return [round(float(x), places) for x in values.flatten()] if values.dim() else round(float(values), places)


def _entry_json(entry: Entry, variance: Sequence[float]) -> dict[str, Any]:
    cal = entry.calibration
    layers = [
        {
            "layer": i,
            **{kind: {_key(v): entry.ranks[kind][v][i].tolist() for v in variance} for kind in KINDS},
        }
        for i in range(cal.facts.num_layers)
    ]
    return {
        "file": entry.file,
        "model": cal.facts.model_id,
        "dataset": cal.info.get("dataset"),
        "model_facts": cal.facts.to_dict(),
        "info": cal.info,
        "head_dim": cal.facts.head_dim,
        "mean_rank": {
            kind: {_key(v): round(float(entry.ranks[kind][v].double().mean()), 3) for v in variance} for kind in KINDS
        },
        "layers": layers,
        **_score_variance_json(entry),
    }


def _score_variance_json(entry: Entry) -> dict[str, Any]:
    """Per (layer, kind, d) and per head; means over layers and heads; a note where the file has no queries."""
    if entry.score_variance is None:
        return {"score_variance": None, "score_variance_mean": None, "score_variance_note": NO_QUERIES_NOTE}
    num_layers = entry.calibration.facts.num_layers
    by_layer = [
        {
            "layer": i,
            "kind": sv.kind,
            "d": sv.d,
            "key_variance": _rounded(sv.key_variance[i]),
            **{b: _rounded(sv.captured[b][i]) for b in BASES},
        }
        for i in range(num_layers)
        for sv in entry.score_variance  # kind-major, then d
    ]
    means = [
        {
            "kind": sv.kind,
            "d": sv.d,
            "key_variance": _rounded(sv.key_variance.mean()),
            **{b: _rounded(sv.captured[b].mean()) for b in BASES},
        }
        for sv in entry.score_variance
    ]
    return {"score_variance": by_layer, "score_variance_mean": means}


def _pair_json(report: RankReport, pair: PairComparison) -> dict[str, Any]:
    num_layers = report.facts.num_layers
    layers = [
        {
            "layer": i,
            "kind": kind,
            "d": pair.kinds[kind].d[i].tolist(),
            "agreement": _rounded(pair.kinds[kind].agreement[i]),
            "captured_variance": _rounded(pair.kinds[kind].captured[i]),
            "own_variance": _rounded(pair.kinds[kind].own[i]),
        }
        for i in range(num_layers)
        for kind in KINDS
    ]
    mean = {
        kind: {
            "d": round(float(c.d.double().mean()), 3),
            "agreement": _rounded(c.agreement.mean()),
            "captured_variance": _rounded(c.captured.mean()),
            "own_variance": _rounded(c.own.mean()),
        }
        for kind, c in pair.kinds.items()
    }
    return {
        "a": report.entries[pair.a].file,
        "b": report.entries[pair.b].file,
        "threshold": report.threshold,
        "mean": mean,
        "layers": layers,
    }


def report_json(report: RankReport) -> dict[str, Any]:
    return {
        "files": [e.file for e in report.entries],
        "variance": list(report.variance),
        "reference_threshold": report.threshold,
        "dims": list(report.dim_fractions),
        "d": list(report.dims),
        "definitions": {
            "rank": RANK_DEFINITION,
            "agreement": AGREEMENT_DEFINITION,
            "captured_variance": CAPTURED_DEFINITION,
            "own_variance": OWN_DEFINITION,
            "score_variance": SCORE_VARIANCE_DEFINITION,
            "key_variance": KEY_VARIANCE_DEFINITION,
        },
        "generated": _generated(),
        "calibrations": [_entry_json(e, report.variance) for e in report.entries],
        "comparisons": [_pair_json(report, p) for p in report.comparisons],
    }


_FLAT_LIST = re.compile(r"\[\s+([^\[\]{}\"]*?)\s+\]")


def dumps(obj: Any) -> str:
    """JSON with 2-space indents, but lists of numbers on one line (one head per entry, easy to diff)."""
    text = json.dumps(obj, indent=2)
    return _FLAT_LIST.sub(lambda m: "[" + " ".join(m.group(1).split()) + "]", text) + "\n"


# ----------------------------------------------------------------------------------------------
# Labels shared by tables and figures


def labels(report: RankReport) -> list[str]:
    """Short name per file: the file stem, or the path where stems repeat."""
    stems = [Path(e.file).stem for e in report.entries]
    return [s if stems.count(s) == 1 else e.file for s, e in zip(stems, report.entries)]


def _dataset(entry: Entry) -> str:
    return str(entry.calibration.info.get("dataset", "unknown dataset"))


def _title_suffix(report: RankReport) -> str:
    datasets = " vs ".join(dict.fromkeys(_dataset(e) for e in report.entries))
    return f"{report.facts.model_id}\n{datasets}"


def _pct(v: float) -> str:
    return f"{v * 100:g}%"


# ----------------------------------------------------------------------------------------------
# report.md


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1) -> str:
    """GitHub table: the first `text_columns` columns left-aligned, the rest (numbers) right-aligned."""
    rule = ["---" if i < text_columns else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _md_sources(report: RankReport, names: Sequence[str]) -> str:
    rows = []
    for name, entry in zip(names, report.entries):
        info = entry.calibration.info
        versions = info.get("versions", {})
        rows.append([
            f"`{entry.file}`" if name == entry.file else f"{name} (`{entry.file}`)",
            f"`{_dataset(entry)}`",
            str(info.get("dtype", "?")),
            str(info.get("date", "?")),
            str(versions.get("lokitool", "?")),
            f"{info['num_tokens']:,}" if isinstance(info.get("num_tokens"), int) else "?",
            str(info.get("seq_len", "?")),
        ])
    return _md_table(["file", "dataset", "dtype", "calibrated", "lokitool", "tokens", "window"], rows, text_columns=5)


def _md_summary(report: RankReport, names: Sequence[str]) -> str:
    dim = report.facts.head_dim
    rows = []
    for name, entry in zip(names, report.entries):
        for kind in KINDS:
            cells = []
            for v in report.variance:
                r = entry.ranks[kind][v].double()
                cells.append(f"{r.mean():.1f} ({r.mean() / dim:.0%}), {int(r.min())}-{int(r.max())}")
            rows.append([name, KIND_LABEL[kind], *cells])
    header = ["file", "keys", *(f"rank at {_pct(v)}" for v in report.variance)]
    return _md_table(header, rows, text_columns=2)


def _md_layers(report: RankReport, entry: Entry) -> str:
    t = report.threshold
    rows = []
    for i in range(report.facts.num_layers):
        means = [f"{float(mean_rank(entry, kind, v)[i]):.1f}" for kind in KINDS for v in report.variance]
        heads = [" / ".join(str(int(x)) for x in entry.ranks[kind][t][i]) for kind in KINDS]
        rows.append([str(i), *means, *heads])
    header = [
        "layer",
        *(f"{kind} {_pct(v)}" for kind in KINDS for v in report.variance),
        *(f"{kind} {_pct(t)} per head" for kind in KINDS),
    ]
    return _md_table(header, rows)


def _md_comparison_summary(report: RankReport, names: Sequence[str]) -> str:
    rows = []
    for pair in report.comparisons:
        for kind, c in pair.kinds.items():
            rows.append([
                names[pair.a],
                names[pair.b],
                KIND_LABEL[kind],
                f"{c.d.double().mean():.1f}",
                f"{c.agreement.mean():.3f} (min {c.agreement.min():.3f})",
                f"{c.captured.mean():.3f} (min {c.captured.min():.3f})",
                f"{c.own.mean():.3f}",
            ])
    header = ["A (basis)", "B (keys)", "keys", "mean d", "agreement", "captured variance", "own variance"]
    return _md_table(header, rows, text_columns=3)


def _md_comparison_layers(report: RankReport, pair: PairComparison) -> str:
    rows = []
    for i in range(report.facts.num_layers):
        cells = []
        for kind in KINDS:
            c = pair.kinds[kind]
            cells += [f"{c.d[i].double().mean():.1f}", f"{c.agreement[i].mean():.3f}", f"{c.captured[i].mean():.3f}",
                      f"{c.own[i].mean():.3f}"]
        rows.append([str(i), *cells])
    header = ["layer", *(f"{kind} {col}" for kind in KINDS for col in ("d", "agreement", "captured", "own"))]
    return _md_table(header, rows)


def _md_score_summary(report: RankReport, names: Sequence[str]) -> str:
    rows = []
    for name, entry in zip(names, report.entries):
        for sv in entry.score_variance or ():
            rows.append([
                name,
                KIND_LABEL[sv.kind],
                str(sv.d),
                f"{sv.key_variance.mean():.3f}",
                *(f"{sv.captured[b].mean():.3f}" for b in BASES),
            ])
    header = ["file", "keys", "d", "key variance (PCA)", *(f"score variance: {BASIS_LABEL[b]}" for b in BASES)]
    return _md_table(header, rows, text_columns=2)


def _md_score_variance(report: RankReport, names: Sequence[str], figures: "FigureFiles") -> list[str]:
    dim = report.facts.head_dim
    dims = ", ".join(map(str, report.dims))
    fractions = ",".join(f"{f:g}" for f in report.dim_fractions)
    parts = [
        "## Score variance captured by truncated scores",
        "Loki ranks keys by scores computed in the first d directions of a basis U. For each layer, KV head "
        "and kind, with C the key covariance and S = E[q qᵀ] over the query heads of the KV group, the "
        "**score variance captured** at d is 1 − tr((I − U_d U_dᵀ) C (I − U_d U_dᵀ) S) / tr(CS): the share "
        "of the per-query variance of scores across keys that the truncated scores keep (1: they vary "
        "exactly as the full scores). It can fall below 0 for a basis that mixes high-variance key "
        "directions into the directions queries look along.",
        "- **PCA (Loki)**: the top-d principal directions of the keys;",
        "- **random**: a Haar-random orthonormal basis (seed 0): what any basis must beat;",
        "- **query-aware**: the d directions that minimise the truncation error for that d "
        "(fitted per d, see `lokitool/bases.py`);",
        "- **key variance (PCA)**: PCA's explained variance at d, (λ1 + … + λd) / (λ1 + … + λD): what the "
        "ranks above measure. Score variance captured by PCA equals it when queries weigh all directions alike.",
        f"d = {dims} of D = {dim} (`--dims {fractions}`: d = round(f · D)).",
    ]
    if any(e.score_variance is not None for e in report.entries):
        parts[-1] += " Means over layers and KV heads:"
        parts.append(_md_score_summary(report, names))
    for name, entry, files in zip(names, report.entries, figures.per_entry):
        if entry.score_variance is None:
            parts.append(f"- {name} (`{entry.file}`): {NO_QUERIES_NOTE}.")
        else:
            parts.append(f"![score variance captured, {name}]({files['score_variance']})")
    parts.append(
        "In `report.json`, each calibration has `score_variance`: a list over layer, then kind, then d of "
        '`{"layer": 0, "kind": "post", "d": 16, "key_variance": [per head], "pca": [per head], '
        '"random": [per head], "query_aware": [per head]}`, and `score_variance_mean` (means over layers '
        "and heads per kind and d); both are `null`, with `score_variance_note`, for a file without query statistics."
    )
    return parts


def report_markdown(report: RankReport, figures: "FigureFiles") -> str:
    facts = report.facts
    names = labels(report)
    t = report.threshold
    parts = [
        f"# Rank report: {facts.model_id}",
        f"{facts.architecture}, {facts.num_layers} layers, {facts.num_heads} query heads, "
        f"{facts.num_kv_heads} KV heads, head dimension D = {facts.head_dim}"
        + (f", revision `{facts.revision}`" if facts.revision else "") + ".",
        "## Calibrations",
        _md_sources(report, names),
        "## How ranks are counted",
        "For each layer, KV head, and keys before (pre) or after (post) RoPE, the rank at a threshold v is "
        "the smallest d >= 1 with (λ1 + … + λd) / (λ1 + … + λD) >= v (within 1e-9 for float rounding), "
        "where λ are the eigenvalues, descending, of the covariance of that head's keys (centred on their "
        f"mean) and D = {facts.head_dim}. A rank of D means the keys need every direction.",
        "## Summary",
        "Rank over all layers and KV heads: mean (share of D), min-max.",
        _md_summary(report, names),
        f"![rank per layer]({figures.rank_per_layer})",
        *_md_score_variance(report, names, figures),
    ]
    for name, entry, files in zip(names, report.entries, figures.per_entry):
        parts += [
            f"## {name}: `{_dataset(entry)}`",
            f"Mean rank over KV heads per layer at each threshold; per-head ranks at {_pct(t)}.",
            _md_layers(report, entry),
            f"![rank heatmap]({files['heatmap']})",
            f"![cumulative explained variance]({files['cumulative']})",
            f"![eigenvalue spectrum]({files['spectrum']})",
        ]
    if report.comparisons:
        parts += [
            "## Comparisons",
            f"For each ordered pair (A, B), layer, KV head and kind, d is A's rank at {_pct(t)} (the reference "
            "threshold: 0.9 when asked for, else the middle one), so A→B and B→A differ.",
            "- **agreement**: mean squared cosine of the principal angles between A's and B's top-d "
            "subspaces, ‖P_A P_Bᵀ‖²_F / d: 1 for the same subspace, 0 for orthogonal ones.",
            "- **captured variance**: the share of B's key variance inside A's top-d subspace, "
            "trace(U_Aᵀ C_B U_A) / trace(C_B), with C_B rebuilt from B's eigenvalues and components. "
            "This is what a Loki basis calibrated on A keeps of B's keys.",
            "- **own variance**: the same share for B's own top-d subspace, the most any d directions can "
            "capture; captured variance is at most this.",
            "Means over layers and KV heads (min over them in brackets):",
            _md_comparison_summary(report, names),
            f"![comparison]({figures.comparison})",
        ]
        for pair in report.comparisons:
            parts += [
                f"### {names[pair.a]} → {names[pair.b]}",
                "Means over KV heads per layer.",
                _md_comparison_layers(report, pair),
            ]
    parts.append("All numbers, per head, are in `report.json`.")
    return "\n\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------------------
# Figures (matplotlib's object API with the Agg canvas: no pyplot, no global backend switch)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained", dpi=110)


def _colors(n: int) -> list:
    from matplotlib import colormaps

    return [colormaps["tab10"](i % 10) for i in range(n)]


def plot_rank_per_layer(report: RankReport):
    """Mean rank over KV heads per layer, pre and post, one panel per threshold; for a single file a
    band shows the min-max over heads (with several files the bands would hide each other)."""
    facts = report.facts
    layers = range(facts.num_layers)
    names = labels(report)
    colors = _colors(len(report.entries))
    many = len(report.entries) > 1
    fig = _figure(4.6 * len(report.variance) + 1.0, 4.6)
    axes = fig.subplots(1, len(report.variance), sharey=True, squeeze=False)[0]
    for ax, v in zip(axes, report.variance):
        for name, entry, color in zip(names, report.entries, colors):
            for kind, style, marker in (("pre", "--", "o"), ("post", "-", "s")):
                r = entry.ranks[kind][v].double().numpy()  # [L, H]
                label = f"{name} ({_dataset(entry)}), {KIND_LABEL[kind]}" if many else KIND_LABEL[kind]
                shade = color if many else ("tab:blue" if kind == "pre" else "tab:orange")
                ax.plot(layers, r.mean(-1), style, marker=marker, ms=3.5, color=shade, label=label)
                if not many:
                    ax.fill_between(layers, r.min(-1), r.max(-1), color=shade, alpha=0.12, lw=0)
        ax.axhline(facts.head_dim, color="0.3", lw=1.2, ls=":")
        ax.text(0, facts.head_dim, f" head dim D = {facts.head_dim}", va="bottom", ha="left", fontsize=9, color="0.3")
        ax.set_title(f"rank at {_pct(v)} explained variance")
        ax.set_xlabel("layer")
        ax.set_ylim(0, facts.head_dim * 1.1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("rank, mean over KV heads" + ("" if many else " (band: min-max)"))
    handles, names_ = axes[0].get_legend_handles_labels()
    fig.legend(handles, names_, loc="outside lower center", ncols=min(len(handles), 4), fontsize=9)
    fig.suptitle(f"Key rank per layer, pre vs post RoPE - {_title_suffix(report)}", fontsize=11)
    return fig


def plot_heatmap(report: RankReport, entry: Entry):
    """Rank at the reference threshold, layer x KV head, pre and post."""
    facts = report.facts
    t = report.threshold
    fig = _figure(max(7.0, 0.36 * facts.num_layers + 2.2), 2 * (0.42 * facts.num_kv_heads + 1.0) + 0.9)
    axes = fig.subplots(2, 1, sharex=True)
    for ax, kind in zip(axes, KINDS):
        ranks = entry.ranks[kind][t].T.numpy()  # [H, L]
        image = ax.imshow(ranks, aspect="auto", cmap="viridis", vmin=1, vmax=facts.head_dim, interpolation="nearest")
        for h in range(ranks.shape[0]):
            for i in range(ranks.shape[1]):
                value = int(ranks[h, i])
                light = value > 0.6 * facts.head_dim
                ax.text(i, h, str(value), ha="center", va="center", fontsize=7, color="black" if light else "white")
        ax.set_yticks(range(facts.num_kv_heads))
        ax.set_ylabel(f"{KIND_LABEL[kind]}\nKV head")
    axes[-1].set_xticks(range(facts.num_layers))
    axes[-1].set_xlabel("layer")
    fig.colorbar(image, ax=axes, label=f"rank (of D = {facts.head_dim})", shrink=0.9)
    fig.suptitle(
        f"Rank at {_pct(t)} explained variance per layer and KV head - {facts.model_id}\n{_dataset(entry)}",
        fontsize=10,
    )
    return fig


def sample_layers(num_layers: int, count: int = 5) -> list[int]:
    """Up to `count` layers spread evenly from first to last."""
    if num_layers <= count:
        return list(range(num_layers))
    return sorted({round(k * (num_layers - 1) / (count - 1)) for k in range(count)})


def plot_cumulative(report: RankReport, entry: Entry):
    """Cumulative explained-variance ratio against d for a few layers (thin lines: single heads)."""
    facts = report.facts
    chosen = sample_layers(facts.num_layers)
    colors = _colors(len(chosen))
    d = range(1, facts.head_dim + 1)
    fig = _figure(11, 4.4)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, kind in zip(axes, KINDS):
        ratio = explained_variance_ratio(entry.calibration.pca[kind].eigenvalues).numpy()  # [L, H, D]
        for layer, color in zip(chosen, colors):
            for h in range(facts.num_kv_heads):
                ax.plot(d, ratio[layer, h], color=color, lw=0.7, alpha=0.45)
            ax.plot(d, ratio[layer].mean(0), color=color, lw=2, label=f"layer {layer}")
        for v in report.variance:
            ax.axhline(v, color="0.4", lw=0.8, ls=":")
            ax.text(facts.head_dim, v, f"{_pct(v)} ", ha="right", va="bottom", fontsize=8, color="0.3")
        ax.set_title(KIND_LABEL[kind])
        ax.set_xlabel("d (top principal directions kept)")
        ax.set_xlim(1, facts.head_dim)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cumulative explained-variance ratio")
    axes[0].legend(fontsize=8, loc="lower right", title="thick: mean over KV heads", title_fontsize=8)
    fig.suptitle(f"Cumulative explained variance - {facts.model_id}\n{_dataset(entry)}", fontsize=10)
    return fig


def plot_spectrum(report: RankReport, entry: Entry):
    """Eigenvalues (mean over KV heads) per layer, log scale, coloured by layer."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    facts = report.facts
    cmap = colormaps["viridis"]
    norm = Normalize(0, max(facts.num_layers - 1, 1))
    j = range(1, facts.head_dim + 1)
    fig = _figure(11, 4.4)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, kind in zip(axes, KINDS):
        values = entry.calibration.pca[kind].eigenvalues.double().mean(1)  # [L, D]
        values = torch.where(values > 0, values, torch.nan).numpy()  # zeros have no place on a log axis
        for layer in range(facts.num_layers):
            ax.plot(j, values[layer], color=cmap(norm(layer)), lw=1.1)
        ax.set_yscale("log")
        ax.set_title(KIND_LABEL[kind])
        ax.set_xlabel("principal direction j (descending)")
        ax.set_xlim(1, facts.head_dim)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("eigenvalue (mean over KV heads)")
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, label="layer")
    fig.suptitle(f"Key covariance eigenvalues per layer - {facts.model_id}\n{_dataset(entry)}", fontsize=10)
    return fig


def plot_comparisons(report: RankReport):
    """Agreement and captured variance per layer (mean over KV heads) for every ordered pair."""
    facts = report.facts
    names = labels(report)
    layers = range(facts.num_layers)
    colors = _colors(len(report.comparisons))
    fig = _figure(12, 4.6)
    axes = fig.subplots(1, 2)
    for pair, color in zip(report.comparisons, colors):
        for kind, style in (("pre", "--"), ("post", "-")):
            c = pair.kinds[kind]
            label = f"A={names[pair.a]}, B={names[pair.b]}, {KIND_LABEL[kind]}"
            axes[0].plot(layers, c.agreement.mean(-1).numpy(), style, marker=".", color=color, label=label)
            axes[1].plot(layers, c.captured.mean(-1).numpy(), style, marker=".", color=color, label=label)
            axes[1].plot(layers, c.own.mean(-1).numpy(), style, color=color, lw=0.8, alpha=0.5)
    axes[0].set_title("subspace agreement (mean cos² of principal angles)")
    axes[1].set_title("share of B's key variance in A's top-d subspace\n(faint: B's own top-d, the ceiling)")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.set_ylim(top=min(ax.get_ylim()[1], 1.005))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"mean over KV heads, d = A's rank at {_pct(report.threshold)}")
    handles, names_ = axes[0].get_legend_handles_labels()
    fig.legend(handles, names_, loc="outside lower center", ncols=2, fontsize=9)
    fig.suptitle(f"Do the key subspaces carry over? - {_title_suffix(report)}", fontsize=10)
    return fig


def plot_score_variance(report: RankReport, entry: Entry):
    """Score variance captured per layer (mean over KV heads) by each basis, one panel per (d, kind);
    dashed: PCA's key variance captured at the same d."""
    facts = report.facts
    layers = range(facts.num_layers)
    by = {(sv.d, sv.kind): sv for sv in entry.score_variance}
    colors = {"pca": "tab:blue", "random": "tab:gray", "query_aware": "tab:red"}
    markers = {"pca": "o", "random": "x", "query_aware": "s"}
    fig = _figure(12, 3.4 * len(report.dims) + 1.2)
    axes = fig.subplots(len(report.dims), len(KINDS), sharex=True, sharey=True, squeeze=False)
    for row, d in zip(axes, report.dims):
        for ax, kind in zip(row, KINDS):
            sv = by[(d, kind)]
            for b in BASES:
                ax.plot(layers, sv.captured[b].mean(-1).numpy(), "-", marker=markers[b], ms=3.5, lw=1.4,
                        color=colors[b], label=f"score variance: {BASIS_LABEL[b]}")
            ax.plot(layers, sv.key_variance.mean(-1).numpy(), "--", color="black", lw=1.2,
                    label="key variance (PCA explained variance)")
            ax.axhline(0, color="0.5", lw=0.8)
            ax.set_title(f"{KIND_LABEL[kind]}, d = {d} of {facts.head_dim}", fontsize=10)
            ax.grid(alpha=0.3)
    low = min(float(sv.captured[b].mean(-1).min()) for sv in entry.score_variance for b in BASES)
    axes[0, 0].set_ylim(min(-0.05, low - 0.05), 1.03)
    for ax in axes[-1]:
        ax.set_xlabel("layer")
    for ax in axes[:, 0]:
        ax.set_ylabel("captured, mean over KV heads")
    handles, names_ = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names_, loc="outside lower center", ncols=len(handles), fontsize=9)
    fig.suptitle(
        f"Share of score variance kept by truncated scores, per basis - {facts.model_id}\n{_dataset(entry)}",
        fontsize=10,
    )
    return fig


# ----------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class FigureFiles:
    rank_per_layer: str
    per_entry: tuple[dict[str, str], ...]  # "heatmap" / "cumulative" / "spectrum" [/ "score_variance"] -> file name
    comparison: str | None

    def all(self) -> list[str]:
        names = [self.rank_per_layer, *(n for files in self.per_entry for n in files.values())]
        return names + ([self.comparison] if self.comparison else [])


def figure_files(report: RankReport) -> FigureFiles:
    per_entry = []
    for i, entry in enumerate(report.entries, 1):
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(entry.file).stem)
        parts = ("heatmap", "cumulative", "spectrum") + (("score_variance",) if entry.score_variance is not None else ())
        per_entry.append({part: f"{i}-{stem}-{part}.png" for part in parts})
    comparison = "comparison.png" if report.comparisons else None
    return FigureFiles(rank_per_layer="rank_per_layer.png", per_entry=tuple(per_entry), comparison=comparison)


def _save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def write_report(report: RankReport, output_dir: Path) -> list[Path]:
    """Write the figures, report.json and report.md (each atomically); return their paths."""
    output_dir = ensure_writable_dir(Path(output_dir))
    files = figure_files(report)
    plots = [(files.rank_per_layer, lambda: plot_rank_per_layer(report))]
    for entry, names in zip(report.entries, files.per_entry):
        plots += [
            (names["heatmap"], lambda e=entry: plot_heatmap(report, e)),
            (names["cumulative"], lambda e=entry: plot_cumulative(report, e)),
            (names["spectrum"], lambda e=entry: plot_spectrum(report, e)),
        ]
        if "score_variance" in names:
            plots.append((names["score_variance"], lambda e=entry: plot_score_variance(report, e)))
    if files.comparison:
        plots.append((files.comparison, lambda: plot_comparisons(report)))
    written = []
    for name, make in plots:
        _save_figure(make(), output_dir / name)
        written.append(output_dir / name)
    write_text_atomic(output_dir / "report.json", dumps(report_json(report)))
    write_text_atomic(output_dir / "report.md", report_markdown(report, files))
    return written + [output_dir / "report.json", output_dir / "report.md"]


def run(
    paths: Sequence[str | Path],
    output_dir: Path,
    variance: str = DEFAULT_VARIANCE,
    dims: str = DEFAULT_DIMS,
    progress: Progress | None = None,
) -> tuple[RankReport, list[Path]]:
    """The whole command: check the settings and the output folder, load, compute, write."""
    thresholds = parse_variance(variance)
    fractions = parse_dims(dims)
    ensure_writable_dir(Path(output_dir))  # before any work
    report = build_report(load_calibrations(paths), thresholds, fractions, progress)
    return report, write_report(report, output_dir)


# ----------------------------------------------------------------------------------------------
# Terminal tables (rich renderables; the CLI prints them)


def terminal_tables(report: RankReport) -> list:
    from rich.table import Table

    names = labels(report)
    dim = report.facts.head_dim
    t = report.threshold
    summary = Table(title=f"rank over layers and KV heads: mean (min-max), of D = {dim}")
    summary.add_column("file")
    summary.add_column("keys")
    for v in report.variance:
        summary.add_column(f"{_pct(v)}", justify="right")
    for name, entry in zip(names, report.entries):
        for kind in KINDS:
            cells = []
            for v in report.variance:
                r = entry.ranks[kind][v].double()
                cells.append(f"{r.mean():.1f} ({int(r.min())}-{int(r.max())})")
            summary.add_row(name, KIND_LABEL[kind], *cells)

    per_layer = Table(title=f"rank at {_pct(t)} per layer, mean over KV heads")
    per_layer.add_column("layer", justify="right")
    for name in names:
        for kind in KINDS:
            per_layer.add_column(f"{name} {kind}" if len(names) > 1 else KIND_LABEL[kind], justify="right")
    for i in range(report.facts.num_layers):
        cells = [f"{float(mean_rank(e, kind, t)[i]):.1f}" for e in report.entries for kind in KINDS]
        per_layer.add_row(str(i), *cells)
    tables = [per_layer, summary]

    if report.comparisons:
        pairs = Table(title=f"A's top-d subspaces against B's keys, d = A's rank at {_pct(t)}; means over layers and heads")
        for col in ("A (basis)", "B (keys)", "keys"):
            pairs.add_column(col)
        for col in ("mean d", "agreement", "captured", "own"):
            pairs.add_column(col, justify="right")
        for pair in report.comparisons:
            for kind, c in pair.kinds.items():
                pairs.add_row(
                    names[pair.a], names[pair.b], KIND_LABEL[kind], f"{c.d.double().mean():.1f}",
                    f"{c.agreement.mean():.3f}", f"{c.captured.mean():.3f}", f"{c.own.mean():.3f}",
                )
        tables.append(pairs)
    return tables + _terminal_score_variance(report, names)


def _terminal_score_variance(report: RankReport, names: Sequence[str]) -> list:
    from rich.table import Table

    notes = [f"{name}: {NO_QUERIES_NOTE}" for name, e in zip(names, report.entries) if e.score_variance is None]
    if len(notes) == len(report.entries):
        return notes
    table = Table(title=f"score variance captured by truncated scores, of D = {report.facts.head_dim}; means over layers and heads")
    for col in ("file", "keys"):
        table.add_column(col)
    for col in ("d", "key variance", *(BASIS_LABEL[b] for b in BASES)):
        table.add_column(col, justify="right")
    for name, entry in zip(names, report.entries):
        for sv in entry.score_variance or ():
            table.add_row(
                name, KIND_LABEL[sv.kind], str(sv.d), f"{sv.key_variance.mean():.3f}",
                *(f"{sv.captured[b].mean():.3f}" for b in BASES),
            )
    return [table, *notes]
