"""`lokitool bench`: decode-attention speed of Loki against SDPA, next to the memory floor.

One decode step (one query token per sequence) over a KV cache of random float16/bfloat16 data,
keys already in the PCA basis. Methods:
    sdpa         torch.nn.functional.scaled_dot_product_attention over the whole cache
    loki-torch   the reference's decode stages (sparse/reference.py: float32 scores, torch.topk, gather)
    loki-triton  lokitool.kernels.loki_decode (scores -> threshold top-k -> sparse flash-decoding)
Every point reports the median time and its spread (10th/90th percentiles) of CUDA-graph replays
with the L2 cache flushed before each (triton.testing.do_bench), the time of each stage, the
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
At kf = df = 0.25 with MHA that is 0.375 of the bytes of full attention: a 2.7x ceiling.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .. import __version__, fileio
from ..errors import UserError
from ..fileio import atomic_path, ensure_writable_dir, write_text_atomic
from ..results import git_hash
from ..sparse import reference as ref
from ..sparse.reference import LokiSpec, expand_kv

# Attention shapes (query heads, KV heads, head dim) of well-known models.
PRESETS: dict[str, tuple[int, int, int]] = {
    "llama2-7b": (32, 32, 128),
    "llama2-13b": (40, 40, 128),
    "llama2-70b": (64, 8, 128),
    "llama3-8b": (32, 8, 128),
    "llama3-70b": (64, 8, 128),
    "mistral-7b": (32, 8, 128),
    "qwen2.5-7b": (28, 4, 128),
    "smollm2-135m": (9, 3, 64),
    "smollm2-1.7b": (32, 32, 64),
}
DEFAULT_PRESET = "llama2-13b"
METHODS = ("sdpa", "loki-torch", "loki-triton")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
LAYOUTS = ("split", "plain")  # loki-triton's keys: two planes split after dim d (the Loki layout), or one tensor

CSV_COLUMNS = [
    "gpu", "method", "batch", "heads", "kv_heads", "head_dim", "seq_len", "kf", "df", "d", "k", "group", "layout", "dtype",
    "median_ms", "p10_ms", "p90_ms", "gbps", "frac_copy_bw", "floor_ms", "speedup_vs_sdpa",
    "score_ms", "select_ms", "attn_ms", "score_gbps", "attn_gbps", "peak_mem_mb", "max_err_vs_loki_torch",
    "copy_gbps", "note", "torch", "triton", "cuda", "lokitool", "git", "timestamp",
]


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
    methods: tuple[str, ...] = METHODS
    layout: str = "split"
    output_path: Path = Path("runs/bench")
    device: str = "auto"
    preset: str | None = None
    plot: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
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
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise UserError(f"unknown method {', '.join(unknown) or '(none)'}; choose from {','.join(METHODS)}")
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


def resolve_shape(preset: str | None, num_heads: int | None, num_kv_heads: int | None, head_dim: int | None) -> tuple[int, int, int]:
    """(H, Hkv, D): a preset's shape with any dimension given explicitly overriding it. Without a
    preset, missing dimensions come from llama2-13b, and --num-heads alone means MHA."""
    name = preset or DEFAULT_PRESET
    if name not in PRESETS:
        raise UserError(f"unknown --model preset {name!r}; choose one of {', '.join(PRESETS)} or give --num-heads/--num-kv-heads/--head-dim")
    for flag, value in (("--num-heads", num_heads), ("--num-kv-heads", num_kv_heads), ("--head-dim", head_dim)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    h, hkv, d = PRESETS[name]
    if preset is None and num_heads is not None and num_kv_heads is None:
        num_kv_heads = num_heads
    return (h if num_heads is None else num_heads, hkv if num_kv_heads is None else num_kv_heads,
            d if head_dim is None else head_dim)


# ----------------------------------------------------------------------------------------------
# Environment


@dataclass(frozen=True)
class Environment:
    gpu: str
    torch: str
    triton: str
    cuda: str
    lokitool: str
    git: str
    copy_gbps: float | None = None  # measured device-to-device copy, bytes read + written


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


def resolve_device(device: str) -> torch.device:
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("no CUDA GPU found: bench times GPU kernels; pass --device cpu to time the PyTorch reference on the CPU at small shapes")
    return torch.device("cuda")


def environment(device: torch.device) -> Environment:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    return Environment(gpu=gpu, torch=torch.__version__, triton=_triton_version(), cuda=torch.version.cuda or "none",
                       lokitool=__version__, git=git_hash(short=True) or "unknown")


def measure_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """GB/s of one large device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    # eager: a copy captured in a CUDA graph may run on the copy engines, which are slower
    ms = time_ms(lambda: dst.copy_(src), device, graph=False, rep_ms=300)[1]
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------
# Timing


