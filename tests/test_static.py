"""The static decode loop (sparse/static.py), run eagerly on the CPU: the same greedy tokens as the
eager loops, the cache layout and device-side positions, prefill in chunks."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import random_tokens, tiny_calibrated

from lokitool.sparse import generation as gen
from lokitool.sparse import static
from lokitool.sparse.reference import LokiSpec


@pytest.fixture(scope="module")
def tiny_gqa():
    """A GQA decoder (6 query heads over 2 KV heads) and a calibration made on its own keys."""
    return tiny_calibrated()


def test_full_attention_in_the_static_loop_generates_what_the_eager_loop_does(tiny_gqa):
    loaded, _ = tiny_gqa
    ids = random_tokens(2, 20, seed=3)
    eager = gen.generate_with(loaded.model, loaded.facts, ids, 30, None, static_loop=False)
    got = gen.generate_with(loaded.model, loaded.facts, ids, 30, None, static_loop=True)
    assert eager.shape == got.shape == (2, 30)
    assert torch.equal(got, eager)


def test_loki_at_full_budgets_in_the_static_loop_equals_full_attention(tiny_gqa):
    loaded, cal = tiny_gqa
    ids = random_tokens(2, 20, seed=3)
    full = gen.generate_with(loaded.model, loaded.facts, ids, 30, None, static_loop=False)
    got = gen.generate_with(loaded.model, loaded.facts, ids, 30, LokiSpec(kf=1.0, df=1.0), cal, static_loop=True)
    assert torch.equal(got, full)


@pytest.mark.parametrize("group", ["head", "kv"])
def test_loki_in_the_static_loop_equals_the_eager_loki_loop(tiny_gqa, group):
    loaded, cal = tiny_gqa
    ids = random_tokens(2, 24, seed=5)
    spec = LokiSpec(kf=0.25, df=0.25, group=group)
    eager = gen.generate_with(loaded.model, loaded.facts, ids, 30, spec, cal, static_loop=False)
    got = gen.generate_with(loaded.model, loaded.facts, ids, 30, spec, cal, static_loop=True)
    assert torch.equal(got, eager)
    full = gen.generate_with(loaded.model, loaded.facts, ids, 30, None, static_loop=False)
    assert not torch.equal(got, full)  # selection really happens at kf = 0.25


def test_cache_holds_rotated_split_keys_and_positions_on_the_device(tiny_gqa):
    loaded, cal = tiny_gqa
    facts = loaded.facts
    spec = LokiSpec(kf=0.5, df=0.25)
    bases = gen.loki_bases(spec, cal, facts)
    ids = random_tokens(2, 21, seed=7)
    cache = static.StaticCache(facts, batch=2, capacity=40, dtype=torch.float32, device=torch.device("cpu"), bases=bases, spec=spec)
    layer = cache.layers[1]
    d = spec.dims(facts.head_dim)
    assert layer.low.shape == (2, 2, 40, d) and layer.high.shape == (2, 2, 40, facts.head_dim - d) and layer.k is None
    with static.static_attention(loaded.model, cache), torch.no_grad():
        decoder = static.StaticDecoder(loaded.model, cache)
        decoder.prefill(ids, chunk=8)  # three chunks: 8, 8, 5
        assert cache.seen == 21 and cache.positions.tolist() == [21, 21]
        for _ in range(3):
            decoder.step()
    assert cache.seen == 24 and cache.positions.tolist() == [24, 24] and cache.lengths.tolist() == [24, 24]
    # the same tokens through the eager Loki cache: keys rotated by the basis, split after d
    eager = gen.new_cache(spec, bases, 40)
    with gen.loki_attention(loaded.model, eager, spec), torch.no_grad():
        first = gen.prefill(loaded.model, ids, eager)
        gen.decode_n_tokens(loaded.model, first, eager, 3)
    want = eager.layers[1].keys  # [B, Hkv, 24, D] rotated
    torch.testing.assert_close(layer.joined_keys(24), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.v[:, :, :24], eager.layers[1].values, rtol=1e-5, atol=1e-5)
    assert bool((layer.v[:, :, 24:] == 0).all())  # nothing written past the positions


def test_static_cache_refuses_to_overflow(tiny_gqa):
    loaded, _ = tiny_gqa
    cache = static.StaticCache(loaded.facts, batch=1, capacity=12, dtype=torch.float32, device=torch.device("cpu"))
    with static.static_attention(loaded.model, cache), torch.no_grad():
        decoder = static.StaticDecoder(loaded.model, cache)
        decoder.prefill(random_tokens(1, 11), chunk=None)
        decoder.step()
        with pytest.raises(ValueError, match="static cache is full"):
            decoder.step()


@pytest.mark.parametrize("fill", ["random", "prefill"])
def test_e2e_rows_of_the_static_loop_report_the_memory_floor(fill):
    from lokitool.bench import e2e
    from lokitool.bench.presets import PRESETS

    cfg = e2e.E2EConfig(model="tiny", batch=2, prompt_len=40, new_tokens=3, warmup=1, eager_tokens=1, device="cpu", dtype="float32",
                        fill=fill)
    rows = e2e.run_e2e(cfg)
    assert [r["method"] for r in rows] == ["full-graph", "loki-graph"]
    p = PRESETS["tiny"]
    # weights read per step: all but the (untied) input embedding, float32
    weights = sum(t.numel() for t in e2e.load("tiny", "cpu", "float32").model.parameters()) * 4 - p.vocab_size * p.hidden_size * 4
    # prompt, 4 plain steps (the first 3 untimed: compile and plan, then each layer's call graph), 1 warm-up step,
    # then the mean of 3 timed steps
    assert e2e.UNTIMED_PLAIN == 3
    context = 40 + 4 + 1 + (3 - 1) / 2
    kv = 2 * p.num_hidden_layers * 2 * p.num_key_value_heads * p.head_dim * context * 4
    for r in rows:
        assert r["graph"] is False and r["eager_ms"] > 0 and r["finite_logits"]
        assert r["weights_gb"] == pytest.approx(weights / 1e9) and r["floor_gb"] == pytest.approx((weights + kv) / 1e9)
        assert r["floor_ms"] == pytest.approx(r["floor_gb"] / r["bandwidth_gbs"] * 1e3)
        assert r["x_floor"] == pytest.approx(r["per_token_ms"] / r["floor_ms"]) and r["floor_fraction"] == pytest.approx(1 / r["x_floor"])
        # K + V, B=2, Hkv=2, capacity 40 + 4 + 1 + 3 tokens, D=16, 2 layers, float32: the Loki planes hold as many bytes
        assert r["cache_mb"] == pytest.approx(2 * 2 * 2 * 2 * 48 * 16 * 4 / 2**20)
        assert (r["prefill_s"] is None) == (fill == "random")
    assert rows[0]["speedup_vs_full_graph"] == 1.0 and rows[1]["d"] == 4 and rows[0]["speedup_vs_full"] is None


def test_compiled_norms_and_mlps_give_the_same_tokens_and_are_removed_after(tiny_gqa):
    loaded, cal = tiny_gqa
    model = loaded.model
    ids = random_tokens(2, 20, seed=3)
    spec = LokiSpec(kf=0.25, df=0.25)
    want = gen.generate_with(model, loaded.facts, ids, 12, spec, cal, static_loop=True)
    import sys

    modeling = sys.modules[type(model.model.layers[0].self_attn).__module__]
    norm_forward, rotary = type(model.model.norm).forward, modeling.apply_rotary_pos_emb
    with static.compiled_parts(model, backend="aot_eager") as count:
        assert count == 2 * 3 + 1 + 1  # per layer two norms and an MLP, the final norm, the rotary function
        assert model.model.norm.forward.__func__ is not norm_forward and modeling.apply_rotary_pos_emb is not rotary
        got = gen.generate_with(model, loaded.facts, ids, 12, spec, cal, static_loop=True)
    assert torch.equal(got, want)
    assert "forward" not in model.model.norm.__dict__ and model.model.norm.forward.__func__ is norm_forward
    assert modeling.apply_rotary_pos_emb is rotary


@contextlib.contextmanager
def linear_shapes():
    """The weight shape of every F.linear call made inside the block, in order (F.linear patched, then restored)."""
    import torch.nn.functional as F

    calls, real = [], F.linear

    def counting(inp, weight, bias=None):
        calls.append(tuple(weight.shape))
        return real(inp, weight, bias)

    F.linear = counting
    try:
        yield calls
    finally:
        F.linear = real


def test_fused_projections_compute_q_k_v_in_one_multiply_and_give_the_same_tokens(tiny_gqa):
    """Inside fused_projections each attention module runs one matrix multiply for q, k and v (k_proj
    and v_proj hand back its slices), the projections equal the separate ones, the static loop's tokens
    are unchanged, and afterwards the forwards are the modules' own (weights keep their values)."""

    loaded, cal = tiny_gqa
    model = loaded.model
    attn = model.model.layers[1].self_attn
    before = [p.weight.detach().clone() for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
    x = torch.randn(2, 3, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    ids = random_tokens(2, 20, seed=3)
    spec = LokiSpec(kf=0.25, df=0.25)
    want = gen.generate_with(model, loaded.facts, ids, 12, spec, cal, static_loop=True)
    with static.fused_projections(model) as count, torch.no_grad():
        assert count == len(model.model.layers)
        with linear_shapes() as calls:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            assert calls == [(sum(w.shape[0] for w in before), model.config.hidden_size)]  # one multiply for the three
            other = attn.k_proj(x.clone())  # not the input q_proj saw: its own multiply
            assert len(calls) == 2 and calls[1] == tuple(before[1].shape)
        for got, w in zip((q, k, v, other), (*before, before[1])):
            torch.testing.assert_close(got, x @ w.T, rtol=1e-5, atol=1e-5)
        got = gen.generate_with(model, loaded.facts, ids, 12, spec, cal, static_loop=True)
    assert torch.equal(got, want)
    for p, w in zip((attn.q_proj, attn.k_proj, attn.v_proj), before):
        assert "forward" not in p.__dict__ and torch.equal(p.weight, w)


def test_fused_projections_keep_biases_and_skip_what_they_cannot_fuse():
    """Biased q, k, v (Qwen2) are fused with their biases; a module whose projections differ in input
    size, or that has a bias on some only, is left alone."""
    from torch import nn

    class Attn(nn.Module):
        def __init__(self, idx, bias_k=True, k_in=8):
            super().__init__()
            self.layer_idx = idx
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(k_in, 4, bias=bias_k), nn.Linear(8, 4)

    model = nn.ModuleList([Attn(0), Attn(1, bias_k=False), Attn(2, k_in=6)])
    x = torch.randn(3, 8)
    want = [m.q_proj(x) + 0 for m in model], model[0].k_proj(x), model[0].v_proj(x)
    with static.fused_projections(model) as count, torch.no_grad():
        assert count == 1 and "forward" in model[0].q_proj.__dict__ and "forward" not in model[1].q_proj.__dict__
        q, k, v = model[0].q_proj(x), model[0].k_proj(x), model[0].v_proj(x)
    torch.testing.assert_close(q, want[0][0])
    torch.testing.assert_close(k, want[1])
    torch.testing.assert_close(v, want[2])


def _gated_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The reference of a SiLU-gated MLP without biases: down(silu(x gate^T) * x up^T)."""
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


def test_fused_gate_up_compute_gate_and_up_in_one_multiply_and_give_the_same_tokens(tiny_gqa):
    """Inside fused_gate_up each MLP runs one matrix multiply for gate and up (their weights become row
    blocks of one matrix), the MLP output equals the gated-MLP formula, logits and the static loop's
    tokens are unchanged, and afterwards the forwards are the modules' own with the same weights."""

    loaded, cal = tiny_gqa
    model = loaded.model
    assert model.config.hidden_act == "silu"
    mlp = model.model.layers[1].mlp
    hidden, inter = model.config.hidden_size, model.config.intermediate_size
    before = [p.weight.detach().clone() for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    x = torch.randn(2, 3, hidden, generator=torch.Generator().manual_seed(0))
    ids = random_tokens(2, 20, seed=3)
    spec = LokiSpec(kf=0.25, df=0.25)
    reference = _gated_mlp(x, *before)
    with torch.no_grad():
        want_logits = model(ids).logits
    want = gen.generate_with(model, loaded.facts, ids, 12, spec, cal, static_loop=True)
    with static.fused_gate_up(model) as count, torch.no_grad():
        assert count == len(model.model.layers)
        gate, up = mlp.gate_proj.weight, mlp.up_proj.weight  # row blocks of one [2 * inter, hidden] matrix
        assert gate.untyped_storage().data_ptr() == up.untyped_storage().data_ptr()
        assert up.data_ptr() - gate.data_ptr() == inter * hidden * gate.element_size()
        with linear_shapes() as calls:
            out = mlp(x)
            assert calls == [(2 * inter, hidden), (hidden, inter)]  # gate and up together, then down
            lone = mlp.up_proj(x.clone())  # not the input gate_proj saw: its own multiply
            assert calls[2:] == [(inter, hidden)]
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lone, x @ before[1].T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(ids).logits, want_logits, rtol=1e-5, atol=1e-5)
        got = gen.generate_with(model, loaded.facts, ids, 12, spec, cal, static_loop=True)
    assert torch.equal(got, want)
    for p, w in zip((mlp.gate_proj, mlp.up_proj), before):
        assert "forward" not in p.__dict__ and torch.equal(p.weight, w)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compiled_first", [True, False])
def test_fused_gate_up_compose_with_compiled_parts(tiny_gqa, compiled_first):
    """Under compiled_parts the patched projections are traced into the MLP's graph: no graph break,
    one graph for every layer, holding one multiply for gate and up and one for down; outputs and the
    static loop's tokens equal those of neither, whichever of the two is entered first."""
    import torch._dynamo
    from torch._dynamo.backends.registry import lookup_backend
    from torch._dynamo.utils import counters

    loaded, cal = tiny_gqa
    model = loaded.model
    hidden, inter = model.config.hidden_size, model.config.intermediate_size
    mlps = [layer.mlp for layer in model.model.layers]
    x = torch.randn(2, 1, hidden, generator=torch.Generator().manual_seed(1))
    references = [_gated_mlp(x, m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight).detach() for m in mlps]
    ids = random_tokens(2, 20, seed=3)
    spec = LokiSpec(kf=0.25, df=0.25)
    want = gen.generate_with(model, loaded.facts, ids, 12, spec, cal, static_loop=True)
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    @contextlib.contextmanager
    def both(backend):
        parts = [static.compiled_parts(model, backend=backend), static.fused_gate_up(model)]
        with contextlib.ExitStack() as stack:
            for part in parts if compiled_first else parts[::-1]:
                stack.enter_context(part)
            yield

    torch._dynamo.reset()
    counters.clear()
    with both(recording), torch.no_grad():
        outs = [m(x) for m in mlps]
    assert not counters["graph_break"]
    linears = [[n for n in g.graph.nodes if n.target is torch._C._nn.linear] for g in graphs]
    linears = [nodes for nodes in linears if nodes]  # the MLP graphs (norms and rotary have none)
    assert len(linears) == 1  # both layers run the one graph
    assert [tuple(n.args[1].meta["example_value"].shape) for n in linears[0]] == [(2 * inter, hidden), (hidden, inter)]
    for out, ref in zip(outs, references):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with both("aot_eager"):
        got = gen.generate_with(model, loaded.facts, ids, 12, spec, cal, static_loop=True)
    assert torch.equal(got, want)


def test_fused_gate_up_keep_biases_and_skip_what_they_cannot_fuse():
    """Biased gate and up are fused with their biases; an MLP with a bias on one only, differing input
    sizes, a Linear subclass (a quantized linear, say), up_proj called before gate_proj, or one fused
    gate_up_proj (Phi-3) is left alone and computes what it did."""
    from torch import nn

    class Quantized(nn.Linear):
        pass

    class Gated(nn.Module):
        def __init__(self, bias=False, up_bias=None, up_in=8, up_type=nn.Linear):
            super().__init__()
            self.gate_proj = nn.Linear(8, 6, bias=bias)
            self.up_proj = up_type(up_in, 6, bias=bias if up_bias is None else up_bias)
            self.down_proj, self.act_fn = nn.Linear(6, 8), nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    class UpFirst(Gated):  # Falcon-H1's order
        def forward(self, x):
            return self.down_proj(self.up_proj(x) * self.act_fn(self.gate_proj(x)))

    class GateUp(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj, self.down_proj = nn.Linear(8, 12), nn.Linear(6, 8)

        def forward(self, x):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(torch.nn.functional.silu(gate) * up)

    torch.manual_seed(0)
    model = nn.ModuleList([Gated(bias=True), Gated(), Gated(bias=True, up_bias=False), Gated(up_in=6), Gated(up_type=Quantized), UpFirst(),
                           GateUp()])
    runnable = [0, 1, 2, 4, 5, 6]  # those whose gate and up read the same input size
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = {i: model[i](x) for i in runnable}
    with static.fused_gate_up(model) as count, torch.no_grad():
        assert count == 2
        assert ["forward" in m.gate_proj.__dict__ for m in model[:6]] == [True, True, False, False, False, False]
        assert model[0].gate_proj.bias.data_ptr() + 6 * 4 == model[0].up_proj.bias.data_ptr()  # one bias vector
        for i in runnable:
            torch.testing.assert_close(model[i](x), want[i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("qkv, mlp, counts", [(None, None, (2, 2)), ("0", None, (0, 2)), ("1", "0", (2, 0)), ("0", "0", (0, 0))])
def test_decode_projections_fuse_on_cuda_as_the_switches_say(tiny_gqa, monkeypatch, qkv, mlp, counts):
    """On CUDA (the model may stay on the CPU: fusing only moves weights into one matrix) q/k/v and
    gate/up are fused unless LOKITOOL_FUSED_QKV / LOKITOOL_FUSED_MLP is 0; never elsewhere."""
    model = tiny_gqa[0].model
    for name, value in (("LOKITOOL_FUSED_QKV", qkv), ("LOKITOOL_FUSED_MLP", mlp)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    with static.decode_projections(model, torch.device("cuda")) as fused:
        assert fused == static.FusedCounts(*counts)
        layer = model.model.layers[0]
        assert ("forward" in layer.self_attn.q_proj.__dict__, "forward" in layer.mlp.gate_proj.__dict__) == (counts[0] > 0, counts[1] > 0)
    assert "forward" not in layer.self_attn.q_proj.__dict__ and "forward" not in layer.mlp.gate_proj.__dict__
    with static.decode_projections(model, torch.device("cpu")) as fused:
        assert fused == static.FusedCounts(0, 0)


@pytest.mark.parametrize("name", ["LOKITOOL_FUSED_QKV", "LOKITOOL_FUSED_MLP"])
@pytest.mark.parametrize("value", ["2", "off", "", "true"])
def test_decode_projection_switches_refuse_other_values(tiny_gqa, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"^{name} must be 0 or 1, not {value!r}$"):
        static.decode_projections(tiny_gqa[0].model, torch.device("cuda"))


@pytest.mark.parametrize("v", [1, 255, 256, 1000, 49152])
def test_greedy_tokens_are_torch_argmax(v):
    """The two-stage argmax of the static loop picks what torch.argmax picks: the first maximum (ties
    across and inside chunks), NaN as the maximum, a row of -inf, vocabularies of any size."""
    g = torch.Generator().manual_seed(v)
    logits = torch.randint(-4, 5, (6, v), generator=g).float()  # many ties
    logits[1] = torch.randn(v, generator=g)
    logits[2] = float("-inf")
    logits[3, v // 2] = float("nan")
    logits[4, -1] = 99.0  # the last logit, past every full chunk
    logits[5, :] = 7.0
    assert torch.equal(static.greedy_tokens(logits), logits.argmax(-1))
    half = logits.half()
    assert torch.equal(static.greedy_tokens(half), half.argmax(-1))
