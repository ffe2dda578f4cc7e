"""Host time of one `loki_decode` call (issue 12): what a decode step costs the CPU when it is not
replayed from a CUDA graph.

    python benchmarks/host_overhead.py [--calls 200] [--out DIR]

For each shape (keys in the two-plane layout, fp16, kf = df = 0.25, all sequences full):
    host_us   median over `calls` of the wall time of one call, the device synchronized before it
              (the launch queue empty) and not after: the CPU's share alone. Every call brings the
              same tensors, so loki_decode replays its call graph (kernels/loki_decode.py _CallGraph)
    launches_us  the same with LOKITOOL_CALL_GRAPHS=0: the plan's recorded launches one by one
    eager_us  `calls` calls back to back, synchronized only at the ends, per call: what an eager
              decode loop gets (the larger of host and GPU time per call)
    graph_us  the same call captured once in a CUDA graph, `calls` replays, per replay: GPU time
and the host time of each stage wrapper on its own. For comparison, the same step two other ways:
    stages_us the public stage wrappers in a row (decode_budgets, loki_scores, select_topk,
              sparse_decode_attention): pinned configs, but Triton's own launch path and fresh
              scratch each call, no plan
    before_us the step as loki_decode ran it before the host-overhead work: input checks, budgets
              by five torch ops, every autotuned kernel launched through the autotuner, the SM
              count asked each call
Autotuning is off (LOKITOOL_AUTOTUNE=0): host time does not depend on the config chosen.
Writes host_overhead.json to --out. Needs a CUDA GPU; with --smoke it runs a tiny shape on the
CPU interpreter to check that the script works (its times mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("LOKITOOL_AUTOTUNE", "0")

import torch  # noqa: E402
from lokitool.kernels import (  # noqa: E402  # noqa: E402
    _common,
    attention,
    check_inputs,
    clear_plans,
    decode_budgets,
    loki_decode,
    loki_scores,
    select_topk,
    sparse_decode_attention,
    split_keys,
)

from lokitool.bench.environment import environment  # noqa: E402
from lokitool.bench.presets import PRESETS  # noqa: E402
from lokitool.sparse import reference as ref  # noqa: E402
from lokitool.sparse.reference import LokiSpec  # noqa: E402

SHAPES = [  # preset, batch, context, group
    ("llama2-13b", 16, 16384, "head"),
    ("llama2-13b", 1, 16384, "head"),
    ("llama3-8b", 16, 16384, "kv"),
    ("llama2-13b", 1, 65536, "head"),  # split selection (rows past the register tile)
    ("llama3-8b", 1, 32768, "kv"),  # split selection, the merge kernel (group kv)
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_us(fn, device: torch.device, calls: int) -> float:
    times = []
    for _ in range(calls):
        sync(device)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    sync(device)
    return statistics.median(times) * 1e6


def eager_us(fn, device: torch.device, calls: int) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls * 1e6


def graph_us(fn, device: torch.device, calls: int) -> float | None:
    if device.type != "cuda":
        return None
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()
        with torch.cuda.graph(graph, stream=stream):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph.replay()
    return eager_us(graph.replay, device, calls)


def staged(q, k, v, lengths, spec: LokiSpec, scaling: float) -> torch.Tensor:
    """One decode step through the public stage wrappers."""
    d = spec.dims(q.shape[-1])
    budgets = decode_budgets(lengths, spec.kf)
    scores = loki_scores(q, k, lengths, d=d, group=spec.group)
    idx = select_topk(scores, lengths, budgets, kmax=spec.max_budget(k.shape[2]))
    return sparse_decode_attention(q, k, v, idx, budgets, scaling=scaling, group=spec.group)


def before(q, k, v, lengths, spec: LokiSpec, scaling: float) -> torch.Tensor:
    """loki_decode as it was (run inside `old_launches`)."""
    d = spec.dims(q.shape[-1])
    check_inputs(q, k, v, lengths, d=d)
    lengths = lengths.to(device=q.device, dtype=torch.int32)
    budgets = ref.decode_budget(lengths, spec.kf).to(torch.int32)
    scores = loki_scores(q, k, lengths, d=d, group=spec.group)
    idx = select_topk(scores, lengths, budgets, kmax=spec.max_budget(k.shape[2]))
    return sparse_decode_attention(q, k, v, idx, budgets, scaling=scaling, group=spec.group)


@contextlib.contextmanager
def launch_by_launch():
    """loki_decode without its call graphs (LOKITOOL_CALL_GRAPHS=0): the plan's launches one by one."""
    saved = os.environ.get("LOKITOOL_CALL_GRAPHS")
    os.environ["LOKITOOL_CALL_GRAPHS"] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["LOKITOOL_CALL_GRAPHS"]
        else:
            os.environ["LOKITOOL_CALL_GRAPHS"] = saved


@contextlib.contextmanager
def old_launches():
    """Launches as they were: through the autotuner, the SM count asked each call."""
    saved = (_common.Pinned.launch, attention.multiprocessors)
    _common.Pinned.launch = lambda self, grid, dtypes, **args: self.kernel[grid](**args)
    attention.multiprocessors = lambda device: torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    try:
        yield
    finally:
        _common.Pinned.launch, attention.multiprocessors = saved


