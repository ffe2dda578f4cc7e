"""The static decode loop: a preallocated cache, lengths on the GPU, the whole step one CUDA graph.

    StaticCache  a transformers Cache holding, per layer, keys and values at full capacity
                 [B, Hkv, C, D], allocated once. Full attention stores keys as they come; Loki stores
                 them rotated into the PCA basis and split in the two-plane layout of the kernels
                 (kernels/layout.py LokiKeys: low [B, Hkv, C, d] scored dims, high [B, Hkv, C, D - d]).
                 `positions` [B] (int64, on the device) counts the tokens each sequence holds.
    static_attention  routes the model's attention (transformers' own model code, through
                 `dispatch.route_attention`) to the cache: exact attention at prefill, and at decode
                 one kernel over the whole capacity that reads the valid lengths on the device:
                 `kernels.full_decode` or `kernels.loki_decode` on CUDA, the oracles
                 `reference.dense_decode_attention` / `reference.decode_attention` elsewhere.
    StaticDecoder  prefill (eager, in chunks) and the decode step. A step reads the token it feeds
                 from a device buffer and writes the greedy token back into it, writes the new key
                 and value at `positions` (scatter, no host value involved) and advances `positions`:
                 nothing in it depends on a host number that changes between steps, so on CUDA it is
                 captured once in a `torch.cuda.CUDAGraph` and every later step is one replay. On
                 CUDA the write (rotation and split included) and the query rotation are one kernel
                 each (kernels/cache_write.py; LOKITOOL_FUSED_WRITE=0 falls back to PyTorch ops).
    compiled_parts  optional: the model's RMS norms, MLPs and rotary function through torch.compile
                 (fewer, fused kernels per step); the attention and the cache stay as above.
    fused_projections  each attention module's q, k and v projections as one matrix multiply, and
    fused_gate_up  each gated MLP's gate and up projections as one (the static loop on CUDA:
                 decode_projections; LOKITOOL_FUSED_QKV=0 / LOKITOOL_FUSED_MLP=0 turn them off).
Inputs are unpadded (every sequence of a batch starts with the same prompt length); models with
sliding-window layers, soft-capping or sink logits keep the eager loop (`supports`).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from ..calib.dispatch import exact_attention, route_attention
from ..calib.models import ModelFacts, attention_modules
from . import reference as loki
from .cache import rotate_into
from .reference import LokiSpec


def _kernels():
    """lokitool.kernels (imports triton: only on CUDA)."""
    from .. import kernels

    return kernels


def supports(facts: ModelFacts, loki_prefill: bool = False) -> bool:
    """Whether the static loop can run this model: one full-attention length per sequence."""
    return not (facts.sliding_layers or facts.softcap is not None or facts.attention_sinks or loki_prefill)


# ----------------------------------------------------------------------------------------------
# The cache


class StaticLayer(DynamicLayer):
    """One layer: keys (one tensor, or the two Loki planes) and values at full capacity.

    `keys` / `values` stay views of the first `seen` tokens (host count, advanced by prefill and by
    the decoder), so transformers' length and mask-size methods keep working at prefill."""

    def __init__(self, owner: "StaticCache", basis: torch.Tensor | None, d: int | None):
        super().__init__()
        b, hkv, cap, dim = owner.batch, owner.num_kv_heads, owner.capacity, owner.head_dim
        new = lambda *shape: torch.zeros(*shape, dtype=owner.dtype, device=owner.device)  # noqa: E731
        self.owner = owner
        self.basis = None if basis is None else basis.float().to(owner.device).contiguous()  # [Hkv, D, D], directions as columns
        self.k = new(b, hkv, cap, dim) if basis is None else None  # [B, Hkv, C, D]
        self.low = new(b, hkv, cap, d) if basis is not None else None  # [B, Hkv, C, d]
        self.high = new(b, hkv, cap, dim - d) if basis is not None else None  # [B, Hkv, C, D - d]
        self.v = new(b, hkv, cap, dim)
        self.device, self.dtype = owner.device, owner.dtype
        self.is_initialized = True
        self._expose()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        pass  # allocated up front

    def _expose(self) -> None:
        n = self.owner.seen
        self.keys = (self.k if self.k is not None else self.low)[:, :, :n]
        self.values = self.v[:, :, :n]

    def joined_keys(self, n: int) -> torch.Tensor:
        """The first n keys as one [B, Hkv, n, D] tensor (a copy for the Loki planes)."""
        if self.k is not None:
            return self.k[:, :, :n]
        return torch.cat([self.low[:, :, :n], self.high[:, :, :n]], dim=-1)

    def _write(self, key_states: torch.Tensor, value_states: torch.Tensor, at) -> None:
        key_states = rotate_into(key_states, self.basis)
        if self.k is not None:
            at(self.k, key_states)
        else:
            d = self.low.shape[-1]
            at(self.low, key_states[..., :d])
            at(self.high, key_states[..., d:])
        at(self.v, value_states)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store new post-RoPE keys (rotated for Loki) and values [B, Hkv, s, D].
        Decoding (s = 1): written at `positions` on the device; returns the whole buffers (the decode
        handler reads the cache itself). Prefill: written after the `seen` tokens; returns every
        cached key (rotated, joined) and value, [B, Hkv, seen + s, D], for exact attention."""
        owner = self.owner
        if owner.decoding and owner.fused:  # one kernel: rotate, split, write key and value at positions
            kernels = _kernels()
            k_dst = self.k if self.k is not None else kernels.LokiKeys(self.low, self.high)
            kernels.write_decode_kv(key_states[:, :, 0], value_states[:, :, 0], owner.positions, k_dst=k_dst, v_dst=self.v, basis=self.basis)
            return (self.k if self.k is not None else self.low), self.v
        if owner.decoding:
            index = owner.positions[:, None, None, None]  # [B, 1, 1, 1]

            def at(buffer, new):  # buffer[b, :, positions[b]] = new[b, :, 0]
                buffer.scatter_(2, index.expand(new.shape), new)

            self._write(key_states, value_states, at)
            return (self.k if self.k is not None else self.low), self.v
        n, s = owner.seen, key_states.shape[2]
        if n + s > owner.capacity:
            raise ValueError(f"static cache is full: {n + s} tokens do not fit its capacity {owner.capacity}")

        def at(buffer, new):
            buffer[:, :, n : n + s] = new

        self._write(key_states, value_states, at)
        return self.joined_keys(n + s), self.v[:, :, : n + s]

    def get_seq_length(self) -> int:
        return self.owner.seen

    def get_max_length(self) -> int:
        return self.owner.capacity

    def get_max_cache_shape(self) -> int:  # the name in older transformers
        return self.owner.capacity

    def reset(self) -> None:
        self._expose()

    def offload(self):
        raise NotImplementedError("the static cache does not support offloading")

    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in (self.k, self.low, self.high, self.v) if t is not None)


class StaticCache(Cache):
    """Every layer preallocated for `capacity` tokens of `batch` sequences.

    bases None: full attention (keys as they come). bases [L, Hkv, D, D] with a `spec`: Loki (keys
    rotated, split after d = spec.dims(D))."""

    def __init__(self, facts: ModelFacts, *, batch: int, capacity: int, dtype: torch.dtype, device: torch.device,
                 bases: torch.Tensor | None = None, spec: LokiSpec | None = None):
        if (bases is None) != (spec is None):
            raise ValueError("give Loki bases and a spec together, or neither (full attention)")
        self.batch, self.capacity, self.dtype, self.device = batch, capacity, dtype, torch.device(device)
        self.num_kv_heads, self.head_dim = facts.num_kv_heads, facts.head_dim
        self.spec = spec
        self.seen = 0  # tokens every sequence holds, on the host (prefill; advanced by the decoder)
        self.decoding = False  # set by the decoder around a decode step
        # decode-step writes and query rotations through kernels/cache_write.py (CUDA; LOKITOOL_FUSED_WRITE=0: PyTorch ops)
        self.fused = self.device.type == "cuda" and os.environ.get("LOKITOOL_FUSED_WRITE", "1") != "0"
        self.positions = torch.zeros(batch, dtype=torch.long, device=self.device)  # [B] tokens held
        self.lengths = torch.ones(batch, dtype=torch.int32, device=self.device)  # [B] keys a decode step sees
        d = spec.dims(facts.head_dim) if spec is not None else None
        per_layer = [None] * facts.num_layers if bases is None else list(bases)
        super().__init__(layers=[StaticLayer(self, basis, d) for basis in per_layer])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states)

    def advance_host(self, n: int) -> None:
        """Count n more tokens in every sequence on the host (the device count is `positions`)."""
        self.seen += n
        for layer in self.layers:
            layer._expose()

    def fill_random(self, length: int, generator: torch.Generator | None = None) -> None:
        """Stand-in for a prefill of `length` tokens (benchmarks: decode speed does not depend on
        what the cache holds): random normal keys and values, every sequence holding `length`."""
        if not 1 <= length <= self.capacity:
            raise ValueError(f"length {length} must lie in [1, {self.capacity}]")
        for layer in self.layers:
            for t in (layer.k, layer.low, layer.high, layer.v):
                if t is not None:
                    t[:, :, :length].normal_(generator=generator)
        self.seen = 0
        self.advance_host(length)
        self.positions.fill_(length)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


# ----------------------------------------------------------------------------------------------
# Attention


def decode_attention_fn(spec: LokiSpec | None, device: torch.device) -> Callable[..., torch.Tensor]:
    """The one place that picks the static loop's decode attention: (q [B, H, D], layer, lengths
    [B] int32, scaling) -> [B, H, D]. Triton kernels on CUDA, the pure-PyTorch oracles elsewhere."""
    if device.type == "cuda":
        from ..kernels import LokiKeys, full_decode, loki_decode  # imports triton: only on CUDA

        if spec is None:
            return lambda q, layer, lengths, scaling: full_decode(q, layer.k, layer.v, lengths, scaling=scaling)
        return lambda q, layer, lengths, scaling: loki_decode(q, LokiKeys(layer.low, layer.high), layer.v, lengths, spec=spec, scaling=scaling,
                                                              out_dtype=q.dtype)
    if spec is None:
        return lambda q, layer, lengths, scaling: loki.dense_decode_attention(q, layer.k, layer.v, lengths, scaling=scaling)
    return lambda q, layer, lengths, scaling: loki.decode_attention(
        q, layer.joined_keys(layer.owner.capacity), layer.v, lengths, spec=spec, scaling=scaling
    )


@contextlib.contextmanager
def static_attention(model: nn.Module, cache: StaticCache) -> Iterator[None]:
    """Route the model's attention to the static cache while the block runs."""
    decode = decode_attention_fn(cache.spec, cache.device)

    def make_handler(module: nn.Module):
        layer = cache.layers[module.layer_idx]

        def handler(mod, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            if not cache.decoding:
                q = rotate_into(query, layer.basis)  # [B, H, Sq, D]
                return exact_attention(mod, q, key, value, attention_mask, scaling=scale, dropout=dropout, **kwargs)
            q = query[:, :, 0]  # [B, H, D]
            if layer.basis is not None:
                q = _kernels().rotate_queries(q, layer.basis) if cache.fused else rotate_into(query, layer.basis)[:, :, 0]
            out = decode(q, layer, cache.lengths, scale)  # [B, H, D]
            return out[:, None].to(query.dtype), None  # [B, 1, H, D]

        return handler

    with route_attention(model, make_handler):
        yield


# ----------------------------------------------------------------------------------------------
# One matrix multiply for the q, k and v projections, and for each MLP's gate and up projections


class FusedCounts(NamedTuple):
    """How many modules decode_projections fused: attention modules (q, k, v) and MLPs (gate, up)."""

    qkv: int
    mlp: int


@contextlib.contextmanager
def fused_projections(model: nn.Module) -> Iterator[int]:
    """Compute each attention module's q, k and v projections as one matrix multiply while the block
    runs (yields how many modules were fused).

    At decode a projection reads its weights once for a handful of rows, so it costs its bytes plus a
    fixed few microseconds: on an H200 (llama3-8b, batch 1, benchmarks/e2e_profile.py) k and v took
    ~5 us each for 8 MB, q ~11 us for 34 MB, each followed by a split-K reduction, against ~30 us for an
    MLP projection of 117 MB. The three weights are copied once into one [q + k + v, hidden] matrix
    whose row blocks become the projections' weights (views: no memory is added); `q_proj` computes all
    three and leaves k and v for `k_proj` and `v_proj`, which return them when called on the same input
    (transformers' attention modules call q, k, v in that order on one hidden-states tensor) and
    otherwise compute their own. Modules without separate `q_proj`, `k_proj`, `v_proj` linears of one
    input size, dtype and device (or with biases on some only) are left as they are. The MLPs' gate and
    up projections: fused_gate_up, the same mechanism."""
    groups = [[getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj")] for attn in attention_modules(model)]
    with _fused_groups(groups) as count:
        yield count


@contextlib.contextmanager
def fused_gate_up(model: nn.Module) -> Iterator[int]:
    """Compute each MLP's gate and up projections as one matrix multiply while the block runs (yields
    how many MLPs were fused).

    A gated MLP (transformers' LlamaMLP and its kin: `down_proj(act_fn(gate_proj(x)) * up_proj(x))`)
    reads two [intermediate, hidden] weights per step, 117 MB each for llama3-8b, each its own ~30 us
    multiply on an H200 at batch 1 (one step, compiled, full attention over 4k keys: batch 16 7.14 ->
    7.08 ms; batch 1 within run-to-run noise, the fused multiply taking 61 us). As in fused_projections, the two weights become row blocks of one
    [2 * intermediate, hidden] matrix (views: no memory is added), `gate_proj` computes both and
    `up_proj` returns its half when called on the input gate_proj saw. So the MLP's own forward runs
    unchanged (compiled or not: under compiled_parts the patched projections are traced into the MLP's
    graph, one graph for every layer) and any order of calls stays correct; a module is fused only
    where its class's forward names gate_proj before up_proj (otherwise up_proj would always miss and
    the multiply of up would be done twice) and both are linears that fused_projections could fuse."""
    groups = [[m.gate_proj, m.up_proj] for m in model.modules() if _gate_before_up(m)]
    with _fused_groups(groups) as count:
        yield count


def decode_projections(model: nn.Module, device: torch.device) -> contextlib.AbstractContextManager[FusedCounts]:
    """What the static loop runs its projections with: on CUDA fused_projections (q, k, v) and
    fused_gate_up (each MLP's gate and up), each unless its switch is 0 (LOKITOOL_FUSED_QKV,
    LOKITOOL_FUSED_MLP: 0 or 1, default 1); separate projections elsewhere (yields zero counts)."""
    qkv, mlp = _switch("LOKITOOL_FUSED_QKV"), _switch("LOKITOOL_FUSED_MLP")
    on_cuda = torch.device(device).type == "cuda"
    return _decode_projections(model, qkv=on_cuda and qkv, mlp=on_cuda and mlp)


@contextlib.contextmanager
def _decode_projections(model: nn.Module, *, qkv: bool, mlp: bool) -> Iterator[FusedCounts]:
    with contextlib.ExitStack() as stack:
        n_qkv = stack.enter_context(fused_projections(model)) if qkv else 0
        n_mlp = stack.enter_context(fused_gate_up(model)) if mlp else 0
        yield FusedCounts(qkv=n_qkv, mlp=n_mlp)


def _switch(name: str) -> bool:
    """An on/off environment variable of the static loop: unset or 1 on, 0 off, anything else refused."""
    value = os.environ.get(name, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, not {value!r}")
    return value == "1"


def _gate_before_up(module: nn.Module) -> bool:
    """Whether `module` has gate_proj and up_proj attributes and its class's forward names gate_proj
    first (co_names lists a code object's attribute names in the order they first occur)."""
    if not (hasattr(module, "gate_proj") and hasattr(module, "up_proj")):
        return False
    names = getattr(getattr(type(module).forward, "__code__", None), "co_names", ())
    return "gate_proj" in names and "up_proj" in names and names.index("gate_proj") < names.index("up_proj")


@contextlib.contextmanager
def _fused_groups(groups: list[list]) -> Iterator[int]:
    """Fuse each group of projections that can be (see _fuse) while the block runs; yields how many
    were. On exit the projections' own forwards return; their weights stay views of the fused matrix."""
    fused = [projs for projs in groups if _fusable(projs)]
    for projs in fused:
        _fuse(projs)
    try:
        yield len(fused)
    finally:
        for projs in fused:
            for proj in projs:
                proj.__dict__.pop("forward", None)


def _fusable(projs: list) -> bool:
    """Plain nn.Linear layers (not subclasses such as quantized linears, whose weights do not
    concatenate) of one input size, dtype and device, with biases on all or none, off the meta device."""
    if not all(type(p) is nn.Linear for p in projs):
        return False
    first = projs[0].weight
    same = all(p.weight.shape[1] == first.shape[1] and p.weight.dtype == first.dtype and p.weight.device == first.device for p in projs)
    biases = {p.bias is None for p in projs}
    return same and len(biases) == 1 and first.device.type != "meta"


def _fuse(projs: list[nn.Linear]) -> None:
    """Point the projections' weights (and biases) at row blocks of one matrix; the first projection's
    forward computes every output and leaves the others' for them, each of which returns its own when
    called on that same input tensor (and otherwise drops what is left and computes its own)."""
    sizes = [p.weight.shape[0] for p in projs]
    with torch.no_grad():
        weight = torch.cat([p.weight for p in projs])  # [sum of outputs, in]
        bias = torch.cat([p.bias for p in projs]) if projs[0].bias is not None else None
        for p, w, bb in zip(projs, weight.split(sizes), bias.split(sizes) if bias is not None else [None] * len(projs)):
            p.weight.data = w  # a view of the fused matrix: the separate copy is freed
            if bb is not None:
                p.bias.data = bb
    # the input the first projection saw ("x") and the outputs not yet handed out, by position
    left: dict = {}

    def first(x: torch.Tensor) -> torch.Tensor:
        outs = F.linear(x, weight, bias).split(sizes, dim=-1)
        left.clear()
        left.update(enumerate(outs[1:], start=1))
        left["x"] = x
        return outs[0]

    def rest(proj: nn.Linear, i: int):
        def forward(x: torch.Tensor) -> torch.Tensor:
            if left.get("x") is x and i in left:
                out = left.pop(i)
                if len(left) == 1:  # only the input: every output handed out
                    left.clear()
                return out
            left.clear()
            return F.linear(x, proj.weight, proj.bias)

        return forward

    projs[0].forward = first
    for i, proj in enumerate(projs[1:], start=1):
        proj.forward = rest(proj, i)


# ----------------------------------------------------------------------------------------------
# Fewer kernels per step: the model's norms and MLPs through torch.compile


def pure_parts(model: nn.Module) -> list[nn.Module]:
    """The submodules a decode step may run compiled: RMS norms and MLPs (class names ending in
    `RMSNorm` or `MLP`, as in transformers' Llama-family modeling files). They hold no cache and
    call no attention, so compiling them cannot change what the attention route sees."""
    return [m for m in model.modules() if type(m).__name__.endswith(("RMSNorm", "MLP"))]


_COMPILED: dict[tuple[Callable, str | Callable], Callable] = {}


@contextlib.contextmanager
def compiled_parts(model: nn.Module, backend: str | Callable = "inductor") -> Iterator[int]:
    """Run the model's norms, MLPs and rotary-embedding function through torch.compile while the
    block runs (yields how many were replaced).

    In eager transformers an RMS norm is ~8 kernels, an MLP's activation 2 and the rotary embedding
    of q and k ~10; compiled, each chain is one or two fused kernels (the matrix multiplies stay
    cuBLAS). The rotary function is the modeling file's `apply_rotary_pos_emb`, replaced in that
    module for the duration of the block (attention modules look it up there at each call). Inside a CUDA graph every kernel still
    costs a few microseconds, so this shortens the step by hundreds of kernels. One compiled
    function per module class serves all its instances (the weights are inputs, not constants)."""
    import types

    import torch._dynamo

    config = torch._dynamo.config
    limits = {name: getattr(config, name) for name in ("recompile_limit", "cache_size_limit") if hasattr(config, name)}
    for name in limits:
        setattr(config, name, max(limits[name], 64))  # one entry per input shape and module class
    parts = pure_parts(model)
    # the modeling files' rotary function, which attention modules look up as a module global
    modules = {sys.modules[type(m).__module__] for m in attention_modules(model)}
    rotary = {mod: mod.apply_rotary_pos_emb for mod in modules if callable(getattr(mod, "apply_rotary_pos_emb", None))}
    try:
        for m in parts:
            m.forward = types.MethodType(_compiled(type(m).forward, backend), m)  # an instance attribute: deleted below
        for mod, fn in rotary.items():
            mod.apply_rotary_pos_emb = _compiled(fn, backend)
        yield len(parts) + len(rotary)
    finally:
        for m in parts:
            m.__dict__.pop("forward", None)
        for mod, fn in rotary.items():
            mod.apply_rotary_pos_emb = fn
        for name, value in limits.items():
            setattr(config, name, value)


def _compiled(fn: Callable, backend: str | Callable) -> Callable:
    """torch.compile(fn), kept for the process: a second block reuses what was compiled."""
    key = (fn, backend)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, backend=backend, dynamic=False)
    return _COMPILED[key]


# ----------------------------------------------------------------------------------------------
# The loop


ARGMAX_CHUNK = 256  # logits per first-stage block of greedy_tokens


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> [B] int64: the index of each row's maximum (the first, as torch.argmax; NaN
    counts as the maximum), in two reductions: the maximum of each chunk of ARGMAX_CHUNK logits, then
    the first chunk holding the largest. torch.argmax over a whole row runs one block of threads per
    row: 27 us for llama3-8b's 128256 logits on an H200 (benchmarks/e2e_profile.py), every step."""
    b, v = logits.shape
    n = -(-v // ARGMAX_CHUNK)
    padded = logits if n * ARGMAX_CHUNK == v else torch.nn.functional.pad(logits, (0, n * ARGMAX_CHUNK - v), value=float("-inf"))
    best, where = padded.view(b, n, ARGMAX_CHUNK).max(dim=-1)  # [B, n]: each chunk's maximum and its first index
    chunk = best.argmax(dim=-1, keepdim=True)  # [B, 1]
    return (chunk * ARGMAX_CHUNK + where.gather(-1, chunk))[:, 0]


class StaticDecoder:
    """Greedy decoding over a StaticCache: `prefill` (eager), then `step` (a graph replay once
    `capture` has run; plain calls before, and always on the CPU). Use inside `static_attention`."""

    def __init__(self, model: nn.Module, cache: StaticCache):
        self.model, self.cache = model, cache
        self.token = torch.zeros(cache.batch, 1, dtype=torch.long, device=cache.device)  # [B, 1] fed next
        self.logits: torch.Tensor | None = None  # [B, V] of the last step (a static buffer under a graph)
        self.graph: torch.cuda.CUDAGraph | None = None
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._keep_last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def _forward(self, ids: torch.Tensor, **kwargs) -> torch.Tensor:
        out = self.model(input_ids=ids, use_cache=True, **{self._cache_arg: self.cache}, **self._keep_last, **kwargs)
        return out.logits[:, -1].float()  # [B, V]

    def prefill(self, ids: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Feed the prompt ids [B, S] after what the cache holds; the greedy next token [B]."""
        cache = self.cache
        cache.decoding = False
        step = chunk or ids.shape[1]
        for start in range(0, ids.shape[1], step):
            piece = ids[:, start : start + step]
            logits = self._forward(piece)
            cache.advance_host(piece.shape[1])
        cache.positions.fill_(cache.seen)
        token = greedy_tokens(logits)
        self.token.copy_(token[:, None])
        return token

    def _step(self) -> None:
        """One decode step on device buffers only: feed `token`, write the greedy one back."""
        cache = self.cache
        cache.lengths.copy_(cache.positions + 1)  # the keys this step sees, its own included
        logits = self._forward(self.token, position_ids=cache.positions[:, None])
        self.token.copy_(greedy_tokens(logits)[:, None])
        cache.positions.add_(1)
        self.logits = logits

    def capture(self) -> None:
        """Capture `_step` in a CUDA graph (after a warm-up step on the capture stream that compiles
        and autotunes the kernels and builds loki_decode's plan; its effects are undone)."""
        cache = self.cache
        token, positions = self.token.clone(), cache.positions.clone()
        stream = torch.cuda.Stream(cache.device)
        stream.wait_stream(torch.cuda.current_stream(cache.device))
        graph = torch.cuda.CUDAGraph()
        cache.decoding = True
        try:
            with torch.cuda.stream(stream):
                self._step()  # writes the slot the first real step overwrites
                self.token.copy_(token)
                cache.positions.copy_(positions)
                with torch.cuda.graph(graph, stream=stream):
                    self._step()
        finally:
            cache.decoding = False
        torch.cuda.current_stream(cache.device).wait_stream(stream)
        self.graph = graph

    def step(self) -> torch.Tensor:
        """One greedy token [B] (a view of the device buffer: clone it to keep it past the next step)."""
        cache = self.cache
        if cache.seen + 1 > cache.capacity:
            raise ValueError(f"static cache is full: capacity {cache.capacity}")
        if self.graph is not None:
            self.graph.replay()
        else:
            cache.decoding = True
            try:
                self._step()
            finally:
                cache.decoding = False
        cache.advance_host(1)
        return self.token[:, 0]


def generate_static(
    model: nn.Module,
    ids: torch.Tensor,
    max_new_tokens: int,
    cache: StaticCache,
    *,
    graph: bool | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    stop_token: int | None = None,
    prefill_chunk: int | None = None,
) -> torch.Tensor:
    """Greedy continuation of ids [B, S] in the static loop: the new tokens [B, <= max_new_tokens].
    graph: capture the step in a CUDA graph (default: on CUDA). Stops once every sequence has
    produced `stop_token`."""
    if max_new_tokens < 1:
        return ids.new_empty(ids.shape[0], 0)
    graph = cache.device.type == "cuda" if graph is None else graph

    def tokens() -> Iterator[torch.Tensor]:
        decoder = StaticDecoder(model, cache)
        yield decoder.prefill(ids, prefill_chunk)
        for _ in range(max_new_tokens - 1):
            if graph and decoder.graph is None:
                decoder.capture()
            yield decoder.step().clone()

    with static_attention(model, cache), decode_projections(model, cache.device), torch.no_grad():
        return collect(tokens(), on_token, stop_token)


def collect(
    tokens: Iterator[torch.Tensor], on_token: Callable[[torch.Tensor], None] | None = None, stop_token: int | None = None
) -> torch.Tensor:
    """The greedy tokens [B] that `tokens` yields, stacked [B, n] (n >= 1), each passed to on_token;
    stops once every sequence has produced `stop_token` (the eager and the static loop both end so)."""
    out, done = [], None
    for token in tokens:
        out.append(token)
        if on_token is not None:
            on_token(token)
        if stop_token is not None:
            done = (token == stop_token) if done is None else done | (token == stop_token)
            if bool(done.all()):
                break
    return torch.stack(out, dim=1)
