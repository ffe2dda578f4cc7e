"""Where a batch-1 attention launch's time goes (issues 12, 13): the full-attention decode kernel of the
static loop (kernels/decode_full.py) and Loki's sparse attention (kernels/attention.py), each at several
split counts under every autotune config, next to SDPA and to plain reads of the same bytes.

For each shape: SDPA; `full_decode` (its kernel and the merge) at split counts around `num_splits`, every
config forced in turn; the sparse attention over the kept rows of a real selection, merged inside the
kernel (as loki_decode runs it) and by the separate merge kernel; torch reads (`sum`) of the K and V bytes
and of the kept rows' bytes laid out contiguously, and an empty launch: what a graph replay of one
launch costs at all. Random fp16 data, kf = df = 0.25; CUDA-graph medians after an L2 flush.

    python benchmarks/attn_lab.py [--shapes llama3-8b:1:32768:kv,...] [--parts full,sparse,reads] --out DIR
    TRITON_INTERPRET=1 python benchmarks/attn_lab.py --device cpu --shapes tiny:1:256:kv   # a dry run
"""

from __future__ import annotations

import torch
import triton
from lokitool.kernels import attention, decode_full, loki_scores, select, split_keys
from lokitool.kernels._common import pow2
from stage_lab import forced, lab_parser, name, run_lab  # benchmarks/: the stage profile's config forcing, options and loop

from lokitool.bench.kernels import Point, make_inputs, sdpa_decode
from lokitool.bench.presets import PRESETS
from lokitool.bench.timing import time_ms
from lokitool.sparse.reference import LokiSpec

DEFAULT_SHAPES = "llama3-8b:1:32768:kv,llama3-8b:1:131072:kv,llama3-8b:16:16384:kv,llama2-13b:1:131072:head"
EXTRA_FULL = [(64, 2, 3), (128, 4, 4), (64, 4, 4), (32, 2, 4), (128, 8, 4)]
EXTRA_SPARSE = [(32, 2, 4), (64, 4, 4), (16, 2, 4)]
TINY = (4, 2, 32)  # --shapes tiny:B:S:group for the CPU dry run: H, Hkv, D


@triton.jit
def _empty_kernel(x_ptr):
    pass


def shape_of(preset: str) -> tuple[int, int, int]:
    return TINY if preset == "tiny" else PRESETS[preset].attention_shape


