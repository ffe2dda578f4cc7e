"""`lokitool bench-e2e`: end-to-end greedy decoding speed with full attention and with Loki.

A whole model decodes `new_tokens` tokens for `batch` sequences after a prompt of `prompt_len`
random tokens. Methods of the static loop (sparse/static.py; the headline):
    full-graph     static preallocated cache, full attention by `kernels.full_decode` over the valid
                   lengths (no mask); on CUDA the whole step (every layer, cache write, logits, greedy
                   token) is one CUDA graph replay
    loki-graph     the same loop, keys rotated and stored in the two-plane layout, `kernels.loki_decode`
Per row: the median step time of graph replays (CUDA events around each), the median of a few plain
(non-graph) steps, and the memory floor of one step: the bytes a step must read (weights other than
the input embedding, plus keys and values of the mean context of the timed steps) over the card's
measured copy bandwidth; `x_floor` = ms/token over that floor. `compile_parts` runs the model's
RMS norms and MLPs through torch.compile (static.compiled_parts) in that loop; on CUDA its q, k and v
projections run as one matrix multiply, and so do each MLP's gate and up projections (static.decode_projections;
`fused_qkv`, `fused_mlp` in the row). With `fill="random"` (default) the
static loop's cache is filled with random keys and values instead of running the prefill (decode
speed does not depend on what the cache holds; a 128k prefill would cost more than the decode).
Methods of the eager loop (issue 6; transformers' eager decode, host launches every kernel):
    full           transformers' DynamicCache (grows by concatenation) and SDPA: the stock path
    full-prealloc  the Loki cache's preallocated layout without rotation, and SDPA: isolates the cache
    loki           the Loki cache (rotated keys) and Loki decode (Triton kernels on CUDA, oracle on CPU)
Prefill is exact (SDPA) for every method that runs it. Models: `default` (the embedded SmolLM2-135M) or any
`load_model` spec, or a preset of bench/presets.py (`llama2-7b`, `llama3-8b`, `tiny`, ...) built
with random weights (weights do not change speed).

Two passes per eager method after `warmup` steps:
1. clean: the device is synchronized only around each step -> per-token latency (median, p10, p90)
   and tokens/s = batch / latency;
2. profiled (`profile_tokens` steps): also synchronized around every attention call and every cache
   update -> the share of a step spent in attention, in cache appends, and in the rest (projections,
   MLP, norms, sampling). The syncs make this pass a little slower; only its shares are reported.
Without a calibration the Loki basis is random orthonormal: the speed is the same as with a PCA basis.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from ..calib.calibration import Calibration
from ..calib.dispatch import route_attention, sdpa_attention
from ..calib.models import LoadedModel, load_model, resolve_device, resolve_dtype
from ..errors import UserError
from ..sparse import generation as gen
from ..sparse import static
from ..sparse.cache import LokiCache, cache_nbytes
from ..sparse.reference import LokiSpec
from .environment import environment
from .presets import PRESETS, random_model
from .timing import copy_bandwidth, sync

GRAPH_METHODS = ("full-graph", "loki-graph")
E2E_METHODS = (*GRAPH_METHODS, "full", "full-prealloc", "loki")
FILLS = ("random", "prefill")

@dataclass(frozen=True)
class E2EConfig:
    model: str = "default"
    batch: int = 1
    prompt_len: int = 512
    new_tokens: int = 32
    kf: float = 0.25
    df: float = 0.25
    methods: tuple[str, ...] = GRAPH_METHODS
    device: str = "auto"
    dtype: str = "auto"
    calibration: str | None = None
    basis: str = "post"
    group: str = "head"
    warmup: int = 4
    profile_tokens: int = 8
    prefill_chunk: int | None = 2048
    fill: str = "random"  # the static loop's cache: random keys and values, or the model's prefill
    eager_tokens: int = 2  # plain (non-graph) steps of the static loop, timed too
    compile_parts: bool = False  # static loop: the model's norms and MLPs through torch.compile
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch", "prompt_len", "new_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.profile_tokens < 0 or self.eager_tokens < 0:
            raise UserError("--warmup, --profile-tokens and --eager-tokens must be >= 0")
        if self.fill not in FILLS:
            raise UserError(f"--fill must be one of {', '.join(FILLS)}, got {self.fill!r}")
        unknown = [m for m in self.methods if m not in E2E_METHODS]
        if unknown or not self.methods:
            raise UserError(f"unknown method(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(E2E_METHODS)}")
        self.spec()  # validates kf, df, basis, group

    def spec(self) -> LokiSpec:
        basis = self.basis if self.calibration else "random"
        return LokiSpec(kf=self.kf, df=self.df, basis=basis, group=self.group).for_decoding()


# ----------------------------------------------------------------------------------------------
# Models


def load(spec: str, device: str, dtype: str) -> LoadedModel:
    if spec in PRESETS:
        dev = resolve_device(device)
        return random_model(spec, dev, resolve_dtype(dtype, dev))
    return load_model(spec, device, dtype)


# ----------------------------------------------------------------------------------------------
# Timing


class RegionTimer:
    """Seconds spent in named regions; only while `enabled`, synchronizing the device around each."""

    def __init__(self, device: torch.device):
        self.device = device
        self.enabled = False
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            if not self.enabled:
                return fn(*args, **kwargs)
            sync(self.device)
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            sync(self.device)
            self.seconds[name] += time.perf_counter() - start
            return result

        return timed


@contextlib.contextmanager
def instrumented(method: str, model: nn.Module, cache, spec: LokiSpec, head_dim: int,
                 device: torch.device, timer: RegionTimer) -> Iterator[None]:
    """Route attention for `method` with every attention call and cache update timed."""
    if method == "loki":
        make = gen.loki_handlers(cache, spec, head_dim, device)
    else:
        dense = sdpa_attention()
        make = lambda module: dense  # noqa: E731  (the stock SDPA function, behind the same route)
    cache.update = timer.wrap("cache", cache.update)  # instance attribute: dropped with the cache
    with route_attention(model, lambda module: timer.wrap("attention", make(module))):
        yield


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return statistics.median(ordered), pick(0.1), pick(0.9)


# ----------------------------------------------------------------------------------------------
# One method


def _new_cache(method: str, loki_bases: torch.Tensor, num_layers: int, capacity: int):
    if method == "full":
        from transformers import DynamicCache

        return DynamicCache()
    if method == "full-prealloc":
        return LokiCache.unrotated(num_layers, max_length=capacity)
    return LokiCache(loki_bases, max_length=capacity)


def run_method(method: str, cfg: E2EConfig, loaded: LoadedModel, loki_bases: torch.Tensor, ids: torch.Tensor) -> dict:
    model, facts = loaded.model, loaded.facts
    device = ids.device
    spec = cfg.spec()
    capacity = cfg.prompt_len + cfg.warmup + cfg.new_tokens + cfg.profile_tokens
    cache = _new_cache(method, loki_bases, facts.num_layers, capacity)
    timer = RegionTimer(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    latencies, profiled = [], []
    last_logits = [None]  # random fp16 weights can overflow: report whether the logits stayed finite

    def step(token: torch.Tensor, into: list[float]) -> torch.Tensor:
        sync(device)
        start = time.perf_counter()
        logits = gen.next_logits(model, token[:, None], cache)  # [B, V]
        token = logits.argmax(-1)
        sync(device)
        into.append(time.perf_counter() - start)
        last_logits[0] = logits
        return token

    with instrumented(method, model, cache, spec, facts.head_dim, device, timer), torch.no_grad():
        sync(device)
        start = time.perf_counter()
        token = gen.prefill(model, ids, cache, cfg.prefill_chunk)
        sync(device)
        prefill_s = time.perf_counter() - start
        for _ in range(cfg.warmup):
            token = step(token, [])
        for _ in range(cfg.new_tokens):
            token = step(token, latencies)
        timer.enabled = True
        for _ in range(cfg.profile_tokens):
            token = step(token, profiled)
        timer.enabled = False

    median, p10, p90 = _quantiles(latencies)
    prof_total = sum(profiled)
    shares = {}
    if prof_total > 0:
        attention = timer.seconds["attention"] / prof_total
        append = timer.seconds["cache"] / prof_total
        shares = {"attention_share": attention, "cache_share": append, "other_share": max(0.0, 1 - attention - append)}
    result = {
        "method": method,
        "batch": cfg.batch,
        "prompt_len": cfg.prompt_len,
        "new_tokens": cfg.new_tokens,
        "context_end": cfg.prompt_len + cfg.warmup + cfg.new_tokens,
        "kf": cfg.kf if method == "loki" else None,
        "df": cfg.df if method == "loki" else None,
        "d": spec.dims(facts.head_dim) if method == "loki" else None,
        "basis": spec.basis if method == "loki" else None,
        "group": spec.group if method == "loki" else None,
        "prefill_s": prefill_s,
        "per_token_ms": median * 1e3,
        "p10_ms": p10 * 1e3,
        "p90_ms": p90 * 1e3,
        "tokens_per_s": cfg.batch / median,
        **shares,
        "profiled_per_token_ms": prof_total / max(len(profiled), 1) * 1e3,
        "cache_mb": cache_nbytes(cache) / 2**20,
        "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "finite_logits": bool(torch.isfinite(last_logits[0]).all()),
    }
    del cache
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------------------------
# The static loop (one CUDA graph per step)


def weight_bytes_read(model: nn.Module) -> int:
    """Bytes of the weights one decode step reads: every parameter but the input embedding (a step
    reads B of its rows), unless that table is also the output projection."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == embed.data_ptr()
    return total if tied else total - embed.numel() * embed.element_size()


