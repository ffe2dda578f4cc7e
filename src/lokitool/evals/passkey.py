"""Passkey retrieval: can the model find a 5-digit number hidden in long filler text?

The filler is held-out State of the Union text (`data.sotu_documents("heldout")`); the key sentence
"The pass key is NNNNN. Remember it. NNNNN is the pass key." is put at a chosen depth (a fraction of
the filler, cut at a sentence end), and the model is asked, through its chat template, for the key.
A trial passes when the 5 digits appear in the greedy answer. Each (length, depth) trial runs under
full attention and under Loki at the given budgets (dense prefill, Loki at decode, as `generate`).
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from .. import results
from ..calib.calibration import Calibration
from ..calib.data import sotu_documents
from ..calib.models import LoadedModel, ModelFacts
from ..errors import UserError
from ..fileio import write_text_atomic
from ..sparse import generation as gen
from ..sparse.reference import LokiSpec

QUESTION = "What is the pass key? Answer with the number only."
MAX_NEW_TOKENS = 12  # enough for the five digits and some words around them
INTRO = "There is a pass key hidden in the following text. Find it and remember it.\n\n"


@dataclass(frozen=True)
class Trial:
    length: int  # prompt tokens, as built
    target_length: int
    depth: float
    key: str
    method: str  # "full" or "loki kf=.. df=.."
    answer: str
    found: bool


def key_sentence(key: str) -> str:
    return f" The pass key is {key}. Remember it. {key} is the pass key. "


def filler_text(min_chars: int) -> str:
    """At least `min_chars` characters of held-out speeches."""
    parts, size = [], 0
    for doc in sotu_documents("heldout"):
        parts.append(doc.strip())
        size += len(parts[-1])
        if size >= min_chars:
            break
    return "\n\n".join(parts)


def _cut_at_sentence(text: str, pos: int) -> int:
    """The nearest sentence end at or before `pos` (or `pos` itself if there is none)."""
    end = text.rfind(". ", 0, pos)
    return end + 2 if end > 0 else pos


def build_prompt(loaded: LoadedModel, filler: str, *, length: int, depth: float, key: str) -> list[int]:
    """Token ids of about `length` tokens: intro, filler with the key at `depth`, question."""
    tok, bos = loaded.tokenizer, loaded.facts.bos_token_id
    overhead = len(gen.encode_prompt(tok, INTRO + key_sentence(key) + "\n\n" + QUESTION, bos))
    budget = length - overhead
    if budget < 16:
        raise UserError(f"passkey length {length} is too short for the question; use at least {overhead + 16}")
    filler_ids = tok(filler, add_special_tokens=False)["input_ids"]
    if len(filler_ids) < budget:
        raise UserError(f"not enough filler text for {length} tokens")
    body = tok.decode(filler_ids[:budget])
    at = _cut_at_sentence(body, int(depth * len(body)))
    text = INTRO + body[:at] + key_sentence(key) + body[at:] + "\n\n" + QUESTION
    return gen.encode_prompt(tok, text, bos)


def answer_of(loaded: LoadedModel, ids: list[int], spec: LokiSpec | None, calibration: Calibration | None,
              max_new_tokens: int) -> str:
    device = next(loaded.model.parameters()).device
    x = torch.tensor([ids], device=device)
    eos = getattr(loaded.tokenizer, "eos_token_id", None)
    out = gen.generate_with(loaded.model, loaded.facts, x, max_new_tokens, spec, calibration, stop_token=eos)
    return loaded.tokenizer.decode(out[0], skip_special_tokens=True).strip()


def run(
    loaded: LoadedModel,
    *,
    lengths: Iterable[int],
    depths: Iterable[float],
    spec: LokiSpec,
    calibration: Calibration | None,
    seed: int = 0,
    max_new_tokens: int = MAX_NEW_TOKENS,
    on_trial: Callable[[Trial], None] = lambda t: None,
) -> list[Trial]:
    """Full attention and Loki on every (length, depth); one random key per pair."""
    lengths, depths = list(lengths), list(depths)
    if any(not 0 <= d <= 1 for d in depths):
        raise UserError(f"--depths must lie in [0, 1], got {depths}")
    filler = filler_text(max(lengths) * 8)  # ~4 characters a token, with margin
    rng = random.Random(seed)
    label = f"loki kf={spec.kf:g} df={spec.df:g}"
    trials = []
    for length in lengths:
        for depth in depths:
            key = f"{rng.randrange(10000, 100000)}"
            ids = build_prompt(loaded, filler, length=length, depth=depth, key=key)
            for method, s in (("full", None), (label, spec)):
                answer = answer_of(loaded, ids, s, calibration, max_new_tokens)
                trial = Trial(len(ids), length, depth, key, method, answer, key in re.sub(r"[\s,]", "", answer))
                trials.append(trial)
                on_trial(trial)
    return trials


def table_markdown(trials: list[Trial]) -> str:
    """Rows (length, depth), one column per method: found or the answer given."""
    methods = list(dict.fromkeys(t.method for t in trials))
    rows = list(dict.fromkeys((t.target_length, t.depth) for t in trials))
    by = {(t.target_length, t.depth, t.method): t for t in trials}
    lines = ["| tokens | depth | key | " + " | ".join(methods) + " |", "|---:|---:|---:|" + "---|" * len(methods)]
    for length, depth in rows:
        first = by[(length, depth, methods[0])]
        cells = []
        for m in methods:
            t = by[(length, depth, m)]
            answer = t.answer.replace("|", "/").replace("\n", " ")[:40]
            cells.append(f"{'yes' if t.found else 'no'} (`{answer}`)")
        lines.append(f"| {first.length} | {depth:g} | {first.key} | " + " | ".join(cells) + " |")
    totals = [sum(by[(l, d, m)].found for l, d in rows) for m in methods]
    lines.append("| **found** | | | " + " | ".join(f"**{n}/{len(rows)}**" for n in totals) + " |")
    return "\n".join(lines)


def trials_json(trials: list[Trial]) -> list[dict]:
    return [asdict(t) for t in trials]


def write_results(out_dir: Path, config: dict, facts: ModelFacts, trials: list[Trial]) -> Path:
    """OUT_DIR/passkey.json (config, model, trials and the provenance stamp) and passkey.md."""
    path = results.write_results(out_dir, "passkey", {"config": config, "model": facts.to_dict(), "trials": trials_json(trials)},
                                 keep_dated=False)
    write_text_atomic(out_dir / "passkey.md", table_markdown(trials) + "\n")
    return path
