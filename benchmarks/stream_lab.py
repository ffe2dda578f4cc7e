"""Loki decode with its rows split into parts on parallel streams (issue 12): does one part's selection,
which reads little and keeps few programs busy, overlap another part's score or attention reads?

For each shape: SDPA, loki_decode over the whole batch, and for each split count P the same step as P
loki_decode calls over P parts of the rows (batch halves, or KV-head parts at batch 1), issued on one
stream (the cost of smaller launches alone) and on P streams forked from and joined to the caller's (the
overlap). CUDA-graph medians after do_bench's L2 flush, in one process; every split's output checked
against the whole call's. Parts run the three stages (LOKITOOL_FUSED_STEP=0, LOKITOOL_SPLIT_ONE_LAUNCH=0):
kernels that wait at grid barriers must not share the card with another kernel.

    python benchmarks/stream_lab.py [--shapes llama2-13b:16:65536:head,...] [--splits 2,4] --out DIR
"""

from __future__ import annotations

import os

import torch
from lokitool.kernels import clear_plans, decode_path, loki_decode
from lokitool.kernels.layout import LokiKeys
from stage_lab import lab_parser, lab_shape, run_lab

from lokitool.bench.timing import time_ms

DEFAULT_SHAPES = ("llama2-13b:16:65536:head,llama2-13b:16:16384:head,llama3-8b:16:16384:kv,llama2-13b:1:32768:head,"
                  "llama2-13b:1:131072:head,llama3-8b:1:131072:kv")


def parts(q, k: LokiKeys, v, lengths, n: int) -> list[tuple]:
    """n parts of the rows: batch slices where the batch divides, else KV-head slices (with their query heads)."""
    b, h, _ = q.shape
    hkv = v.shape[1]
    if b % n == 0 and b >= n:
        cut = [slice(i * b // n, (i + 1) * b // n) for i in range(n)]
        return [(q[c], LokiKeys(k.low[c], k.high[c]), v[c], lengths[c]) for c in cut]
    assert b == 1 and hkv % n == 0, (b, hkv, n)
    g = h // hkv
    cut = [slice(i * hkv // n, (i + 1) * hkv // n) for i in range(n)]
    return [(q[:, c.start * g:c.stop * g], LokiKeys(k.low[:, c], k.high[:, c]), v[:, c], lengths) for c in cut]


def measure(preset: str, b: int, s: int, group: str, splits: list[int], device, log) -> dict:
    x = lab_shape(preset, b, s, group, device)
    spec, q, k, v, lengths, scaling = x.spec, x.q, x.k, x.v, x.lengths, x.scaling
    h, hkv = x.p.heads, x.p.kv_heads
    out = {"shape": f"{preset}:{b}:{s}:{group}", "sdpa_ms": x.sdpa_ms}
    clear_plans()
    whole = lambda: loki_decode(q, k, v, lengths, spec=spec, scaling=scaling)  # noqa: E731
    want = whole()
    out["loki_ms"] = time_ms(whole, device)[1]
    out["loki_path"] = decode_path(b * (hkv if group == "kv" else h), s, device)
    os.environ.update(LOKITOOL_FUSED_STEP="0", LOKITOOL_SPLIT_ONE_LAUNCH="0")
    clear_plans()
    out["stages_ms"] = time_ms(whole, device)[1]
    log(f"{out['shape']}: sdpa {out['sdpa_ms']:.4f} ms, loki ({out['loki_path']}) {out['loki_ms']:.4f} "
        f"({out['sdpa_ms'] / out['loki_ms']:.2f}x), three stages in one launch each {out['stages_ms']:.4f}")
    out["splits"] = []
    for n in splits:
        if not (b % n == 0 and b >= n) and not (b == 1 and hkv % n == 0):
            continue
        pieces = parts(q, k, v, lengths, n)
        streams = [torch.cuda.Stream(device) for _ in range(n - 1)] if device.type == "cuda" else []

        def serial(pieces=pieces):
            return [loki_decode(*piece, spec=spec, scaling=scaling) for piece in pieces]

        def parallel(pieces=pieces, streams=streams):
            main = torch.cuda.current_stream(device)
            outs = []
            for piece, st in zip(pieces[1:], streams):
                st.wait_stream(main)
                with torch.cuda.stream(st):
                    outs.append(loki_decode(*piece, spec=spec, scaling=scaling))
            outs.insert(0, loki_decode(*pieces[0], spec=spec, scaling=scaling))
            for st in streams:
                main.wait_stream(st)
            return outs

        row = {"parts": n}
        for name, fn in (("one_stream", serial), ("streams", parallel)) if streams else (("one_stream", serial),):
            got = torch.cat(fn(), dim=0 if b > 1 else 1)
            row[f"{name}_err"] = err = (got - want).abs().max().item()
            row[f"{name}_ms"] = ms = time_ms(fn, device)[1]
            log(f"  {n} parts, {name.replace('_', ' ')}: {ms:.4f} ms ({out['sdpa_ms'] / ms:.2f}x sdpa, "
                f"{out['loki_ms'] / ms:.2f}x loki), max diff from the whole call {err:.1e}")
        out["splits"].append(row)
    os.environ.pop("LOKITOOL_FUSED_STEP")
    os.environ.pop("LOKITOOL_SPLIT_ONE_LAUNCH")
    clear_plans()
    return out


def main() -> None:
    parser = lab_parser(__doc__, DEFAULT_SHAPES, "none", "runs/stream_lab", "cpu: a dry run under TRITON_INTERPRET=1")
    parser.add_argument("--splits", default="2,4")
    args = parser.parse_args()
    splits = [int(n) for n in args.splits.split(",")]
    run_lab(args, "stream_lab", lambda preset, b, s, group, device, log: measure(preset, b, s, group, splits, device, log))


if __name__ == "__main__":
    main()
