"""The model matrix on the kernel paths: what the Triton kernels cannot express goes to the torch reference.

The prefill kernels take per-row causal lengths and a plain softmax, so eval's triton backend must
leave to torch (and record) the layers where a sliding window bites, soft-capping (Gemma 2) or sink
logits (gpt-oss) apply; the decode kernels see a sliding layer as a shorter sequence (the cache view
sliced to the window). Runs on Triton's CPU interpreter without a GPU (switched on before triton is
imported), compiled on a GPU.
"""

from __future__ import annotations

import os

import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

import pytest  # noqa: E402

pytest.importorskip("triton")

from conftest import random_tokens  # noqa: E402
from test_architectures import FAMILIES, SEQ, WINDOW, tiny  # noqa: E402

from lokitool.calib.models import LoadedModel  # noqa: E402
from lokitool.sparse import generation as gen  # noqa: E402
from lokitool.sparse.attention import MethodSpec, patched  # noqa: E402
from lokitool.sparse.reference import LokiSpec  # noqa: E402

FAMILY = {f.name: f for f in FAMILIES}


@pytest.fixture(autouse=True)
def _one_config_per_kernel(monkeypatch):
    monkeypatch.setenv("LOKITOOL_AUTOTUNE", "0")


def half(name: str):
    """The family's tiny model and calibration, as a float16 copy on the test device."""
    import copy

    loaded, calibration = tiny(FAMILY[name])
    model = copy.deepcopy(loaded.model).to(DEVICE, torch.float16)
    return LoadedModel(model=model, tokenizer=None, facts=loaded.facts), calibration


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens.to(DEVICE), use_cache=False).logits.float()


# layers the triton backend must leave to torch over SEQ tokens: sliding layers (the window bites),
# and every layer of a model whose attention soft-caps or adds sink logits (Gemma 3's full layer 1 runs
# the kernels: the plain case)
@pytest.mark.parametrize("name, on_torch", [("mistral", [0, 1]), ("gemma3", [0]), ("gemma2", [0, 1]), ("gpt_oss", [0, 1])])
def test_triton_backend_leaves_what_it_cannot_express_to_torch(name, on_torch):
    loaded, calibration = half(name)
    tokens = random_tokens(1, SEQ, seed=7)
    want = _logits(loaded.model, tokens)
    with patched(loaded.model, loaded.facts, MethodSpec("loki", LokiSpec(kf=1.0, df=1.0)), calibration, backend="triton") as recorder:
        got = _logits(loaded.model, tokens)
    assert recorder.backend == "triton" and sorted(recorder.torch_layers) == on_torch
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * scale)


@pytest.mark.parametrize("name", ["mistral", "gemma3"])
def test_decode_kernels_see_a_sliding_layer_as_its_window(name, monkeypatch):
    """Greedy tokens at kf = df = 1 through the decode kernels equal full attention past the window,
    and a sliding layer's decode steps reach the kernel with the last WINDOW keys only."""
    from lokitool.kernels.loki_decode import loki_decode

    lengths_seen = []

    def spy(q_rot, k_rot, v, lengths, **kwargs):
        lengths_seen.append((k_rot.shape[2], int(lengths.max())))
        return loki_decode(q_rot, k_rot, v, lengths, **kwargs)

    monkeypatch.setattr(gen, "decode_backend", lambda device: spy)
    loaded, calibration = half(name)
    prompt = random_tokens(1, 2 * WINDOW + 4, seed=9).to(DEVICE)
    want = gen.generate_with(loaded.model, loaded.facts, prompt, 4, None)
    got = gen.generate_with(loaded.model, loaded.facts, prompt, 4, LokiSpec(kf=1.0, df=1.0), calibration)
    assert torch.equal(got, want)
    assert (WINDOW, WINDOW) in lengths_seen  # a sliding layer: the view holds its window, all of it scored
    if len(loaded.facts.sliding_layers) < loaded.facts.num_layers:
        assert any(n > WINDOW for n, _ in lengths_seen)  # a full layer sees the whole cache