def time_ms(fn: Callable[[], object], device: torch.device, *, rep_ms: int = 100, graph: bool = True) -> tuple[float, float, float]:
    """(p10, median, p90) milliseconds of fn. On a GPU: fn captured once in a CUDA graph (so launch
    overhead stays out, as in a serving loop), replayed by triton.testing.do_bench, which flushes
    the L2 cache before each replay; falls back to eager calls if capture fails."""
    if device.type != "cuda":
        fn()
        times = []
        deadline = time.perf_counter() + rep_ms / 1000
        while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 200):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000)
        qs = statistics.quantiles(times, n=10)
        return qs[0], statistics.median(times), qs[-1]
    from triton.testing import do_bench

    fn()  # compile and autotune outside the graph
    torch.cuda.synchronize(device)
    target: Callable[[], object] = fn
    cuda_graph = torch.cuda.CUDAGraph()
    if graph:
        try:
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                fn()  # warm the caching allocator on the capture stream
                with torch.cuda.graph(cuda_graph, stream=stream):
                    fn()
            torch.cuda.current_stream(device).wait_stream(stream)
            target = cuda_graph.replay
        except RuntimeError:
            target = fn
    p10, p50, p90 = do_bench(target, warmup=max(25, rep_ms // 4), rep=rep_ms, quantiles=[0.1, 0.5, 0.9])
    del cuda_graph
    return p10, p50, p90


def peak_extra_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Memory fn allocates beyond what is already allocated, at its peak (MiB)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    del out
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


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
    median_ms: float | None = None
    p10_ms: float | None = None
    p90_ms: float | None = None
    stages: dict[str, float] = field(default_factory=dict)
    peak_mem_mb: float | None = None
    output: torch.Tensor | None = None
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
        res.peak_mem_mb = peak_extra_mb(whole, device)
        res.p10_ms, res.median_ms, res.p90_ms = time_ms(whole, device)
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
# Rows, files


def _fmt(x: float | None, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _fmt_rate(x: float | None) -> str:
    return "" if x is None else f"{x:.4g}"


def make_row(method: str, p: Point, res: MethodResult, env: Environment, cfg: BenchConfig, sdpa_ms: float | None,
             ref: torch.Tensor | None, stamp: str) -> dict[str, str]:
    bw = env.copy_gbps
    moved = p.kv_bytes if method == "sdpa" else p.loki_bytes
    gbps = moved / (res.median_ms * 1e-3) / 1e9 if res.median_ms else None
    floor_ms = moved / (bw * 1e9) * 1e3 if bw else None
    err = None
    if ref is not None and res.output is not None and method == "loki-triton":
        err = float((res.output - ref).abs().max())
    st = res.stages
    return {
        "gpu": env.gpu, "method": method, "batch": str(p.batch), "heads": str(p.heads), "kv_heads": str(p.kv_heads),
        "head_dim": str(p.head_dim), "seq_len": str(p.seq_len), "kf": str(cfg.spec.kf), "df": str(cfg.spec.df), "d": str(p.d),
        "k": str(p.k), "group": p.group, "layout": p.layout if method == "loki-triton" else "plain", "dtype": cfg.dtype,
        "median_ms": _fmt(res.median_ms), "p10_ms": _fmt(res.p10_ms), "p90_ms": _fmt(res.p90_ms),
        "gbps": _fmt_rate(gbps), "frac_copy_bw": _fmt(gbps / bw if gbps and bw else None, 3), "floor_ms": _fmt(floor_ms),
        "speedup_vs_sdpa": _fmt(sdpa_ms / res.median_ms if sdpa_ms and res.median_ms else None, 3),
        "score_ms": _fmt(st.get("score")), "select_ms": _fmt(st.get("select")), "attn_ms": _fmt(st.get("attn")),
        "score_gbps": _fmt_rate(p.score_bytes / (st["score"] * 1e-3) / 1e9 if st.get("score") else None),
        "attn_gbps": _fmt_rate(p.attn_bytes / (st["attn"] * 1e-3) / 1e9 if st.get("attn") else None),
        "peak_mem_mb": _fmt(res.peak_mem_mb, 1), "max_err_vs_loki_torch": _fmt(err, 6),
        "copy_gbps": _fmt_rate(bw), "note": res.note,
        "torch": env.torch, "triton": env.triton, "cuda": env.cuda, "lokitool": env.lokitool, "git": env.git,
        "timestamp": stamp,
    }


def append_csv(path: Path, rows: list[dict[str, str]]) -> None:
    """Append rows to a bench.csv with CSV_COLUMNS, rewriting it atomically."""
    fileio.append_csv(path, CSV_COLUMNS, rows)


def plot_latency(csv_path: Path, png_path: Path) -> None:
    """Median latency against context length, one panel per batch size, one line per method, for
    the GPU, shape and settings of the newest row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with csv_path.open() as f:
        rows = [r for r in csv.DictReader(f) if r["median_ms"]]
    if not rows:
        return
    last = rows[-1]
    same = ("gpu", "heads", "kv_heads", "head_dim", "kf", "df", "group", "dtype")
    rows = [r for r in rows if all(r[c] == last[c] for c in same)]
    latest: dict[tuple, dict] = {}
    for r in rows:  # newest measurement of each point wins
        label = f"loki-triton ({r['layout']})" if r["method"] == "loki-triton" else r["method"]
        latest[(label, int(r["batch"]), int(r["seq_len"]))] = r
    batches = sorted({key[1] for key in latest})
    labels = sorted({key[0] for key in latest}, key=lambda m: (m.split(" ")[0] not in METHODS, METHODS.index(m.split(" ")[0]), m))
    colors = {m: f"C{i}" for i, m in enumerate(labels)}  # one color per method in every panel
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for method in labels:
            pts = sorted((s, float(r["median_ms"])) for (m, bb, s), r in latest.items() if m == method and bb == batch)
            if pts:
                ax.plot([s for s, _ in pts], [t for _, t in pts], marker="o", label=method, color=colors[method])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("decode attention, median ms")
        ax.set_title(f"batch {batch}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{last['gpu']}: H={last['heads']} Hkv={last['kv_heads']} D={last['head_dim']} {last['dtype']} "
                 f"kf={last['kf']} df={last['df']} group={last['group']}", fontsize=9)
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


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
    device = resolve_device(cfg.device)
    env = environment(device)
    methods = list(cfg.methods)
    if device.type == "cuda":
        env = Environment(**{**asdict(env), "copy_gbps": measure_copy_bandwidth(device)})
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
            sdpa_ms = results["sdpa"].median_ms if "sdpa" in results else None
            ref = results["loki-torch"].output if "loki-torch" in results else None
            rows += [make_row(m, p, results[m], env, cfg, sdpa_ms, ref, stamp) for m in methods]
            del x, results, ref
            if device.type == "cuda":
                torch.cuda.empty_cache()
    csv_path = out_dir / "bench.csv"
    append_csv(csv_path, rows)
    png_path = None
    if cfg.plot:
        png_path = out_dir / "bench.png"
        plot_latency(csv_path, png_path)
    json_path = out_dir / "bench.json"
    write_text_atomic(json_path, json.dumps({"config": cfg.to_dict(), "environment": asdict(env), "rows": rows}, indent=2) + "\n")
    return BenchRun(rows=rows, env=env, csv_path=csv_path, png_path=png_path, json_path=json_path)
