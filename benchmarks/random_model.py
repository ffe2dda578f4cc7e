"""Models with random weights at known shapes (lokitool.bench.presets.PRESETS): speed does not depend on
weights, and the GPU machine has no model files. `python benchmarks/random_model.py SHAPE OUT_DIR [--tokenizer DIR]`
saves one as a model folder that `lokitool calibrate --model OUT_DIR` loads."""

from __future__ import annotations

import argparse

import torch

from lokitool.bench.presets import PRESETS, random_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("shape", choices=sorted(PRESETS))
    parser.add_argument("out")
    parser.add_argument("--tokenizer", default=None, help="folder of a tokenizer to save beside the weights")
    args = parser.parse_args()
    loaded = random_model(args.shape, torch.device("cpu"), torch.bfloat16)
    loaded.model.save_pretrained(args.out)
    if args.tokenizer:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(args.tokenizer).save_pretrained(args.out)


if __name__ == "__main__":
    main()
