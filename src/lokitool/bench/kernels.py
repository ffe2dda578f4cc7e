"""`lokitool bench`: decode-attention speed of Loki against SDPA, next to the memory floor.

One decode step (one query token per sequence) over a KV cache of random float16/bfloat16 data,
keys already in the PCA basis. Methods:
    sdpa         torch.nn.functional.scaled_dot_product_attention over the whole cache
    loki-torch   the reference's decode stages (sparse/reference.py: float32 scores, torch.topk, gather)
    loki-triton  lokitool.kernels.loki_decode (scores -> threshold top-k -> sparse flash-decoding)
Every point reports the median time and its spread (10th/90th percentiles) of CUDA-graph replays
with the L2 cache flushed before each (triton.testing.do_bench), the median of plain calls (no
enclosing graph: the host's launch overhead shows where it exceeds the GPU's time; loki_decode replays
its own call graph once it has seen the same cache twice), the time of each stage, the
bytes a method must move over that time (GB/s) and as a fraction of the card's measured copy
bandwidth, the speedup over SDPA, and the peak extra memory. Rows are appended to
OUTPUT/bench.csv (GPU name and library versions in every row), this run is written to
OUTPUT/bench.json, and OUTPUT/bench.png plots latency against context length.

Byte counts (elt = bytes per element, R = selection rows: H for group "head", Hkv for "kv"):
    sdpa:  K and V read once            2 x B x Hkv x S x D x elt
    loki:  first d dims of K, then the kept K and V rows of every selection row
           B x Hkv x S x d x elt  +  B x R x k x 2 x D x elt
loki-triton reads its keys in the two-plane Loki layout (kernels/layout.py: the d scored dims of all
tokens contiguous, the other D - d dims in a second plane; same values, each stored once) unless
--layout plain; sdpa and loki-torch read the plain [B, Hkv, S, D] cache.
At kf = df = 0.25 with MHA that is 0.375 of the bytes of full attention: a 2.7x ceiling
(Point.byte_ceiling). With GQA and one selection per query head (group "head") each of the G query
heads of a KV head reads its own kept rows: at G = 4 the ceiling falls below 1x.

Layers: presets.py (shapes) -> environment.py, timing.py -> this file (config, byte model, methods,
the run) -> output.py (bench.csv rows, bench.png).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .. import results as results_file
from ..errors import UserError
from ..fileio import ensure_writable_dir
from ..sparse import reference as ref
from ..sparse.reference import LokiSpec, expand_kv
from .environment import Environment, environment, timing_device
from .output import append_csv, make_row, plot_latency
from .timing import copy_bandwidth, peak_extra_mb, time_ms

KERNEL_METHODS = ("sdpa", "loki-torch", "loki-triton")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
LAYOUTS = ("split", "plain")  # loki-triton's keys: two planes split after dim d (the Loki layout), or one tensor


# ----------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class BenchConfig:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    batch_sizes: tuple[int, ...] = (1, 16)
    seq_lens: tuple[int, ...] = (4096, 16384, 65536)
    spec: LokiSpec = LokiSpec()  # kf, df (d = spec.dims(D)) and group; the basis does not change speed
    dtype: str = "float16"
    methods: tuple[str, ...] = KERNEL_METHODS
    layout: str = "split"
    output_path: Path = Path("runs/bench")
    device: str = "auto"
    preset: str | None = None
    plot: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        self.spec.for_decoding()
        if min(self.num_heads, self.num_kv_heads, self.head_dim) < 1:
            raise UserError("--num-heads, --num-kv-heads and --head-dim must be positive")
        if self.num_heads % self.num_kv_heads:
            raise UserError(f"--num-heads {self.num_heads} is not a multiple of --num-kv-heads {self.num_kv_heads}; fix one")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise UserError("--batch-size takes positive integers, e.g. --batch-size 1,16")
        if not self.seq_lens or min(self.seq_lens) < 1:
            raise UserError("--seq-len takes positive integers, e.g. --seq-len 4096,16384")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype {self.dtype} is not supported; use one of {', '.join(DTYPES)}")
        unknown = [m for m in self.methods if m not in KERNEL_METHODS]
        if unknown or not self.methods:
            raise UserError(f"unknown method {', '.join(unknown) or '(none)'}; choose from {','.join(KERNEL_METHODS)}")
        if self.layout not in LAYOUTS:
            raise UserError(f"--layout {self.layout} is not one of {', '.join(LAYOUTS)}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise UserError(f"--device {self.device} is not one of auto, cuda, cpu")

    @property
    def d(self) -> int:
        return self.spec.dims(self.head_dim)

    def to_dict(self) -> dict:
        out = asdict(self)
        spec = out.pop("spec")
        out.update(kf=spec["kf"], df=spec["df"], group=spec["group"])
        out["output_path"] = str(self.output_path)
        return out


# ----------------------------------------------------------------------------------------------
# One point: inputs, byte counts, methods


@dataclass(frozen=True)
class Point:
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    seq_len: int
    spec: LokiSpec
    dtype: torch.dtype
    layout: str = "split"

    @property
    def elt(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def d(self) -> int:
        return self.spec.dims(self.head_dim)

    @property
    def group(self) -> str:
        return self.spec.group

    @property
    def k(self) -> int:
        return self.spec.max_budget(self.seq_len)  # the budget of a full cache

    @property
    def rows(self) -> int:
        return self.heads if self.group == "head" else self.kv_heads

    @property
    def kv_bytes(self) -> int:
        return 2 * self.batch * self.kv_heads * self.seq_len * self.head_dim * self.elt

    @property
    def score_bytes(self) -> int:
        """First d dims of K read, float32 scores written."""
        return self.batch * (self.kv_heads * self.seq_len * self.d * self.elt + self.rows * self.seq_len * 4)

    @property
    def attn_bytes(self) -> int:
        """Kept K and V rows of every selection row (plus their int32 indices)."""
        return self.batch * self.rows * self.k * (2 * self.head_dim * self.elt + 4)

    @property
    def loki_bytes(self) -> int:
        return self.batch * (self.kv_heads * self.seq_len * self.d + self.rows * self.k * 2 * self.head_dim) * self.elt

    @property
    def byte_ceiling(self) -> float:
        """The most Loki can gain over full attention if both run at the same bandwidth."""
        return self.kv_bytes / self.loki_bytes

    def workspace_bytes(self, method: str) -> int:
        """Rough peak of what a method allocates besides the cache (for the does-it-fit check)."""
        b, h, s = self.batch, self.heads, self.seq_len
        if method == "sdpa":
            return b * h * self.head_dim * 16
        if method == "loki-triton":  # scores, indices, partial outputs (+ the two-plane copy of K)
            split_copy = self.kv_bytes // 2 if self.layout == "split" else 0
            return b * self.rows * s * 8 + b * self.rows * self.k * 4 + b * h * self.head_dim * 64 * 4 + split_copy
        # loki-torch: float32 expanded first-d keys, scores, top-k, gathered K and V
        return b * h * s * (self.d * 4 + 16) + 2 * b * self.rows * self.k * (self.head_dim * self.elt + 8)


def make_inputs(p: Point, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random cache and query (never zeros: they hide unwritten outputs and time differently)."""
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (p.batch, p.kv_heads, p.seq_len, p.head_dim)
    q = torch.randn(p.batch, p.heads, p.head_dim, generator=g, device=device, dtype=torch.float32).to(p.dtype)
    k = torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(p.dtype)
    v = torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(p.dtype)
    lengths = torch.full((p.batch,), p.seq_len, dtype=torch.int32, device=device)
    return {"q": q, "k": k, "v": v, "lengths": lengths}


