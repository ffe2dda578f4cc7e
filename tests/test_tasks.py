"""`eval --tasks`: synthetic tasks (generation and scoring), decode-time methods, the runner, bad input."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
from conftest import tiny_calibrated

from lokitool.errors import UserError
from lokitool.evals import longctx
from lokitool.evals import tasks as T
from lokitool.evals.config import EvalConfig, TaskConfig
from lokitool.sparse import decode as D
from lokitool.sparse import reference as R
from lokitool.sparse.attention import MethodSpec
from lokitool.sparse.reference import LokiSpec


class CharTokenizer:
    """One token per ASCII character (ids 3..127), so the 128-token tiny models can read a task."""

    chat_template = None
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [min(127, max(3, ord(c))) for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if i > 2)


def haystack(n_words: int = 3000) -> str:
    rng = random.Random(0)
    words = [f"alpha{a}{b}" for a in "abcdefgh" for b in "abcdefgh"]
    return " ".join(rng.choice(words) + ("." if i % 9 == 8 else "") for i in range(n_words))


def sample(task: str, length: int = 700, depth: float | None = 0.5, seed: int = 0) -> T.Sample:
    tok = CharTokenizer()
    return T.make_sample(task, length=length, depth=depth, seed=seed, haystack=haystack(),
                         encode=lambda t: tok(t)["input_ids"], decode=tok.decode)


@pytest.fixture(scope="module")
def tiny():
    loaded, cal = tiny_calibrated(with_queries=True)  # query statistics: qa bases, Double Sparsity
    facts = dataclasses.replace(loaded.facts, max_positions=None)  # RoPE runs past the config's 256
    return type(loaded)(model=loaded.model, tokenizer=CharTokenizer(), facts=facts), cal


@pytest.mark.parametrize("task", T.TASKS)
def test_samples_are_deterministic_fit_the_length_and_hold_their_answers(task):
    a, b = sample(task), sample(task)
    assert a == b and sample(task, seed=1) != a
    assert a.expected and all(e in a.context for e in a.expected)
    context, question = T.prompt_ids(a, CharTokenizer(), 1)
    assert 600 <= len(context) + len(question) <= 720
    assert a.depth is None if task in T.DEPTHLESS else a.depth == 0.5


def test_the_needle_sits_at_its_depth():
    for depth in (0.0, 0.1, 0.5, 0.9, 1.0):
        s = sample("niah", length=1500, depth=depth)
        intro = len(T.NEEDLE_INTRO.format(kind="numbers"))
        start = s.context.index(" One of the special magic numbers")
        needle = s.context.index(f"is: {s.expected[0]}. ") + len(f"is: {s.expected[0]}. ") - start
        at = (start - intro) / (len(s.context) - intro - needle)
        assert 0 <= depth - at < 0.07, (depth, at)  # cut back to a sentence end


def test_multikey_asks_one_of_several_keys_and_multivalue_all_values():
    mk = sample("multikey")
    assert mk.context.count("One of the special magic numbers for") == 4 and len(mk.expected) == 1
    mv = sample("multivalue")
    assert len(mv.expected) == 4 and all(f"is: {v}." in mv.context for v in mv.expected)
    vt = sample("vt")
    first, *rest = vt.expected
    assert f"VAR {first} = " in vt.context and all(f"VAR {b} = VAR " in vt.context for b in rest)


def test_score_is_rulers_string_match_all():
    assert T.score(["1234567"], "The number is 1234567.") == 1.0
    assert T.score(["ab", "cd", "ef", "gh"], "AB and cd") == 0.5
    assert T.score(["1234567"], "123456") == 0.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(tasks=("needle",)), "unknown task 'needle'"),
    (dict(lengths=(9000,)), "beyond the model's context of 8192"),
    (dict(depths=(1.5,)), "--depths must lie in [0, 1]"),
    (dict(depths=(-0.1,)), "--depths must lie in [0, 1]"),
])
def test_bad_input_is_one_clear_line(kwargs, message):
    request = dict(tasks=("niah",), lengths=(1024,), depths=(0.5,)) | kwargs
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        T.check_request(request["tasks"], request["lengths"], request["depths"], 8192)
    if "lengths" not in kwargs:
        with pytest.raises(UserError):
            TaskConfig(eval=EvalConfig(methods=("full",)), **kwargs)


def test_the_cli_refuses_a_bad_task_in_one_line():
    from typer.testing import CliRunner

    from lokitool.cli.main import app

    result = CliRunner().invoke(app, ["eval", "--tasks", "needle", "--methods", "full"])
    assert result.exit_code != 0
    assert isinstance(result.exception, UserError) and "unknown task 'needle'" in str(result.exception)


# ----------------------------------------------------------------------------------------------
# Decode-time methods against the reference


def qkv(s: int = 40, h: int = 6, hkv: int = 2, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, h, s, d, generator=g), torch.randn(1, hkv, s, d, generator=g), torch.randn(1, hkv, s, d, generator=g))


@pytest.mark.parametrize("method", ["exact-topk", "h2o"])
def test_decoding_every_row_reproduces_the_reference(method):
    """Decoded one query at a time from the first token, exact-topk and h2o (whose heavy hitters
    are then ranked by the mass of every earlier row) equal the reference over the whole sequence."""
    q, k, v = qkv()
    spec = LokiSpec(kf=0.3, df=None)
    scale = 0.25
    if method == "h2o":
        want = R.h2o_attention(q, k, v, spec=spec, scaling=scale)
    else:
        want = R.sparse_attention(q, k, v, selector=R.exact_topk_selector(), spec=spec, scaling=scale)
    scorer = D.scorer_for(method)
    for t in range(q.shape[2]):
        kt, vt = k[:, :, : t + 1], v[:, :, : t + 1]
        scores = scorer(0, q[:, :, t], kt, scale, spec.max_budget(t + 1))
        got, keep = D.scored_decode(q[:, :, t], kt, vt, scores, spec=spec, scaling=scale)
        assert int(keep[0, 0].sum()) == spec.max_budget(t + 1)
        torch.testing.assert_close(got, want[:, :, t], atol=1e-5, rtol=1e-5, msg=f"row {t}")


def test_recent_scorer_keeps_the_last_k_keys():
    q, k, v = qkv(s=20)
    spec = LokiSpec(kf=0.25, df=None)
    scores = D.recent_scorer()(0, q[:, :, -1], k, 1.0, spec.max_budget(20))
    _, keep = D.scored_decode(q[:, :, -1], k, v, scores, spec=spec, scaling=1.0)
    assert keep[0, 0].nonzero().flatten().tolist() == [15, 16, 17, 18, 19]


# ----------------------------------------------------------------------------------------------
# The runner on a tiny model


def all_methods(kf: float, df: float) -> list[MethodSpec]:
    return [
        MethodSpec("full"),
        MethodSpec("loki", LokiSpec(kf=kf, df=df)),
        MethodSpec("exact-topk", LokiSpec(kf=kf, df=None)),
        MethodSpec("h2o", LokiSpec(kf=kf, df=None)),
        MethodSpec("random-basis", LokiSpec(kf=kf, df=df, basis="random")),
    ]


@pytest.mark.parametrize("sparse_prefill", [False, True])
def test_every_method_at_full_budget_answers_as_full_attention(tiny, sparse_prefill):
    loaded, cal = tiny
    s = sample("passkey", length=300, depth=0.3)
    context, question = T.prompt_ids(s, loaded.tokenizer, 1)
    answers = longctx.answer_sample(loaded, context, question, 6, all_methods(1.0, 1.0), cal, sparse_prefill=sparse_prefill)
    assert [a for a, _ in answers] == [answers[0][0]] * 5 and len(answers[0][0]) > 0
    assert all(kept == pytest.approx(1.0) for _, kept in answers)


def test_small_budgets_keep_their_fraction_and_change_the_answer(tiny):
    loaded, cal = tiny
    s = sample("passkey", length=300, depth=0.3)
    context, question = T.prompt_ids(s, loaded.tokenizer, 1)
    answers = longctx.answer_sample(loaded, context, question, 6, all_methods(0.05, 0.25), cal)
    for answer, kept in answers[1:]:
        assert 0.04 < kept < 0.06
    assert any(a != answers[0][0] for a, _ in answers[1:])


def test_run_writes_json_table_and_heatmaps(tiny, tmp_path):
    loaded, cal = tiny
    (tmp_path / "hay.txt").write_text(haystack())
    config = TaskConfig(
        eval=EvalConfig(methods=("full", "exact-topk"), kf=(0.5,), output_path=tmp_path / "out"),
        tasks=("passkey",), lengths=(300, 320), depths=(0.2, 0.8), haystack=tmp_path / "hay.txt",
    )
    results = longctx.run(config, loaded, cal)
    assert len(results) == 2 * 2 * 2  # lengths x depths x methods
    assert {(r.task, r.length, r.depth) for r in results} == {("passkey", n, d) for n in (300, 320) for d in (0.2, 0.8)}
    path = longctx.write_results(config, loaded, cal, results)
    doc = json.loads(path.read_text())
    assert doc["git_hash"] is not None and doc["config"]["tasks"] == ["passkey"]
    record = doc["results"][0]
    assert {"method", "task", "length", "depth", "score", "kept_fraction", "answers"} <= set(record)
    assert (tmp_path / "out" / "tasks.md").read_text().count("\n| passkey |") == 4
    assert sorted(p.name for p in (tmp_path / "out").glob("heatmap_*.png")) == ["heatmap_exact-topk_kf0.5.png", "heatmap_full.png"]


@pytest.mark.embedded
def test_a_recent_window_misses_an_early_needle_that_full_attention_finds(embedded_model):
    """Known answer on the embedded model: full attention retrieves a passkey placed early; a
    selector that keeps only the most recent quarter of the cache cannot see it."""
    loaded = embedded_model
    tok = loaded.tokenizer
    s = T.make_sample("passkey", length=512, depth=0.05, seed=0, haystack=longctx.haystack_text(None, 8000),
                      encode=lambda t: tok(t, add_special_tokens=False)["input_ids"], decode=tok.decode,
                      overhead=T.template_overhead(tok, loaded.facts.bos_token_id))
    context, question = T.prompt_ids(s, tok, loaded.facts.bos_token_id)
    specs = [MethodSpec("full"), MethodSpec("exact-topk", LokiSpec(kf=0.25, df=None))]
    answers = longctx.answer_sample(loaded, context, question, s.max_new_tokens, specs, None, scorers={1: D.recent_scorer()})
    assert T.score(s.expected, answers[0][0]) == 1.0, answers
    assert T.score(s.expected, answers[1][0]) == 0.0, answers


# ----------------------------------------------------------------------------------------------
# One prefill per sample; the peers and union groups at decode time


def peer_methods(kf: float, df: float, group: str = "union") -> list[MethodSpec]:
    common = dict(kf=kf, group=group)
    return [
        MethodSpec("full"),
        MethodSpec("loki", LokiSpec(df=df, basis="qa-post", **common)),
        MethodSpec("loki", LokiSpec(df=df, basis="pre", **common)),
        MethodSpec("exact-topk", LokiSpec(df=None, **common)),
        MethodSpec("sparq", LokiSpec(df=df, **common)),
        MethodSpec("quest", LokiSpec(df=None, **common), page=4),
        MethodSpec("double-sparsity", LokiSpec(df=df, basis="random", **common)),
        MethodSpec("h2o", LokiSpec(df=None, **common)),
    ]


def per_basis_prefill_answers(loaded, cal, context, question, max_new, specs):
    """The protocol before one shared prefill: each method's cache prefilled in its own basis."""
    from lokitool.sparse import generation as gen
    from lokitool.sparse.cache import LokiCache

    out = []
    with torch.inference_mode():
        for spec in specs:
            capacity = len(context) + len(question) + max_new + 1
            bases = longctx.cache_bases(spec, loaded, cal)
            cache = LokiCache(bases, max_length=capacity) if bases is not None else LokiCache.unrotated(
                loaded.facts.num_layers, max_length=capacity)
            with D.method_attention(loaded.model, cache, MethodSpec("full")):
                gen.prefill(loaded.model, torch.tensor([context]), cache)
            with D.method_attention(loaded.model, cache, spec) as stats:
                ids = longctx._decode_answer(loaded.model, cache, torch.tensor([question]), max_new, None)
            out.append((loaded.tokenizer.decode(ids.tolist()).strip(), stats.kept_fraction))
    return out


