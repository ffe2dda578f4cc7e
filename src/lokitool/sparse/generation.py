"""Greedy decoding with a Loki KV cache: the attention route and the decode loop.

The cache (`cache.LokiCache`) stores keys rotated into the PCA basis; the handler installed here
(through `dispatch.route_attention`) receives those rotated keys from the model's attention, rotates
the queries with the same basis, and
- at decode time (one query per sequence) runs Loki over the keys the model's mask lets it see:
  score them with the first d rotated dims, keep the top k = max(1, floor(kf x visible)), exact
  attention over those (`decode_backend`: the Triton kernels on CUDA, the pure-PyTorch oracle
  `loki.decode_attention` elsewhere). A sliding layer sees its last `window` keys: the cache view is
  sliced to them, which both backends express as a shorter sequence. What a decode backend cannot
  express (soft-capping, sink logits, a mask that is not one suffix of the cache) runs on the
  reference `loki.sparse_attention` with the mask;
- at prefill runs the model's exact attention (`dispatch.exact_attention` over rotated q and k: the
  same scores, P being orthonormal), or, with `loki_prefill`, the Loki reference with per-row budgets.
Inputs are assumed unpadded: every sequence of a batch has the same length.

The loop follows gpt-fast: `prefill`, `decode_one_token`, `decode_n_tokens`.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Iterator

import torch
from torch import nn

from ..calib.calibration import Calibration
from ..calib.dispatch import Handler, exact_attention, plain_causal, route_attention, visible_keys
from ..calib.models import ModelFacts, attention_modules
from . import bases, static
from . import reference as loki
from .cache import LokiCache, rotate_into
from .reference import LokiSpec

DecodeFn = Callable[..., torch.Tensor]


def decode_backend(device: torch.device) -> DecodeFn:
    """The one place that picks the decode implementation: Triton kernels on CUDA, the oracle elsewhere.
    Both take (q_rot [B, H, D], k_rot, v [B, Hkv, S, D], lengths [B], *, spec, scaling)."""
    if device.type == "cuda":
        from ..kernels.loki_decode import loki_decode  # imports triton: only on CUDA

        return loki_decode
    return loki.decode_attention


def loki_bases(spec: LokiSpec, calibration: Calibration | None, facts: ModelFacts) -> torch.Tensor:
    """[L, Hkv, D, D] float32 bases for the cache (a query-aware basis depends on d)."""
    if calibration is not None:
        calibration.check_shape(facts)
    shape = (facts.num_layers, facts.num_kv_heads, facts.head_dim)
    return bases.basis_for(spec.basis, calibration, spec.dims(facts.head_dim), shape).float()


def visible_suffix(attention_mask, num_keys: int, sliding_window: int | None) -> int | None:
    """For one query row per sequence: the first visible key when every sequence sees the same suffix
    [start, Sk) of the cache (causal: 0; a sliding window: Sk - window), else None (padding, or
    anything else a decode kernel's per-sequence length cannot say). Without a mask (what transformers
    passes for a full layer's decode step) this is arithmetic, with no device sync."""
    if attention_mask is None:
        return max(0, num_keys - sliding_window) if sliding_window is not None else 0
    visible = visible_keys(attention_mask, 1, num_keys, sliding_window, attention_mask.device)
    row = visible[:, 0, 0]  # [B or 1, Sk]
    count = int(row[0].sum())
    start = row.shape[-1] - count
    if count == 0 or not bool(row[:, start:].all()) or bool(row[:, :start].any()):
        return None
    return start


def loki_handlers(
    cache: LokiCache, spec: LokiSpec, head_dim: int, device: torch.device, loki_prefill: bool = False
) -> Callable[[nn.Module], Handler]:
    """`make_handler` for `route_attention`: Loki over the rotated keys that `cache.update` returns.
    Prefill is exact unless `loki_prefill` (then Loki with per-row budgets over the prompt)."""
    decode = decode_backend(device)
    selector = loki.rotated_selector(spec.dims(head_dim))

    def make_handler(module: nn.Module) -> Handler:
        layer_idx = module.layer_idx

        def handler(mod, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            q_rot = rotate_into(query, cache.basis(layer_idx))  # [B, H, Sq, D]
            sq, sk, window = query.shape[2], key.shape[2], kwargs.get("sliding_window")
            softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
            if sq > 1 and not loki_prefill:
                return exact_attention(mod, q_rot, key, value, attention_mask, scaling=scale, dropout=dropout, **kwargs)
            start = visible_suffix(attention_mask, sk, window) if sq == 1 and softcap is None and sinks is None else None
            if start is not None:  # the decode backend over the keys this step sees
                lengths = torch.full((query.shape[0],), sk - start, dtype=torch.int32, device=query.device)
                out = decode(q_rot[:, :, 0], key[:, :, start:], value[:, :, start:], lengths, spec=spec, scaling=scale)
                return out[:, None].to(query.dtype), None  # [B, 1, H, D]
            causal = plain_causal(attention_mask, sq, sk, window, query.device)
            mask = None if causal else visible_keys(attention_mask, sq, sk, window, query.device)  # [B or 1, 1, Sq, Sk]
            out = loki.sparse_attention(
                q_rot, key, value, selector=selector, spec=spec, scaling=scale, mask=mask, softcap=softcap, sink_logits=sinks
            )
            return out.transpose(1, 2).to(query.dtype).contiguous(), None

        return handler

    return make_handler


@contextlib.contextmanager
def loki_attention(model: nn.Module, cache: LokiCache, spec: LokiSpec, loki_prefill: bool = False) -> Iterator[None]:
    """Route the model's attention to Loki over `cache` while the block runs."""
    device = next(attention_modules(model)[0].parameters()).device
    head_dim = cache.basis(0).shape[-1]
    with route_attention(model, loki_handlers(cache, spec, head_dim, device, loki_prefill)):
        yield


# ----------------------------------------------------------------------------------------------
# The loop


def _forward_kwargs(model: nn.Module, cache) -> dict:
    """The cache argument is `cache` in newer transformers, `past_key_values` in older ones; ask for
    the last position's logits only where the model supports it."""
    params = inspect.signature(model.forward).parameters
    kwargs = {"cache" if "cache" in params else "past_key_values": cache, "use_cache": True}
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    return kwargs


def next_logits(model: nn.Module, ids: torch.Tensor, cache) -> torch.Tensor:
    """Run ids [B, s] after what the cache holds; logits of the last position [B, V] (float32)."""
    return model(input_ids=ids, **_forward_kwargs(model, cache)).logits[:, -1].float()


def prefill(model: nn.Module, ids: torch.Tensor, cache, chunk: int | None = None) -> torch.Tensor:
    """Feed the prompt ids [B, S] (in chunks of `chunk` tokens, to bound activation memory); the
    greedy next token [B]."""
    step = chunk or ids.shape[1]
    for start in range(0, ids.shape[1], step):
        logits = next_logits(model, ids[:, start : start + step], cache)
    return logits.argmax(-1)


def decode_one_token(model: nn.Module, token: torch.Tensor, cache) -> torch.Tensor:
    """token [B] -> the greedy next token [B]."""
    return next_logits(model, token[:, None], cache).argmax(-1)


def decode_n_tokens(
    model: nn.Module,
    token: torch.Tensor,
    cache,
    n: int,
    on_token: Callable[[torch.Tensor], None] | None = None,
    stop_token: int | None = None,
) -> torch.Tensor:
    """Greedy decode after `token` [B] (already generated, not yet in the cache): up to n more tokens,
    [B, <= n]. Stops early once every sequence has produced `stop_token`."""
    if n < 1:
        return token.new_empty(token.shape[0], 0)

    def tokens(token: torch.Tensor) -> Iterator[torch.Tensor]:
        for _ in range(n):
            token = decode_one_token(model, token, cache)
            yield token

    return static.collect(tokens(token), on_token, stop_token)


def generate(
    model: nn.Module,
    ids: torch.Tensor,
    max_new_tokens: int,
    cache,
    *,
    on_token: Callable[[torch.Tensor], None] | None = None,
    stop_token: int | None = None,
    prefill_chunk: int | None = None,
) -> torch.Tensor:
    """Greedy continuation of ids [B, S]: the new tokens [B, <= max_new_tokens]. Run inside
    `loki_attention(model, cache, ...)` for Loki; with a DynamicCache and no route it is the
    model's own attention."""
    if max_new_tokens < 1:
        return ids.new_empty(ids.shape[0], 0)

    def tokens() -> Iterator[torch.Tensor]:
        token = prefill(model, ids, cache, prefill_chunk)
        yield token
        for _ in range(max_new_tokens - 1):
            token = decode_one_token(model, token, cache)
            yield token

    with torch.no_grad():
        return static.collect(tokens(), on_token, stop_token)


def new_cache(spec: LokiSpec | None, loki_bases_: torch.Tensor | None, max_length: int | None):
    """The cache for a run: transformers' DynamicCache for full attention, else a LokiCache."""
    if spec is None:
        from transformers import DynamicCache

        return DynamicCache()
    return LokiCache(loki_bases_, max_length=max_length)


def generate_with(
    model: nn.Module,
    facts: ModelFacts,
    ids: torch.Tensor,
    max_new_tokens: int,
    spec: LokiSpec | None,
    calibration: Calibration | None = None,
    *,
    loki_prefill: bool = False,
    static_loop: bool | None = None,
    **kwargs,
) -> torch.Tensor:
    """`generate` with full attention (spec None) or Loki at `spec`; the cache is made here.
    static_loop: the static-cache loop of static.py (on CUDA its step is one CUDA graph replay);
    default: on CUDA for the models it supports, else the eager loop over a growing cache."""
    if static_loop is None:
        static_loop = ids.device.type == "cuda" and static.supports(facts, loki_prefill)
    if static_loop:
        cache = static.StaticCache(
            facts, batch=ids.shape[0], capacity=ids.shape[1] + max_new_tokens, dtype=model.get_input_embeddings().weight.dtype,
            device=ids.device, bases=None if spec is None else loki_bases(spec, calibration, facts), spec=spec,
        )
        return static.generate_static(model, ids, max_new_tokens, cache, **kwargs)
    if spec is None:
        return generate(model, ids, max_new_tokens, new_cache(None, None, None), **kwargs)
    cache = new_cache(spec, loki_bases(spec, calibration, facts), ids.shape[1] + max_new_tokens)
    with loki_attention(model, cache, spec, loki_prefill):
        return generate(model, ids, max_new_tokens, cache, **kwargs)


# ----------------------------------------------------------------------------------------------
# Prompts


def encode_prompt(tokenizer, text: str, bos_token_id: int | None, chat: bool = True) -> list[int]:
    """Token ids of a user prompt: through the chat template when the tokenizer has one (and `chat`),
    always starting with BOS when the model has one (tokenizers differ in whether they add it)."""
    if chat and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if bos_token_id is not None and (not ids or ids[0] != bos_token_id):
        ids = [bos_token_id] + ids
    return ids
