"""Sparse attention inside a transformers model: Loki and the baselines, per layer.

`patched(model, facts, method)` routes every attention layer of the model to the reference in
`reference.py` for the duration of a `with` block (through transformers' AttentionInterface; see
`dispatch.py`). Queries and keys arrive post-RoPE, as the model's own attention would see them, with
the model's mask: every method selects among the keys a row may see (a sliding layer keeps its
window; budgets count the visible keys), and soft-capping (`softcap`) and sink logits (`s_aux`)
shape the softmax as in the model's own attention. The Triton backend takes only per-row causal
lengths and plain softmax: layers it cannot express (a window that bites, padding, soft-capping,
sink logits) run on the torch reference, and the recorder lists them (`torch_layers`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from ..calib.calibration import Calibration
from ..calib.dispatch import plain_causal, route_attention, visible_keys
from ..calib.models import ModelFacts, attention_modules
from ..calib.pca import rank_at_variance
from ..errors import UserError
from . import bases, peers
from . import reference as loki
from .reference import LokiSpec

EVAL_METHODS = ("full", "loki", "exact-topk", "h2o", "random-basis", "sparq", "quest", "double-sparsity")
# Methods that score the first d dims of a basis (Double Sparsity's: its outlier channels, sparse/peers.py).
LOW_RANK = ("loki", "random-basis", "double-sparsity")
# Methods that read d = df x D dims of each key to score (SparQ: the largest |q_i| of each row).
DIM_SCANNERS = peers.DIM_SCANNERS


@dataclass(frozen=True)
class MethodRecord:
    """The method's fields that lead every record of a results file (eval --ppl's and --tasks'),
    as `MethodSpec.fields` fills them (with `page`, which each record places itself)."""

    method: str
    kf: float | None
    df: float | None
    variance: float | None
    basis: str | None
    budget: str | None
    sink: int | None
    group: str | None


@dataclass(frozen=True)
class MethodSpec:
    """One point of an evaluation: a method, and (for every method but `full`) its Loki settings."""

    method: str
    loki: LokiSpec | None = None
    page: int | None = None  # Quest's page size (tokens)

    def __post_init__(self) -> None:
        if self.method not in EVAL_METHODS:
            raise UserError(f"unknown method {self.method!r}; choose from {', '.join(EVAL_METHODS)}")
        if self.method == "quest" and (self.page is None or self.page < 1):
            raise UserError(f"--page must be a whole number >= 1, got {self.page}")
        if self.method == "sparq" and self.loki is not None and self.loki.df is None:
            raise UserError("method sparq needs --df (r = df x D dims per row)")
        if self.method != "full" and self.loki is None:
            raise UserError(f"method {self.method} needs --kf")
        if self.method in LOW_RANK and (self.loki.df is None) == (self.loki.variance is None):
            raise UserError(f"method {self.method} needs exactly one of --df and --variance")

    @property
    def basis(self) -> str | None:
        """The basis the method rotates into: the spec's for loki, random for random-basis, the
        outlier channels for double-sparsity."""
        if self.method == "random-basis":
            return "random"
        if self.method == "double-sparsity":
            return "channels"
        return self.loki.basis if self.method == "loki" else None

    def fields(self) -> dict:
        """The flat record of results files: method, kf, df, variance, basis, budget, sink, group, page
        (null where a field does not apply to the method)."""
        s = self.loki
        low_rank = self.method in DIM_SCANNERS
        return {
            "method": self.method,
            "kf": s.kf if s else None,
            "df": s.df if s and low_rank else None,
            "variance": s.variance if s and low_rank else None,
            "basis": s.basis if s and self.method == "loki" else None,
            "budget": s.budget if s else None,
            "sink": s.sink if s else None,
            "group": s.group if s else None,
            "page": self.page if self.method == "quest" else None,
        }

    def step_bytes(self, facts: ModelFacts, dims: list[int] | None = None) -> float:
        """Bytes read per decode step relative to full attention (sparse/peers.py's byte model): scoring
        reads the mean d / D of `dims` (SparQ per query head under group head), attention rows x kf."""
        s, m = self.loki, self.method
        if m == "full":
            return 1.0
        group_size = facts.num_heads // facts.num_kv_heads
        per_head = s.group == "head" or m == "h2o"  # h2o selects per query head whatever the group
        if m in DIM_SCANNERS:
            scan = sum(dims) / len(dims) / facts.head_dim * (group_size if m == "sparq" and per_head else 1)
        else:
            scan = peers.scan_fraction(m, df=None, page=self.page)
        return peers.step_bytes(m, s.kf, scan=scan, rows=group_size if per_head else 1)


@dataclass
class Recorder:
    """Per-layer selection statistics of one evaluation run, and what ran its sparse attention."""

    layers: list[loki.SelectionStats] = field(default_factory=list)
    backend: str = "torch"
    torch_layers: set[int] = field(default_factory=set)  # layers the triton backend left to torch

    def kept_fraction(self) -> float | None:
        rows = sum(s.rows for s in self.layers)
        return sum(s.kept_fraction for s in self.layers) / rows if rows else None

    def jaccard_per_layer(self) -> list[float | None]:
        return [s.mean_jaccard for s in self.layers]

    def mean_jaccard(self) -> float | None:
        values = [j for j in self.jaccard_per_layer() if j is not None]
        return sum(values) / len(values) if values else None


def layer_dims(spec: MethodSpec, calibration: Calibration | None, facts: ModelFacts) -> list[int]:
    """d per layer: spec.dims(D), or the largest rank over KV heads at the variance threshold."""
    if spec.loki.df is not None:
        return [spec.loki.dims(facts.head_dim)] * facts.num_layers
    if spec.method == "sparq":
        raise UserError("sparq needs --df")
    if calibration is None:
        raise UserError("--variance needs --calibration FILE (ranks come from its eigenvalues)")
    kind = spec.basis.removeprefix("qa-") if spec.basis in ("pre", "post", "qa-pre", "qa-post") else "post"  # sa-post too
    ranks = rank_at_variance(calibration.pca[kind].eigenvalues, spec.loki.variance)  # [L, Hkv]
    return [int(r) for r in ranks.max(dim=-1).values]


def layer_bases(spec: MethodSpec, calibration: Calibration | None, facts: ModelFacts, dims: list[int]) -> torch.Tensor:
    """Orthonormal bases [L, Hkv, D, D], directions as columns (a query-aware basis depends on d)."""
    name = spec.basis
    if name == "channels":
        if calibration is None:
            raise UserError("double-sparsity needs --calibration FILE (its channels come from the query and key moments)")
        return peers.channel_basis(calibration).float()
    shape = (facts.num_layers, facts.num_kv_heads, facts.head_dim)
    by_d = {d: bases.basis_for(name, calibration, d, shape) for d in sorted(set(dims))}
    return torch.stack([by_d[d][i] for i, d in enumerate(dims)]).float()


def selector_for(spec: MethodSpec, d: int | None, basis: torch.Tensor | None = None) -> loki.Selector:
    """The reference selector of every method but h2o (its own attention): d = dims scored by the
    low-rank methods and SparQ; low-rank methods rotate into `basis` [Hkv, D, D], or, with basis None,
    score keys and queries already rotated (the Loki cache's, at decode)."""
    if spec.method == "exact-topk":
        return loki.exact_topk_selector()
    if spec.method in LOW_RANK:
        return loki.loki_selector(basis, d, name=spec.method) if basis is not None else loki.rotated_selector(d)
    if spec.method == "sparq":
        return peers.sparq_selector(d, shared=spec.loki.group != "head")
    if spec.method == "quest":
        return peers.quest_selector(spec.page)
    return loki.full_selector()


def _layer_attention(spec: MethodSpec, basis: torch.Tensor | None, d: int | None, stats: loki.SelectionStats, backend: str):
    """The attention functions of one layer: (q, k, v, scaling, mask, softcap, sink_logits) ->
    [B, H, Sq, D] float32, on torch, and on triton (None where the backend is torch)."""
    common = dict(spec=spec.loki, stats=stats)
    if spec.method == "h2o":
        return (lambda q, k, v, scaling, **shape: loki.h2o_attention(q, k, v, scaling=scaling, **shape, **common)), None
    selector = selector_for(spec, d, basis)
    compare = spec.method not in ("exact-topk", "full")

    def on_torch(q, k, v, scaling, **shape):
        return loki.sparse_attention(q, k, v, selector=selector, scaling=scaling, compare_exact=compare, **shape, **common)

    if backend != "triton":
        return on_torch, None
    from ..kernels.loki_prefill import sparse_prefill

    def on_triton(q, k, v, scaling):
        return sparse_prefill(q, k, v, selector=selector, scaling=scaling, compare_exact=compare, **common)

    return on_torch, on_triton


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """`torch` (the reference, any device) or `triton` (the kernels: selection and sparse attention);
    `auto` takes triton on a CUDA device with a 16-bit model."""
    kernel_dtype = dtype in (torch.float16, torch.bfloat16)
    if backend == "auto":
        return "triton" if device.type == "cuda" and kernel_dtype else "torch"
    if backend == "torch":
        return backend
    if backend != "triton":
        raise UserError(f"--backend must be auto, torch or triton, got {backend!r}")
    from ..kernels._common import interpreting

    if device.type != "cuda" and not interpreting():
        raise UserError("--backend triton needs a CUDA device (or TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)")
    if not kernel_dtype:
        raise UserError(f"--backend triton needs a 16-bit model, got {str(dtype).removeprefix('torch.')}: add --dtype bfloat16")
    return backend


@contextlib.contextmanager
def patched(
    model: nn.Module, facts: ModelFacts, spec: MethodSpec, calibration: Calibration | None = None, backend: str = "torch"
) -> Iterator[Recorder]:
    """Run the model's attention through `spec` while the block runs; yields the per-layer stats.
    backend: `torch` (sparse/reference.py) or `triton` (kernels/loki_prefill.py; h2o stays on torch)."""
    if calibration is not None:
        calibration.check_shape(facts)
    # the kernels have no path for H2O's accumulated attention, nor anything to select for `full`;
    # SparQ, Quest (sparse/peers.py) and union groups are the reference's only
    if spec.method in ("h2o", "full", "sparq", "quest") or (spec.loki is not None and spec.loki.group == "union"):
        backend = "torch"
    recorder = Recorder(layers=[loki.SelectionStats() for _ in range(facts.num_layers)], backend=backend)
    low_rank = spec.method in LOW_RANK
    dims = layer_dims(spec, calibration, facts) if spec.method in DIM_SCANNERS else [None] * facts.num_layers
    layer_basis = layer_bases(spec, calibration, facts, dims) if low_rank else None
    layers = attention_modules(model)

    def make_handler(module: nn.Module):
        i = layers.index(module)
        basis = layer_basis[i].to(next(module.parameters()).device) if layer_basis is not None else None
        on_torch, on_triton = _layer_attention(spec, basis, dims[i], recorder.layers[i], backend)

        def handler(mod, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            sq, sk, window = query.shape[2], key.shape[2], kwargs.get("sliding_window")
            softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
            causal = plain_causal(attention_mask, sq, sk, window, query.device)
            if on_triton is not None and causal and softcap is None and sinks is None:
                out = on_triton(query, key, value, scale)
            else:
                if on_triton is not None:
                    recorder.torch_layers.add(i)
                mask = None if causal else visible_keys(attention_mask, sq, sk, window, query.device)
                out = on_torch(query, key, value, scale, mask=mask, softcap=softcap, sink_logits=sinks)
            return out.transpose(1, 2).to(query.dtype).contiguous(), None  # [B, Sq, H, D]

        return handler

    with route_attention(model, make_handler):
        yield recorder
