"""Bad input and interruptions: every error a user can cause prints one line naming the fix and
exits 2, before any slow work, and overwrites nothing.

The CASES table holds one row per case: a name, the command line (built from `Inputs`, which makes
files on demand), a substring of the message, and optionally files that must stay unchanged, a
monkeypatch (a full disk) or environment variables. A new case is one more row.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import run_cli, tiny_calibrated

from lokitool.calib.calibration import Calibration
from lokitool.cli.main import main

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def run_cli_output(args: list[str], capsys) -> tuple[int, str]:
    """(exit code, stdout + stderr) of `lokitool ARGS`."""
    code, out, err = run_cli(args, capsys)
    return code, out + err


# ----------------------------------------------------------------------------------------------
# Inputs, made on demand


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny random Llama saved as a model folder, with a small byte-level BPE tokenizer (no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-model")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_folder_calibration(tiny_folder, tmp_path_factory) -> Path:
    """A calibration of `tiny_folder`, made through the library (fast)."""
    from conftest import random_tokens

    from lokitool.calib.collect import collect_statistics
    from lokitool.calib.models import load_model
    from lokitool.calib.run import build_calibration

    loaded = load_model(str(tiny_folder), device="cpu", dtype="float32")
    tokens = random_tokens(2, 32, vocab=200)
    stats = collect_statistics(loaded.model, loaded.facts, tokens, batch_size=2, with_queries=True)
    path = tmp_path_factory.mktemp("cal") / "tiny.safetensors"
    build_calibration(stats, loaded.facts, {"dataset": "random", "num_tokens": tokens.numel()}).save(path)
    return path


@pytest.fixture(scope="session")
def tiny_cal() -> Calibration:
    return tiny_calibrated(num_heads=4, num_kv_heads=2, head_dim=8)[1]


@dataclass
class Inputs:
    tmp: Path
    tiny_cal: Calibration
    request: pytest.FixtureRequest

    def file(self, name: str, data: bytes | str) -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return str(path)

    def folder(self, name: str, files: dict[str, bytes | str]) -> str:
        (self.tmp / name).mkdir(parents=True, exist_ok=True)
        for file, data in files.items():
            self.file(f"{name}/{file}", data)
        return str(self.tmp / name)

    @cached_property
    def model(self) -> str:
        return str(self.request.getfixturevalue("tiny_folder"))

    @cached_property
    def model_cal(self) -> str:
        return str(self.request.getfixturevalue("tiny_folder_calibration"))

    @cached_property
    def out(self) -> str:
        """An output folder already holding results.json, which no failed run may overwrite."""
        folder = self.tmp / "out"
        folder.mkdir(exist_ok=True)
        (folder / "results.json").write_text('{"old": true}\n')
        return str(folder)

    def cal(self, name: str = "cal.safetensors", *, queries: bool = True, meta: Callable[[dict], None] | None = None,
            tensors: Callable[[dict], None] | None = None, facts: dict | None = None) -> str:
        """A calibration file of the tiny model, its header (`meta`, `facts`) or tensors altered."""
        from dataclasses import replace

        from safetensors.torch import save_file

        cal = self.tiny_cal
        if facts:
            cal = replace(cal, facts=replace(cal.facts, **facts))
        if queries:
            moment = torch.eye(8).expand(2, 2, 8, 8).contiguous()
            cal = replace(cal, query_moment={"pre": moment, "post": moment})
        t, m = {k: v.clone() for k, v in cal.tensors().items()}, cal.metadata()
        if meta:
            meta(m)
        if tensors:
            tensors(t)
        path = self.tmp / name
        save_file(t, str(path), metadata=m)
        return str(path)


def _model_record(change: Callable[[dict], None]) -> Callable[[dict], None]:
    def edit(meta: dict) -> None:
        header = json.loads(meta["lokitool"])
        change(header["model"])
        meta["lokitool"] = json.dumps(header)
    return edit


def _full_disk(monkeypatch, safetensors_error: bool = False) -> None:
    """Every write of a file's text, and safetensors' writes, fail as on a full disk (safetensors
    reports it as its own SafetensorError)."""
    import safetensors.torch
    from safetensors import SafetensorError

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def rust_enospc(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")

    monkeypatch.setattr(Path, "write_text", enospc)
    monkeypatch.setattr(safetensors.torch, "save_file", rust_enospc if safetensors_error else enospc)


# ----------------------------------------------------------------------------------------------
# The table


@dataclass
class Case:
    name: str
    args: Callable[[Inputs], list[str]]
    message: str
    unchanged: Callable[[Inputs], list[str]] = lambda i: []  # files a failed run must not touch
    patch: Callable[[pytest.MonkeyPatch], None] | None = None
    env: dict[str, str] = field(default_factory=dict)


NOT_UTF8 = "caf\xe9 au lait\n".encode("latin-1")
BINARY = bytes(range(256)) * 4
LLAMA_CONFIG = json.dumps({"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2})
NO_MODEL = ["--model", "default", "--device", "cpu"]  # refused before any model loads
EVAL = ["eval", "--ppl", "--device", "cpu"]

CASES = [
    # text inputs
    Case("calibrate binary txt", lambda i: ["calibrate", *NO_MODEL, "--dataset", i.file("b.txt", BINARY)], "looks binary"),
    Case("calibrate latin-1 txt", lambda i: ["calibrate", *NO_MODEL, "--dataset", i.file("l.txt", NOT_UTF8)], "--encoding latin-1"),
    Case("calibrate folder with latin-1 txt", lambda i: ["calibrate", *NO_MODEL, "--dataset", i.folder("d", {"a.txt": "ok", "b.txt": NOT_UTF8})],
         "b.txt is not valid utf-8"),
    Case("calibrate unknown encoding", lambda i: ["calibrate", *NO_MODEL, "--encoding", "klingon"], "unknown --encoding"),
    Case("eval latin-1 txt", lambda i: [*EVAL, *NO_MODEL, "--methods", "full", "--dataset", i.file("l.txt", NOT_UTF8),
                                        "--output-path", i.out], "--encoding", lambda i: [i.out + "/results.json"]),
    Case("jsonl text is a number", lambda i: ["calibrate", *NO_MODEL, "--dataset", i.file("n.jsonl", '{"text": "a"}\n{"text": 5}\n')],
         "n.jsonl:2: the `text` field is int"),
    Case("jsonl text is null", lambda i: ["calibrate", *NO_MODEL, "--dataset", i.file("n.jsonl", '{"text": null}\n')],
         "n.jsonl:1: the `text` field is NoneType"),
    Case("jsonl line not JSON", lambda i: ["calibrate", *NO_MODEL, "--dataset", i.file("n.jsonl", '{"text": "a"\n')], "n.jsonl:1: not valid JSON"),
    Case("generate binary prompt file", lambda i: ["generate", "--full", *NO_MODEL, "--prompt-file", i.file("p.bin", BINARY)], "looks binary"),
    # models
    Case("model random file named .gguf", lambda i: ["calibrate", "--model", i.file("m.gguf", BINARY), "--device", "cpu"], "is not a GGUF file"),
    Case("model empty folder", lambda i: ["calibrate", "--model", i.folder("empty", {}), "--device", "cpu"],
         "holds no config.json"),
    Case("model folder with a broken config", lambda i: ["calibrate", "--model", i.folder("m", {"config.json": "{}"}), "--device", "cpu"],
         "cannot read"),
    Case("model folder without weights", lambda i: ["calibrate", "--model", i.folder("m", {"config.json": LLAMA_CONFIG, "tokenizer.json": "{}"}),
                                                    "--device", "cpu"], "holds no weights"),
    Case("model folder without tokenizer", lambda i: ["calibrate", "--model", i.folder("m", {"config.json": LLAMA_CONFIG, "model.safetensors": "x"}),
                                                      "--device", "cpu"], "holds no tokenizer"),
    # calibration files
    Case("calibration format_version abc", lambda i: ["rank-report", i.cal(meta=lambda m: m.update(format_version="abc")),
                                                      "--output-dir", str(i.tmp / "r")], "format_version is 'abc'"),
    Case("calibration header not JSON", lambda i: ["rank-report", i.cal(meta=lambda m: m.update(lokitool="{oops")),
                                                   "--output-dir", str(i.tmp / "r")], "is not JSON"),
    Case("calibration without lokitool key", lambda i: ["rank-report", i.cal(meta=lambda m: m.pop("lokitool")),
                                                        "--output-dir", str(i.tmp / "r")], "no `lokitool` record"),
    Case("calibration model record missing a field", lambda i: ["rank-report", i.cal(meta=_model_record(lambda r: r.pop("head_dim"))),
                                                                "--output-dir", str(i.tmp / "r")], "missing head_dim"),
    Case("calibration model record extra field", lambda i: ["rank-report", i.cal(meta=_model_record(lambda r: r.update(colour="red"))),
                                                             "--output-dir", str(i.tmp / "r")], "unknown colour"),
    Case("calibration model record wrong type", lambda i: ["rank-report", i.cal(meta=_model_record(lambda r: r.update(num_layers="2"))),
                                                           "--output-dir", str(i.tmp / "r")], "num_layers is '2'"),
    Case("calibration header field wrong type", lambda i: ["rank-report", i.cal(meta=lambda m: m.update(
        lokitool=json.dumps({**json.loads(m["lokitool"]), "versions": "1.0"}))), "--output-dir", str(i.tmp / "r")],
         "the header's versions is '1.0'"),
    Case("calibration components wrong shape",
         lambda i: [*EVAL, *NO_MODEL, "--methods", "loki", "--output-path", i.out,
                    "--calibration", i.cal(tensors=lambda t: t.update({"layers.1.post.components": torch.zeros(2, 8, 7)}))],
         "layers.1.post.components has shape (2, 8, 7), expected (2, 8, 8)", lambda i: [i.out + "/results.json"]),
    Case("calibration all-NaN components",
         lambda i: ["rank-report", i.cal(tensors=lambda t: t["layers.0.pre.components"].fill_(float("nan"))), "--output-dir", str(i.tmp / "r")],
         "layers.0.pre.components holds NaN"),
    Case("calibration NaN spectrum",
         lambda i: ["rank-report", i.cal(tensors=lambda t: t["layers.1.post.eigenvalues"].fill_(float("nan"))), "--output-dir", str(i.tmp / "r")],
         "layers.1.post.eigenvalues holds NaN"),
    Case("calibration integer tensor",
         lambda i: ["rank-report", i.cal(tensors=lambda t: t.update({"layers.0.pre.mean": torch.zeros(2, 8, dtype=torch.int32)})),
                    "--output-dir", str(i.tmp / "r")], "int32, not floating point"),
    Case("calibration missing tensor",
         lambda i: ["rank-report", i.cal(tensors=lambda t: t.pop("layers.1.pre.mean")), "--output-dir", str(i.tmp / "r")],
         "tensor layers.1.pre.mean is missing"),
    Case("calibration of another model, same shapes",
         lambda i: [*EVAL, "--model", i.model, "--device", "cpu", "--methods", "loki", "--output-path", i.out,
                    "--calibration", i.cal(facts=dict(model_id="meta-llama/Llama-2-7b-hf", revision=None))],
         "was made for meta-llama/Llama-2-7b-hf, not for", lambda i: [i.out + "/results.json"]),
    Case("generate with another model's calibration",
         lambda i: ["generate", "--model", i.model, "--device", "cpu", "--prompt", "hi",
                    "--calibration", i.cal(facts=dict(model_id="meta-llama/Llama-2-7b-hf", revision=None))],
         "--allow-other-model"),
    # eval settings
    Case("eval methods empty", lambda i: [*EVAL, *NO_MODEL, "--methods", "", "--output-path", i.out], "--methods is empty",
         lambda i: [i.out + "/results.json"]),
    Case("eval methods commas", lambda i: [*EVAL, *NO_MODEL, "--methods", ",,", "--output-path", i.out], "--methods is empty",
         lambda i: [i.out + "/results.json"]),
    Case("eval batch size 0", lambda i: [*EVAL, *NO_MODEL, "--methods", "full", "--batch-size", "0", "--output-path", i.out],
         "--batch-size must be at least 1", lambda i: [i.out + "/results.json"]),
    Case("eval sink beyond window", lambda i: [*EVAL, *NO_MODEL, "--methods", "exact-topk", "--sink", "1000", "--seq-len", "256",
                                               "--output-path", i.out], "--sink 1000 keeps every token"),
    Case("eval qa basis without queries",
         lambda i: [*EVAL, *NO_MODEL, "--methods", "full,loki", "--basis", "post,qa-post", "--output-path", i.out,
                    "--calibration", i.cal(queries=False)], "basis qa-post needs query statistics", lambda i: [i.out + "/results.json"]),
    Case("eval sa basis without a fit",
         lambda i: [*EVAL, *NO_MODEL, "--methods", "full,loki", "--basis", "sa-post", "--output-path", i.out,
                    "--calibration", i.cal(queries=True)], "basis sa-post needs a selection-aware fit", lambda i: [i.out + "/results.json"]),
    Case("calibrate sa-df above 1", lambda i: ["calibrate", *NO_MODEL, "--sa-df", "1.5"], "--sa-df 1.5 is not a fraction"),
    Case("eval full disk", lambda i: [*EVAL, "--model", i.model, "--methods", "full", "--seq-len", "16", "--num-tokens", "32",
                                      "--dataset", i.file("t.txt", TEXT), "--output-path", i.out],
         "the disk is full", lambda i: [i.out + "/results.json"], patch=_full_disk),
    Case("calibrate full disk", lambda i: ["calibrate", "--model", i.model, "--device", "cpu", "--seq-len", "16", "--num-tokens", "32",
                                           "--dataset", i.file("t.txt", TEXT), "--output", i.file("old.safetensors", "old")],
         "the disk is full", lambda i: [str(i.tmp / "old.safetensors")], patch=_full_disk),
    Case("calibrate full disk, safetensors' error", lambda i: ["calibrate", "--model", i.model, "--device", "cpu", "--seq-len", "16",
                                                              "--num-tokens", "32", "--dataset", i.file("t.txt", TEXT),
                                                              "--output", i.file("old.safetensors", "old")],
         "free some space", lambda i: [str(i.tmp / "old.safetensors")], patch=lambda mp: _full_disk(mp, safetensors_error=True)),
    # passkey, generate
    Case("passkey lengths empty", lambda i: ["passkey", *NO_MODEL, "--lengths", ""], "--lengths is empty"),
    Case("passkey depths empty", lambda i: ["passkey", *NO_MODEL, "--depths", ""], "--depths is empty"),
    Case("passkey depth above 1", lambda i: ["passkey", *NO_MODEL, "--depths", "1.5"], "--depths must lie in [0, 1]"),
    Case("passkey longer than context", lambda i: ["passkey", "--model", i.model, "--device", "cpu", "--calibration", i.model_cal,
                                                   "--lengths", "512"], "use --lengths up to 52"),
    Case("generate prompt longer than context", lambda i: ["generate", "--full", "--model", i.model, "--device", "cpu",
                                                           "--prompt", TEXT], "context of 64 positions"),
    # bench
    Case("bench head dim 0", lambda i: ["bench", "--head-dim", "0", "--num-heads", "0", "--output-path", str(i.tmp / "b")],
         "must be at least 1"),
    Case("bench union groups", lambda i: ["bench", "--device", "cpu", "--group", "union", "--output-path", str(i.tmp / "b")],
         "--group union is eval's only"),
    Case("generate union groups", lambda i: ["generate", "--prompt", "hi", "--group", "union"],
         "--group union is eval's only"),
    Case("bench-e2e unknown fill", lambda i: ["bench-e2e", "--model", "tiny", "--device", "cpu", "--fill", "zeros",
                                              "--output-path", str(i.tmp / "e")], "--fill must be one of random, prefill"),
    Case("bench-e2e negative eager tokens", lambda i: ["bench-e2e", "--model", "tiny", "--device", "cpu", "--eager-tokens", "-1",
                                                       "--output-path", str(i.tmp / "e")], "--eager-tokens must be >= 0"),
    # the debug variable is a boolean
    Case("LOKITOOL_DEBUG=0 keeps one line", lambda i: ["passkey", *NO_MODEL, "--lengths", ""], "--lengths is empty",
         env={"LOKITOOL_DEBUG": "0"}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_user_error_is_one_line(case: Case, tmp_path, tiny_cal, request, monkeypatch, capsys):
    inputs = Inputs(tmp_path, tiny_cal, request)
    args = case.args(inputs)
    keep = {path: Path(path).read_bytes() for path in case.unchanged(inputs)}
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    if case.patch is not None:
        case.patch(monkeypatch)
    code, output = run_cli_output(args, capsys)
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 2, output
    assert "Traceback" not in output
    assert lines and lines[-1].startswith("error:") and case.message in lines[-1], output
    assert sum(line.startswith("error:") for line in lines) == 1
    for path, data in keep.items():
        assert Path(path).read_bytes() == data, f"{path} was overwritten"
    if (tmp_path / "out").exists():  # nothing new in an output folder either (no empty dated file, no temporaries)
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["results.json"]


def test_debug_variable_shows_the_traceback(monkeypatch, capsys):
    from lokitool.errors import UserError

    monkeypatch.setenv("LOKITOOL_DEBUG", "1")
    with pytest.raises(UserError, match="--lengths is empty"):
        main(["passkey", *NO_MODEL, "--lengths", ""])


# ----------------------------------------------------------------------------------------------
# Text that is not UTF-8 reads with --encoding


def test_encoding_option_reads_latin1(tmp_path):
    from lokitool.calib.data import check_dataset, documents

    path = tmp_path / "l.txt"
    path.write_bytes(NOT_UTF8)
    check_dataset(str(path), "latin-1")
    assert list(documents(str(path), "latin-1")) == ["caf\xe9 au lait\n"]


# ----------------------------------------------------------------------------------------------
# Model identity: the same weights wherever they lie are one model; other weights are not


def test_identity_rules(tmp_path, tiny_cal):
    from dataclasses import replace

    from lokitool.calib.models import EMBEDDED_ID, SOURCE_RECORD, identify, same_identity
    from lokitool.errors import UserError

    gguf_rev = "gguf-sha256:97bd540928490fa0"
    folder = tmp_path / "SmolLM2-135M-Instruct.Q4_1-97bd540928490fa0"  # a converted cache folder
    folder.mkdir()
    (folder / "config.json").write_text(LLAMA_CONFIG)
    for name in ("tokenizer.json", "model.safetensors"):
        (folder / name).write_text("{}")
    (folder / SOURCE_RECORD).write_text(json.dumps({"revision": gguf_rev}))
    assert identify(str(folder)) == (str(folder.resolve()), gguf_rev)
    assert same_identity((EMBEDDED_ID, gguf_rev), identify(str(folder)))  # default vs its cache folder
    assert same_identity((EMBEDDED_ID, gguf_rev), ("/models/SmolLM2.gguf", gguf_rev))  # default vs the .gguf
    assert not same_identity((EMBEDDED_ID, gguf_rev), ("/models/other.gguf", "gguf-sha256:0123456789abcdef"))
    assert same_identity(("org/model", None), ("org/model", "main"))  # a hub id, revision unknown on one side
    assert not same_identity(("org/model", "v1"), ("org/model", "v2"))
    assert not same_identity(("meta-llama/Llama-2-7b-hf", None), ("mistralai/Mistral-7B-v0.1", None))

    llama = replace(tiny_cal, facts=replace(tiny_cal.facts, model_id="meta-llama/Llama-2-7b-hf", revision=None))
    with pytest.raises(UserError, match="made for meta-llama/Llama-2-7b-hf, not for tiny-llama"):
        llama.check_model(tiny_cal.facts)
    llama.check_model(tiny_cal.facts, allow_other_model=True)  # same shapes: allowed on purpose


def test_other_model_allowed_on_purpose(tmp_path, tiny_folder, tiny_cal, request, capsys):
    """--allow-other-model passes the identity check (and then the shapes decide)."""
    inputs = Inputs(tmp_path, tiny_cal, request)
    other = inputs.cal(facts=dict(model_id="meta-llama/Llama-2-7b-hf", revision=None))
    code, output = run_cli_output(["generate", "--model", str(tiny_folder), "--device", "cpu", "--prompt", "the fox",
                            "--max-new-tokens", "2", "--no-chat", "--calibration", other, "--allow-other-model"], capsys)
    assert code == 0, output
    assert "prompt tokens" in output


# ----------------------------------------------------------------------------------------------
# Files: modes, names, leftovers, interruptions


def test_calibration_gets_the_umask_mode(tmp_path, tiny_cal):
    old = os.umask(0o022)
    try:
        path = tiny_cal.save(tmp_path / "cal.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_unique_path_never_collides(tmp_path, monkeypatch):
    import datetime as dt

    from lokitool import fileio

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return dt.datetime(2026, 1, 2, 3, 4, 5, 6)

    monkeypatch.setattr(fileio._dt, "datetime", Frozen)
    names = {fileio.unique_path(tmp_path, "results", ".json").name for _ in range(3)}
    assert names == {"results_20260102-030405-000006.json", "results_20260102-030405-000006-1.json",
                     "results_20260102-030405-000006-2.json"}


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_stale_temporaries_are_removed_by_the_next_write(tmp_path):
    from lokitool.fileio import _host, write_json_atomic

    host, dead = _host(), _dead_pid()
    stale_file = tmp_path / f".cal.safetensors.{host}-{dead}.k2j3h4.tmp"
    stale_dir = tmp_path / f".SmolLM2-abc.{host}-{dead}.x8y9z0.tmp"  # a killed conversion or calibration write
    live = tmp_path / f".cal.safetensors.{host}-{os.getpid()}.a1b2c3.tmp"  # a write in progress (this process)
    elsewhere = tmp_path / f".cal.safetensors.otherhost-{dead}.d4e5f6.tmp"  # another machine's, on a shared disk
    stale_file.write_bytes(b"half")
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"half")
    live.write_bytes(b"busy")
    elsewhere.write_bytes(b"busy")
    write_json_atomic(tmp_path / "results.json", {"ok": True})
    assert not stale_file.exists() and not stale_dir.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, elsewhere.name, "results.json"])


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_write_cleans_up(sig, code, tmp_path, monkeypatch, capsys):
    """SIGTERM (or Ctrl-C) while a command writes: the temporary folder is removed, the old file
    stands, the exit status is 143 (130), through the real command line (Typer included)."""
    import time

    from lokitool.calib import run as calib
    from lokitool.fileio import atomic_path

    target = tmp_path / "cal.safetensors"
    target.write_bytes(b"old")

    def killed_mid_write(config):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            os.kill(os.getpid(), sig)
            time.sleep(5)  # the handler interrupts this

    monkeypatch.setattr(calib, "prepare", killed_mid_write)
    before = signal.getsignal(signal.SIGTERM)
    code_seen, output = run_cli_output(["calibrate", "--device", "cpu", "--output", str(target)], capsys)
    assert code_seen == code, output
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["cal.safetensors"]
    assert signal.getsignal(signal.SIGTERM) is before  # restored for whoever called main
    assert ("terminated" if sig == signal.SIGTERM else "interrupted") in output


# ----------------------------------------------------------------------------------------------
# What eval writes and shows


def test_eval_records_d_and_writes_distinct_results(tmp_path, tiny_folder, tiny_folder_calibration, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    args = ["eval", "--ppl", "--model", str(tiny_folder), "--device", "cpu", "--calibration", str(tiny_folder_calibration),
            "--methods", "loki", "--df", "0.001", "--seq-len", "16", "--num-tokens", "32", "--dataset", str(text),
            "--output-path", str(tmp_path / "out")]
    for _ in range(2):
        code, output = run_cli_output(args, capsys)
        assert code == 0, output
    dated = sorted((tmp_path / "out").glob("results_*.json"))
    assert len(dated) == 2  # two runs within a second: two files
    latest = json.loads((tmp_path / "out" / "results.json").read_text())
    assert latest["results"][0]["df"] == 0.001 and latest["results"][0]["d"] == 1


def test_eval_table_never_truncates_numbers():
    from types import SimpleNamespace

    from rich.console import Console

    from lokitool.cli.eval import results_table

    rows = [
        SimpleNamespace(method="full", kf=None, df=None, variance=None, basis=None, budget=None, sink=None,
                        bytes=1.0, perplexity=24.0123456, kept_fraction=1.0, jaccard=None),
        SimpleNamespace(method="random-basis", kf=0.125, df=0.25, variance=None, basis="random", budget="per-row", sink=4,
                        bytes=0.25, perplexity=12345.678, kept_fraction=0.1234, jaccard=0.5),
    ]
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(results_table(rows, 24.0123456, "perplexity on sotu:heldout (8,192 predicted tokens)", 80))
    text = console.export_text()
    assert all(len(line) <= 80 for line in text.splitlines())
    for value in ("24.012", "12345.678", "514.139", "random-basis", "0.125"):
        assert value in text
    assert "…" not in text
