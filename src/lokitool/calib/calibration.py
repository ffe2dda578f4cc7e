"""The calibration file: the one object handed downstream (rank report, Loki attention, kernels).

One safetensors file. For every layer i and kind in (pre, post) RoPE:
    layers.{i}.{kind}.components    [H_kv, D, D]  components[h, j] = j-th principal direction (unit)
    layers.{i}.{kind}.eigenvalues   [H_kv, D]     descending
    layers.{i}.{kind}.mean          [H_kv, D]
    layers.{i}.{kind}.query_moment  [H_kv, D, D]  E[q q^T] over the query heads of each KV group
                                                  (optional: absent when queries were not collected)
Header metadata: `format`, `format_version`, and `lokitool`, a JSON object with the model's
facts, the dataset, token counts, window length, BOS choice, dtype, device, date and versions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..fileio import atomic_path
from .models import ModelFacts
from .pca import PCA

FORMAT = "lokitool-calibration"
FORMAT_VERSION = 1
KINDS = ("pre", "post")


@dataclass(frozen=True)
class Calibration:
    facts: ModelFacts
    info: dict[str, Any]  # dataset, num_tokens, seq_len, bos, dtype, device, date, versions
    pca: dict[str, PCA]  # "pre" / "post"
    query_moment: dict[str, torch.Tensor] = field(default_factory=dict)  # kind -> [L, H_kv, D, D]

    # ------------------------------------------------------------------------------------------
    def basis(self, kind: str) -> torch.Tensor:
        """Orthonormal basis per (layer, KV head), directions as columns: [L, H_kv, D, D]."""
        if kind not in self.pca:
            raise UserError(f"unknown basis kind {kind!r}; use pre or post")
        return self.pca[kind].basis()

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
        facts = ModelFacts.from_dict(header.pop("model"))
        try:
            pca, query_moment = _stack(tensors, facts)
        except KeyError as err:
            raise UserError(f"{path} is incomplete: tensor {err.args[0]} is missing") from err
        return cls(facts=facts, info=header, pca=pca, query_moment=query_moment)


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
