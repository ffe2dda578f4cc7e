"""Passkey prompts and results, with a character-level tokenizer (no model download needed)."""

from __future__ import annotations

import json

import pytest

from lokitool.calib.models import LoadedModel, ModelFacts
from lokitool.errors import UserError
from lokitool.evals import passkey
from lokitool.evals import tasks as T


class CharTokenizer:
    """One token per character; no chat template."""

    chat_template = None
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


FACTS = ModelFacts("char", None, "llama", 1, 1, 1, 8, True, 4096, 1)
FILLER = " ".join(f"Sentence number {i} is here." for i in range(400))


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9])
def test_key_sits_at_its_depth_and_the_prompt_has_its_length(depth):
    loaded = LoadedModel(model=None, tokenizer=CharTokenizer(), facts=FACTS)
    ids, key = passkey.build_prompt(loaded, FILLER, length=2000, depth=depth, seed=3)
    text = CharTokenizer().decode(ids[1:])
    assert ids[0] == 1  # BOS, set explicitly
    assert len(ids) == pytest.approx(2000, abs=40)  # cut at a sentence end: at most a sentence short
    sentence = T.PASSKEY_NEEDLE.format(key=key)
    body_start = len(T.PASSKEY_INTRO)
    body_end = text.index(T.PASSKEY_QUESTION)
    at = text.index(sentence)
    fraction = (at - body_start) / (body_end - body_start - len(sentence))
    assert fraction == pytest.approx(depth, abs=0.03)
    assert len(key) == 5 and text.count(key) == 2  # the key sentence names it twice, the filler never


def test_the_prompt_is_the_passkey_task_sample():
    """One prompt builder: `lokitool passkey` asks what `eval --tasks passkey` asks, key included."""
    loaded = LoadedModel(model=None, tokenizer=CharTokenizer(), facts=FACTS)
    tok = CharTokenizer()
    sample = T.make_sample("passkey", length=1500, depth=0.4, seed=7, haystack=FILLER,
                           encode=lambda t: tok(t)["input_ids"], decode=tok.decode, overhead=T.template_overhead(tok, 1))
    context, question = T.prompt_ids(sample, tok, 1)
    assert passkey.build_prompt(loaded, FILLER, length=1500, depth=0.4, seed=7) == (context + question, sample.expected[0])


def test_too_short_and_too_little_filler_are_refused():
    loaded = LoadedModel(model=None, tokenizer=CharTokenizer(), facts=FACTS)
    with pytest.raises(UserError, match="too short"):
        passkey.build_prompt(loaded, FILLER, length=50, depth=0.5, seed=0)
    with pytest.raises(UserError, match="not enough"):
        passkey.build_prompt(loaded, "Short. Text.", length=500, depth=0.5, seed=0)


def test_results_file_and_table(tmp_path):
    trials = [
        passkey.Trial(1000, 1024, 0.5, "12345", "full", "12345", True),
        passkey.Trial(1000, 1024, 0.5, "12345", "loki kf=0.25 df=0.25", "1234", False),
    ]
    path = passkey.write_results(tmp_path, {"kf": 0.25}, FACTS, trials)
    doc = json.loads(path.read_text())
    assert path.name == "passkey.json" and {"config", "model", "trials", "versions", "git_hash", "date"} <= set(doc)
    assert doc["trials"][1]["found"] is False and doc["model"]["model_id"] == "char"
    table = (tmp_path / "passkey.md").read_text()
    assert "| **found** | | | **1/1** | **0/1** |" in table
