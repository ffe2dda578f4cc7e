"""Loki decode in three kernels: approximate scores -> exact top-k -> sparse flash-decoding.

`loki_decode` computes what the oracle `lokitool.sparse.reference.decode_attention` computes, over a cache
whose keys are stored already rotated into the PCA basis. In the Loki layout the d scored dims of
all tokens are one contiguous plane and the other D - d dims a second one: each key element is
stored once, the score pass streams the first plane, the exact attention reads kept rows from both.

    q_rot [B, H, D], v [B, Hkv, S, D]            (float16 or bfloat16, head dim contiguous)
    k_rot: LokiKeys(low [B, Hkv, S, d], high [B, Hkv, S, D - d])  (the Loki layout, layout.py)
           or one tensor [B, Hkv, S, D]
    lengths [B]: sequence i holds lengths[i] valid tokens, 1 <= lengths[i] <= S
    -> [B, H, D] float32

Stages, each callable (and timed by the benchmark) on its own:
    scores = loki_scores(q_rot, k_rot, lengths, d=d, group=group)              # score.py
    idx    = select_topk(scores, lengths, budgets, kmax=spec.max_budget(S))    # select.py
    out    = sparse_decode_attention(q_rot, k_rot, v, idx, budgets, scaling=s, group=group)
Where the selection rows are too few to fill the card (batch 1) all three run in one kernel instead
(loki_step.py: `decode_path` says which way a shape goes).
No stage synchronises with the host (lengths given on the GPU are trusted), so a decode step can be
captured in a CUDA graph.

Host cost: a decode step also runs outside a CUDA graph (eager decoding, a server's first steps),
and Triton's launch path costs the host tens of microseconds per kernel, mostly re-deriving each
argument's specialization. So the first call at a shape builds a plan (`_Plan`): the scratch of
every stage, and a record of its launches (four; six when the selection runs in pivot mode, on
rows past the register tile; in radix "split" mode three where its grid is resident at once, seven
elsewhere: select.py; one more, the merge, with group="kv": attention.merges_inside; one for the
step, loki_step.py, six where it runs phase by phase) (compiled kernel, grid, arguments; _common.Recorded),
made while autotuned kernels pin their config. Later calls with the same shapes, strides, dtypes, devices,
pointer alignments, settings and stream check nothing again and replay the record with their own
tensors swapped in: a key lookup, one allocation (the output) and the launches, every pointer passed
as a raw address (Triton's launcher would ask each tensor for it, and CUDA whether it is a device pointer, on
every launch: ~10 us of a call's ~60 on an H200's host). The last MAX_PLANS plans keep their scratch
(about B x R x S x 5 bytes, R selection rows, + 1/16 of that split; x 8 for loki_step.py; `clear_plans()` frees it);
a plan serves one call at a time on its stream, and a CUDA graph captured from loki_decode may be
replayed only while its plan is kept. A decode loop over a cache whose length grows each step
(sparse/generation.py) gets a new plan per step and gains nothing here; one that passes the
preallocated cache and per-sequence lengths would. Pass lengths as int32 on the GPU: anything else
costs a conversion per call.

Such a loop brings each layer's cache tensors again every step. The second time a plan sees the same
cache tensors (k, v, lengths, by address) it captures its launches for them as a CUDA graph
(`_CallGraph`); from then on a call costs the host a copy of q in, one graph launch and a copy of the
output out, whatever the number of kernels. Not while the caller is capturing a graph of its own (its
graph takes the launches). LOKITOOL_CALL_GRAPHS=0 turns this off (benchmarks compare both).
"""

from __future__ import annotations

import torch

from ..sparse.reference import LokiSpec
from . import attention, loki_step, score, select
from ._common import env_switch, recording
from .layout import Keys, LokiKeys, scored_plane