@pytest.mark.parametrize("group", ["head", "union"])
def test_one_shared_prefill_answers_as_a_prefill_per_basis(tiny, group):
    """The rotated copy of one unrotated prefill decodes every method to the same answer, with the
    same kept fraction, as a prefill into each method's own cache."""
    loaded, cal = tiny
    s = sample("passkey", length=300, depth=0.3)
    context, question = T.prompt_ids(s, loaded.tokenizer, 1)
    specs = [spec for spec in peer_methods(0.3, 0.5, group) if not (group == "head" and spec.method == "quest")]
    got = longctx.answer_sample(loaded, context, question, 8, specs, cal)
    want = per_basis_prefill_answers(loaded, cal, context, question, 8, specs)
    assert [a for a, _ in got] == [a for a, _ in want]
    assert [k for _, k in got] == pytest.approx([k for _, k in want])


def test_a_rotated_copy_holds_the_keys_a_prefill_in_the_basis_stores(tiny):
    from lokitool.sparse import generation as gen
    from lokitool.sparse.cache import LokiCache

    loaded, cal = tiny
    spec = MethodSpec("loki", LokiSpec(kf=0.5, df=0.5, basis="post"))
    ids = torch.tensor([[5 + i % 100 for i in range(50)]])
    bases = longctx.cache_bases(spec, loaded, cal)
    plain, rotated = LokiCache.unrotated(loaded.facts.num_layers, max_length=60), LokiCache(bases, max_length=60)
    with torch.inference_mode():
        for cache in (plain, rotated):
            with D.method_attention(loaded.model, cache, MethodSpec("full")):
                gen.prefill(loaded.model, ids, cache)
        copy = longctx.rotated_copy(plain, bases, 60)
    for a, b in zip(copy.layers, rotated.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["sparq", "quest", "exact-topk", "double-sparsity"])