def triton_keys(x: dict, p: Point):
    """loki-triton's keys: the same values, in the two-plane Loki layout unless --layout plain."""
    if p.layout == "plain":
        return x["k"]
    if "k_split" not in x:
        from ..kernels import split_keys

        x["k_split"] = split_keys(x["k"], p.d)
    return x["k_split"]


def sdpa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """Full attention of q [B, H, D] over k, v [B, Hkv, S, D] -> [B, H, D]."""
    h, hkv = q.shape[1], k.shape[1]
    if h != hkv:
        try:
            return F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scaling, enable_gqa=True)[:, :, 0]
        except TypeError:  # torch < 2.5
            k, v = expand_kv(k, h), expand_kv(v, h)
    return F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scaling)[:, :, 0]


@dataclass
class MethodResult:
    median_ms: float | None = None  # CUDA-graph replays (plain calls on the CPU)
    p10_ms: float | None = None
    p90_ms: float | None = None
    plain_ms: float | None = None  # plain launches, no graph
    stages: dict[str, float] = field(default_factory=dict)
    peak_mem_mb: float | None = None
    output: torch.Tensor | None = None
    select: str = ""  # loki-triton's selection mode: row (a program per row) or split (a row over many programs)
    note: str = ""


def _stage_fns(method: str, x: dict, p: Point, scaling: float) -> tuple[Callable[[], torch.Tensor], dict[str, Callable[[], object]]]:
    """(whole step, {stage: fn}) for one method; stage inputs are computed once here."""
    q, k, v, lengths = x["q"], x["k"], x["v"], x["lengths"]
    if method == "sdpa":
        return (lambda: sdpa_decode(q, k, v, scaling)), {}
    budgets = ref.decode_budget(lengths.long(), p.spec.kf)
    if method == "loki-torch":  # the reference's three decode stages
        scores = ref.decode_scores(q, k, d=p.d, group=p.group)
        top = ref.decode_topk(scores, lengths, p.k)
        whole = lambda: ref.decode_attention(q, k, v, lengths, spec=p.spec, scaling=scaling)
        return whole, {
            "score": lambda: ref.decode_scores(q, k, d=p.d, group=p.group),
            "select": lambda: ref.decode_topk(scores, lengths, p.k),
            "attn": lambda: ref.decode_gather_attention(q, k, v, top, budgets, scaling=scaling, group=p.group),
        }
    from ..kernels import loki_decode, loki_scores, select_topk, sparse_decode_attention

    k = triton_keys(x, p)
    budgets32 = budgets.to(torch.int32)
    kmax = p.k
    scores = loki_scores(q, k, lengths, d=p.d, group=p.group)
    idx = select_topk(scores, lengths, budgets32, kmax=kmax)
    whole = lambda: loki_decode(q, k, v, lengths, spec=p.spec, scaling=scaling)
    return whole, {
        "score": lambda: loki_scores(q, k, lengths, d=p.d, group=p.group),
        "select": lambda: select_topk(scores, lengths, budgets32, kmax=kmax),
        "attn": lambda: sparse_decode_attention(q, k, v, idx, budgets32, scaling=scaling, group=p.group),
    }


