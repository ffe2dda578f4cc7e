"""The model matrix: every decoder family lokitool accepts, as a tiny random-weight model built from
transformers' own config class, checked end to end; the families it refuses, refused in one line.

For each supported family:
- keys: the pre-RoPE keys `calibrate` collects equal the test's own capture (the k_norm output read in
  the layout that family's code is known to use, else the k_proj output), and the post-RoPE keys equal
  those rotated with the model's own cos/sin (Gemma 3: a different base per layer type);
- eval: Loki (and exact top-k, H2O) at kf = df = 1 reproduce the model's logits over a sequence three
  times longer than the sliding window (the window bites: layers keep it, budgets count visible keys);
- generate: greedy tokens at kf = df = 1 equal full attention over a prompt longer than the window,
  with exact and with Loki prefill.
The reference is the model's own attention: `eager` where soft-capping (Gemma 2) or sink logits
(gpt-oss) need it (SDPA does neither), `sdpa` elsewhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch
from conftest import random_tokens

from lokitool.calib.calibration import Calibration
from lokitool.calib.collect import capture, collect_statistics
from lokitool.calib.models import LoadedModel, ModelFacts, attention_modules, read_facts
from lokitool.calib.run import build_calibration
from lokitool.errors import UserError
from lokitool.sparse import generation as gen
from lokitool.sparse.attention import MethodSpec, patched
from lokitool.sparse.reference import LokiSpec

WINDOW = 8
SEQ = 3 * WINDOW
SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=256,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)


@dataclass(frozen=True)
class Family:
    name: str
    config: str  # transformers config class
    overrides: dict = field(default_factory=dict)
    heads: tuple[int, int] = (4, 2)  # query heads, KV heads
    attn: str = "sdpa"  # the reference implementation
    key_norm: str | None = None  # layout of k_norm's output in the family's code: "BSHD", "BHSD", "BS(HD)"
    sliding: tuple[int, ...] = ()  # layers that keep a window of WINDOW keys


FAMILIES = [
    Family("llama", "LlamaConfig"),
    Family("mistral", "MistralConfig", dict(sliding_window=WINDOW), sliding=(0, 1)),
    Family("qwen2", "Qwen2Config", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1), sliding=(1,)),
    Family("qwen3", "Qwen3Config", key_norm="BSHD"),
    Family("gemma2", "Gemma2Config", dict(sliding_window=WINDOW, attn_logit_softcapping=1.0, query_pre_attn_scalar=16, initializer_range=0.2),
           attn="eager", sliding=(0,)),
    Family("gemma3", "Gemma3TextConfig", dict(sliding_window=WINDOW, sliding_window_pattern=2, query_pre_attn_scalar=16,
           rope_local_base_freq=100.0), heads=(4, 1), key_norm="BHSD", sliding=(0,)),
    Family("olmo2", "Olmo2Config", key_norm="BS(HD)"),
    Family("gpt_oss", "GptOssConfig", dict(sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2),
           attn="eager", sliding=(0,)),
]
REFUSED = [("phi3", "Phi3Config", "qkv_proj"), ("gpt_neox", "GPTNeoXConfig", "query_key_value")]


def build_config(config: str, heads: tuple[int, int] = (4, 2), **overrides):
    import transformers

    h, hkv = heads
    return getattr(transformers, config)(num_attention_heads=h, num_key_value_heads=hkv, head_dim=64 // h, **SHAPE, **overrides)


_MODELS: dict[str, tuple[LoadedModel, Calibration]] = {}


def tiny(family: Family) -> tuple[LoadedModel, Calibration]:
    """The family's tiny model (float32, eval mode, seeded) and a calibration on its own keys; built once."""
    if family.name not in _MODELS:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        config = build_config(family.config, family.heads, **family.overrides)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=family.attn).eval()
        facts = read_facts(model, None, f"tiny-{family.name}", None)
        tokens = random_tokens(2, SEQ, seed=1)
        stats = collect_statistics(model, facts, tokens, batch_size=2, with_queries=False)
        calibration = build_calibration(stats, facts, {"dataset": "random", "num_tokens": tokens.numel()})
        _MODELS[family.name] = (LoadedModel(model=model, tokenizer=None, facts=facts), calibration)
    return _MODELS[family.name]


def by_name(names):
    return [pytest.param(f, id=f.name) for f in FAMILIES if f.name in names]


