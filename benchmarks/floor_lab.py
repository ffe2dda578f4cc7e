"""The fastest any exact Loki decode step could be on this card, measured (issue 12's targets).

An exact top-k step has an order no kernel can change: every key of a row is scored (the scored plane
read whole) before any kept row is known, and the kept rows (the low and high planes and V at the kept
tokens) are read after. What a step must do beyond that (the selection, the products, the softmax, the
merge) only adds time. So a kernel that does nothing but those reads, in that order, bounds every Loki
step from below at that shape: the *floor*. Two floors are timed here, each the best over its launch
settings:

    one launch   each program reads its chunk of the scored plane, meets the row's other programs at one
                 barrier (the least an exact selection needs), then reads an equal share of the row's kept
                 rows: one launch's ramp and drain, one grid-wide wait
    two launches the plane in one launch, the kept rows in a second (a stage boundary in place of the
                 barrier: loki_decode's three stages pay two)

Kept tokens are a random sorted kf share of each row (random data keeps about that spread). Each floor's
sum of everything it read is checked against torch's sum of the same elements, so a floor that skips bytes
fails loudly instead of looking fast. Beside them, SDPA and loki_decode as it runs (its path named), all
CUDA-graph medians after do_bench's L2 flush, as `lokitool bench` times them, in one process:

    python benchmarks/floor_lab.py [--shapes llama3-8b:1:32768:kv,...] --out DIR

A target above SDPA / floor is out of reach for any exact Loki step on this card; loki / floor is what is
left to win. --device cpu is a dry run under TRITON_INTERPRET=1 (the two-launch floor only: the interpreter
runs programs one after another, so a barrier would never open).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lokitool.kernels import clear_plans, decode_path, loki_decode
from lokitool.kernels import select_radix as radix
from lokitool.kernels.loki_step import fits_resident
from stage_lab import lab_parser, lab_shape, run_lab

from lokitool.bench.presets import PRESETS
from lokitool.bench.timing import time_ms

DEFAULT_SHAPES = ("llama3-8b:1:32768:kv,llama3-8b:1:65536:kv,llama3-8b:1:131072:kv,llama2-13b:1:32768:head,"
                  "llama2-13b:1:65536:head,llama2-13b:1:131072:head,llama3-8b:16:16384:kv,llama2-13b:16:16384:head,llama2-13b:16:65536:head")
TARGETS = {(1, 32768): 1.8, (1, 65536): 1.8, (1, 131072): 1.8, ("llama3-8b", 16, 16384): 2.2, ("llama2-13b", 16, 65536): 2.2,
           ("llama2-13b", 16, 16384): 2.0, ("llama2-13b", 16, 4096): 1.7}


@triton.jit
def _floor_kernel(low_ptr, high_ptr, v_ptr, idx_ptr, sync_ptr, out_ptr, s, kk, nch,
                  D_LOW: tl.constexpr, D_HIGH: tl.constexpr, DHP: tl.constexpr, D: tl.constexpr,
                  CH: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                  PLANE: tl.constexpr, KEPT: tl.constexpr, BARRIER: tl.constexpr):
    """Program (c, r): chunk c of row r's scored plane (PLANE), the row's barrier (BARRIER), an equal share
    of the row's kk kept rows (KEPT); the sum of what it read stored at out[r, c]."""
    c = tl.program_id(0)
    r = tl.program_id(1).to(tl.int64)
    total = 0.0
    if PLANE:
        base = low_ptr + r * s * D_LOW
        acc = tl.zeros([BLOCK], tl.float32)
        end = tl.minimum((c + 1) * CH, s) * D_LOW
        for t in range(c * CH * D_LOW, end, BLOCK):  # the plane is contiguous along the row
            offs = t + tl.arange(0, BLOCK)
            acc += tl.load(base + offs, mask=offs < end, other=0.0).to(tl.float32)
        total += tl.sum(acc, axis=0)
    if BARRIER:
        radix._row_arrive(sync_ptr + r * 2)
        radix._row_wait(sync_ptr + r * 2, nch)
    if KEPT:
        per = tl.cdiv(kk, nch)
        lo = c * per
        hi = tl.minimum(lo + per, kk)
        dl = tl.arange(0, D_LOW)
        dh = tl.arange(0, DHP)
        dv = tl.arange(0, D)
        acc_l = tl.zeros([BLOCK_N, D_LOW], tl.float32)
        acc_h = tl.zeros([BLOCK_N, DHP], tl.float32)
        acc_v = tl.zeros([BLOCK_N, D], tl.float32)
        for t in range(lo, hi, BLOCK_N):
            offs = t + tl.arange(0, BLOCK_N)
            ok = offs < hi
            tok = tl.load(idx_ptr + r * kk + offs, mask=ok, other=0).to(tl.int64)
            acc_l += tl.load(low_ptr + r * s * D_LOW + tok[:, None] * D_LOW + dl[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            acc_h += tl.load(high_ptr + r * s * D_HIGH + tok[:, None] * D_HIGH + dh[None, :],
                             mask=ok[:, None] & (dh < D_HIGH)[None, :], other=0.0).to(tl.float32)
            acc_v += tl.load(v_ptr + r * s * D + tok[:, None] * D + dv[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        total += tl.sum(tl.sum(acc_l, axis=1), axis=0) + tl.sum(tl.sum(acc_h, axis=1), axis=0) + tl.sum(tl.sum(acc_v, axis=1), axis=0)
    tl.store(out_ptr + r * nch + c, total)
    if BARRIER:  # the row's last program zeroes its counters for the next call
        if tl.atomic_add(sync_ptr + r * 2 + 1, 1, sem="acq_rel") == nch - 1:
            tl.store(sync_ptr + r * 2, 0)
            tl.store(sync_ptr + r * 2 + 1, 0)


class Floor:
    """The floor reads of one shape: planes low [R, S, d], high [R, S, D - d], v [R, S, D] (R = batch x KV
    heads, the selection rows of group kv; per-head rows of an MHA model are the same) and kept lists."""

    def __init__(self, low, high, v, kk: int, seed: int = 1):
        self.low, self.high, self.v = (t.reshape(-1, *t.shape[-2:]) for t in (low, high, v))
        rows, self.s, _ = self.low.shape
        self.kk = kk
        g = torch.Generator(device=low.device).manual_seed(seed)
        keys = torch.rand(rows, self.s, generator=g, device=low.device)
        self.idx = keys.topk(kk, dim=1).indices.sort(dim=1).values.to(torch.int32).contiguous()
        self.sync = torch.zeros(rows * 2, dtype=torch.int32, device=low.device)

    def expected(self) -> float:
        """torch's sum of every element a floor reads (float64)."""
        i = self.idx.long()[:, :, None]
        kept = [t.gather(1, i.expand(-1, -1, t.shape[-1])).sum(dtype=torch.float64) for t in (self.low, self.high, self.v)]
        return (self.low.sum(dtype=torch.float64) + sum(kept)).item()

    def launch(self, chunk: int, warps: int, plane: bool, kept: bool, barrier: bool, out: torch.Tensor | None = None, maxnreg=None):
        rows = self.low.shape[0]
        nch = triton.cdiv(self.s, chunk)
        out = torch.empty(rows, nch, dtype=torch.float32, device=self.low.device) if out is None else out
        dl, dh, dim = self.low.shape[-1], self.high.shape[-1], self.v.shape[-1]
        args = dict(low_ptr=self.low, high_ptr=self.high, v_ptr=self.v, idx_ptr=self.idx, sync_ptr=self.sync, out_ptr=out,
                    s=self.s, kk=self.kk, nch=nch, D_LOW=dl, D_HIGH=dh, DHP=triton.next_power_of_2(max(dh, 1)), D=dim,
                    CH=chunk, BLOCK=min(4096, chunk * dl), BLOCK_N=64, PLANE=plane, KEPT=kept, BARRIER=barrier, num_warps=warps)
        if maxnreg:
            args["maxnreg"] = maxnreg
        _floor_kernel[(nch, rows)](**args)
        return out

    def compiled(self, chunk: int, warps: int, maxnreg: int):
        rows = self.low.shape[0]
        nch = triton.cdiv(self.s, chunk)
        dl, dh, dim = self.low.shape[-1], self.high.shape[-1], self.v.shape[-1]
        return _floor_kernel.warmup(self.low, self.high, self.v, self.idx, self.sync, self.sync.float(), self.s, self.kk, nch,
                                    D_LOW=dl, D_HIGH=dh, DHP=triton.next_power_of_2(max(dh, 1)), D=dim, CH=chunk,
                                    BLOCK=min(4096, chunk * dl), BLOCK_N=64, PLANE=True, KEPT=True, BARRIER=True,
                                    num_warps=warps, maxnreg=maxnreg, grid=(nch, rows))


def _check(got: float, want: float, what: str) -> None:
    if abs(got - want) > 1e-3 * max(1.0, abs(want)) + 1.0:
        raise SystemExit(f"{what}: read sum {got:.6g}, torch's sum of the same elements {want:.6g}: the floor skips bytes")


def floors(f: Floor, device, log) -> dict:
    """Best one-launch and two-launch floors over their settings, each checked against torch's sum."""
    want = f.expected()
    rows = f.low.shape[0]
    best = {}
    two = []
    chunks = [c for c in (512, 2048, 8192) if c <= max(512, f.s)]
    for c1 in chunks:
        for c2 in chunks:
            for warps in (4, 8):
                def run(c1=c1, c2=c2, warps=warps):
                    return f.launch(c1, warps, True, False, False).sum() + f.launch(c2, warps, False, True, False).sum()
                got = run().item()
                _check(got, want, f"two launches chunk {c1}/{c2} w{warps}")
                two.append((time_ms(lambda: (f.launch(c1, warps, True, False, False), f.launch(c2, warps, False, True, False)), device)[1],
                            c1, c2, warps))
    ms, c1, c2, warps = min(two)
    best["two_launch"] = {"ms": ms, "plane_chunk": c1, "kept_chunk": c2, "warps": warps}
    log(f"  floor, two launches: {ms:.4f} ms (plane chunks {c1}, kept shares of chunks {c2}, {warps} warps; {len(two)} settings)")
    if device.type != "cuda":
        return best
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    one = []
    for per_sm in (1, 2, 4, 8):
        for warps in (4, 8):
            if rows > per_sm * sms:
                continue
            regs = radix.one_launch_registers(warps, per_sm)
            chunk = 256
            while rows * triton.cdiv(f.s, chunk) > per_sm * sms:
                chunk *= 2
            if not fits_resident(f.compiled(chunk, warps, regs), per_sm, device):
                continue
            _check(f.launch(chunk, warps, True, True, True, maxnreg=regs).sum().item(), want, f"one launch chunk {chunk} w{warps}")
            ms = time_ms(lambda: f.launch(chunk, warps, True, True, True, maxnreg=regs), device)[1]
            one.append((ms, chunk, warps, per_sm))
    if not one:
        log("  floor, one launch: no grid of the rows fits the card at once")
        return best
    ms, chunk, warps, per_sm = min(one)
    best["one_launch"] = {"ms": ms, "chunk": chunk, "warps": warps, "per_sm": per_sm}
    log(f"  floor, one launch: {ms:.4f} ms (chunks {chunk}, {warps} warps, {per_sm} programs a multiprocessor; {len(one)} settings)")
    return best


def measure(preset: str, b: int, s: int, group: str, device, log) -> dict:
    h, hkv, _ = PRESETS[preset].attention_shape
    if group == "head" and h != hkv:
        raise SystemExit(f"{preset}: per-head selection on a GQA model reads each KV head once per query head; the floor is for group kv")
    x = lab_shape(preset, b, s, group, device)
    p, spec, q, k, v, lengths, scaling = x.p, x.spec, x.q, x.k, x.v, x.lengths, x.scaling
    out = {"shape": f"{preset}:{b}:{s}:{group}", "d": p.d, "k": p.k, "sdpa_ms": x.sdpa_ms}
    clear_plans()
    out["path"] = decode_path(b * (hkv if group == "kv" else h), s, device)
    out["loki_ms"] = time_ms(lambda: loki_decode(q, k, v, lengths, spec=spec, scaling=scaling), device)[1]
    f = Floor(k.low, k.high, v, p.k)
    mb = (f.low.numel() + f.kk * f.low.shape[0] * (f.low.shape[-1] + f.high.shape[-1] + f.v.shape[-1])) * 2 / 1e6
    out["floor_mb"] = mb
    log(f"{out['shape']}: sdpa {out['sdpa_ms']:.4f} ms, loki ({out['path']}) {out['loki_ms']:.4f} ms "
        f"({out['sdpa_ms'] / out['loki_ms']:.2f}x); a step's floor reads {mb:.1f} MB")
    out.update(floors(f, device, log))
    target = TARGETS.get((preset, b, s)) or TARGETS.get((b, s))
    for name in ("one_launch", "two_launch"):
        if name in out:
            out[name]["ceiling_x"] = out["sdpa_ms"] / out[name]["ms"]
    lowest = min(out[n]["ms"] for n in ("one_launch", "two_launch") if n in out)
    out["ceiling_x"], out["loki_over_floor"], out["target_x"] = out["sdpa_ms"] / lowest, out["loki_ms"] / lowest, target
    log(f"  ceiling {out['ceiling_x']:.2f}x SDPA (loki {out['sdpa_ms'] / out['loki_ms']:.2f}x, {out['loki_over_floor']:.2f}x the floor's time)"
        + (f"; target {target}x: {'within' if out['ceiling_x'] >= target else 'beyond'} the floor" if target else ""))
    return out


def main() -> None:
    args = lab_parser(__doc__, DEFAULT_SHAPES, "none", "runs/floor_lab", "cpu: a dry run under TRITON_INTERPRET=1").parse_args()
    run_lab(args, "floor_lab", measure)


if __name__ == "__main__":
    main()
