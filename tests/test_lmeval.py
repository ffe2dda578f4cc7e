"""`eval --lm-eval`: a local lm-eval task (tests/data/lmeval) end to end through LokiLM, offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import tiny_calibrated

pytest.importorskip("lm_eval")

DATA = Path(__file__).parent / "data" / "lmeval"


def word_tokenizer():
    """A word-level tokenizer over the task's words, so a 128-token tiny model can read it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = set()
    for line in (DATA / "tiny_choice.jsonl").read_text().splitlines():
        doc = json.loads(line)
        words.update(doc["question"].split() + doc["choices"])
    vocab = {t: i for i, t in enumerate(["[UNK]", "<s>", "</s>", "[PAD]", *sorted(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>", pad_token="[PAD]")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("lmeval")
    shutil.copy(DATA / "tiny_choice.jsonl", out / "tiny_choice.jsonl")
    text = (DATA / "tiny_choice.yaml").read_text().replace("DATA_FILE", str(out / "tiny_choice.jsonl"))
    (out / "tiny_choice.yaml").write_text(text)
    return out


@pytest.fixture(scope="module")
def tiny():
    loaded, cal = tiny_calibrated()
    return type(loaded)(model=loaded.model, tokenizer=word_tokenizer(), facts=loaded.facts), cal


def per_doc_loglikelihoods(lm, task_dir):
    """The loglikelihood of every (document, choice) request: what the accuracy is made of."""
    from lm_eval.tasks import TaskManager, get_task_dict

    task = get_task_dict(["lokitool_tiny_choice"], TaskManager(include_path=str(task_dir)))["lokitool_tiny_choice"]
    task.build_all_requests(rank=0, world_size=1)
    return [ll for ll, _ in lm.loglikelihood([r for r in task.instances])]


def test_full_attention_equals_plain_hflm(tiny, task_dir):
    from lm_eval.models.huggingface import HFLM

    from lokitool.evals import lmeval
    from lokitool.sparse.attention import MethodSpec

    loaded, cal = tiny
    plain = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=1)
    ours = lmeval.lm_class()(loaded=loaded, method=MethodSpec("full"), calibration=cal)
    tasks, include = lmeval.split_tasks([str(task_dir), "lokitool_tiny_choice"])
    assert (tasks, include) == (["lokitool_tiny_choice"], [str(task_dir.resolve())])
    assert lmeval.evaluate(ours, tasks, include, None) == lmeval.evaluate(plain, tasks, include, None)
    assert per_doc_loglikelihoods(ours, task_dir) == per_doc_loglikelihoods(plain, task_dir)


def test_methods_at_full_budget_match_full_and_small_budgets_differ(tiny, task_dir):
    from lokitool.evals import lmeval
    from lokitool.sparse.attention import MethodSpec
    from lokitool.sparse.reference import LokiSpec

    loaded, cal = tiny
    cls = lmeval.lm_class()
    full = per_doc_loglikelihoods(cls(loaded=loaded, method=MethodSpec("full")), task_dir)
    whole = cls(loaded=loaded, method=MethodSpec("loki", LokiSpec(kf=1.0, df=1.0)), calibration=cal)
    assert per_doc_loglikelihoods(whole, task_dir) == pytest.approx(full, abs=1e-4)
    assert whole.kept_fraction == pytest.approx(1.0)
    small = cls(loaded=loaded, method=MethodSpec("exact-topk", LokiSpec(kf=0.1, df=None)))
    lls = per_doc_loglikelihoods(small, task_dir)
    assert max(abs(a - b) for a, b in zip(lls, full)) > 1e-3
    assert small.kept_fraction < 0.5


def test_cli_runs_a_local_task(tiny, task_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lokitool.cli import eval_tasks
    from lokitool.cli.main import app

    loaded, cal = tiny
    monkeypatch.setattr(eval_tasks, "load_model_and_calibration", lambda *a, **k: (loaded, None))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", "--lm-eval", f"{task_dir},lokitool_tiny_choice", "--methods", "full,exact-topk",
                                      "--kf", "0.5", "--output-path", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "lm_eval.json").read_text())
    rows = {(r["method"], r["metric"]): r for r in doc["results"]}
    assert set(rows) == {("full", "acc,none"), ("exact-topk", "acc,none")}
    assert 0 <= rows[("full", "acc,none")]["value"] <= 1 and doc["git_hash"] is not None
