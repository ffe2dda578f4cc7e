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
    layers.{i}.post.sa_basis.d{d}  [H_kv, d, D]   the selection-aware subspace for budget d
                                                  (calib/selection_aware.py), where calibrate fitted one
                                                  (--sa-df); per head PCA, query-aware or fitted, as the
                                                  held-out check chose (header: `selection_aware`)
Header metadata: `format`, `format_version`, and `lokitool`, a JSON object with the model's
facts, the dataset, token counts, window length, BOS choice, dtype, device, date and versions.
Version 2 added qa_basis; version-1 files load, and their query-aware bases are fitted when asked for.
sa_basis is optional within version 2 (older readers ignore tensors they do not know).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..fileio import atomic_path, disk_error
from .models import ModelFacts, describe_identity, same_identity
from .pca import PCA
from .query_aware import complete_basis, orthonormalize, query_aware_subspace

FORMAT = "lokitool-calibration"
FORMAT_VERSION = 2  # 2: query-aware subspaces stored (qa_basis); 1 loads too
KINDS = ("pre", "post")
QA_FRACTIONS = (0.125, 0.25, 0.5)  # budgets d / D whose query-aware subspaces `calibrate` stores
_QA_NAME = re.compile(r"layers\.0\.(pre|post)\.qa_basis\.d(\d+)")
_SA_NAME = re.compile(r"layers\.0\.(post)\.sa_basis\.d(\d+)")


