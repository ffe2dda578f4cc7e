"""Timing on a device: medians of CUDA-graph replays and of plain launches, peak extra memory, the
card's copy bandwidth, and a device synchronization that is a no-op on the CPU."""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import torch

from ..errors import UserError


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_cpu(fn: Callable[[], object], rep_ms: int) -> tuple[float, float, float]:
    fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1000
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 200):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    qs = statistics.quantiles(times, n=10)
    return qs[0], statistics.median(times), qs[-1]


def _captured(fn: Callable[[], object], device: torch.device) -> tuple[Callable[[], object], torch.cuda.CUDAGraph] | None:
    """fn captured once in a CUDA graph (its replay, and the graph to keep alive), or None if capture fails."""
    graph = torch.cuda.CUDAGraph()
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            fn()  # warm the caching allocator on the capture stream
            with torch.cuda.graph(graph, stream=stream):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
    except RuntimeError:
        return None
    return graph.replay, graph


L2_FLUSH_BYTES = 256 << 20  # more than any GPU's L2 (H200: 50 MB)
_flush_buffers: dict = {}


def _flush_by_reading(device: torch.device) -> Callable[[], object]:
    """Evict the L2 cache by reading a buffer larger than it: what is left there is clean. (do_bench's
    own flush zeroes its buffer, which leaves the L2 full of dirty lines: the first kernel timed then
    writes up to ~50 MB of someone else's data back to memory as it reads; a decode step, which follows
    layers that mostly read weights, does not. Measured on an H200, that costs SDPA's step 5-10 us and
    Loki's 1-5 us, so it does not flatter Loki.)"""
    buf = _flush_buffers.get(device)
    if buf is None:
        buf = _flush_buffers[device] = torch.ones(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    return lambda: torch.amax(buf)


def _bench(target: Callable[[], object], flush: Callable[[], object], device: torch.device, warmup_ms: int, rep_ms: int) -> list[float]:
    """Milliseconds of each call of target, the L2 flushed before each (do_bench's loop, with our flush)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush()
        target()
    end.record()
    torch.cuda.synchronize(device)
    estimate = max(start.elapsed_time(end) / 5, 1e-3)  # flush included: bounds the loop's length
    n_warmup, n_rep = max(1, int(warmup_ms / estimate)), max(10, min(1000, int(rep_ms / estimate)))
    for _ in range(n_warmup):
        target()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        flush()
        starts[i].record()
        target()
        ends[i].record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def time_ms(fn: Callable[[], object], device: torch.device, *, rep_ms: int = 100, graph: bool = True, flush: str | None = None) -> tuple[float, float, float]:
    """(p10, median, p90) milliseconds of fn, the L2 cache flushed before each call. graph=True: fn
    captured once in a CUDA graph and replayed, so launch overhead stays out, as in a serving loop
    (falls back to plain calls if capture fails); graph=False: plain calls, so host time spent
    launching shows whenever it exceeds the GPU's. flush="read" evicts the L2 by reading a large
    buffer (it is left clean, see _flush_by_reading); "write" is triton.testing.do_bench's own loop
    (it zeroes the buffer, leaving the L2 dirty); the default is $LOKITOOL_L2_FLUSH, else "write", the
    flush every committed figure was timed with. On an H200 a read flush takes 5-10 us off a step for SDPA
    and 1-5 us for Loki (benchmarks/stage_lab.py): Loki's speedups are no larger with it.
    On the CPU: wall-clock times of plain calls."""
    flush = flush or os.environ.get("LOKITOOL_L2_FLUSH", "write")
    if flush not in ("read", "write"):
        raise UserError(f"the L2 flush must be 'read' or 'write' (LOKITOOL_L2_FLUSH), not {flush!r}")
    if device.type != "cuda":
        return _time_cpu(fn, rep_ms)
    from triton.testing import do_bench

    fn()  # compile and autotune outside the graph
    sync(device)
    target, keep = fn, None
    if graph:
        captured = _captured(fn, device)
        if captured is not None:
            target, keep = captured
    warmup = max(25, rep_ms // 4)
    if flush == "write":
        p10, p50, p90 = do_bench(target, warmup=warmup, rep=rep_ms, quantiles=[0.1, 0.5, 0.9])
    else:
        times = _bench(target, _flush_by_reading(device), device, warmup, rep_ms)
        qs = statistics.quantiles(times, n=10)
        p10, p50, p90 = qs[0], statistics.median(times), qs[-1]
    del keep
    return p10, p50, p90


def peak_extra_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Memory fn allocates beyond what is already allocated, at its peak (MiB)."""
    if device.type != "cuda":
        return None
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    sync(device)
    del out
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """GB/s of one large device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    # plain calls: a copy captured in a CUDA graph may run on the copy engines, which are slower
    ms = time_ms(lambda: dst.copy_(src), device, graph=False, rep_ms=300)[1]
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9