def check_inputs(q_rot: torch.Tensor, k_rot: Keys, v: torch.Tensor, lengths: torch.Tensor, *, d: int) -> None:
    """Shapes, dtypes and ranges (the spec validated its own settings); lengths are range-checked
    only when they live on the CPU."""
    if isinstance(k_rot, LokiKeys):
        low, high = k_rot
        if low.dim() != 4 or high.shape[:3] != low.shape[:3] or high.dtype != low.dtype:
            raise ValueError(f"LokiKeys planes must be [B, Hkv, S, d] and [B, Hkv, S, D - d]; got {tuple(low.shape)}, {tuple(high.shape)}")
        if d > low.shape[-1]:
            raise ValueError(f"d={d} is larger than the scored plane ({low.shape[-1]} dims); split the keys at d")
    if q_rot.dim() != 3 or len(k_rot.shape) != 4 or v.shape != k_rot.shape:
        raise ValueError(f"expected q_rot [B, H, D] and k_rot, v [B, Hkv, S, D]; got {tuple(q_rot.shape)}, {tuple(k_rot.shape)}, {tuple(v.shape)}")
    b, h, dim = q_rot.shape
    if k_rot.shape[0] != b or k_rot.shape[3] != dim or h % k_rot.shape[1]:
        raise ValueError(f"q_rot {tuple(q_rot.shape)} does not match k_rot {tuple(k_rot.shape)} (H must be a multiple of Hkv)")
    if not (q_rot.dtype == k_rot.dtype == v.dtype) or q_rot.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"q_rot, k_rot, v must share dtype float16 or bfloat16; got {q_rot.dtype}, {k_rot.dtype}, {v.dtype}")
    if not 1 <= d <= dim:
        raise ValueError(f"d={d} must lie in [1, {dim}]")
    if lengths.shape != (b,):
        raise ValueError(f"lengths must have shape ({b},), got {tuple(lengths.shape)}")
    if lengths.device.type == "cpu" and lengths.numel() and not (1 <= int(lengths.min()) and int(lengths.max()) <= k_rot.shape[2]):
        raise ValueError(f"lengths must lie in [1, {k_rot.shape[2]}], got {lengths.tolist()}")


# ----------------------------------------------------------------------------------------------
# Plans: scratch and recorded launches per shape


