"""The one-kernel decode step (kernels/loki_step.py) under several tilings, against the three-stage
loki_decode and SDPA in the same process (issue 12).

    python benchmarks/step_lab.py [--shapes llama3-8b:1:32768:kv,...] [--variants 128:64:0:0,512:64:3:0,...] --out DIR

A variant is BLOCK_S:BLOCK_N:stages:warps (0: the default stages / warps). For each shape (keys in the
two-plane layout, fp16, kf = df = 0.25, sequences full): SDPA, loki_decode through the three stages
(LOKITOOL_FUSED_STEP=0) and each variant of the step, CUDA-graph medians after do_bench's L2 flush,
whether the step ran in one launch, its chunk, and its largest difference from the three-stage output.
Writes step_lab.json and step_lab.log to --out.
"""

from __future__ import annotations

import os

from lokitool.kernels import clear_plans, loki_decode
from lokitool.kernels import loki_step as step
from stage_lab import lab_parser, lab_shape, run_lab

from lokitool.bench.timing import time_ms

DEFAULT_VARIANTS = "128:64:0:0,512:64:0:0,512:64:2:0,1024:64:2:0,512:128:2:0,512:64:0:4"


def measure(preset: str, b: int, s: int, group: str, variants: list[tuple[int, ...]], device, log) -> dict:
    x = lab_shape(preset, b, s, group, device)
    p, spec, q, k, v, lengths, scaling = x.p, x.spec, x.q, x.k, x.v, x.lengths, x.scaling
    h, hkv, dim = p.heads, p.kv_heads, p.head_dim
    out = {"shape": f"{preset}:{b}:{s}:{group}", "sdpa_ms": x.sdpa_ms}
    os.environ["LOKITOOL_FUSED_STEP"] = "0"
    clear_plans()
    want = loki_decode(q, k, v, lengths, spec=spec, scaling=scaling)
    out["stages_ms"] = time_ms(lambda: loki_decode(q, k, v, lengths, spec=spec, scaling=scaling), device)[1]
    os.environ.pop("LOKITOOL_FUSED_STEP")
    clear_plans()
    log(f"{out['shape']}: sdpa {out['sdpa_ms']:.4f} ms, three stages {out['stages_ms']:.4f} ({out['sdpa_ms'] / out['stages_ms']:.2f}x)")
    rows, qps = (h, 1) if group == "head" else (hkv, h // hkv)
    out["variants"] = []
    for bs, bn, stages, warps in variants:
        plan = step.StepPlan(b, rows, qps, s, dim, device)
        plan.block_s, plan.block_n, plan.stages = bs, bn, stages or None
        plan.warps = warps or plan.warps
        run = lambda: step.step_decode(q, k, v, lengths, kf=spec.kf, d=p.d, scaling=scaling, group=group, plan=plan)  # noqa: E731
        err = (run() - want).abs().max().item()
        ms = time_ms(run, device)[1]
        row = {"block_s": bs, "block_n": bn, "stages": stages, "warps": plan.warps, "chunk": plan.chunk, "one_launch": plan.one_launch,
               "ms": ms, "max_err": err}
        out["variants"].append(row)
        log(f"  step S{bs} N{bn} st{stages or '-'} w{plan.warps} chunk {plan.chunk} {'one launch' if plan.one_launch else 'by phase'}: "
            f"{ms:.4f} ms ({out['sdpa_ms'] / ms:.2f}x sdpa, {out['stages_ms'] / ms:.2f}x stages), max err {err:.2e}")
    return out


def main() -> None:
    parser = lab_parser(__doc__, "llama3-8b:1:16384:kv,llama3-8b:1:32768:kv,llama3-8b:1:65536:kv,llama3-8b:1:131072:kv", "none",
                        "runs/step_lab", "cpu: a dry run of the script under TRITON_INTERPRET=1")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    args = parser.parse_args()
    variants = [tuple(int(x) for x in v.split(":")) for v in args.variants.split(",")]
    run_lab(args, "step_lab", lambda preset, b, s, group, device, log: measure(preset, b, s, group, variants, device, log))


if __name__ == "__main__":
    main()
