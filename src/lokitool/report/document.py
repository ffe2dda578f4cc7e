"""report.json: every number of a RankReport, per head, with the definitions and a provenance stamp.

Per calibration, `"score_variance"` is a list over layer, then kind, then d of
    {"layer": 0, "kind": "post", "d": 16, "key_variance": [per head], "pca": [per head],
     "random": [per head], "query_aware": [per head]}
with `"score_variance_mean"` (means over layers and heads per kind and d); both are null, with a
one-line `"score_variance_note"`, for a file without query statistics.
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

import torch

from ..calib.calibration import KINDS
from ..results import provenance
from .labels import NO_QUERIES_NOTE
from .numbers import SCORE_BASES, Entry, PairComparison, RankReport

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


def _key(v: float) -> str:
    return f"{v:g}"


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
            **{b: _rounded(sv.captured[b][i]) for b in SCORE_BASES},
        }
        for i in range(num_layers)
        for sv in entry.score_variance  # kind-major, then d
    ]
    means = [
        {
            "kind": sv.kind,
            "d": sv.d,
            "key_variance": _rounded(sv.key_variance.mean()),
            **{b: _rounded(sv.captured[b].mean()) for b in SCORE_BASES},
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
        **provenance(),  # versions, git_hash, date: the stamp every results file carries
        "calibrations": [_entry_json(e, report.variance) for e in report.entries],
        "comparisons": [_pair_json(report, p) for p in report.comparisons],
    }


_FLAT_LIST = re.compile(r"\[\s+([^\[\]{}\"]*?)\s+\]")


def dumps(obj: Any) -> str:
    """JSON with 2-space indents, but lists of numbers on one line (one head per entry, easy to diff)."""
    text = json.dumps(obj, indent=2)
    return _FLAT_LIST.sub(lambda m: "[" + " ".join(m.group(1).split()) + "]", text) + "\n"

