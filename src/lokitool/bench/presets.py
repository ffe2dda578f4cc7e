"""One table of model presets: the LlamaConfig fields of well-known models, and what derives from it.

`lokitool bench` takes a preset's attention shape (H, Hkv, D); `bench-e2e` and the calibration
benchmarks build a LlamaForCausalLM of a preset's shape with random weights (weights do not change
speed, and the GPU machine has no model files). Every preset is a Llama-architecture model of the
named model's shapes; smollm2-135m and llama3.2-1b use the SmolLM2 vocabulary (49152) so that the
embedded tokenizer can feed them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..calib.models import LoadedModel, read_facts
from ..errors import UserError


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float | None = None  # None: LlamaConfig's default (10000)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def attention_shape(self) -> tuple[int, int, int]:
        """(query heads H, KV heads Hkv, head dim D)."""
        return self.num_attention_heads, self.num_key_value_heads, self.head_dim

    def llama_fields(self) -> dict:
        """Keyword arguments of transformers.LlamaConfig."""
        return {k: v for k, v in asdict(self).items() if v is not None}


PRESETS: dict[str, Preset] = {
    "llama2-7b": Preset(4096, 11008, 32, 32, 32, 32000, 32768),
    "llama2-13b": Preset(5120, 13824, 40, 40, 40, 32000, 32768),
    "llama2-70b": Preset(8192, 28672, 80, 64, 8, 32000, 32768),
    "llama3-8b": Preset(4096, 14336, 32, 32, 8, 128256, 131072, rope_theta=500000.0),
    "llama3-70b": Preset(8192, 28672, 80, 64, 8, 128256, 131072, rope_theta=500000.0),
    "mistral-7b": Preset(4096, 14336, 32, 32, 8, 32768, 32768, rope_theta=1000000.0),
    "qwen2.5-7b": Preset(3584, 18944, 28, 28, 4, 152064, 32768, rope_theta=1000000.0),
    "smollm2-135m": Preset(576, 1536, 30, 9, 3, 49152, 8192),
    "smollm2-1.7b": Preset(2048, 8192, 24, 32, 32, 49152, 8192, rope_theta=130000.0),
    "llama3.2-1b": Preset(2048, 8192, 16, 32, 8, 49152, 8192),
    "tiny": Preset(64, 128, 2, 4, 2, 256, 4096),
}
DEFAULT_SHAPE = "llama2-13b"  # bench's attention shape when no preset is named


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown --model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def attention_shape(preset_name: str | None, num_heads: int | None, num_kv_heads: int | None, head_dim: int | None) -> tuple[int, int, int]:
    """(H, Hkv, D): a preset's shape with any dimension given explicitly overriding it. Without a
    preset, missing dimensions come from llama2-13b, and --num-heads alone means MHA."""
    name = preset_name or DEFAULT_SHAPE
    if name not in PRESETS:
        raise UserError(f"unknown --model preset {name!r}; choose one of {', '.join(PRESETS)} or give --num-heads/--num-kv-heads/--head-dim")
    for flag, value in (("--num-heads", num_heads), ("--num-kv-heads", num_kv_heads), ("--head-dim", head_dim)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    h, hkv, d = PRESETS[name].attention_shape
    if preset_name is None and num_heads is not None and num_kv_heads is None:
        num_kv_heads = num_heads
    return (h if num_heads is None else num_heads, hkv if num_kv_heads is None else num_kv_heads,
            d if head_dim is None else head_dim)


def random_model(name: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """A LlamaForCausalLM of a preset's shape with random weights, built directly on `device`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(bos_token_id=1, eos_token_id=2, **preset(name).llama_fields())
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    return LoadedModel(model=model, tokenizer=None, facts=read_facts(model, None, f"random-{name}", None))