def kv_bytes(facts, batch: int, context: float, element_size: int) -> float:
    """Bytes of keys and values of `context` tokens per sequence, every layer."""
    return 2 * facts.num_layers * batch * facts.num_kv_heads * facts.head_dim * context * element_size


# Plain steps of the static loop left untimed: the first compiles, autotunes and builds loki_decode's plan;
# the next two bring each layer's cache to loki_decode again, which captures its call graph on the second
# sight (kernels/loki_decode.py _CallGraph). Timed plain steps are the steady state of eager decoding.
UNTIMED_PLAIN = 3


def run_graph_method(method: str, cfg: E2EConfig, loaded: LoadedModel, loki_bases: torch.Tensor | None, ids: torch.Tensor) -> dict:
    """Time the static loop: `eager_tokens` plain steps, then (CUDA) capture, `warmup` replays and
    `new_tokens` timed replays, each between two CUDA events."""
    model, facts = loaded.model, loaded.facts
    device = ids.device
    dtype = model.get_input_embeddings().weight.dtype
    spec = cfg.spec() if method == "loki-graph" else None
    plain_steps = cfg.eager_tokens + UNTIMED_PLAIN if cfg.eager_tokens else 0
    capacity = cfg.prompt_len + plain_steps + cfg.warmup + cfg.new_tokens
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cache = static.StaticCache(facts, batch=cfg.batch, capacity=capacity, dtype=dtype, device=device,
                               bases=loki_bases if spec is not None else None, spec=spec)
    prefill_s = None
    compiled = static.compiled_parts(model) if cfg.compile_parts else contextlib.nullcontext()
    with compiled, static.static_attention(model, cache), static.decode_projections(model, device) as fused, torch.no_grad():
        decoder = static.StaticDecoder(model, cache)
        if cfg.fill == "random":
            cache.fill_random(cfg.prompt_len, torch.Generator(device).manual_seed(cfg.seed))
            decoder.token.copy_(ids[:, -1:])
        else:
            sync(device)
            start = time.perf_counter()
            decoder.prefill(ids, cfg.prefill_chunk)
            sync(device)
            prefill_s = time.perf_counter() - start
        eager = []
        for i in range(plain_steps):
            sync(device)
            start = time.perf_counter()
            decoder.step()
            sync(device)
            if i >= UNTIMED_PLAIN:
                eager.append(time.perf_counter() - start)
        graph = device.type == "cuda"
        if graph:
            decoder.capture()
        for _ in range(cfg.warmup):
            decoder.step()
        latencies = []
        if graph:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(cfg.new_tokens)]
            for begin, end in events:
                begin.record()
                decoder.step()
                end.record()
            sync(device)
            latencies = [begin.elapsed_time(end) / 1e3 for begin, end in events]
        else:
            for _ in range(cfg.new_tokens):
                start = time.perf_counter()
                decoder.step()
                latencies.append(time.perf_counter() - start)
        finite = bool(torch.isfinite(decoder.logits).all())
        del decoder
    median, p10, p90 = _quantiles(latencies)
    result = {
        "method": method,
        "batch": cfg.batch,
        "prompt_len": cfg.prompt_len,
        "new_tokens": cfg.new_tokens,
        "context_end": capacity,
        "kf": cfg.kf if spec else None,
        "df": cfg.df if spec else None,
        "d": spec.dims(facts.head_dim) if spec else None,
        "basis": spec.basis if spec else None,
        "group": spec.group if spec else None,
        "prefill_s": prefill_s,
        "per_token_ms": median * 1e3,
        "p10_ms": p10 * 1e3,
        "p90_ms": p90 * 1e3,
        "tokens_per_s": cfg.batch / median,
        "graph": graph,
        "compiled": cfg.compile_parts,
        "fused_qkv": fused.qkv > 0,
        "fused_mlp": fused.mlp > 0,
        "eager_ms": statistics.median(eager) * 1e3 if eager else None,
        "mean_context": cfg.prompt_len + plain_steps + cfg.warmup + (cfg.new_tokens - 1) / 2,
        "cache_mb": cache.nbytes() / 2**20,
        "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "finite_logits": finite,
    }
    del cache
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def add_floor(row: dict, loaded: LoadedModel, bandwidth_gbs: float) -> None:
    """The memory floor of one step at the row's mean context, and how far the row is from it."""
    model, facts = loaded.model, loaded.facts
    elt = model.get_input_embeddings().weight.element_size()
    context = row.get("mean_context") or row["prompt_len"] + row["new_tokens"] / 2
    weights = weight_bytes_read(model)
    floor_bytes = weights + kv_bytes(facts, row["batch"], context, elt)
    floor_ms = floor_bytes / (bandwidth_gbs * 1e9) * 1e3
    row.update({"weights_gb": weights / 1e9, "floor_gb": floor_bytes / 1e9, "bandwidth_gbs": bandwidth_gbs, "floor_ms": floor_ms,
                "x_floor": row["per_token_ms"] / floor_ms, "floor_fraction": floor_ms / row["per_token_ms"]})


