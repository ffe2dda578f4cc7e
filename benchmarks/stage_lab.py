"""Where a Loki decode step's time goes, stage by stage, and which launch settings move it (issue 12).

For each shape: SDPA and the whole loki_decode (CUDA-graph medians), then each stage timed alone with
every autotune config forced in turn (score, attention), the attention at several split counts and on
contiguous kept rows (the same bytes without the gather's scatter), the selection's launches as cumulative
prefixes, and plain reads of the same bytes as a bandwidth reference. Random fp16 data, kf = df = 0.25.

    python benchmarks/stage_lab.py [--shapes llama3-8b:16:16384:kv,...] [--parts score,select,attn] --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
import triton
from lokitool.kernels import attention, decode_budgets, decode_path, loki_decode, loki_scores, score, split_keys
from lokitool.kernels import select as sel
from lokitool.kernels._common import pow2

from lokitool.bench.kernels import Point, make_inputs, sdpa_decode
from lokitool.bench.presets import PRESETS
from lokitool.bench.timing import time_ms
from lokitool.fileio import write_text_atomic
from lokitool.sparse.reference import LokiSpec

DEFAULT_SHAPES = "llama3-8b:16:16384:kv,llama3-8b:1:32768:kv,llama2-13b:1:32768:head,llama2-13b:16:65536:head"
EXTRA_SCORE = [(512, 2, 8, 1), (512, 4, 8, 1), (512, 1, 4, 1), (256, 8, 8, 1), (128, 8, 4, 1), (512, 2, 4, 3)]
EXTRA_ATTN = [(32, 4, 4), (64, 4, 5), (32, 2, 4), (64, 8, 3), (16, 4, 6)]


def forced(kernel, pinned, config):
    """Pin an autotuned kernel to one config (None: restore its list and retune)."""
    if not hasattr(kernel, "_lab_configs"):
        kernel._lab_configs = list(kernel.configs)
    kernel.configs = [config] if config is not None else kernel._lab_configs
    kernel.cache.clear()
    pinned.configs.clear()


def name(c) -> str:
    return " ".join(f"{k}={v}" for k, v in c.kwargs.items()) + f" w{c.num_warps} s{c.num_stages}"


def measure(preset: str, b: int, s: int, group: str, parts: set, device, log) -> dict:
    x = lab_shape(preset, b, s, group, device)
    p, spec, q, k, v, lengths, scaling = x.p, x.spec, x.q, x.k, x.v, x.lengths, x.scaling  # p: bench's point, its byte counts
    h, hkv = p.heads, p.kv_heads
    d, kmax = p.d, p.k
    out = {"shape": f"{preset}:{b}:{s}:{group}", "d": d, "k": kmax}
    kv_mb = p.kv_bytes / 1e6
    out["sdpa_ms"] = x.sdpa_ms
    out["sum_low_ms"] = time_ms(lambda: k.low.sum(), device)[1]
    out["loki_ms"] = time_ms(lambda: loki_decode(q, k, v, lengths, spec=spec, scaling=scaling), device)[1]
    out["loki_plain_ms"] = time_ms(lambda: loki_decode(q, k, v, lengths, spec=spec, scaling=scaling), device, graph=False)[1]
    out["path"] = decode_path(b * (h if group == "head" else hkv), s, device)
    log(f"{out['shape']} [{out['path']}]: sdpa {out['sdpa_ms']:.4f} ms ({kv_mb / out['sdpa_ms'] / 1e3:.2f} TB/s), loki {out['loki_ms']:.4f} "
        f"({out['sdpa_ms'] / out['loki_ms']:.2f}x) plain {out['loki_plain_ms']:.4f}; sum(low) {out['sum_low_ms']:.4f} ms")

    score_mb = p.score_bytes / 1e6
    if "score" in parts:
        rows = []
        configs = list(score._score_kernel.configs) + [triton.Config({"BLOCK_S": a, "STEPS": st}, num_warps=w, num_stages=ns)
                                                        for a, st, w, ns in EXTRA_SCORE]
        for c in [None] + configs:
            if c is not None and c.kwargs["BLOCK_S"] * pow2(d, 16) > 16384:  # score._prune's bound
                continue
            forced(score._score_kernel, score._SCORE, c)
            ms = time_ms(lambda: loki_scores(q, k, lengths, d=d, group=group), device)[1]
            label = "autotuned " + name(score._score_kernel.best_config) if c is None else name(c)
            rows.append({"config": label, "ms": ms, "tbps": score_mb / ms / 1e3})
            log(f"  score {label:40} {ms:.4f} ms {score_mb / ms / 1e3:5.2f} TB/s")
        forced(score._score_kernel, score._SCORE, None)
        out["score"] = rows

    scores = loki_scores(q, k, lengths, d=d, group=group)
    budgets = decode_budgets(lengths, spec.kf)
    rows_sel = scores.shape[1]
    idx = torch.empty(b, rows_sel, kmax, dtype=torch.int32, device=device)
    if "select" in parts:
        mode = sel.selection_mode(b * rows_sel, s, device)
        res = []
        fits_row = s <= sel.row_cap()
        for m in {mode, "row" if fits_row else "pivot", "split"}:
            plan = sel.SelectPlan(b, rows_sel, s, device, mode=m)
            steps = sel._steps(scores=scores, lengths=lengths, budgets=budgets, idx=idx, plan=plan)
            prefix = [time_ms(lambda n=n: [f() for f in steps[:n]], device)[1] for n in range(1, len(steps) + 1)]
            steps_ms = [prefix[0]] + [prefix[i] - prefix[i - 1] for i in range(1, len(prefix))]
            res.append({"mode": m, "total_ms": prefix[-1], "step_ms": steps_ms})
            log(f"  select {m:6} {prefix[-1]:.4f} ms ({' '.join(f'{x:.4f}' for x in steps_ms)})" + (" <- auto" if m == mode else ""))
        if fits_row:
            plan = sel.SelectPlan(b, rows_sel, s, device, mode="row")
            for c in [None] + list(sel._select_kernel.configs):
                forced(sel._select_kernel, sel._SELECT, c)
                steps = sel._steps(scores=scores, lengths=lengths, budgets=budgets, idx=idx, plan=plan)
                try:
                    ms = time_ms(steps[0], device)[1]
                except Exception as e:  # a config the row tile cannot take
                    log(f"  select row {name(c) if c else 'autotuned'}: {type(e).__name__}")
                    continue
                label = "autotuned " + name(sel._select_kernel.best_config) if c is None else name(c)
                res.append({"mode": "row kernel", "config": label, "ms": ms})
                log(f"  select row kernel {label:36} {ms:.4f} ms")
            forced(sel._select_kernel, sel._SELECT, None)
        out["select"] = res

    idx = sel.select_topk(scores, lengths, budgets, kmax=kmax)
    if "attn" in parts:
        attn_mb = p.attn_bytes / 1e6
        base = attention.num_splits(b * rows_sel, kmax, attention.multiprocessors(device))
        contiguous = torch.arange(kmax, dtype=torch.int32, device=device).expand(b, rows_sel, kmax).contiguous()
        res = []

        def run(nsplit, which):
            return lambda: attention.sparse_decode_attention(q, k, v, which, budgets, scaling=scaling, group=group, nsplit=nsplit)

        configs = list(attention._sparse_attention_kernel.configs) + [
            triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=st) for n, w, st in EXTRA_ATTN]
        for c in [None] + configs:
            forced(attention._sparse_attention_kernel, attention._ATTENTION, c)
            try:
                ms = time_ms(run(base, idx), device)[1]
            except Exception as e:
                log(f"  attn {name(c)}: {type(e).__name__} {str(e)[:80]}")
                continue
            label = "autotuned " + name(attention._sparse_attention_kernel.best_config) if c is None else name(c)
            res.append({"config": label, "nsplit": base, "ms": ms, "tbps": attn_mb / ms / 1e3})
            log(f"  attn {label:34} nsplit {base:3} {ms:.4f} ms {attn_mb / ms / 1e3:5.2f} TB/s")
        forced(attention._sparse_attention_kernel, attention._ATTENTION, None)
        for ns in sorted({max(1, base // 2), base * 2, base * 4, min(64, base * 8)}):
            ms = time_ms(run(ns, idx), device)[1]
            res.append({"config": "autotuned", "nsplit": ns, "ms": ms, "tbps": attn_mb / ms / 1e3})
            log(f"  attn autotuned nsplit {ns:3} {ms:.4f} ms {attn_mb / ms / 1e3:5.2f} TB/s")
        ms = time_ms(run(base, contiguous), device)[1]
        res.append({"config": "autotuned, contiguous rows", "nsplit": base, "ms": ms, "tbps": attn_mb / ms / 1e3})
        log(f"  attn contiguous kept rows nsplit {base} {ms:.4f} ms {attn_mb / ms / 1e3:5.2f} TB/s")
        out["attn"] = res
        out["attn_mb"] = attn_mb
    out["score_mb"] = score_mb
    return out


def open_log(out: Path, name: str, device: torch.device) -> tuple[Callable[[str], None], str]:
    """(log, card name): log prints a line and appends it to out/name; its first line names the card and
    the versions. The labs of this folder share it (attn_lab.py)."""
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / name, "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    log(f"{gpu} torch {torch.__version__} triton {triton.__version__}")
    return log, gpu


def shapes(text: str) -> list[tuple[str, int, int, str]]:
    """--shapes preset:batch:context:group,... as tuples."""
    return [(preset, int(b), int(s), group) for preset, b, s, group in (shape.split(":") for shape in text.split(","))]


def lab_shape(preset: str, b: int, s: int, group: str, device) -> SimpleNamespace:
    """A lab's inputs at one shape (bench's Point and make_inputs: random fp16, kf = df = 0.25, sequences
    full), the keys in the two-plane layout, and SDPA's median over the plain keys, which are then freed:
    .p, .spec, .q, .k, .v, .lengths, .scaling, .sdpa_ms."""
    h, hkv, dim = PRESETS[preset].attention_shape
    spec = LokiSpec(kf=0.25, df=0.25, group=group)
    p = Point(b, h, hkv, dim, s, spec, torch.float16)
    x = make_inputs(p, device)
    scaling = dim**-0.5
    sdpa_ms = time_ms(lambda: sdpa_decode(x["q"], x["k"], x["v"], scaling), device)[1]
    return SimpleNamespace(p=p, spec=spec, q=x["q"], k=split_keys(x.pop("k"), p.d), v=x["v"], lengths=x["lengths"], scaling=scaling,
                           sdpa_ms=sdpa_ms)


def lab_parser(doc: str, shapes_default: str, parts_default: str, out_default: str, device_help: str) -> argparse.ArgumentParser:
    """The options every lab of this folder takes (attn_lab.py too): --shapes, --parts, --out, --device."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=shapes_default)
    parser.add_argument("--parts", default=parts_default)
    parser.add_argument("--out", type=Path, default=Path(out_default))
    parser.add_argument("--device", default="cuda", help=device_help)
    return parser


def run_lab(args, name: str, measure_shape: Callable[..., dict]) -> None:
    """Measure each of args.shapes (measure_shape(preset, b, s, group, device, log) -> dict), the GPU's
    cache freed between shapes; the log in args.out/name.log, the results in args.out/name.json."""
    device = torch.device(args.device)
    log, gpu = open_log(args.out, f"{name}.log", device)
    results = []
    for preset, b, s, group in shapes(args.shapes):
        results.append(measure_shape(preset, b, s, group, device, log))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_text_atomic(args.out / f"{name}.json", json.dumps({"gpu": gpu, "results": results}, indent=1))


def main() -> None:
    args = lab_parser(__doc__, DEFAULT_SHAPES, "score,select,attn", "runs/stage_lab",
                      "cpu: a dry run of the script under TRITON_INTERPRET=1").parse_args()
    parts = set(args.parts.split(",")) - {"none"}
    run_lab(args, "stage_lab", lambda preset, b, s, group, device, log: measure(preset, b, s, group, parts, device, log))


if __name__ == "__main__":
    main()