def _rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D] rotated by the model's cos/sin [B, S, D] (or [B, S, D/2], gpt-oss): dims i and
    i + D/2 form a pair."""
    if cos.shape[-1] * 2 == x.shape[-1]:
        cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    first, second = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat([-second, first], dim=-1) * sin[:, None]


@pytest.mark.parametrize("family", by_name([f.name for f in FAMILIES]))
def test_facts_record_the_sliding_layers(family):
    loaded, _ = tiny(family)
    facts = loaded.facts
    assert facts.sliding_layers == family.sliding
    assert facts.sliding_window == (WINDOW if family.sliding else None)
    assert facts.softcap == family.overrides.get("attn_logit_softcapping")
    assert facts.attention_sinks == (family.name == "gpt_oss")
    record = json.loads(json.dumps(facts.to_dict()))  # as eval's results file and the calibration header hold it
    assert record["sliding_layers"] == list(family.sliding)
    assert ModelFacts.from_dict(record) == facts


def test_facts_from_files_written_before_the_new_fields_load():
    old = {"model_id": "m", "revision": None, "architecture": "llama", "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
           "head_dim": 16, "rope": True, "max_positions": 256, "bos_token_id": 1}
    facts = ModelFacts.from_dict(old)
    assert facts.sliding_layers == () and facts.sliding_window is None and facts.layer_window(0) is None


@pytest.mark.parametrize("family", by_name([f.name for f in FAMILIES]))
def test_collected_keys_equal_an_independent_capture(family):
    """calibrate's pre- and post-RoPE keys against the test's own hooks and the model's cos/sin."""
    loaded, _ = tiny(family)
    model, facts = loaded.model, loaded.facts
    hkv, dim = facts.num_kv_heads, facts.head_dim
    got: dict[tuple[str, int], torch.Tensor] = {}
    own: dict[tuple[str, int], torch.Tensor] = {}

    def sink(vector, kind, layer, x):
        if vector == "key":
            got[kind, layer] = x.clone()

    def own_pre(layer):
        def hook(_module, _inputs, out):
            b, s = out.shape[0], (out.shape[2] if family.key_norm == "BHSD" else out.shape[1])
            layout = family.key_norm
            x = out.transpose(1, 2) if layout == "BHSD" else out.reshape(b, s, hkv, dim)
            own["pre", layer] = x.transpose(1, 2).clone()  # [B, Hkv, S, D]

        return hook

    def own_cos_sin(layer):
        def hook(_module, _args, kwargs):
            own["rope", layer] = kwargs["position_embeddings"]

        return hook

    handles = []
    try:
        for i, attn in enumerate(attention_modules(model)):
            point = attn.k_norm if family.key_norm else attn.k_proj
            handles.append(point.register_forward_hook(own_pre(i)))
            handles.append(attn.register_forward_pre_hook(own_cos_sin(i), with_kwargs=True))
        # S = D = 16 on purpose: a layout guessed from shapes cannot tell [B, H, S, D] from [B, S, H, D] here
        with torch.no_grad(), capture(model, facts, sink):
            model(input_ids=random_tokens(2, 16, seed=5))
    finally:
        for handle in handles:
            handle.remove()
    for layer in range(facts.num_layers):
        torch.testing.assert_close(got["pre", layer], own["pre", layer], rtol=1e-6, atol=1e-6)
        cos, sin = own["rope", layer]
        torch.testing.assert_close(got["post", layer], _rotate_half_rope(own["pre", layer], cos, sin), rtol=1e-5, atol=1e-5)


def test_gemma3_layers_use_two_rope_bases():
    """The check above is not vacuous for Gemma 3: its sliding and full layers rotate differently."""
    loaded, _ = tiny(FAMILIES[[f.name for f in FAMILIES].index("gemma3")])
    seen = {}

    def hook(module, _args, kwargs):
        seen[module.layer_idx] = kwargs["position_embeddings"][0]

    handles = [a.register_forward_pre_hook(hook, with_kwargs=True) for a in attention_modules(loaded.model)]
    try:
        with torch.no_grad():
            loaded.model(input_ids=random_tokens(1, 12))
    finally:
        for handle in handles:
            handle.remove()
    assert not torch.allclose(seen[0], seen[1])


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits.float()


@pytest.mark.parametrize("family", by_name([f.name for f in FAMILIES]))
def test_full_budgets_reproduce_the_model_past_the_window(family):
    """kf = df = 1 over 24 tokens with an 8-token window: every method equals the model's own attention."""
    loaded, calibration = tiny(family)
    tokens = random_tokens(2, SEQ, seed=7)
    want = _logits(loaded.model, tokens)
    full = LokiSpec(kf=1.0, df=1.0)
    for spec in (MethodSpec("loki", full), MethodSpec("exact-topk", LokiSpec(kf=1.0, df=None)), MethodSpec("h2o", LokiSpec(kf=1.0, df=None))):
        with patched(loaded.model, loaded.facts, spec, calibration) as recorder:
            got = _logits(loaded.model, tokens)
        label = f"{family.name} {spec.method}"
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m, label=label: f"{label}: {m}")
        assert abs(recorder.kept_fraction() - 1.0) < 1e-9  # every visible key kept, and no more