# ----------------------------------------------------------------------------------------------
# The run


def provenance(device: torch.device) -> dict:
    """The columns of e2e.csv that say what ran: bench's environment record under e2e's names."""
    env = environment(device)
    return {"device": env.gpu, "torch": env.torch, "transformers": env.transformers, "triton": env.triton, "cuda": env.cuda,
            "lokitool": env.lokitool, "git": env.git, "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def run_e2e(cfg: E2EConfig, loaded: LoadedModel | None = None, progress: Callable[[str], None] = lambda msg: None) -> list[dict]:
    """Every method of `cfg` on one model and one prompt batch: a list of result rows."""
    loaded = loaded or load(cfg.model, cfg.device, cfg.dtype)
    facts = loaded.facts
    device = next(loaded.model.parameters()).device
    dtype = next(loaded.model.parameters()).dtype
    extra = cfg.warmup + cfg.new_tokens + max(cfg.profile_tokens, cfg.eager_tokens + UNTIMED_PLAIN)
    if facts.max_positions is not None and cfg.prompt_len + extra > facts.max_positions:
        raise UserError(f"prompt plus new tokens exceed {facts.model_id}'s {facts.max_positions} positions; lower --prompt-len")
    if set(GRAPH_METHODS) & set(cfg.methods) and not static.supports(facts):
        raise UserError(f"{facts.model_id} has sliding-window layers, soft-capping or sink logits, which the static loop "
                        f"does not run; use --methods full,loki")
    calibration = Calibration.load(cfg.calibration) if cfg.calibration else None
    spec = cfg.spec()
    loki_bases = gen.loki_bases(spec, calibration, facts) if {"loki", "loki-graph"} & set(cfg.methods) else None
    vocab = loaded.model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(3, vocab, (cfg.batch, cfg.prompt_len), generator=g)
    if facts.bos_token_id is not None:
        ids[:, 0] = facts.bos_token_id
    ids = ids.to(device)
    env = provenance(device)
    common = {"model": facts.model_id, "dtype": str(dtype).removeprefix("torch."), "num_layers": facts.num_layers,
              "num_heads": facts.num_heads, "num_kv_heads": facts.num_kv_heads, "head_dim": facts.head_dim}
    bandwidth = _bandwidth(device)
    rows = []
    for method in cfg.methods:
        progress(f"{method}: batch {cfg.batch}, prompt {cfg.prompt_len}, {cfg.new_tokens} new tokens")
        run = run_graph_method if method in GRAPH_METHODS else run_method
        row = {**common, **run(method, cfg, loaded, loki_bases, ids)}
        add_floor(row, loaded, bandwidth)
        rows.append({**row, **env})
    for name, column in (("full", "speedup_vs_full"), ("full-graph", "speedup_vs_full_graph")):
        base = next((r for r in rows if r["method"] == name), None)
        for r in rows:
            r[column] = base["per_token_ms"] / r["per_token_ms"] if base else None
    return rows


_BANDWIDTH: dict[str, float] = {}


def _bandwidth(device: torch.device) -> float:
    """The device's copy bandwidth (GB/s), measured once per process (a small copy on the CPU)."""
    key = str(device)
    if key not in _BANDWIDTH:
        _BANDWIDTH[key] = copy_bandwidth(device, nbytes=1 << 30 if device.type == "cuda" else 1 << 24)
    return _BANDWIDTH[key]


def config_dict(cfg: E2EConfig) -> dict:
    d = asdict(cfg)
    d["methods"] = list(cfg.methods)
    return d
