"""Where the selection's time goes (issue 12): each launch of kernels/select.py's split (radix) and pivot
modes timed as a cumulative prefix (first launch, first two, ...), next to one plain read of the scores,
and how many keys each radix pass still has to consider (keys sharing the threshold's top 8 / 12 / 16 /
24 bits) or a linear value bin holds.

    python benchmarks/select_profile.py [--shapes llama2-13b:16:131072:head,...] [--kf 0.25] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from lokitool.kernels import decode_budgets, kept_mask, loki_scores, select_radix, split_keys
from lokitool.kernels import select as sel
from select_modes import exact_mask  # noqa: E402  (benchmarks/ is the script's folder)

from lokitool.bench.presets import PRESETS
from lokitool.bench.timing import time_ms
from lokitool.fileio import write_text_atomic
from lokitool.sparse.reference import LokiSpec

DEFAULT_SHAPES = "llama2-13b:1:131072:head,llama2-13b:16:131072:head,llama2-13b:16:32768:head,llama2-13b:16:16384:head,llama2-13b:1:16384:head,llama3-8b:16:16384:kv"


def bucket_sizes(scores, budgets) -> dict:
    """Mean fraction of a row's keys that share the k-th largest key's top n bits, or its bin when the
    row's value range is cut into nb equal bins."""
    keys = scores.view(torch.int32)
    keys = torch.where(keys < 0, -(keys & 0x7FFFFFFF), keys).long()
    kth = torch.topk(keys, int(budgets[0]), dim=-1).values[..., -1:]
    out = {}
    for bits in (8, 11, 12, 16, 24):
        shift = 32 - bits
        out[f"top{bits}"] = float(((keys >> shift) == (kth >> shift)).float().mean())
    lo, hi = scores.amin(-1, keepdim=True), scores.amax(-1, keepdim=True)
    thr = torch.topk(scores, int(budgets[0]), dim=-1).values[..., -1:]
    for nb in (256, 1024, 4096):
        binf = lambda x: ((x - lo) / (hi - lo) * nb).long().clamp(max=nb - 1)  # noqa: E731
        out[f"linear{nb}"] = float((binf(scores) == binf(thr)).float().mean())
    return out


def variants(s: int) -> list:
    """(mode, chunk, sample) to time: the radix passes phase by phase (select_radix.py: 4 x 8 bits, then the
    write), pivot selection at its default chunk (select.pivot_chunk) and at the split mode's chunk and
    those around it, and at three sample sizes. (Other digit widths were timed in an earlier version:
    reports/bench/select-profile/digits.log.)"""
    base = select_radix.split_chunk(s)
    chunks = sorted({sel.pivot_chunk(s), max(256, base // 2), base, min(16384, base * 2)})
    return [("split", base, None)] + [("pivot", c, None) for c in chunks] + [("pivot", base, m) for m in (1024, 2048, 4096)]


def measure(preset: str, b: int, s: int, group: str, device, kf: float = 0.25) -> dict:
    h, hkv, dim = PRESETS[preset].attention_shape
    spec = LokiSpec(kf=kf, df=0.25, group=group)
    d, kmax = spec.dims(dim), spec.max_budget(s)
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, h, dim, generator=g, device=device).half()
    k = split_keys(torch.randn(b, hkv, s, dim, generator=g, device=device).half(), d)
    lengths = torch.full((b,), s, dtype=torch.int32, device=device)
    budgets = decode_budgets(lengths, spec.kf)
    scores = loki_scores(q, k, lengths, d=d, group=group)
    del k
    rows = scores.shape[1]
    idx = torch.empty(b, rows, kmax, dtype=torch.int32, device=device)
    out = {"shape": f"{preset}:{b}:{s}:{group}", "kf": kf, "rows": b * rows, "scores_mb": scores.numel() * 4 / 1e6,
           "read_ms": time_ms(lambda: scores.sum(), device)[1], "buckets": bucket_sizes(scores, budgets)}
    want = exact_mask(scores, lengths, budgets)
    out["split"] = []
    for mode, chunk, sample in variants(s):
        extra = {"one_launch": False} if mode == "split" else {"sample": sample} if sample else {"kf": kf}
        plan = sel.SelectPlan(b, rows, s, device, mode=mode, chunk=chunk, **extra)
        steps = sel._steps(scores=scores, lengths=lengths, budgets=budgets, idx=idx, plan=plan)
        prefix = []
        for n in range(1, len(steps) + 1):
            run = lambda n=n: [f() for f in steps[:n]]
            prefix.append(time_ms(run, device)[1])
        [f() for f in steps]
        wrong = int((kept_mask(idx, budgets, s) != want).any(-1).sum())
        steps_ms = [prefix[0]] + [prefix[i] - prefix[i - 1] for i in range(1, len(prefix))]
        name = f"{mode} {'8-8-8-8' if mode == 'split' else f'm{plan.sample}'} ch{plan.chunk}"
        out["split"].append({"mode": mode, "chunk": plan.chunk, "sample": getattr(plan, "sample", None), "total_ms": prefix[-1], "step_ms": steps_ms,
                             "rows_not_exact": wrong})
        print(f"  {out['shape']:28} {name:22}: {prefix[-1]:.4f} ms ({' '.join(f'{x:.4f}' for x in steps_ms)}) not exact {wrong}", flush=True)
    if s <= sel.row_cap():
        out["row_ms"] = time_ms(lambda: sel.select_topk(scores, lengths, budgets, kmax=kmax, mode="row"), device)[1]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES)
    parser.add_argument("--out", type=Path, default=Path("runs/select_profile"))
    parser.add_argument("--kf", type=float, default=0.25, help="budget share (the pivot sample's size follows it)")
    args = parser.parse_args()
    device = torch.device("cuda")
    results = []
    for shape in args.shapes.split(","):
        preset, b, s, group = shape.split(":")
        r = measure(preset, int(b), int(s), group, device, args.kf)
        results.append(r)
        print(json.dumps(r), flush=True)
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "select_profile.json", json.dumps({"gpu": torch.cuda.get_device_name(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
