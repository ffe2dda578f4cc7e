"""Passkey retrieval (`lokitool passkey`): can the model find a 5-digit number hidden in long filler text?

The prompt is the `passkey` task of `tasks.py` (the one prompt builder of `eval --tasks`): held-out
State of the Union text (`tasks.heldout_text`) with the key sentence "The pass key is NNNNN.
Remember it. NNNNN is the pass key." at a chosen depth (a fraction of the filler, cut at a sentence
end), and the question, through the model's chat template. A trial passes when the 5 digits appear
in the greedy answer. Each (length, depth) trial runs under full attention and under Loki at the
given budgets (dense prefill, Loki at decode, as `generate`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from .. import results
from ..calib.calibration import Calibration
from ..calib.models import LoadedModel, ModelFacts
from ..errors import UserError
from ..fileio import write_text_atomic
from ..sparse import generation as gen
from ..sparse.reference import LokiSpec
from . import tasks as T

MAX_NEW_TOKENS = 12  # enough for the five digits and some words around them (the passkey task's own)


@dataclass(frozen=True)
class Trial:
    length: int  # prompt tokens, as built
    target_length: int
    depth: float
    key: str
    method: str  # "full" or "loki kf=.. df=.."
    answer: str
    found: bool


def build_prompt(loaded: LoadedModel, filler: str, *, length: int, depth: float, seed: int) -> tuple[list[int], str]:
    """Token ids of about `length` tokens (the passkey task's sample of `seed`: intro, filler with the
    key at `depth`, question) and the key."""
    tok, bos = loaded.tokenizer, loaded.facts.bos_token_id
    sample = T.make_sample("passkey", length=length, depth=depth, seed=seed, haystack=filler,
                           encode=lambda text: tok(text, add_special_tokens=False)["input_ids"], decode=tok.decode,
                           overhead=T.template_overhead(tok, bos))
    context, question = T.prompt_ids(sample, tok, bos)
    return context + question, sample.expected[0]


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
    """Full attention and Loki on every (length, depth): the passkey task's sample of `seed` for each."""
    lengths, depths = list(lengths), list(depths)
    if any(not 0 <= d <= 1 for d in depths):
        raise UserError(f"--depths must lie in [0, 1], got {depths}")
    filler = T.heldout_text(max(lengths) * 8 + 4096)  # ~4 characters a token, with margin
    label = f"loki kf={spec.kf:g} df={spec.df:g}"
    trials = []
    for length in lengths:
        for depth in depths:
            ids, key = build_prompt(loaded, filler, length=length, depth=depth, seed=seed)
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
