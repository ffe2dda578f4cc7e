"""Greedy decoding with a Loki KV cache: the attention route and the decode loop.

The cache (`cache.LokiCache`) stores keys rotated into the PCA basis; the handler installed here
(through `dispatch.route_attention`) receives those rotated keys from the model's attention, rotates
the queries with the same basis, and
- at decode time (one query per sequence) runs Loki: score the cached keys with the first d rotated
  dims, keep the top k = max(1, floor(kf x length)), exact attention over those (`decode_backend`:
  the Triton kernels on CUDA, the pure-PyTorch oracle `loki.decode_attention` elsewhere);
- at prefill runs exact attention (SDPA over rotated q and k: the same scores, P being orthonormal),
  or, with `loki_prefill`, the Loki reference `loki.sparse_attention` with per-row budgets.
Inputs are assumed unpadded: every sequence of a batch has the same length.

The loop follows gpt-fast: `prefill`, `decode_one_token`, `decode_n_tokens`.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from ..calib.calibration import Calibration
from ..calib.dispatch import Handler, route_attention, sdpa_attention
from ..calib.models import ModelFacts, attention_modules
from ..errors import UserError
from . import bases
from . import reference as loki
from .cache import LokiCache, rotate_into

DecodeFn = Callable[..., torch.Tensor]
BASIS_NAMES = bases.BASES + ("random",)


@dataclass(frozen=True)
class LokiSettings:
    """Budgets of Loki decoding: token fraction kf, dimension fraction df (d = round(df x D))."""

    kf: float
    df: float
    basis: str = "post"
    group: loki.Group = "head"
    loki_prefill: bool = False

    def __post_init__(self) -> None:
        for name in ("kf", "df"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise UserError(f"--{name} must be in (0, 1], got {value}")
        if self.basis not in BASIS_NAMES:
            raise UserError(f"unknown basis {self.basis!r}; choose from {', '.join(BASIS_NAMES)}")
        if self.group not in ("head", "kv"):
            raise UserError(f"--group must be head or kv, got {self.group!r}")

    def dims(self, head_dim: int) -> int:
        return loki.dims_for(self.df, head_dim)


def decode_backend(device: torch.device) -> DecodeFn:
    """The one place that picks the decode implementation: Triton kernels on CUDA, the oracle elsewhere.
    Both take (q_rot [B, H, D], k_rot, v [B, Hkv, S, D], lengths [B], *, d, kf, scaling, group)."""
    if device.type == "cuda":
        from ..kernels.loki_decode import loki_decode  # imports triton: only on CUDA

        return loki_decode
    return loki.decode_attention


def loki_bases(settings: LokiSettings, calibration: Calibration | None, facts: ModelFacts) -> torch.Tensor:
    """[L, Hkv, D, D] float32 bases for the cache (a query-aware basis depends on d)."""
    if calibration is not None:
        calibration.check_model(facts)
    shape = (facts.num_layers, facts.num_kv_heads, facts.head_dim)
    return bases.basis_for(settings.basis, calibration, settings.dims(facts.head_dim), shape).float()


def _rotated_selector(d: int) -> loki.Selector:
    """Loki's selector for keys and queries that are already in the PCA basis."""
    return loki.Selector(
        "loki",
        prepare=lambda k: k[..., :d],
        score=lambda q, k_low: q[..., :d].float() @ loki.expand_kv(k_low, q.shape[1]).float().transpose(-1, -2),
    )


def loki_handlers(cache: LokiCache, settings: LokiSettings, head_dim: int, device: torch.device) -> Callable[[nn.Module], Handler]:
    """`make_handler` for `route_attention`: Loki over the rotated keys that `cache.update` returns."""
    decode = decode_backend(device)
    dense = sdpa_attention()
    d = settings.dims(head_dim)
    selector = _rotated_selector(d)

    def make_handler(module: nn.Module) -> Handler:
        layer_idx = module.layer_idx

        def handler(mod, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            q_rot = rotate_into(query, cache.basis(layer_idx))  # [B, H, Sq, D]
            if query.shape[2] == 1:
                lengths = torch.full((query.shape[0],), key.shape[2], dtype=torch.int32, device=query.device)
                out = decode(q_rot[:, :, 0], key, value, lengths, d=d, kf=settings.kf, scaling=scale, group=settings.group)
                return out[:, None].to(query.dtype), None  # [B, 1, H, D]
            if settings.loki_prefill:
                out = loki.sparse_attention(q_rot, key, value, selector=selector, kf=settings.kf, scaling=scale, group=settings.group)
                return out.transpose(1, 2).to(query.dtype).contiguous(), None
            return dense(mod, q_rot, key, value, attention_mask, scaling=scale, dropout=dropout, **kwargs)

        return handler

    return make_handler


@contextlib.contextmanager
def loki_attention(model: nn.Module, cache: LokiCache, settings: LokiSettings) -> Iterator[None]:
    """Route the model's attention to Loki over `cache` while the block runs."""
    device = next(attention_modules(model)[0].parameters()).device
    head_dim = cache.basis(0).shape[-1]
    with route_attention(model, loki_handlers(cache, settings, head_dim, device)):
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
    out = []
    done = torch.zeros_like(token, dtype=torch.bool)
    for _ in range(n):
        token = decode_one_token(model, token, cache)
        out.append(token)
        if on_token is not None:
            on_token(token)
        if stop_token is not None:
            done |= token == stop_token
            if bool(done.all()):
                break
    return torch.stack(out, dim=1) if out else token.new_empty(token.shape[0], 0)


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
    with torch.no_grad():
        first = prefill(model, ids, cache, prefill_chunk)
        if on_token is not None:
            on_token(first)
        if stop_token is not None and bool((first == stop_token).all()):
            return first[:, None]
        rest = decode_n_tokens(model, first, cache, max_new_tokens - 1, on_token, stop_token)
    return torch.cat([first[:, None], rest], dim=1)


def new_cache(settings: LokiSettings | None, loki_bases_: torch.Tensor | None, max_length: int | None):
    """The cache for a run: transformers' DynamicCache for full attention, else a LokiCache."""
    if settings is None:
        from transformers import DynamicCache

        return DynamicCache()
    return LokiCache(loki_bases_, max_length=max_length)


def generate_with(
    model: nn.Module,
    facts: ModelFacts,
    ids: torch.Tensor,
    max_new_tokens: int,
    settings: LokiSettings | None,
    calibration: Calibration | None = None,
    **kwargs,
) -> torch.Tensor:
    """`generate` with full attention (settings None) or Loki at `settings`; the cache is made here."""
    if settings is None:
        return generate(model, ids, max_new_tokens, new_cache(None, None, None), **kwargs)
    cache = new_cache(settings, loki_bases(settings, calibration, facts), ids.shape[1] + max_new_tokens)
    with loki_attention(model, cache, settings):
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
