"""Seconds per window of `eval --ppl` on the GPU, torch reference against the Triton path.

    python benchmarks/eval_speed.py [--preset llama2-7b] [--seq-len 4096] [--windows 1] [--out DIR]

A model of a preset shape with random weights (speed does not depend on weights; the GPU machine
has no model files), bf16, random tokens. Methods: full (the model's SDPA), random-basis (Loki's
work with a random orthonormal basis, no calibration needed) and exact-topk, each on both backends,
with the selection statistics on (as `eval --ppl` runs them). Prints a table and writes
eval_speed.json; the NLLs of the two backends are printed side by side (they should agree to the
kernels' 16-bit rounding).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lokitool.bench.presets import random_model
from lokitool.evals.ppl import evaluate_spec
from lokitool.results import versions
from lokitool.sparse.attention import MethodSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama2-7b")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--windows", type=int, default=1)
    parser.add_argument("--kf", type=float, default=0.25)
    parser.add_argument("--df", type=float, default=0.25)
    parser.add_argument("--backends", default="triton,torch")
    parser.add_argument("--out", type=Path, default=Path("runs/eval_speed"))
    args = parser.parse_args()

    device = torch.device("cuda")
    t0 = time.perf_counter()
    loaded = random_model(args.preset, device, torch.bfloat16)
    print(f"built random {args.preset} in {time.perf_counter() - t0:.1f} s ({torch.cuda.get_device_name()})", flush=True)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, loaded.model.config.vocab_size, (args.windows, args.seq_len), generator=g)
    tokens[:, 0] = 1

    specs = [MethodSpec("full")]
    specs += [MethodSpec("random-basis", kf=args.kf, df=args.df), MethodSpec("exact-topk", kf=args.kf)]
    rows = []
    for spec in specs:
        for backend in ["model"] if spec.method == "full" else args.backends.split(","):
            evaluate_spec(loaded, tokens[:1], spec, None, 1, backend)  # compile and autotune at these shapes
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            r = evaluate_spec(loaded, tokens, spec, None, 1, backend)
            torch.cuda.synchronize()
            row = dict(method=spec.method, backend=backend, seconds_per_window=r.seconds / args.windows, nll=r.nll,
                       kept=r.kept_fraction, jaccard=r.jaccard, peak_gib=torch.cuda.max_memory_allocated() / 2**30)
            rows.append(row)
            print(f"{spec.method:<13} {backend:<7} {row['seconds_per_window']:8.2f} s/window  nll {r.nll:.5f}  "
                  f"kept {r.kept_fraction if r.kept_fraction is not None else float('nan'):.4f}  "
                  f"jaccard {r.jaccard if r.jaccard is not None else float('nan'):.4f}  peak {row['peak_gib']:.1f} GiB", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = dict(preset=args.preset, seq_len=args.seq_len, windows=args.windows, kf=args.kf, df=args.df,
               gpu=torch.cuda.get_device_name(), versions=versions(), rows=rows)
    (args.out / "eval_speed.json").write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
