"""Models with random weights at known shapes: speed does not depend on weights, and the GPU
machine has no model files. `python benchmarks/random_model.py SHAPE OUT_DIR [--tokenizer DIR]`
saves one as a model folder that `lokitool calibrate --model OUT_DIR` loads."""

from __future__ import annotations

import argparse

import torch

from lokitool.models import LoadedModel, read_facts

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152),
    "llama3.2-1b": (2048, 8192, 16, 32, 8, 49152),
    "llama2-7b": (4096, 11008, 32, 32, 32, 32000),
}


def config_for(shape: str):
    from transformers import LlamaConfig

    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2)


def random_model(shape: str, device: str, dtype: torch.dtype) -> LoadedModel:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config_for(shape)).to(dtype).eval()
    model.config._attn_implementation = "sdpa"
    return LoadedModel(model=model, tokenizer=None, facts=read_facts(model, None, f"random:{shape}", None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out")
    parser.add_argument("--tokenizer", default=None, help="folder of a tokenizer to save beside the weights")
    args = parser.parse_args()
    loaded = random_model(args.shape, "cpu", torch.bfloat16)
    loaded.model.save_pretrained(args.out)
    if args.tokenizer:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(args.tokenizer).save_pretrained(args.out)


if __name__ == "__main__":
    main()
