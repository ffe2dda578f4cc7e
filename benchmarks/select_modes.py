"""The two selection modes of kernels/select.py side by side (issue 12): which is faster where.

    python benchmarks/select_modes.py [--shapes llama2-13b:1:32768:head,...] [--out DIR]

For each shape (preset:batch:context:group; keys in the two-plane layout, fp16, kf = df = 0.25, all
sequences full) and each mode that can run it ("row": a program per row, rows up to the register
tile, select.row_cap();
"split": a row over many programs, radix passes phase by phase; "split1": the same in one launch, where
its grid is resident at once (select_radix.programs_per_sm() a multiprocessor); "pivot": select_pivot.py), the median time (CUDA-graph replays, L2 flushed before each,
and plain launches) of the selection alone (select_topk) and of the whole loki_decode step, next to
SDPA over the whole cache; and, per mode, the selection rows whose kept tokens differ from exact
top-k (a stable sort on the GPU: ties to the lower token index, the kernels' rule). `auto` names the
mode that loki_decode picks for the shape (kernels/select.py choose_mode). Writes
select_modes.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from lokitool.kernels import (
    clear_plans,
    decode_budgets,
    kept_mask,
    loki_decode,
    loki_scores,
    select_topk,
    selection_mode,
    split_keys,
)
from lokitool.kernels.select import row_cap

from lokitool.bench.kernels import sdpa_decode
from lokitool.bench.presets import PRESETS
from lokitool.bench.timing import time_ms
from lokitool.fileio import write_text_atomic
from lokitool.sparse.reference import LokiSpec

DEFAULT_SHAPES = (
    "llama2-13b:1:4096:head,llama2-13b:1:16384:head,llama2-13b:1:32768:head,llama2-13b:1:131072:head,"
    "llama3-8b:1:32768:kv,llama3-8b:16:16384:kv,llama2-13b:16:16384:head"
)


VARIANTS = {"row": ("row", "0"), "split": ("split", "0"), "split1": ("split", "1"), "pivot": ("pivot", "0")}  # name: mode, one launch


def exact_mask(scores: torch.Tensor, lengths: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """Exact top-k keep mask [B, R, S]: the budgets[b] largest scores of each row among its first
    lengths[b], ties to the lower token index."""
    b, r, s = scores.shape
    valid = torch.arange(s, device=scores.device)[None, :] < lengths[:, None]
    order = torch.sort(scores.masked_fill(~valid[:, None], float("-inf")), dim=-1, descending=True, stable=True).indices
    rank_ok = torch.arange(s, device=scores.device)[None, None, :] < budgets[:, None, None]
    keep = torch.zeros(b, r, s, dtype=torch.bool, device=scores.device)
    keep.scatter_(-1, order, rank_ok.expand(b, r, s))
    return keep & valid[:, None]


def _decode_ms(step, device) -> tuple[float, float]:
    clear_plans()
    step()
    return time_ms(step, device)[1], time_ms(step, device, graph=False)[1]


def measure(preset: str, b: int, s: int, group: str, device: torch.device, chunks: tuple[int, ...] = (),
            modes: tuple[str, ...] = tuple(VARIANTS), pivot_chunks: tuple[int, ...] = ()) -> dict:
    h, hkv, dim = PRESETS[preset].attention_shape
    spec = LokiSpec(kf=0.25, df=0.25, group=group)
    d, kmax, scaling = spec.dims(dim), spec.max_budget(s), dim**-0.5
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, h, dim, generator=g, device=device).half()
    k_full = torch.randn(b, hkv, s, dim, generator=g, device=device).half()
    k = split_keys(k_full, d)
    v = torch.randn(b, hkv, s, dim, generator=g, device=device).half()
    lengths = torch.full((b,), s, dtype=torch.int32, device=device)
    budgets = decode_budgets(lengths, spec.kf)
    scores = loki_scores(q, k, lengths, d=d, group=group)
    rows = scores.shape[1]
    sdpa = lambda: sdpa_decode(q, k_full, v, scaling)
    out = {
        "preset": preset, "batch": b, "seq_len": s, "group": group, "rows": b * rows,
        "auto": selection_mode(b * rows, s, device),
        "sdpa_ms": time_ms(sdpa, device)[1], "sdpa_plain_ms": time_ms(sdpa, device, graph=False)[1],
    }
    want = exact_mask(scores, lengths, budgets)
    for name, (mode, one_launch) in VARIANTS.items():
        if (mode == "row" and s > row_cap()) or name not in modes:
            continue
        os.environ["LOKITOOL_SELECT"] = mode
        os.environ["LOKITOOL_SPLIT_ONE_LAUNCH"] = one_launch
        sel = lambda mode=mode: select_topk(scores, lengths, budgets, kmax=kmax, mode=mode)
        try:
            idx = sel()
        except ValueError as e:  # one launch does not fit this grid
            print(f"{preset}:{b}:{s}:{group} {name}: {e}")
            continue
        wrong_rows = int((kept_mask(idx, budgets, s) != want).any(-1).sum())
        step = lambda: loki_decode(q, k, v, lengths, spec=spec, scaling=scaling)
        graph_ms, plain_ms = _decode_ms(step, device)
        out[name] = {
            "select_ms": time_ms(sel, device)[1], "decode_ms": graph_ms, "decode_plain_ms": plain_ms,
            "speedup": out["sdpa_ms"] / graph_ms, "plain_speedup": out["sdpa_plain_ms"] / plain_ms,
            "rows_not_exact": wrong_rows,
        }
    os.environ.pop("LOKITOOL_SELECT", None)
    if chunks:
        out["split1_chunks"] = split_chunks(scores, lengths, budgets, kmax, want, chunks, f"{preset}:{b}:{s}:{group}", device)
    if pivot_chunks:
        out["pivot_chunks"] = {}
        os.environ["LOKITOOL_SELECT"] = "pivot"
        for chunk in pivot_chunks:  # the selection alone and whole steps, the pivot mode's chunk forced
            os.environ["LOKITOOL_PIVOT_CHUNK"] = str(chunk)
            clear_plans()
            sel = lambda: select_topk(scores, lengths, budgets, kmax=kmax, mode="pivot")  # noqa: E731
            wrong = int((kept_mask(sel(), budgets, s) != want).any(-1).sum())
            graph_ms, plain_ms = _decode_ms(lambda: loki_decode(q, k, v, lengths, spec=spec, scaling=scaling), device)
            row = out["pivot_chunks"][chunk] = {"select_ms": time_ms(sel, device)[1], "decode_ms": graph_ms, "decode_plain_ms": plain_ms,
                                                "rows_not_exact": wrong}
            print(f"  {preset}:{b}:{s}:{group} pivot chunk {chunk:6d}: select {row['select_ms']:.4f} ms, step {graph_ms:.4f} "
                  f"({out['sdpa_ms'] / graph_ms:.2f}x sdpa), plain {plain_ms:.4f}, rows not exact {wrong}", flush=True)
        os.environ.pop("LOKITOOL_PIVOT_CHUNK")
        os.environ.pop("LOKITOOL_SELECT")
    os.environ.pop("LOKITOOL_SPLIT_ONE_LAUNCH", None)
    clear_plans()
    torch.cuda.empty_cache()
    return out


def split_chunks(scores, lengths, budgets, kmax: int, want, chunks: tuple[int, ...], label: str, device: torch.device) -> dict:
    """The split selection alone, in one launch, at each chunk size whose grid is resident
    (select_radix.programs_per_sm()): {chunk: median ms of CUDA-graph replays}; exactness checked against
    `want` (exact_mask of the same scores)."""
    out = {}
    os.environ["LOKITOOL_SPLIT_ONE_LAUNCH"] = "1"  # refuse, rather than run phase by phase, where it does not fit
    for chunk in chunks:
        sel = lambda chunk=chunk: select_topk(scores, lengths, budgets, kmax=kmax, mode="split", chunk=chunk)
        try:
            wrong = int((kept_mask(sel(), budgets, scores.shape[-1]) != want).any(-1).sum())
        except ValueError as e:
            print(f"  {label} chunk {chunk}: {e}")
            continue
        out[chunk] = time_ms(sel, device)[1]
        print(f"  {label} split1 chunk {chunk:6d}: select {out[chunk]:.4f} ms, rows not exact {wrong}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="preset:batch:context:group, comma-separated")
    parser.add_argument("--out", type=Path, default=Path("runs/select_modes"))
    parser.add_argument("--split-chunks", default="", help="also time the split selection alone in one launch at these chunk sizes (comma-separated)")
    parser.add_argument("--pivot-chunks", default="", help="also time the pivot selection and whole steps at these chunk sizes (comma-separated)")
    parser.add_argument("--modes", default=",".join(VARIANTS), help="the variants to time (comma-separated)")
    args = parser.parse_args()
    device = torch.device("cuda")
    chunks = tuple(int(c) for c in args.split_chunks.split(",")) if args.split_chunks else ()
    results = []
    print(f"{'shape':34} {'auto':5} {'sdpa ms':>8} | {'mode':6} {'select':>7} {'decode':>7} {'plain':>7} {'x sdpa':>6} {'x plain':>7} "
          f"{'rows not exact top-k':>20}")
    for spec in args.shapes.split(","):
        preset, b, s, group = spec.split(":")
        try:
            r = measure(preset, int(b), int(s), group, device, chunks, tuple(args.modes.split(",")),
                        tuple(int(c) for c in args.pivot_chunks.split(",")) if args.pivot_chunks else ())
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            print(f"{spec}: skipped, out of GPU memory")
            continue
        results.append(r)
        for mode in VARIANTS:
            if mode in r:
                m = r[mode]
                print(f"{spec:34} {r['auto']:5} {r['sdpa_ms']:8.4f} | {mode:6} {m['select_ms']:7.4f} {m['decode_ms']:7.4f} "
                      f"{m['decode_plain_ms']:7.4f} {m['speedup']:6.2f} {m['plain_speedup']:7.2f} {m['rows_not_exact']:20d}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "select_modes.json", json.dumps({"gpu": torch.cuda.get_device_name(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
