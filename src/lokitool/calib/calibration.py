"""The calibration file: the one object handed downstream (rank report, Loki attention, kernels).

One safetensors file. For every layer i and kind in (pre, post) RoPE:
    layers.{i}.{kind}.components    [H_kv, D, D]  components[h, j] = j-th principal direction (unit)
    layers.{i}.{kind}.eigenvalues   [H_kv, D]     descending
    layers.{i}.{kind}.mean          [H_kv, D]
    layers.{i}.{kind}.query_moment  [H_kv, D, D]  E[q q^T] over the query heads of each KV group
                                                  (optional: absent when queries were not collected)
    layers.{i}.{kind}.qa_basis.d{d} [H_kv, d, D]  qa_basis[h, j] = j-th direction (unit, orthonormal)
                                                  of the query-aware subspace for budget d
                                                  (calib/query_aware.py), fitted from the stored C
                                                  and S for d = dims_for(f, D), f in QA_FRACTIONS;
                                                  absent without query_moment and in version-1 files
Header metadata: `format`, `format_version`, and `lokitool`, a JSON object with the model's
facts, the dataset, token counts, window length, BOS choice, dtype, device, date and versions.
Version 2 added qa_basis; version-1 files load, and their query-aware bases are fitted when asked for.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..fileio import atomic_path
from .models import ModelFacts
from .pca import PCA
from .query_aware import complete_basis, orthonormalize, query_aware_subspace

FORMAT = "lokitool-calibration"
FORMAT_VERSION = 2  # 2: query-aware subspaces stored (qa_basis); 1 loads too
KINDS = ("pre", "post")
QA_FRACTIONS = (0.125, 0.25, 0.5)  # budgets d / D whose query-aware subspaces `calibrate` stores
_QA_NAME = re.compile(r"layers\.0\.(pre|post)\.qa_basis\.d(\d+)")


@dataclass(frozen=True)
class Calibration:
    facts: ModelFacts
    info: dict[str, Any]  # dataset, num_tokens, seq_len, bos, dtype, device, date, versions
    pca: dict[str, PCA]  # "pre" / "post"
    query_moment: dict[str, torch.Tensor] = field(default_factory=dict)  # kind -> [L, H_kv, D, D]
    query_aware: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # kind -> d -> [L, H_kv, d, D] rows
    # Full query-aware bases handed out in this process, by (kind, d): each is fitted or completed once.
    _qa_bases: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    # ------------------------------------------------------------------------------------------
    def basis(self, kind: str) -> torch.Tensor:
        """Orthonormal basis per (layer, KV head), directions as columns: [L, H_kv, D, D]."""
        if kind not in self.pca:
            raise UserError(f"unknown basis kind {kind!r}; use pre or post")
        return self.pca[kind].basis()

    def query_aware_basis(self, kind: str, d: int) -> torch.Tensor:
        """The query-aware basis for budget d, directions as columns: [L, H_kv, D, D] float64.

        Its first d columns span the stored subspace when the file has one for (kind, d); otherwise
        the subspace is fitted here. Either way once per (kind, d): later calls return the same tensor."""
        if kind not in self.query_moment:
            raise UserError(
                "this calibration file has no query statistics; recalibrate with a current lokitool "
                "(queries are collected unless --no-queries)"
            )
        if (kind, d) not in self._qa_bases:
            rows = self.query_aware.get(kind, {}).get(d)
            if rows is None:
                rows = self.fit_query_aware(kind, d)
            self._qa_bases[(kind, d)] = complete_basis(orthonormalize(rows.to(torch.float64).transpose(-1, -2)))
        return self._qa_bases[(kind, d)]

    def fit_query_aware(self, kind: str, d: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Fit the query-aware subspace from C and S as the file stores them (float32): [L, H_kv, d, D] rows."""
        pca = self.pca[kind]
        stored = PCA(mean=pca.mean, components=pca.components.float(), eigenvalues=pca.eigenvalues.float())
        c = stored.covariance().to(device)  # [L, H_kv, D, D] float64
        s = self.query_moment[kind].float().to(device=device, dtype=torch.float64)
        return query_aware_subspace(c, s, d).transpose(-1, -2).float().cpu()

    def key_second_moment(self, kind: str) -> torch.Tensor:
        """E[k k^T] = C + mu mu^T, [L, H_kv, D, D], float64."""
        pca = self.pca[kind]
        mean = pca.mean.to(torch.float64)
        return pca.covariance() + mean.unsqueeze(-1) * mean.unsqueeze(-2)

    def check_model(self, facts: ModelFacts, source: str = "calibration") -> None:
        """Refuse a calibration made for another model, naming both."""
        if not self.facts.same_architecture(facts):
            raise UserError(
                f"{source} was made for {self.facts.model_id} ({_shape(self.facts)}), "
                f"not for {facts.model_id} ({_shape(facts)}); calibrate this model first"
            )

    # ------------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for kind in KINDS:
            pca = self.pca[kind]
            for i in range(self.facts.num_layers):
                prefix = f"layers.{i}.{kind}"
                out[f"{prefix}.components"] = pca.components[i].float().contiguous()
                out[f"{prefix}.eigenvalues"] = pca.eigenvalues[i].float().contiguous()
                out[f"{prefix}.mean"] = pca.mean[i].float().contiguous()
                if kind in self.query_moment:
                    out[f"{prefix}.query_moment"] = self.query_moment[kind][i].float().contiguous()
                for d, rows in self.query_aware.get(kind, {}).items():
                    out[f"{prefix}.qa_basis.d{d}"] = rows[i].float().contiguous()
        return out

    def metadata(self) -> dict[str, str]:
        header = {"model": self.facts.to_dict(), **self.info}
        return {"format": FORMAT, "format_version": str(FORMAT_VERSION), "lokitool": json.dumps(header)}

    def save(self, path: str | Path) -> Path:
        """Write atomically: a failed write never leaves a partial file nor destroys an old one."""
        from safetensors.torch import save_file

        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(self.tensors(), str(tmp), metadata=self.metadata())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise UserError(f"calibration file {path} does not exist; create it with `lokitool calibrate`")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises its own error types for non-safetensors bytes
            raise UserError(f"{path} is not a calibration file (not safetensors: {str(err)[:120]})") from err
        if meta.get("format") != FORMAT:
            raise UserError(f"{path} is a safetensors file but not a lokitool calibration file")
        version = int(meta.get("format_version", "0"))
        if version > FORMAT_VERSION:
            raise UserError(f"{path} has format version {version}; this lokitool reads up to {FORMAT_VERSION}: upgrade")
        header = json.loads(meta["lokitool"])
        facts = ModelFacts(**header.pop("model"))
        try:
            pca, query_moment = _stack(tensors, facts)
            query_aware = _stack_query_aware(tensors, facts)
        except KeyError as err:
            raise UserError(f"{path} is incomplete: tensor {err.args[0]} is missing") from err
        return cls(facts=facts, info=header, pca=pca, query_moment=query_moment, query_aware=query_aware)