class _Plan:
    def __init__(self, q_rot: torch.Tensor, k_rot: Keys, *, spec: LokiSpec, d: int):
        b, h, dim = q_rot.shape
        _, hkv, s, _ = k_rot.shape
        device = q_rot.device
        self.rows = h if spec.group == "head" else hkv
        self.qps = 1 if spec.group == "head" else h // hkv  # query heads per selection row
        self.spec, self.d = spec, d
        self.replay: list[tuple[object, list, list[tuple[int, int]]]] | None = None
        self.calls: dict[tuple, _CallGraph | None] = {}  # cache tensors' addresses -> their call graph (None: seen once)
        self.step = loki_step.StepPlan(b, self.rows, self.qps, s, dim, device) if loki_step.takes_step(b * self.rows, s, device) else None
        if self.step is not None:  # one kernel (loki_step.py), its own scratch
            return
        self.kmax = spec.max_budget(s)
        self.select = select.SelectPlan(b, self.rows, s, device, mode=select.selection_mode(b * self.rows, s, device), kf=spec.kf)
        self.nsplit = attention.num_splits(b * self.rows, self.kmax, attention.multiprocessors(device))
        f32 = dict(dtype=torch.float32, device=device)
        self.budgets = torch.empty(b, dtype=torch.int32, device=device)
        self.scores = torch.empty(b, self.rows, s, **f32)  # [B, R, S]
        self.idx = torch.empty(b, self.rows, self.kmax, dtype=torch.int32, device=device)  # [B, R, kmax]
        self.o_part = torch.empty(b, h, self.nsplit, dim, **f32)
        self.lse_part = torch.empty(b, h, self.nsplit, **f32)
        self.done = torch.zeros(b * self.rows, dtype=torch.int32, device=device)  # pieces finished per row (attention.py)

    def stages(self, q_rot, k_rot, v, lengths, out, scaling: float) -> None:
        """The stages through the launchers (recorded on the first call): scores (the kernel also writes
        the budgets), selection, sparse attention, whose pieces are merged by each row's last piece or, where a
        row serves several query heads, by the merge kernel (attention.merges_inside); or all of it in the
        fused kernel (loki_step.py)."""
        if self.step is not None:
            loki_step._launch(q_rot=q_rot, k_rot=k_rot, v=v, lengths=lengths, out=out, kf=self.spec.kf, d=self.d, scaling=scaling,
                              plan=self.step)
            return
        score._launch(q_rot=q_rot, k_rot=scored_plane(k_rot), lengths=lengths, scores=self.scores, d=self.d,
                      group_kv=self.spec.group == "kv", budgets=self.budgets, kf=self.spec.kf)  # + budgets [B]: k = max(1, floor(kf x length))
        select._launch(scores=self.scores, lengths=lengths, budgets=self.budgets, idx=self.idx, plan=self.select)
        pieces = dict(q_rot=q_rot, k_rot=k_rot, v=v, idx=self.idx, budgets=self.budgets, o_part=self.o_part, lse_part=self.lse_part,
                      scaling=scaling, qps=self.qps, nsplit=self.nsplit)
        if attention.merges_inside(self.qps):
            attention._launch(**pieces, out=out, done=self.done)
        else:
            attention._launch(**pieces)
            attention.launch_merge(o_part=self.o_part, lse_part=self.lse_part, out=out)

    def record(self, q_rot, k_rot, v, lengths, out, scaling: float) -> None:
        """Run the stages once, recording each launch and where the call's own tensors sit in it."""
        with recording() as rec:
            self.stages(q_rot, k_rot, v, lengths, out, scaling)
        if not rec.complete:
            return
        mine = {id(t): i for i, t in enumerate(_call_tensors(q_rot, k_rot, v, lengths, out))}
        self.replay, self.held, self.addresses = [], [], rec.addresses
        for run, args in rec.launches:
            slots = [(pos, mine[id(a)]) for pos, a in enumerate(args) if id(a) in mine]
            for pos, _ in slots:
                args[pos] = None  # the record must not keep this call's cache alive
            for pos, a in enumerate(args):
                if self.addresses and isinstance(a, torch.Tensor):  # the plan's scratch, by address
                    self.held.append(a)
                    args[pos] = a.data_ptr()
            self.replay.append((run, args, slots))

    def run(self, q_rot, k_rot, v, lengths, out, scaling: float, stream: int | None) -> None:
        if self.replay is None:
            self.stages(q_rot, k_rot, v, lengths, out, scaling)
            return
        tensors = _call_tensors(q_rot, k_rot, v, lengths, out)
        if self.addresses:  # their devices are part of the plan key
            tensors = [t.data_ptr() for t in tensors]
        for run, args, slots in self.replay:
            args = list(args)
            for pos, which in slots:
                args[pos] = tensors[which]
            run(*args, stream=stream)

    def call_graph(self, q_rot, k_rot, v, lengths, scaling: float, out_dtype: torch.dtype) -> _CallGraph | None:
        """The call graph for these cache tensors (by address): None the first time they are seen, captured
        the second time (a loop that brings them again will bring them many times), then kept."""
        _, low, high, v_rows, lens, _ = _call_tensors(q_rot, k_rot, v, lengths, None)
        where = (low.data_ptr(), high.data_ptr(), v_rows.data_ptr(), lens.data_ptr())
        if where not in self.calls:  # first sight
            if len(self.calls) >= MAX_CALL_GRAPHS:
                self.calls.pop(next(iter(self.calls)))
            self.calls[where] = None
            return None
        graph = self.calls[where]
        if graph is None:  # second sight
            graph = self.calls[where] = _CallGraph(self, q_rot, k_rot, v, lengths, scaling, out_dtype)
        return graph


class _CallGraph:
    """A plan's launches captured once as a CUDA graph for one set of cache tensors (k, v, lengths at fixed
    addresses, as a decode loop over a preallocated cache passes them every step, layer by layer): a call
    then costs the host a copy of q into the graph's input, one graph launch and a copy of its output,
    instead of a launch per kernel. The graph reads the cache as it is when replayed (new tokens, new
    lengths); only addresses are fixed. The output is a copy: the caller may keep it."""

    def __init__(self, plan: _Plan, q_rot, k_rot, v, lengths, scaling: float, out_dtype: torch.dtype):
        device = q_rot.device
        self.q = torch.empty_like(q_rot)
        self.out = torch.empty(q_rot.shape, dtype=out_dtype, device=device)
        self.graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # capture_begin/end, not torch.cuda.graph: no device sync, no gc pass
            self.graph.capture_begin()
            try:
                plan.run(self.q, k_rot, v, lengths, self.out, scaling, side.cuda_stream)
            finally:
                self.graph.capture_end()
        torch.cuda.current_stream(device).wait_stream(side)

    def __call__(self, q_rot: torch.Tensor) -> torch.Tensor:
        self.q.copy_(q_rot)
        self.graph.replay()
        return self.out.clone()


def _call_tensors(q_rot, k_rot, v, lengths, out) -> tuple:
    """The tensors a call brings, as the launchers pass them (the high plane of LokiKeys, or the
    plain keys twice: attention._launch reads both planes from one tensor then)."""
    if isinstance(k_rot, LokiKeys):
        low, high = k_rot
        return q_rot, low, high if high.shape[-1] else low, v, lengths, out
    return q_rot, k_rot, k_rot, v, lengths, out