@dataclass(frozen=True)
class Calibration:
    facts: ModelFacts
    info: dict[str, Any]  # dataset, num_tokens, seq_len, bos, dtype, device, date, versions
    pca: dict[str, PCA]  # "pre" / "post"
    query_moment: dict[str, torch.Tensor] = field(default_factory=dict)  # kind -> [L, H_kv, D, D]
    query_aware: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # kind -> d -> [L, H_kv, d, D] rows
    selection_aware: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # "post" -> d -> [L, H_kv, d, D] rows
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

    def selection_aware_basis(self, kind: str, d: int) -> torch.Tensor:
        """The selection-aware basis for budget d, directions as columns: [L, H_kv, D, D] float64.
        Only stored subspaces exist (the fit needs the calibration sample, which the file does not keep)."""
        rows = self.selection_aware.get(kind, {}).get(d)
        if rows is None:
            stored = sorted(self.selection_aware.get(kind, {}))
            have = f"it has d = {', '.join(map(str, stored))}" if stored else "it has none"
            raise UserError(
                f"this calibration file has no selection-aware basis (sa-{kind}) for d = {d} ({have}); "
                f"recalibrate with --sa-df {d / self.facts.head_dim:g}"
            )
        return complete_basis(orthonormalize(rows.to(torch.float64).transpose(-1, -2)))

    def fit_query_aware(self, kind: str, d: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Fit the query-aware subspace from C and S as the file stores them (float32): [L, H_kv, d, D] rows."""
        c, s = self.score_statistics(kind)
        return query_aware_subspace(c.to(device), s.to(device), d).transpose(-1, -2).float().cpu()

    def score_statistics(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, S): key covariance and query second moment as the file stores them (float32 precision),
        [L, H_kv, D, D] float64 each: what the query-aware error tr((I - P) C (I - P) S) is made of."""
        pca = self.pca[kind]
        stored = PCA(mean=pca.mean, components=pca.components.float(), eigenvalues=pca.eigenvalues.float())
        return stored.covariance(), self.query_moment[kind].float().to(torch.float64)

    def key_second_moment(self, kind: str) -> torch.Tensor:
        """E[k k^T] = C + mu mu^T, [L, H_kv, D, D], float64."""
        pca = self.pca[kind]
        mean = pca.mean.to(torch.float64)
        return pca.covariance() + mean.unsqueeze(-1) * mean.unsqueeze(-2)

    def check_shape(self, facts: ModelFacts, source: str = "calibration") -> None:
        """Refuse a calibration whose tensors do not fit this model's attention, naming both."""
        if not self.facts.same_architecture(facts):
            raise UserError(
                f"{source} was made for {self.facts.model_id} ({_shape(self.facts)}), "
                f"not for {facts.model_id} ({_shape(facts)}); calibrate this model first"
            )

    def check_identity(self, model_id: str, revision: str | None, source: str = "calibration") -> None:
        """Refuse a calibration made for other weights (see models.same_identity), naming both; the
        CLI offers --allow-other-model for a deliberate transfer (e.g. a fine-tune of the same base)."""
        if not same_identity((self.facts.model_id, self.facts.revision), (model_id, revision)):
            raise UserError(
                f"{source} was made for {describe_identity(self.facts.model_id, self.facts.revision)}, "
                f"not for {describe_identity(model_id, revision)}; calibrate this model first "
                "(or pass --allow-other-model to use it anyway)"
            )

    def check_model(self, facts: ModelFacts, source: str = "calibration", allow_other_model: bool = False) -> None:
        """Refuse a calibration made for another model, naming both: other weights (unless allowed)
        or another attention shape (always)."""
        if not allow_other_model:
            self.check_identity(facts.model_id, facts.revision, source)
        self.check_shape(facts, source)

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
                for d, rows in self.selection_aware.get(kind, {}).items():
                    out[f"{prefix}.sa_basis.d{d}"] = rows[i].float().contiguous()
        return out

    def metadata(self) -> dict[str, str]:
        header = {"model": self.facts.to_dict(), **self.info}
        return {"format": FORMAT, "format_version": str(FORMAT_VERSION), "lokitool": json.dumps(header)}

    def save(self, path: str | Path) -> Path:
        """Write atomically: a failed write never leaves a partial file nor destroys an old one."""
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        path = Path(path)
        try:
            with atomic_path(path) as tmp:
                save_file(self.tensors(), str(tmp), metadata=self.metadata())
        except OSError as err:
            raise disk_error(path, err) from err
        except SafetensorError as err:  # safetensors reports I/O failures (a full disk) as its own error
            raise UserError(f"cannot write {path} ({' '.join(str(err).split())[:160]}); free some space or choose "
                            "another --output (the old file, if any, is intact)") from err
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        """Read and validate a calibration file: the header's schema and every known tensor's shape,
        dtype and finiteness are checked here, so a bad file is refused in one line before any slow
        work. Tensors this version does not know are ignored."""
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
        try:
            facts, info = _read_header(meta)
            pca, query_moment = _stack(tensors, facts)
            query_aware = _stack_query_aware(tensors, facts)
            selection_aware = _stack_query_aware(tensors, facts, _SA_NAME, "sa_basis")
        except _Invalid as err:
            raise UserError(f"{path} is not a valid calibration file: {err}; recreate it with `lokitool calibrate`") from None
        except _TooNew as err:
            raise UserError(f"{path} {err}") from None
        return cls(facts=facts, info=info, pca=pca, query_moment=query_moment, query_aware=query_aware,
                   selection_aware=selection_aware)


class _Invalid(Exception):
    """A calibration file that breaks the format (the message says where)."""


class _TooNew(Exception):
    """A calibration file written by a newer lokitool."""


def _read_header(meta: dict[str, str]) -> tuple[ModelFacts, dict[str, Any]]:
    """The header's model facts and run info, every field type-checked."""
    raw = meta.get("format_version")
    if raw is None or not raw.strip().isdigit():
        raise _Invalid(f"format_version is {raw!r}, not a whole number")
    version = int(raw)
    if version > FORMAT_VERSION:
        raise _TooNew(f"has format version {version}; this lokitool reads up to {FORMAT_VERSION}: upgrade lokitool")
    if version < 1:
        raise _Invalid(f"format_version {version} is not a version lokitool ever wrote")
    if "lokitool" not in meta:
        raise _Invalid("the header has no `lokitool` record")
    try:
        header = json.loads(meta["lokitool"])
    except json.JSONDecodeError as err:
        raise _Invalid(f"the header's `lokitool` record is not JSON ({err.msg} at character {err.pos})") from None
    if not isinstance(header, dict) or not isinstance(header.get("model"), dict):
        raise _Invalid("the header's `lokitool` record has no `model` object")
    info = dict(header)
    facts = _read_facts(info.pop("model"))
    for key, value in info.items():
        types = _INFO_TYPES.get(key)
        if types is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            raise _Invalid(f"the header's {key} is {value!r}")
    return facts, info


# Types of the fields this version reads (a field added to ModelFacts later is checked for presence only).
_INFO_TYPES: dict[str, tuple[type, ...]] = {
    "dataset": (str,), "num_tokens": (int,), "num_windows": (int,), "seq_len": (int,), "bos": (bool,), "dtype": (str,),
    "device": (str,), "processes": (int,), "date": (str,), "versions": (dict,),
}
_FACT_TYPES: dict[str, tuple[type, ...]] = {
    "model_id": (str,), "revision": (str, type(None)), "architecture": (str,), "num_layers": (int,), "num_heads": (int,),
    "num_kv_heads": (int,), "head_dim": (int,), "rope": (bool,), "max_positions": (int, type(None)),
    "bos_token_id": (int, type(None)),
}


def _read_facts(record: dict[str, Any]) -> ModelFacts:
    """Every field ModelFacts requires must be there (fields added later with defaults, such as the
    sliding windows, may be absent from older files); none it does not know."""
    fields = dataclasses.fields(ModelFacts)
    names = [f.name for f in fields]
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in record]
    extra = [k for k in record if k not in names]
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown {', '.join(extra)}"] if extra else [])
        raise _Invalid(f"the model record has {'; '.join(parts)}")
    for key, types in _FACT_TYPES.items():
        value = record.get(key)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise _Invalid(f"the model record's {key} is {value!r}")
    for key in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
        if record[key] < 1:
            raise _Invalid(f"the model record's {key} is {record[key]}")
    if record["num_heads"] % record["num_kv_heads"]:
        raise _Invalid(f"{record['num_heads']} heads do not split into {record['num_kv_heads']} KV heads")
    return ModelFacts.from_dict(record)


