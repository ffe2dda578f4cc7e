"""Where one decode step of the static loop spends its GPU time, kernel by kernel (issue 13).

    python benchmarks/e2e_profile.py [--model llama3-8b] [--batch 16] [--context 16384] [--group kv]
                                     [--compile] [--steps 8] [--out DIR]

For full attention and for Loki (kf = df = 0.25; random weights, the cache filled with random keys and
values: decode speed does not depend on what it holds), the step is captured as one CUDA graph, replayed
`--steps` times under torch.profiler, and the GPU kernels of the trace are summed by name: microseconds
and launches per step, each kernel put in a class (matrix multiplies, our Triton kernels, compiled
fusions, other). The table shows what Loki's step adds and removes next to full attention's. Writes
DIR/e2e_profile.json and the two Chrome traces.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
from pathlib import Path

import torch

from lokitool.bench.presets import random_model
from lokitool.fileio import write_text_atomic
from lokitool.sparse import generation as gen
from lokitool.sparse import static
from lokitool.sparse.reference import LokiSpec


def kind(name: str) -> str:
    """A kernel's class, from its name."""
    low = name.lower()
    if any(t in low for t in ("gemm", "gemv", "cutlass", "nvjet", "xmma", "cublas", "splitk")):
        return "matmul"
    if name.startswith("_"):  # kernels/*.py name their kernels _..._kernel
        return "lokitool"
    if name.startswith("triton_"):
        return "compiled"
    return "other"


def kernel_table(trace: Path, steps: int) -> dict[str, dict]:
    """{kernel name: {us, launches}} per step, from a Chrome trace's kernel events."""
    events = json.loads(trace.read_text())["traceEvents"]
    us, n = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy") and "dur" in e:
            us[e["name"]] += e["dur"]
            n[e["name"]] += 1
    return {name: {"us": us[name] / steps, "launches": n[name] / steps, "kind": kind(name)} for name in us}


def profile(method: str, args, loaded, out: Path) -> dict[str, dict]:
    model, facts = loaded.model, loaded.facts
    device = torch.device("cuda")
    spec = LokiSpec(kf=0.25, df=0.25, basis="random", group=args.group).for_decoding() if method == "loki" else None
    bases = gen.loki_bases(spec, None, facts) if spec is not None else None
    cache = static.StaticCache(facts, batch=args.batch, capacity=args.context + 3 * args.steps + 8, dtype=model.dtype,
                               device=device, bases=bases, spec=spec)
    compiled = static.compiled_parts(model) if args.compile else contextlib.nullcontext()
    with compiled, static.static_attention(model, cache), static.decode_projections(model, device), torch.no_grad():
        decoder = static.StaticDecoder(model, cache)
        cache.fill_random(args.context, torch.Generator(device).manual_seed(0))
        decoder.step()  # compiles and autotunes (plain)
        decoder.capture()
        for _ in range(3):
            decoder.step()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.steps):
            decoder.step()
        end.record()
        torch.cuda.synchronize()
        step_ms = start.elapsed_time(end) / args.steps
        trace = out / f"trace_{method}.json"
        replays = True
        for replays in (True, False):  # kernels inside graph replays, else (a profiler that misses them) plain steps
            if not replays:
                decoder.graph = None
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(args.steps):
                    decoder.step()
                torch.cuda.synchronize()
            prof.export_chrome_trace(str(trace))
            table = kernel_table(trace, args.steps)
            if table:
                break
    del decoder, cache
    torch.cuda.empty_cache()
    return {"step_ms": step_ms, "kernels": table, "profiled": "graph replays" if replays else "plain steps"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=16384)
    parser.add_argument("--group", default="kv", choices=["kv", "head"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path("runs/e2e_profile"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    loaded = random_model(args.model, torch.device("cuda"), torch.float16)
    results = {m: profile(m, args, loaded, args.out) for m in ("full", "loki")}
    print(f"{args.model} batch {args.batch} context {args.context} group {args.group} compile {args.compile}")
    for m, r in results.items():
        by_kind = collections.Counter()
        launches = 0.0
        for k in r["kernels"].values():
            by_kind[k["kind"]] += k["us"]
            launches += k["launches"]
        busy = sum(by_kind.values())
        print(f"{m}: step {r['step_ms']:.3f} ms (event timing), {r['profiled']}: kernels {busy / 1e3:.3f} ms in {launches:.0f} launches; "
              + ", ".join(f"{kd} {v / 1e3:.3f}" for kd, v in by_kind.most_common()))
        r["by_kind_ms"] = {kd: v / 1e3 for kd, v in by_kind.items()}
        r["launches"] = launches
    names = set(results["full"]["kernels"]) | set(results["loki"]["kernels"])
    rows = []
    for name in names:
        f = results["full"]["kernels"].get(name, {"us": 0.0, "launches": 0.0})
        lk = results["loki"]["kernels"].get(name, {"us": 0.0, "launches": 0.0})
        rows.append((max(f["us"], lk["us"]), name, f, lk))
    print(f"{'kernel':70} {'kind':8} {'full us':>9} {'n':>5} {'loki us':>9} {'n':>5}")
    for _, name, f, lk in sorted(rows, reverse=True)[: args.top]:
        print(f"{name[:70]:70} {kind(name):8} {f['us']:9.1f} {f['launches']:5.0f} {lk['us']:9.1f} {lk['launches']:5.0f}")
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}}
    write_text_atomic(args.out / "e2e_profile.json", json.dumps({**meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