_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _current_stream(index: int) -> int:
    """The current CUDA stream's handle on device `index` (a CUDA tensor's device always has one), as
    Triton's launcher asks for it (torch's private getter: a fraction of a microsecond against ~2 for
    torch.cuda.current_stream(device).cuda_stream)."""
    if _RAW_STREAM is None:
        return torch.cuda.current_stream(index).cuda_stream
    return _RAW_STREAM(index)


MAX_PLANS = 4  # oldest dropped first: a decode loop whose cache length grows makes a plan per step
MAX_CALL_GRAPHS = 256  # per plan (a model's layers share a plan, each with its own cache tensors)
_PLANS: dict[tuple, _Plan] = {}


def call_graphs() -> bool:
    """Whether repeated calls replay a call graph (_CallGraph): unless LOKITOOL_CALL_GRAPHS=0 (benchmarks
    compare both; the per-launch replay is then what runs)."""
    return env_switch("LOKITOOL_CALL_GRAPHS") is not False


def decode_path(total_rows: int, s: int, device: torch.device) -> str:
    """How loki_decode runs total_rows selection rows of s tokens on this device: "step" (one kernel,
    loki_step.py), or the three stages with the selection in this mode (select.selection_mode)."""
    return "step" if loki_step.takes_step(total_rows, s, device) else select.selection_mode(total_rows, s, device)


def clear_plans() -> None:
    """Free every plan's scratch (no CUDA graph captured from loki_decode may be replayed after)."""
    _PLANS.clear()


def _plan_key(q_rot, k_rot, v, lengths, spec: LokiSpec, scaling: float, stream: int | None, out_dtype: torch.dtype) -> tuple:
    """What a record depends on: shapes, strides, dtypes, devices, 16-byte alignment of every pointer,
    the settings, the output's dtype and the stream (a replay passes raw addresses: nothing checks a
    tensor's device then)."""
    parts = [spec.kf, spec.df, spec.group, scaling, q_rot.device, stream, out_dtype]
    planes = (k_rot.low, k_rot.high) if isinstance(k_rot, LokiKeys) else (k_rot, None)
    for t in (q_rot, *planes, v):
        if t is None:
            parts.append(None)
        else:
            parts += [t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16]
    parts += [lengths.shape, lengths.dtype, lengths.device, lengths.data_ptr() % 16]
    return tuple(parts)


# ----------------------------------------------------------------------------------------------
# Public wrapper


def loki_decode(
    q_rot: torch.Tensor,
    k_rot: Keys,
    v: torch.Tensor,
    lengths: torch.Tensor,
    *,
    spec: LokiSpec,
    scaling: float,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """One Loki decode step: [B, H, D] in out_dtype (float32, or the cache's dtype: the merge rounds
    once as it stores, saving the caller a cast); see the module docstring; d = spec.dims(D)."""
    if out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    if lengths.dtype != torch.int32 or lengths.device != q_rot.device:
        check_inputs(q_rot, k_rot, v, lengths, d=spec.dims(q_rot.shape[-1]))  # range-checks CPU lengths
        lengths = lengths.to(device=q_rot.device, dtype=torch.int32)
    stream = _current_stream(q_rot.device.index) if q_rot.is_cuda else None
    key = _plan_key(q_rot, k_rot, v, lengths, spec, scaling, stream, out_dtype)
    plan = _PLANS.get(key)
    if plan is not None and plan.replay is not None and q_rot.is_cuda and q_rot.is_contiguous() and call_graphs() \
            and not torch.cuda.is_current_stream_capturing():
        graph = plan.call_graph(q_rot, k_rot, v, lengths, scaling, out_dtype)
        if graph is not None:
            return graph(q_rot)
    out = torch.empty(q_rot.shape, dtype=out_dtype, device=q_rot.device)  # [B, H, D]
    if plan is None:
        d = spec.dims(q_rot.shape[-1])
        check_inputs(q_rot, k_rot, v, lengths, d=d)
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.pop(next(iter(_PLANS)))
        plan = _PLANS[key] = _Plan(q_rot, k_rot, spec=spec, d=d)
        plan.record(q_rot, k_rot, v, lengths, out, scaling)
    else:
        plan.run(q_rot, k_rot, v, lengths, out, scaling, stream)
    return out
