"""Calibration throughput: hooks + streamed statistics against a plain forward pass.

    python benchmarks/calibrate_throughput.py --model default --device cpu --num-tokens 8192
    python benchmarks/calibrate_throughput.py --shape smollm2-135m --device cuda --num-tokens 262144

`--model` loads a real model (the embedded default here); `--shape` builds a model with random
weights of a known shape (weights do not change speed), for machines without the model files.
Prints one JSON line per configuration and writes them to --output (JSON lines) if given.
Peak memory is measured at two token counts to show that it does not grow with N.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import torch

from lokitool.bench.presets import PRESETS, random_model
from lokitool.calib.collect import collect_statistics
from lokitool.calib.models import LoadedModel


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@torch.inference_mode()
def plain_forward(loaded: LoadedModel, tokens: torch.Tensor, batch_size: int, device: str) -> None:
    for start in range(0, tokens.shape[0], batch_size):
        loaded.model.base_model(input_ids=tokens[start : start + batch_size].to(device), use_cache=False)


def timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up: kernels, allocator, lazy init
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model spec for lokitool.models.load_model")
    parser.add_argument("--shape", default=None, choices=sorted(PRESETS), help="random-weight model of this shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--num-tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    if args.shape:
        loaded = random_model(args.shape, torch.device(args.device), dtype)
    else:
        from lokitool.calib.models import load_model

        loaded = load_model(args.model or "default", args.device, args.dtype)
    vocab = loaded.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    rows = []
    for num_tokens in (args.num_tokens // 4, args.num_tokens):
        tokens = torch.randint(3, vocab, (num_tokens // args.seq_len, args.seq_len), generator=g)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t_forward = timed(lambda: plain_forward(loaded, tokens, args.batch_size, args.device), args.device, args.repeats)
        results = {}
        for queries in (False, True):
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            t = timed(lambda: collect_statistics(loaded.model, loaded.facts, tokens, batch_size=args.batch_size, with_queries=queries),
                      args.device, args.repeats)
            results[queries] = (t, peak_bytes(args.device))
        row = {
            "model": loaded.facts.model_id,
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "dtype": args.dtype,
            "num_tokens": tokens.numel(),
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "forward_tok_s": tokens.numel() / t_forward,
            "calibrate_keys_tok_s": tokens.numel() / results[False][0],
            "calibrate_keys_queries_tok_s": tokens.numel() / results[True][0],
            "overhead_keys_pct": 100 * (results[False][0] / t_forward - 1),
            "overhead_keys_queries_pct": 100 * (results[True][0] / t_forward - 1),
            "peak_memory_mib": results[True][1] / 2**20,
            "torch": torch.__version__,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.output:
        with open(args.output, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
