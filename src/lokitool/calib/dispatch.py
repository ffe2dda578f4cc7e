"""Route a model's attention through a per-module handler, via transformers' AttentionInterface.

One attention function named `lokitool` is registered with transformers (lazily, the first time
a route is opened; never at import). It looks up a handler stored on each attention module, so
several models, and several kinds of handler (key capture, Loki), share the one registration.
`route_attention` installs handlers and switches the model to `lokitool` for the duration of a
`with` block, restoring the previous implementation and removing the handlers in `finally`.

A handler has the signature of a transformers attention function:
    handler(module, query [B, H, Sq, D], key [B, Hkv, Sk, D], value [B, Hkv, Sk, D],
            attention_mask, *, scaling, dropout=0.0, **kwargs) -> (output [B, Sq, H, D], weights | None)
Masks are built as for `sdpa` (a boolean mask, or None when plain causal masking suffices);
`visible_keys` turns what a handler receives (mask, `sliding_window`) into one boolean mask, and
`exact_attention` is the model's own attention for a handler that needs exact attention: SDPA, or
the model's eager function where the call carries what SDPA cannot do (`softcap`, sink logits `s_aux`).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

import torch
from torch import nn

from .models import attention_modules

NAME = "lokitool"
_HANDLER_ATTR = "_lokitool_attention"

Handler = Callable[..., tuple]


def _dispatch(module: nn.Module, query, key, value, attention_mask, **kwargs):
    handler = module.__dict__.get(_HANDLER_ATTR)
    if handler is None:
        raise RuntimeError(f"{type(module).__name__} is routed to `{NAME}` attention but has no handler installed")
    return handler(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, _dispatch)
    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def sdpa_attention() -> Handler:
    """transformers' own SDPA attention function: what a handler calls for exact attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def visible_keys(attention_mask, num_queries: int, num_keys: int, sliding_window: int | None, device) -> torch.Tensor:
    """The keys each query row may attend to, bool [B or 1, 1 or H, Sq, Sk].

    A boolean mask (True = attend) or an additive one (0 = attend) is taken as the model built it:
    it already holds causality, padding and any sliding window. None means plain causal masking
    (query row i at absolute position Sk - Sq + i), narrowed to the last `sliding_window` keys
    (transformers' overlay: key j is seen from position t iff t - window < j <= t)."""
    if attention_mask is not None:
        mask = attention_mask[..., :num_keys]
        if mask.dtype != torch.bool:
            mask = mask > torch.finfo(mask.dtype).min / 2
        return mask
    positions = torch.arange(num_keys - num_queries, num_keys, device=device)[:, None]  # [Sq, 1]
    keys = torch.arange(num_keys, device=device)[None, :]
    mask = keys <= positions
    if sliding_window is not None:
        mask &= keys > positions - sliding_window
    return mask[None, None]


def plain_causal(attention_mask, num_queries: int, num_keys: int, sliding_window: int | None, device) -> bool:
    """Whether the keys each row sees are exactly its causal keys (no window that bites, no padding):
    what the kernels, which take only per-row lengths, can express."""
    if attention_mask is None:
        return sliding_window is None or num_keys <= sliding_window
    visible = visible_keys(attention_mask, num_queries, num_keys, None, device)
    return bool((visible == visible_keys(None, num_queries, num_keys, None, device)).all())


def _eager(module: nn.Module) -> Handler | None:
    """The eager attention function of the module's own modeling file (where softcap and sinks live)."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def exact_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """Exact attention as the model computes it, called with a handler's arguments.

    SDPA when the call carries nothing SDPA ignores; with `softcap` or `s_aux` (Gemma 2 soft-capping,
    gpt-oss sink logits), the model's eager function with an additive mask built from `visible_keys`
    (the eager functions take the mask as given, so it must already hold causality and the window)."""
    sliding_window = kwargs.get("sliding_window")
    if kwargs.get("softcap") is None and kwargs.get("s_aux") is None:
        if attention_mask is None and sliding_window is not None and key.shape[2] > sliding_window:
            attention_mask = visible_keys(None, query.shape[2], key.shape[2], sliding_window, query.device)
        return sdpa_attention()(module, query, key, value, attention_mask, **kwargs)
    eager = _eager(module)
    if eager is None:
        raise RuntimeError(f"{type(module).__name__} asks for soft-capping or sink logits but its modeling file has no eager attention")
    visible = visible_keys(attention_mask, query.shape[2], key.shape[2], sliding_window, query.device)
    additive = torch.zeros(visible.shape, dtype=query.dtype, device=query.device)
    additive = additive.masked_fill(~visible, torch.finfo(query.dtype).min)
    return eager(module, query, key, value, additive, **kwargs)


def _set_implementation(model: nn.Module, name: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        setter(name)
    else:
        model.config._attn_implementation = name


@contextlib.contextmanager
def route_attention(model: nn.Module, make_handler: Callable[[nn.Module], Handler]) -> Iterator[None]:
    """Install `make_handler(attn_module)` on every attention layer and route attention to it."""
    _register()
    modules = attention_modules(model)
    previous = model.config._attn_implementation
    try:
        for module in modules:
            setattr(module, _HANDLER_ATTR, make_handler(module))
        _set_implementation(model, NAME)
        yield
    finally:
        _set_implementation(model, previous)
        for module in modules:
            module.__dict__.pop(_HANDLER_ATTR, None)