def test_decode_selector_rows_reproduce_the_reference(method):
    """One query row at a time through decode_selector equals the reference over the sequence (union group)."""
    q, k, v = qkv()
    spec = LokiSpec(kf=0.3, df=0.5, group="union")
    mspec = MethodSpec(method, spec, page=4 if method == "quest" else None)
    selector = D.decode_selector(mspec)(q.shape[-1])
    want = R.sparse_attention(q, k, v, selector=selector, spec=spec, scaling=0.25)
    for t in range(q.shape[2]):
        got = R.sparse_attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], selector=selector, spec=spec, scaling=0.25)
        torch.testing.assert_close(got[:, :, 0], want[:, :, t], atol=1e-5, rtol=1e-5, msg=f"row {t}")


def test_peers_and_union_groups_at_full_budget_answer_as_full_attention(tiny):
    loaded, cal = tiny
    s = sample("passkey", length=300, depth=0.3)
    context, question = T.prompt_ids(s, loaded.tokenizer, 1)
    answers = longctx.answer_sample(loaded, context, question, 6, peer_methods(1.0, 1.0), cal)
    assert [a for a, _ in answers] == [answers[0][0]] * len(answers) and len(answers[0][0]) > 0
    assert all(kept == pytest.approx(1.0) for _, kept in answers)


def test_tasks_take_a_byte_budget(tiny, tmp_path):
    """--bytes with --tasks: each method's kf from the byte model, and the bytes in every record."""
    loaded, cal = tiny
    (tmp_path / "hay.txt").write_text(haystack())
    config = TaskConfig(
        eval=EvalConfig(methods=("full", "sparq", "quest"), bytes=(0.375,), df=(0.25,), group="union",
                        output_path=tmp_path / "out"),
        tasks=("passkey",), lengths=(300,), depths=(0.5,), haystack=tmp_path / "hay.txt",
    )
    results = longctx.run(config, loaded, cal)
    by = {r.method: r for r in results}
    assert by["sparq"].kf == pytest.approx(0.25) and by["quest"].kf == pytest.approx(0.3125)
    assert [by[m].bytes for m in ("full", "sparq", "quest")] == pytest.approx([1.0, 0.375, 0.375])