@pytest.mark.parametrize("budget", ["per-row", "window"])
@pytest.mark.parametrize("family", by_name([f.name for f in FAMILIES if f.sliding]))
def test_sparse_rows_select_inside_the_window(family, budget):
    """At kf < 1 a sliding layer's rows keep floor(kf x visible) keys (per-row budgets) or
    min(visible, floor(kf x window)) (window budgets: the window is the most a row sees)."""
    loaded, calibration = tiny(family)
    spec = MethodSpec("loki", LokiSpec(kf=0.5, df=0.5, budget=budget))
    with patched(loaded.model, loaded.facts, spec, calibration) as recorder:
        _logits(loaded.model, random_tokens(1, SEQ, seed=8))
    layer = family.sliding[0]
    visible = torch.arange(SEQ).add(1).clamp(max=WINDOW).double()
    kept = torch.floor(0.5 * visible).clamp(min=1) if budget == "per-row" else visible.clamp(max=WINDOW // 2)
    want = float((kept / visible).mean())  # the mean over rows of kept / visible keys
    assert recorder.layers[layer].mean_kept_fraction == pytest.approx(want)


@pytest.mark.parametrize("sink", [0, 2])
def test_selection_under_a_window_keeps_the_top_visible_keys(sink):
    """Against brute force: each row keeps its first `sink` visible keys and then the best-scored
    visible keys, floor(kf x visible) in all, and nothing outside its window."""
    from lokitool.calib.dispatch import visible_keys
    from lokitool.sparse import reference as loki

    scores = torch.randn(2, 3, SEQ, SEQ, generator=torch.Generator().manual_seed(0))
    visible = visible_keys(None, SEQ, SEQ, WINDOW, "cpu")  # [1, 1, S, S]
    budgets = loki.visible_budgets(LokiSpec(kf=0.4), visible, WINDOW)
    keep = loki.select_visible(scores, visible, budgets, sink)
    for t in range(SEQ):
        seen = list(range(max(0, t - WINDOW + 1), t + 1))
        k = max(1, int(0.4 * len(seen)))
        for b in range(2):
            for h in range(3):
                forced = seen[: min(sink, k)]
                rest = sorted((j for j in seen if j not in forced), key=lambda j: -float(scores[b, h, t, j]))
                want = set(forced + rest[: k - len(forced)])
                assert set(keep[b, h, t].nonzero().flatten().tolist()) == want


@pytest.mark.parametrize("loki_prefill", [False, True], ids=["exact-prefill", "loki-prefill"])
@pytest.mark.parametrize("family", by_name([f.name for f in FAMILIES]))
def test_full_budgets_generate_as_full_attention_past_the_window(family, loki_prefill):
    loaded, calibration = tiny(family)
    prompt = random_tokens(2, 2 * WINDOW + 4, seed=9)
    want = gen.generate_with(loaded.model, loaded.facts, prompt, 8, None)
    got = gen.generate_with(loaded.model, loaded.facts, prompt, 8, LokiSpec(kf=1.0, df=1.0), calibration, loki_prefill=loki_prefill)
    assert torch.equal(got, want)


def _wrong_attention(drop: str):
    """A route to exact attention that forgets one thing the model asks for: its mask and window
    ("window"), or its soft-capping and sink logits ("extras")."""
    from lokitool.calib.dispatch import visible_keys
    from lokitool.sparse import reference as loki

    def make_handler(_module):
        def handler(mod, q, k, v, mask, scaling=None, **kwargs):
            visible = None if drop == "window" else visible_keys(mask, q.shape[2], k.shape[2], kwargs.get("sliding_window"), q.device)
            extras = {} if drop == "extras" else dict(softcap=kwargs.get("softcap"), sink_logits=kwargs.get("s_aux"))
            out = loki.sparse_attention(q, k, v, selector=loki.full_selector(), spec=LokiSpec(kf=1.0), scaling=scaling, mask=visible, **extras)
            return out.transpose(1, 2).to(q.dtype).contiguous(), None

        return handler

    return make_handler


@pytest.mark.parametrize("family", by_name([f.name for f in FAMILIES if f.sliding]))
def test_these_checks_see_what_is_forgotten(family):
    """The matrix is not vacuous: attention that ignores the window (or Gemma 2's soft-capping,
    gpt-oss's sinks) moves these tiny models' logits far beyond the tolerance used above."""
    from lokitool.calib.dispatch import route_attention

    loaded, _ = tiny(family)
    tokens = random_tokens(2, SEQ, seed=7)
    want = _logits(loaded.model, tokens)
    drops = ["window"] + (["extras"] if family.name in ("gemma2", "gpt_oss") else [])
    for drop in drops:
        with route_attention(loaded.model, _wrong_attention(drop)):
            assert (_logits(loaded.model, tokens) - want).abs().max() > 1e-2, drop


@pytest.mark.parametrize("name, config, fused", REFUSED, ids=[r[0] for r in REFUSED])
def test_fused_projections_are_refused_in_one_line(name, config, fused):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(build_config(config))
    with pytest.raises(UserError) as err:
        read_facts(model, None, f"tiny-{name}", None)
    message = str(err.value)
    assert "\n" not in message and name in message and fused in message


@pytest.mark.parametrize("name, config, fused", REFUSED, ids=[r[0] for r in REFUSED])
def test_fused_projections_are_refused_before_weights_load(name, config, fused, tmp_path, monkeypatch):
    import transformers
    from transformers import AutoModelForCausalLM

    from lokitool.calib.models import load_model

    AutoModelForCausalLM.from_config(build_config(config)).save_pretrained(tmp_path)

    def no_weights(*_args, **_kwargs):
        raise AssertionError("weights were loaded before the refusal")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_weights)
    with pytest.raises(UserError, match=fused):
        load_model(str(tmp_path), device="cpu", dtype="float32")
