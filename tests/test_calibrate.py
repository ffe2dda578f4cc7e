"""Calibration: streamed statistics, hooks, PCA, the calibration file, and the command's errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import random_tokens, tiny_llama
from sklearn.decomposition import PCA as SkPCA

from lokitool.calib import pca
from lokitool.calib.calibration import Calibration
from lokitool.calib.collect import accumulate, capture, collect_statistics
from lokitool.calib.models import attention_modules
from lokitool.calib.moments import MomentSums, Statistics
from lokitool.calib.run import build_calibration
from lokitool.errors import UserError


def correlated(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mixing.T + 3.0


# ----------------------------------------------------------------------------------------------
# Streamed moments and PCA against sklearn


def test_streamed_pca_matches_sklearn():
    d = 12
    x = correlated(3000, d)
    sums = MomentSums.zeros(1, 1, d)
    for chunk in x.split(700):  # uneven chunks: streaming must not depend on them
        sums.add(0, chunk[None, None])
    fitted = pca.fit(sums)
    ref = SkPCA().fit(x.numpy())
    ratio = (fitted.eigenvalues[0, 0] / fitted.eigenvalues[0, 0].sum()).numpy()
    np.testing.assert_allclose(ratio, ref.explained_variance_ratio_, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(fitted.mean[0, 0].numpy(), ref.mean_, rtol=1e-10)
    # sklearn uses the n-1 convention; ours is the population covariance
    np.testing.assert_allclose(fitted.eigenvalues[0, 0].numpy() * 3000 / 2999, ref.explained_variance_, rtol=1e-8)
    for j in range(4):  # same directions up to sign
        cos = abs(float(fitted.components[0, 0, j] @ torch.from_numpy(ref.components_[j])))
        assert cos == pytest.approx(1.0, abs=1e-8)
    # top-4 subspaces agree (projection matrices equal)
    mine = fitted.components[0, 0, :4].T @ fitted.components[0, 0, :4]
    theirs = torch.from_numpy(ref.components_[:4]).T @ torch.from_numpy(ref.components_[:4])
    assert torch.allclose(mine, theirs, atol=1e-8)


def test_rank_at_variance_counts_smallest_d():
    ev = torch.tensor([[5.0, 3.0, 1.0, 1.0]])  # cumulative: 0.5, 0.8, 0.9, 1.0
    assert pca.rank_at_variance(ev, 0.5).item() == 1
    assert pca.rank_at_variance(ev, 0.8).item() == 2
    assert pca.rank_at_variance(ev, 0.85).item() == 3
    assert pca.rank_at_variance(ev, 0.9).item() == 3
    assert pca.rank_at_variance(ev, 1.0).item() == 4


def test_moments_are_additive():
    x = correlated(500, 6)
    whole = MomentSums.zeros(1, 1, 6)
    whole.add(0, x[None, None])
    a, b = MomentSums.zeros(1, 1, 6), MomentSums.zeros(1, 1, 6)
    a.add(0, x[None, None, :200])
    b.add(0, x[None, None, 200:])
    merged = a.merge_(b)
    for t1, t2 in zip(whole.tensors(), merged.tensors()):
        assert torch.allclose(t1, t2, rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# Hooks capture what the model's attention really uses


def _keys_from_eager(loaded, tokens):
    """Independent reference: rerun each layer's projections and the model's own RoPE by hand."""
    from transformers.models.llama import modeling_llama

    model = loaded.model
    seen = {}
    handles = []
    for i, attn in enumerate(attention_modules(model)):
        def hook(module, args, kwargs, i=i):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            b, s, _ = hidden.shape
            k = module.k_proj(hidden).view(b, s, -1, module.head_dim).transpose(1, 2)
            q = module.q_proj(hidden).view(b, s, -1, module.head_dim).transpose(1, 2)
            _, k_post = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
            seen[i] = (k, k_post)

        handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        model.set_attn_implementation("eager")
        with torch.no_grad():
            logits = model(input_ids=tokens).logits
    finally:
        model.set_attn_implementation("sdpa")
        for h in handles:
            h.remove()
    return seen, logits


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1), (4, 4)])  # GQA, MQA, MHA
def test_captured_keys_equal_attention_inputs(heads, kv_heads):
    loaded = tiny_llama(num_heads=heads, num_kv_heads=kv_heads)
    tokens = random_tokens(2, 24)
    reference, ref_logits = _keys_from_eager(loaded, tokens)
    captured = {}

    def sink(vector, kind, layer, x):
        if vector == "key":
            captured[(kind, layer)] = x.clone()

    with capture(loaded.model, loaded.facts, sink), torch.no_grad():
        logits = loaded.model(input_ids=tokens).logits
    for layer, (pre, post) in reference.items():
        assert captured[("pre", layer)].shape == (2, kv_heads, 24, 16)
        torch.testing.assert_close(captured[("pre", layer)], pre, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(captured[("post", layer)], post, rtol=1e-5, atol=1e-5)
    # capturing changes nothing the model computes
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert loaded.model.config._attn_implementation == "sdpa"  # route removed


def test_hooks_removed_after_error():
    loaded = tiny_llama()
    stats = Statistics.zeros(loaded.facts, "cpu", with_queries=True)
    with pytest.raises(RuntimeError):
        with accumulate(loaded.model, loaded.facts, stats):
            raise RuntimeError("boom")
    attn = attention_modules(loaded.model)[0]
    assert not attn.k_proj._forward_hooks
    assert "_lokitool_attention" not in attn.__dict__
    assert loaded.model.config._attn_implementation == "sdpa"


def test_streamed_statistics_equal_direct_covariance():
    loaded = tiny_llama(num_heads=6, num_kv_heads=2)
    tokens = random_tokens(5, 20)
    keys = {}

    def sink(vector, kind, layer, x):
        keys.setdefault((vector, kind, layer), []).append(x.double())

    with capture(loaded.model, loaded.facts, sink, with_queries=True), torch.no_grad():
        loaded.model(input_ids=tokens)
    stats = collect_statistics(loaded.model, loaded.facts, tokens, batch_size=2, with_queries=True)
    for (vector, kind, layer), xs in keys.items():
        x = torch.cat(xs)  # [B, H, N, D]
        flat = x.transpose(0, 1).reshape(x.shape[1], -1, x.shape[-1])  # [H, n, D]
        sums = (stats.keys if vector == "key" else stats.queries)[kind]
        assert torch.equal(sums.count[layer], torch.full((2,), float(flat.shape[1]), dtype=torch.float64))
        mean, cov = pca.covariance(sums)
        torch.testing.assert_close(mean[layer], flat.mean(1))
        direct = torch.stack([torch.cov(h.T, correction=0) for h in flat])
        torch.testing.assert_close(cov[layer], direct, rtol=1e-9, atol=1e-10)
    # queries are pooled over the 3 query heads of each KV group: 3x the key count
    assert stats.queries["post"].count[0, 0] == 3 * stats.keys["post"].count[0, 0]


def test_qwen3_pre_rope_keys_are_after_k_norm():
    loaded = tiny_llama(arch="qwen3", num_heads=4, num_kv_heads=2)
    attn = attention_modules(loaded.model)[0]
    with torch.no_grad():
        attn.k_norm.weight.mul_(3.0)  # make the norm matter
    seen = {}

    def norm_hook(_module, _inputs, output):  # returns None: a hook's return value would replace the output
        seen.setdefault("norm", output.transpose(1, 2).clone())

    attn.k_norm.register_forward_hook(norm_hook)
    captured = {}

    def sink(vector, kind, layer, x):
        captured.setdefault((vector, kind, layer), x.clone())

    with capture(loaded.model, loaded.facts, sink):
        with torch.no_grad():
            loaded.model(input_ids=random_tokens(1, 10))
    torch.testing.assert_close(captured[("key", "pre", 0)], seen["norm"])
    assert loaded.facts.rope


# ----------------------------------------------------------------------------------------------
# The calibration file


def _calibration(loaded, tokens):
    stats = collect_statistics(loaded.model, loaded.facts, tokens, batch_size=4, with_queries=True)
    return build_calibration(stats, loaded.facts, {"dataset": "random", "num_tokens": tokens.numel(), "seq_len": tokens.shape[1]})


def test_calibration_roundtrip_and_validation(tmp_path):
    loaded = tiny_llama(num_heads=4, num_kv_heads=2)
    cal = _calibration(loaded, random_tokens(4, 32))
    path = cal.save(tmp_path / "cal.safetensors")
    back = Calibration.load(path)
    assert back.facts == loaded.facts
    assert back.info["num_tokens"] == 128
    for kind in ("pre", "post"):
        torch.testing.assert_close(back.pca[kind].components, cal.pca[kind].components.float())
        eig = back.pca[kind].eigenvalues
        assert eig.shape == (2, 2, 16) and bool((eig[..., :-1] >= eig[..., 1:]).all())
        comps = back.pca[kind].components.double()
        torch.testing.assert_close(comps @ comps.transpose(-1, -2), torch.eye(16, dtype=torch.float64).expand_as(comps), atol=1e-5, rtol=0)
        assert back.query_moment[kind].shape == (2, 2, 16, 16)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert set(f.keys()) >= {"layers.0.pre.components", "layers.1.post.eigenvalues", "layers.1.post.mean"}
    assert meta["format"] == "lokitool-calibration"
    assert json.loads(meta["lokitool"])["model"]["num_kv_heads"] == 2

    other = tiny_llama(num_heads=4, num_kv_heads=1)
    with pytest.raises(UserError, match="made for tiny-llama-4h2kv"):
        back.check_model(other.facts)


def test_failed_save_keeps_existing_file(tmp_path, monkeypatch):
    loaded = tiny_llama()
    cal = _calibration(loaded, random_tokens(2, 16))
    path = cal.save(tmp_path / "cal.safetensors")
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(UserError, match="cannot write .*cal.safetensors"):  # one line, not a traceback
        cal.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["cal.safetensors"]


def test_load_rejects_other_files(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not a tensor file")
    with pytest.raises(UserError, match="not a calibration file"):
        Calibration.load(junk)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(UserError, match="not a lokitool calibration file"):
        Calibration.load(foreign)
    with pytest.raises(UserError, match="does not exist"):
        Calibration.load(tmp_path / "missing.safetensors")