def _shape(facts: ModelFacts) -> str:
    return (
        f"{facts.architecture}, {facts.num_layers} layers, {facts.num_heads} heads, "
        f"{facts.num_kv_heads} KV heads, head dim {facts.head_dim}"
    )


def _stack(tensors: dict[str, torch.Tensor], facts: ModelFacts) -> tuple[dict[str, PCA], dict[str, torch.Tensor]]:
    layers = range(facts.num_layers)
    pca, query_moment = {}, {}
    for kind in KINDS:
        def stacked(name: str) -> torch.Tensor:
            return torch.stack([tensors[f"layers.{i}.{kind}.{name}"] for i in layers])

        pca[kind] = PCA(mean=stacked("mean"), components=stacked("components"), eigenvalues=stacked("eigenvalues"))
        if f"layers.0.{kind}.query_moment" in tensors:
            query_moment[kind] = stacked("query_moment")
    expected = (facts.num_layers, facts.num_kv_heads, facts.head_dim, facts.head_dim)
    if tuple(pca["pre"].components.shape) != expected:
        raise UserError(f"calibration tensors have shape {tuple(pca['pre'].components.shape)}, expected {expected}")
    return pca, query_moment


def _stack_query_aware(tensors: dict[str, torch.Tensor], facts: ModelFacts) -> dict[str, dict[int, torch.Tensor]]:
    """kind -> d -> [L, H_kv, d, D] for every qa_basis.d{d} that layer 0 has (none in version-1 files)."""
    out: dict[str, dict[int, torch.Tensor]] = {}
    for name in sorted(tensors):
        match = _QA_NAME.fullmatch(name)
        if match is None:
            continue
        kind, d = match.group(1), int(match.group(2))
        rows = torch.stack([tensors[f"layers.{i}.{kind}.qa_basis.d{d}"] for i in range(facts.num_layers)])
        expected = (facts.num_layers, facts.num_kv_heads, d, facts.head_dim)
        if tuple(rows.shape) != expected:
            raise UserError(f"calibration tensor {name} has shape {tuple(rows.shape[1:])}, expected {expected[1:]}; recalibrate")
        out.setdefault(kind, {})[d] = rows
    return out

