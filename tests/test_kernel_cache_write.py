"""kernels/cache_write.py: the static loop's cache write (rotated, split into planes) and query rotation
against `reference.rotate` and plain indexing."""

from __future__ import annotations

import pytest
import torch
from kernel_support import (
    DEVICE,
    ON_GPU,
    _one_config_per_kernel,  # noqa: F401  (autouse; importing kernel_support switches on the interpreter first)
    assert_close,
    loki,
)
from lokitool.kernels import LokiKeys, rotate_queries, write_decode_kv


def random_basis(hkv, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(hkv, dim, dim, generator=g, dtype=torch.float64))[0].float().contiguous()


@pytest.mark.parametrize("hkv, dim, d", [(2, 32, 8), (3, 48, 12), (1, 16, 16), (2, 128, 32)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_write_rotates_splits_and_writes_at_each_position(hkv, dim, d, dtype):
    b, cap = 3, 20
    g = torch.Generator().manual_seed(dim)
    # new keys and values as the model hands them: [B, 1, Hkv, D] transposed to [B, Hkv, 1, D], a strided view
    k_new = torch.randn(b, 1, hkv, dim, generator=g).to(dtype).to(DEVICE).transpose(1, 2)[:, :, 0]
    v_new = torch.randn(b, 1, hkv, dim, generator=g).to(dtype).to(DEVICE).transpose(1, 2)[:, :, 0]
    positions = torch.tensor([0, 7, 19], device=DEVICE)
    basis = random_basis(hkv, dim).to(DEVICE)
    low = torch.zeros(b, hkv, cap, d, dtype=dtype, device=DEVICE)
    high = torch.zeros(b, hkv, cap, dim - d, dtype=dtype, device=DEVICE)
    v = torch.zeros(b, hkv, cap, dim, dtype=dtype, device=DEVICE)
    write_decode_kv(k_new, v_new, positions, k_dst=LokiKeys(low, high), v_dst=v, basis=basis)
    want = loki.rotate(k_new[:, :, None].cpu().float(), basis.cpu())[:, :, 0]  # [B, Hkv, D] float32
    for i, p in enumerate(positions.tolist()):
        got = torch.cat([low[i, :, p], high[i, :, p]], dim=-1)
        assert_close(got, want[i].to(dtype), atol=1e-5, rtol=1e-2 if dtype == torch.bfloat16 else 1e-3, what=f"rotated key of sequence {i}")
        assert torch.equal(v[i, :, p].cpu(), v_new[i].cpu())
    written = torch.zeros(b, cap, dtype=torch.bool)
    written[torch.arange(b), positions.cpu()] = True
    assert not low.cpu().transpose(1, 2)[~written].any() and not v.cpu().transpose(1, 2)[~written].any()  # nothing else touched


def test_write_without_a_basis_copies_into_one_key_tensor():
    b, hkv, dim, cap = 2, 2, 32, 9
    k_new = torch.randn(b, hkv, dim).half().to(DEVICE)
    v_new = torch.randn(b, hkv, dim).half().to(DEVICE)
    k = torch.zeros(b, hkv, cap, dim, dtype=torch.float16, device=DEVICE)
    v = torch.zeros_like(k)
    positions = torch.tensor([8, 3], device=DEVICE)
    write_decode_kv(k_new, v_new, positions, k_dst=k, v_dst=v)
    assert torch.equal(k[0, :, 8].cpu(), k_new[0].cpu()) and torch.equal(k[1, :, 3].cpu(), k_new[1].cpu())
    assert torch.equal(v[0, :, 8].cpu(), v_new[0].cpu()) and int((k != 0).sum()) == int((k_new != 0).sum())


@pytest.mark.parametrize("h, hkv, dim", [(6, 2, 32), (4, 4, 48), (8, 1, 16), (8, 2, 128)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rotate_queries_matches_the_reference_rotation(h, hkv, dim, dtype):
    b = 3
    q = torch.randn(b, 1, h, dim).to(dtype).to(DEVICE).transpose(1, 2)[:, :, 0]  # strided, as the model hands it
    basis = random_basis(hkv, dim, seed=h).to(DEVICE)
    got = rotate_queries(q, basis)
    want = loki.rotate(q[:, :, None].cpu().float(), basis.cpu())[:, :, 0]
    assert got.dtype == dtype
    assert_close(got, want.to(dtype), atol=1e-5, rtol=1e-2 if dtype == torch.bfloat16 else 1e-3, what="rotated queries")


@pytest.mark.skipif(ON_GPU, reason="a float32 model with the kernels on the interpreter; on a GPU: benchmarks/e2e_check.py")
@pytest.mark.parametrize("loki_spec", [None, dict(kf=0.25, df=0.25, group="kv")])
def test_static_loop_with_fused_writes_generates_what_the_pytorch_ops_do(loki_spec):
    """The static loop's decode step with the write and query rotation through these kernels (forced
    on here; on by default only on CUDA) against the same loop with PyTorch ops: same tokens, same cache."""
    from conftest import random_tokens, tiny_calibrated

    from lokitool.sparse import generation as gen
    from lokitool.sparse import static
    from lokitool.sparse.reference import LokiSpec

    loaded, cal = tiny_calibrated()
    spec = None if loki_spec is None else LokiSpec(**loki_spec)
    bases = None if spec is None else gen.loki_bases(spec, cal, loaded.facts)
    ids = random_tokens(2, 18, seed=9)
    runs = []
    for fused in (False, True):
        cache = static.StaticCache(loaded.facts, batch=2, capacity=30, dtype=torch.float32, device=torch.device("cpu"), bases=bases, spec=spec)
        cache.fused = fused
        tokens = static.generate_static(loaded.model, ids, 12, cache, graph=False)
        runs.append((tokens, cache))
    (want, plain), (got, fused) = runs
    assert torch.equal(got, want)
    for a, b in zip(plain.layers, fused.layers):
        torch.testing.assert_close(b.joined_keys(29), a.joined_keys(29), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.v, a.v, rtol=1e-5, atol=1e-5)  # deeper layers: inputs rounded differently
