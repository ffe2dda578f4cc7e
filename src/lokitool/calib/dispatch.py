"""Route a model's attention through a per-module handler, via transformers' AttentionInterface.

One attention function named `lokitool` is registered with transformers (lazily, the first time
a route is opened; never at import). It looks up a handler stored on each attention module, so
several models, and several kinds of handler (key capture, Loki), share the one registration.
`route_attention` installs handlers and switches the model to `lokitool` for the duration of a
`with` block, restoring the previous implementation and removing the handlers in `finally`.

A handler has the signature of a transformers attention function:
    handler(module, query [B, H, Sq, D], key [B, Hkv, Sk, D], value [B, Hkv, Sk, D],
            attention_mask, *, scaling, dropout=0.0, **kwargs) -> (output [B, Sq, H, D], weights | None)
Masks are built as for `sdpa` (a boolean mask, or None when plain causal masking suffices).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

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