def measure(preset: str, b: int, s: int, group: str, parts: set, device, log, quick: bool, configs: bool) -> dict:
    h, hkv, dim = shape_of(preset)
    spec = LokiSpec(kf=0.25, df=0.25, group=group)
    p = Point(b, h, hkv, dim, s, spec, torch.float16)
    x = make_inputs(p, device)
    q, kp, v, lengths = x["q"], x["k"], x["v"], x["lengths"]
    scaling = dim**-0.5
    sms = attention.multiprocessors(device)
    out = {"shape": f"{preset}:{b}:{s}:{group}", "kv_mb": p.kv_bytes / 1e6, "attn_mb": p.attn_bytes / 1e6}

    def t(fn) -> float:
        try:
            return time_ms(fn, device, rep_ms=20 if quick else 100)[1]
        except Exception as e:  # a forced config the card cannot run (shared memory, registers)
            log(f"  failed: {type(e).__name__} {str(e)[:100]}")
            return float("nan")
    out["sdpa_ms"] = t(lambda: sdpa_decode(q, kp, v, scaling))
    log(f"{out['shape']}: sdpa {out['sdpa_ms']:.4f} ms ({out['kv_mb'] / out['sdpa_ms'] / 1e3:.2f} TB/s over {out['kv_mb']:.1f} MB)")

    if "reads" in parts:
        e = torch.empty(1, device=device)
        out["empty_launch_ms"] = t(lambda: _empty_kernel[(1,)](e))
        out["sum_kv_ms"] = t(lambda: (kp.sum(), v.sum()))
        kept = max(1, int(p.attn_bytes // (2 * dim * 2)))  # kept rows' bytes as one contiguous block
        flat = torch.cat([kp.flatten(), v.flatten()])[: kept * 2 * dim]
        out["sum_kept_ms"] = t(lambda: flat.sum())
        log(f"  empty launch {out['empty_launch_ms']:.4f} ms; sum(K)+sum(V) {out['sum_kv_ms']:.4f} ms; "
            f"sum over the kept rows' bytes ({flat.numel() * 2 / 1e6:.1f} MB) {out['sum_kept_ms']:.4f} ms")
        del flat

    if "full" in parts:
        base = decode_full.num_splits(b * hkv, s, sms)
        rows = []
        forcing = list(decode_full._full_decode_kernel.configs) + [
            triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=st) for n, w, st in EXTRA_FULL]
        splits = sorted({max(1, base // 4), max(1, base // 2), base, base * 2, base * 4})
        for ns in splits:
            for c in [None] + (forcing if configs else []):
                if c is not None and c.kwargs["BLOCK_N"] * pow2(dim, 16) > 128 * 128:
                    continue
                forced(decode_full._full_decode_kernel, decode_full._FULL, c)
                ms = t(lambda ns=ns: decode_full.full_decode(q, kp, v, lengths, scaling=scaling, nsplit=ns))
                label = "autotuned " + name(decode_full._full_decode_kernel.best_config) if c is None else name(c)
                rows.append({"nsplit": ns, "config": label, "ms": ms})
                log(f"  full nsplit {ns:4}{' <- auto' if ns == base else '        '} {label:38} {ms:.4f} ms "
                    f"{out['kv_mb'] / ms / 1e3:5.2f} TB/s  ({out['sdpa_ms'] / ms:.2f}x sdpa)")
            forced(decode_full._full_decode_kernel, decode_full._FULL, None)
        out["full"] = rows

    if "sparse" in parts:
        k = split_keys(kp, p.d)
        scores = loki_scores(q, k, lengths, d=p.d, group=group)
        budgets = select.decode_budgets(lengths, spec.kf)
        idx = select.select_topk(scores, lengths, budgets, kmax=p.k)
        r = idx.shape[1]
        qps = 1 if group == "head" else h // hkv
        base = attention.num_splits(b * r, p.k, sms)
        rows = []

        def inside(ns):  # merged by each row's last piece, as loki_decode runs it
            o_part = torch.empty(b, h, ns, dim, dtype=torch.float32, device=device)
            lse = torch.empty(b, h, ns, dtype=torch.float32, device=device)
            done = torch.zeros(b * r, dtype=torch.int32, device=device)
            res = torch.empty(b, h, dim, dtype=torch.float16, device=device)
            return lambda: attention._launch(q_rot=q, k_rot=k, v=v, idx=idx, budgets=budgets, o_part=o_part, lse_part=lse,
                                             scaling=scaling, qps=qps, nsplit=ns, out=res, done=done)

        forcing = list(attention._sparse_attention_kernel.configs) + [
            triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=st) for n, w, st in EXTRA_SPARSE]
        for ns in sorted({max(1, base // 4), max(1, base // 2), base, min(256, base * 2)}):
            for c in [None] + (forcing if configs else []):
                forced(attention._sparse_attention_kernel, attention._ATTENTION, c)
                ms = t(inside(ns))
                label = "autotuned " + name(attention._sparse_attention_kernel.best_config) if c is None else name(c)
                sep = t(lambda ns=ns: attention.sparse_decode_attention(q, k, v, idx, budgets, scaling=scaling, group=group, nsplit=ns)) \
                    if c is None else None
                rows.append({"nsplit": ns, "config": label, "merge_inside_ms": ms, "merge_kernel_ms": sep})
                log(f"  sparse nsplit {ns:4}{' <- auto' if ns == base else '        '} {label:38} {ms:.4f} ms "
                    f"{out['attn_mb'] / ms / 1e3:5.2f} TB/s" + (f"; separate merge {sep:.4f} ms" if sep is not None else ""))
            forced(attention._sparse_attention_kernel, attention._ATTENTION, None)
        out["sparse"] = rows
    return out


def main() -> None:
    parser = lab_parser(__doc__, DEFAULT_SHAPES, "reads,full,sparse", "runs/attn_lab",
                        "cpu: a dry run under TRITON_INTERPRET=1 (autotuned configs only)")
    parser.add_argument("--no-configs", action="store_true", help="time the autotuned config only, not each config forced")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    run_lab(args, "attn_lab", lambda preset, b, s, group, device, log: measure(
        preset, b, s, group, parts, device, log, quick=device.type != "cuda", configs=device.type == "cuda" and not args.no_configs))


if __name__ == "__main__":
    main()