def _shape(facts: ModelFacts) -> str:
    return (
        f"{facts.architecture}, {facts.num_layers} layers, {facts.num_heads} heads, "
        f"{facts.num_kv_heads} KV heads, head dim {facts.head_dim}"
    )


def _tensor(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The named tensor, checked: present, of `shape`, floating point and finite."""
    if name not in tensors:
        raise _Invalid(f"tensor {name} is missing")
    t = tensors[name]
    if tuple(t.shape) != shape:
        raise _Invalid(f"tensor {name} has shape {tuple(t.shape)}, expected {shape}")
    if not t.is_floating_point():
        raise _Invalid(f"tensor {name} is {str(t.dtype).removeprefix('torch.')}, not floating point")
    if not bool(torch.isfinite(t).all()):
        raise _Invalid(f"tensor {name} holds NaN or infinite values")
    return t


def _stack(tensors: dict[str, torch.Tensor], facts: ModelFacts) -> tuple[dict[str, PCA], dict[str, torch.Tensor]]:
    layers = range(facts.num_layers)
    h, d = facts.num_kv_heads, facts.head_dim
    shapes = {"components": (h, d, d), "eigenvalues": (h, d), "mean": (h, d), "query_moment": (h, d, d)}
    pca, query_moment = {}, {}
    for kind in KINDS:
        def stacked(name: str) -> torch.Tensor:
            return torch.stack([_tensor(tensors, f"layers.{i}.{kind}.{name}", shapes[name]) for i in layers])

        pca[kind] = PCA(mean=stacked("mean"), components=stacked("components"), eigenvalues=stacked("eigenvalues"))
        if f"layers.0.{kind}.query_moment" in tensors:
            query_moment[kind] = stacked("query_moment")
    return pca, query_moment


def _stack_query_aware(
    tensors: dict[str, torch.Tensor], facts: ModelFacts, pattern: re.Pattern = _QA_NAME, stem: str = "qa_basis",
) -> dict[str, dict[int, torch.Tensor]]:
    """kind -> d -> [L, H_kv, d, D] for every {stem}.d{d} that layer 0 has (no qa_basis in version-1 files)."""
    out: dict[str, dict[int, torch.Tensor]] = {}
    for name in sorted(tensors):
        match = pattern.fullmatch(name)
        if match is None:
            continue
        kind, d = match.group(1), int(match.group(2))
        rows = torch.stack([_tensor(tensors, f"layers.{i}.{kind}.{stem}.d{d}", (facts.num_kv_heads, d, facts.head_dim))
                            for i in range(facts.num_layers)])
        out.setdefault(kind, {})[d] = rows
    return out

