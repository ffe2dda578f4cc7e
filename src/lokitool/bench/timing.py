"""Timing on a device: medians of CUDA-graph replays and of plain launches, peak extra memory, the
card's copy bandwidth, and a device synchronization that is a no-op on the CPU."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


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


def time_ms(fn: Callable[[], object], device: torch.device, *, rep_ms: int = 100, graph: bool = True) -> tuple[float, float, float]:
    """(p10, median, p90) milliseconds of fn, timed by triton.testing.do_bench, which flushes the L2
    cache before each call. graph=True: fn captured once in a CUDA graph and replayed, so launch
    overhead stays out, as in a serving loop (falls back to plain calls if capture fails);
    graph=False: plain calls, so host time spent launching shows whenever it exceeds the GPU's.
    On the CPU: wall-clock times of plain calls."""
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
    p10, p50, p90 = do_bench(target, warmup=max(25, rep_ms // 4), rep=rep_ms, quantiles=[0.1, 0.5, 0.9])
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