def measure(preset: str, b: int, s: int, group: str, device: torch.device, calls: int) -> dict:
    h, hkv, dim = PRESETS[preset].attention_shape
    spec = LokiSpec(kf=0.25, df=0.25, group=group)
    d, kmax, scaling = spec.dims(dim), spec.max_budget(s), dim**-0.5
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, h, dim, generator=g, device=device).half()
    k = split_keys(torch.randn(b, hkv, s, dim, generator=g, device=device).half(), d)
    v = torch.randn(b, hkv, s, dim, generator=g, device=device).half()
    lengths = torch.full((b,), s, dtype=torch.int32, device=device)
    step = lambda: loki_decode(q, k, v, lengths, spec=spec, scaling=scaling)  # noqa: E731
    out = step()  # compile, pin, record
    out2 = step()  # replay
    stage_step = lambda: staged(q, k, v, lengths, spec, scaling)  # noqa: E731
    via_stages = stage_step()
    old_step = lambda: before(q, k, v, lengths, spec, scaling)  # noqa: E731
    with launch_by_launch():
        launches_host, launches_eager = host_us(step, device, calls), eager_us(step, device, calls)
    with old_launches():
        old = old_step()
        before_host = host_us(old_step, device, calls)
        before_eager = eager_us(old_step, device, calls)
    budgets = decode_budgets(lengths, spec.kf)
    scores = loki_scores(q, k, lengths, d=d, group=group)
    idx = select_topk(scores, lengths, budgets, kmax=kmax)
    stages = {
        "budgets": lambda: decode_budgets(lengths, spec.kf),
        "scores": lambda: loki_scores(q, k, lengths, d=d, group=group),
        "select": lambda: select_topk(scores, lengths, budgets, kmax=kmax),
        "attention": lambda: sparse_decode_attention(q, k, v, idx, budgets, scaling=scaling, group=group),
        "torch.empty": lambda: torch.empty(b, h, s, dtype=torch.float32, device=device),
    }
    row = {
        "preset": preset, "batch": b, "seq_len": s, "heads": h, "kv_heads": hkv, "head_dim": dim, "group": group, "calls": calls,
        # the same step, rounded differently where a merge's sum runs in another kernel or config: not bit-equal
        "max_diff_vs_before": max(float((x - old).abs().max()) for x in (out, out2, via_stages)),
        "host_us": host_us(step, device, calls), "eager_us": eager_us(step, device, calls), "graph_us": graph_us(step, device, calls),
        "launches_host_us": launches_host, "launches_eager_us": launches_eager,
        "stages_host_us": host_us(stage_step, device, calls), "stages_eager_us": eager_us(stage_step, device, calls),
        "before_host_us": before_host, "before_eager_us": before_eager,
        "stage_host_us": {name: host_us(fn, device, calls) for name, fn in stages.items()},
    }
    del q, k, v
    clear_plans()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("runs/host_overhead"))
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU interpreter (checks the script only)")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    shapes = [("tiny", 2, 64, "head"), ("tiny", 2, 64, "kv")] if args.smoke else SHAPES
    calls = 3 if args.smoke else args.calls
    env = environment(device)
    rows = [measure(*shape, device=device, calls=calls) for shape in shapes]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "host_overhead.json").write_text(json.dumps({"environment": env.__dict__, "rows": rows}, indent=2) + "\n")
    print(f"{env.gpu}: torch {env.torch}, triton {env.triton}, CUDA {env.cuda}, git {env.git}")
    print("host = CPU time of one call (queue empty); eager = back-to-back calls, per call; graph = per replay (GPU time);\n"
          "loki_decode as it runs (its call graph from the third call), launch by launch (LOKITOOL_CALL_GRAPHS=0), the\n"
          "stage wrappers, and the path before the host-overhead work; max diff = against that path")
    print(f"{'shape':28s} {'host us':>8s} {'launches':>8s} {'stages':>8s} {'before':>8s} {'eager us':>9s} {'launches':>8s} "
          f"{'stages':>8s} {'before':>8s} {'graph us':>9s} {'max diff':>9s}  stage wrappers, host us")
    for r in rows:
        shape = f"{r['preset']} B={r['batch']} S={r['seq_len']} {r['group']}"
        graph = f"{r['graph_us']:9.1f}" if r["graph_us"] is not None else f"{'-':>9s}"
        stages = " ".join(f"{k}={v:.1f}" for k, v in r["stage_host_us"].items())
        print(f"{shape:28s} {r['host_us']:8.1f} {r['launches_host_us']:8.1f} {r['stages_host_us']:8.1f} {r['before_host_us']:8.1f} "
              f"{r['eager_us']:9.1f} {r['launches_eager_us']:8.1f} {r['stages_eager_us']:8.1f} {r['before_eager_us']:8.1f} {graph} "
              f"{r['max_diff_vs_before']:9.2e}  {stages}")


if __name__ == "__main__":
    main()
