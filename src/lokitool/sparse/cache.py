"""A transformers KV cache that stores keys rotated into Loki's PCA basis.

Every layer keeps one preallocated key buffer and one value buffer, [B, Hkv, capacity, D]. On
`update`, the new post-RoPE keys are multiplied by the basis of their layer and KV head (P, [D, D],
directions as columns) and written in place; values are stored as they come. `update` returns views
of the filled part, so the attention function that runs next receives *rotated* keys: it must rotate
the queries the same way (`rotate_into`), after which q_rot . k_rot = q . k exactly (P is orthonormal)
and the first d dims of each stored key row are Loki's low-rank keys. No second copy of the keys
is kept: the cache holds as many bytes as transformers' DynamicCache at the same length (plus the
bases, L x Hkv x D x D float32).

Capacity: `max_length` up front allocates exactly that; without it the buffers grow by doubling
(at least `chunk` tokens), so appends never concatenate.

The layer class extends transformers' DynamicLayer and keeps `keys` / `values` as views of the
buffers, so the inherited length and mask-size methods work across transformers versions.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from . import reference as loki


def rotate_into(x: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """x [B, Hx, S, D] times the basis [Hkv, D, D] of its KV head, computed in float32, in x's dtype.
    A basis of None is the identity (a plain preallocated cache)."""
    return x if basis is None else loki.rotate(x, basis).to(x.dtype)


class LokiLayer(DynamicLayer):
    """One layer's cache: rotated keys and values in preallocated buffers."""

    def __init__(self, basis: torch.Tensor | None, max_length: int | None = None, chunk: int = 256):
        super().__init__()
        self.basis = None if basis is None else basis.float()  # [Hkv, D, D], directions as columns
        self.max_length = max_length
        self.chunk = chunk
        self._k: torch.Tensor | None = None  # [B, Hkv, capacity, D]
        self._v: torch.Tensor | None = None

    # transformers calls this with (keys) in older releases and (keys, values) in newer ones
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        value_states = key_states if value_states is None else value_states
        self.device, self.dtype = key_states.device, key_states.dtype
        if self.basis is not None:
            self.basis = self.basis.to(self.device)
        b, hkv, _, dim = key_states.shape
        capacity = self.max_length if self.max_length is not None else self.chunk
        self._k = torch.empty(b, hkv, capacity, dim, dtype=key_states.dtype, device=self.device)
        self._v = torch.empty(b, hkv, capacity, value_states.shape[-1], dtype=value_states.dtype, device=self.device)
        self._expose(0)
        self.is_initialized = True

    @property
    def capacity(self) -> int:
        return 0 if self._k is None else self._k.shape[2]

    @property
    def length(self) -> int:
        return 0 if not self.is_initialized or self.keys is None else self.keys.shape[2]

    def _expose(self, n: int) -> None:
        self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        if self.max_length is not None:
            raise ValueError(f"Loki cache is full: {needed} tokens do not fit max_length={self.max_length}")
        capacity = max(needed, 2 * self.capacity, self.chunk)
        n = self.length
        k, v = self._k, self._v
        self._k = k.new_empty(k.shape[0], k.shape[1], capacity, k.shape[3])
        self._v = v.new_empty(v.shape[0], v.shape[1], capacity, v.shape[3])
        self._k[:, :, :n] = k[:, :, :n]
        self._v[:, :, :n] = v[:, :, :n]
        self._expose(n)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append post-RoPE keys (rotated here) and values [B, Hkv, s, D]; return the rotated keys and
        the values of every cached token, views [B, Hkv, length, D] of the buffers."""
        if not self.is_initialized or self._k is None:
            self.lazy_initialization(key_states, value_states)
        n, s = self.length, key_states.shape[2]
        self._reserve(n + s)
        self._k[:, :, n : n + s] = rotate_into(key_states, self.basis)
        self._v[:, :, n : n + s] = value_states
        self._expose(n + s)
        return self.keys, self.values

    def get_max_length(self) -> int:
        return -1 if self.max_length is None else self.max_length

    def get_max_cache_shape(self) -> int:  # the name in older transformers
        return self.get_max_length()

    def reset(self) -> None:
        if self._k is not None:
            self._expose(0)

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `tokens_to_remove` tokens (newer transformers pass a negative count; older
        ones may pass the length to keep, as a non-negative number)."""
        n = self.length
        keep = n - abs(tokens_to_remove) if tokens_to_remove < 0 else min(n, tokens_to_remove)
        if self._k is not None:
            self._expose(max(keep, 0))

    # Batch edits act on the whole buffers, so the capacity (and preallocation) survives them.
    def _map_buffers(self, fn) -> None:
        if self._k is not None:
            n = self.length
            self._k, self._v = fn(self._k), fn(self._v)
            self._expose(n)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_buffers(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_buffers(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_buffers(lambda t: t[indices])

    def offload(self):
        raise NotImplementedError("the Loki cache does not support offloading")

    def nbytes(self) -> int:
        """Bytes held by the key and value buffers."""
        return sum(t.untyped_storage().nbytes() for t in (self._k, self._v) if t is not None)


class LokiCache(Cache):
    """One LokiLayer per decoder layer; `bases` [L, Hkv, D, D] with directions as columns.

    `LokiCache.unrotated(num_layers, ...)` stores keys as they come: the same preallocated layout
    for full attention (a baseline that differs from Loki only in how attention reads the cache)."""

    def __init__(self, bases: torch.Tensor | list[None], max_length: int | None = None, chunk: int = 256):
        super().__init__(layers=[LokiLayer(basis, max_length=max_length, chunk=chunk) for basis in bases])

    @classmethod
    def unrotated(cls, num_layers: int, max_length: int | None = None, chunk: int = 256) -> "LokiCache":
        return cls([None] * num_layers, max_length=max_length, chunk=chunk)

    def basis(self, layer_idx: int) -> torch.Tensor | None:
        return self.layers[layer_idx].basis

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by a cache's key and value tensors (any transformers cache with `.layers`)."""
    if isinstance(cache, LokiCache):
        return cache.nbytes()
    seen, total = set(), 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor) and t.numel():
                storage = t.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
    return total