def run_method(method: str, x: dict, p: Point, device: torch.device, scaling: float) -> MethodResult:
    try:
        whole, stages = _stage_fns(method, x, p, scaling)
        res = MethodResult(output=whole().float())
        if method == "loki-triton":  # peak memory counts the scratch that loki_decode's first call at a shape keeps
            from ..kernels import clear_plans, decode_path

            clear_plans()
            res.select = decode_path(p.batch * p.rows, p.seq_len, device)
        res.peak_mem_mb = peak_extra_mb(whole, device)
        res.p10_ms, res.median_ms, res.p90_ms = time_ms(whole, device)
        res.plain_ms = time_ms(whole, device, graph=False)[1] if device.type == "cuda" else res.median_ms
        for name, fn in stages.items():
            res.stages[name] = time_ms(fn, device)[1]
        return res
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return MethodResult(note="skipped: out of GPU memory")


def fits(p: Point, method: str, device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return True, ""
    free, _ = torch.cuda.mem_get_info(device)
    need = p.kv_bytes + p.workspace_bytes(method) + (300 << 20)  # + do_bench's L2 flush buffer
    if need > 0.92 * free:
        return False, f"skipped: needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
    return True, ""


# ----------------------------------------------------------------------------------------------
# The run


@dataclass
class BenchRun:
    rows: list[dict[str, str]]
    env: Environment
    csv_path: Path
    png_path: Path | None
    json_path: Path


def run(cfg: BenchConfig, progress: Callable[[str], None] = lambda msg: None) -> BenchRun:
    out_dir = ensure_writable_dir(cfg.output_path)
    device = timing_device(cfg.device)
    env = environment(device)
    methods = list(cfg.methods)
    if device.type == "cuda":
        env = env.with_copy_bandwidth(copy_bandwidth(device))
        if "loki-triton" in methods and env.triton == "not installed":
            raise UserError("loki-triton needs triton: pip install 'lokitool[gpu]', or leave it out of --methods")
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    dtype = DTYPES[cfg.dtype]
    scaling = cfg.head_dim**-0.5
    rows: list[dict[str, str]] = []
    for batch in cfg.batch_sizes:
        for seq_len in cfg.seq_lens:
            p = Point(batch, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, seq_len, cfg.spec, dtype, cfg.layout)
            results: dict[str, MethodResult] = {}
            ok, why = fits(p, max(methods, key=p.workspace_bytes), device)
            x = None
            if ok:
                try:
                    x = make_inputs(p, device, cfg.seed)
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    why = "skipped: the cache does not fit in GPU memory"
            for method in methods:
                progress(f"B={batch} S={seq_len} {method}")
                if x is None:
                    results[method] = MethodResult(note=why)
                elif method == "loki-triton" and device.type != "cuda":
                    results[method] = MethodResult(note="skipped: needs a CUDA GPU")
                else:
                    m_ok, m_why = fits(p, method, device)
                    results[method] = run_method(method, x, p, device, scaling) if m_ok else MethodResult(note=m_why)
            sdpa = results.get("sdpa")
            ref = results["loki-torch"].output if "loki-torch" in results else None
            rows += [make_row(m, p, results[m], env, cfg, sdpa, ref, stamp) for m in methods]
            del x, results, ref
            if "loki-triton" in methods and device.type == "cuda":
                from ..kernels import clear_plans

                clear_plans()  # the scratch of this point's shapes (its CUDA graphs are gone)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    csv_path = out_dir / "bench.csv"
    append_csv(csv_path, rows)
    png_path = None
    if cfg.plot:
        png_path = out_dir / "bench.png"
        plot_latency(csv_path, png_path, order=KERNEL_METHODS)
    json_path = results_file.write_results(out_dir, "bench", {"config": cfg.to_dict(), "environment": asdict(env), "rows": rows},
                                      keep_dated=False)
    return BenchRun(rows=rows, env=env, csv_path=csv_path, png_path=png_path, json_path=json_path)
