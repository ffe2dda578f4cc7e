"""Small helpers shared by the Loki kernel files: autotune pruning and pinning, launches that can be
recorded and replayed, padding, a dot for the interpreter."""

from __future__ import annotations

import contextlib
import functools
import os

import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pow2(x: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(int(x)))


def env_pow2(name: str, low: int, high: int | None = None) -> int | None:
    """A benchmark's power-of-two setting from the environment variable `name`: None where it is unset,
    a ValueError naming the variable where it is not a power of two in [low, high]."""
    raw = os.environ.get(name)
    if raw is None:
        return None
    value = int(raw) if raw.isdigit() else 0
    if value < low or (high is not None and value > high) or value != pow2(value):
        bounds = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise ValueError(f"{name}={raw!r} must be a power of two {bounds}")
    return value


def env_switch(name: str) -> bool | None:
    """An on/off setting from the environment variable `name`: None where it is unset, True for 1,
    False for 0, a ValueError naming the variable for anything else."""
    raw = os.environ.get(name)
    if raw not in (None, "0", "1"):
        raise ValueError(f"{name}={raw!r} must be 0 or 1")
    return None if raw is None else raw == "1"


@functools.cache
def multiprocessors(device) -> int:
    """Streaming multiprocessors of a CUDA device (4 for the CPU interpreter), asked once per device."""
    import torch

    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def autotuning() -> bool:
    """Autotune on the GPU unless LOKITOOL_AUTOTUNE=0 (tests set it: one compile per shape)."""
    return not interpreting() and os.environ.get("LOKITOOL_AUTOTUNE", "1") != "0"


def keep_configs(configs: list, ok) -> list:
    """Configs passing `ok(config)`, in the given order (smallest tiles first). Without autotuning
    only the last, largest one is kept: the interpreter has nothing to time, and big tiles mean
    fewer Python-level steps there."""
    kept = [c for c in configs if ok(c)] or configs[:1]
    return kept if autotuning() else kept[-1:]


def launch_args(named_args: dict, kwargs: dict) -> dict:
    """The launch arguments as one dict, whether they were passed by position or by keyword."""
    return {**named_args, **kwargs}


# ----------------------------------------------------------------------------------------------
# Launches: pinned configs, recorded for replay
#
# Triton's launch path costs the host tens of microseconds per launch, most of it spent working out
# each argument's specialization again (and, for an autotuned kernel, the autotuner's key). A decode
# step whose shapes repeat can skip that: its first call records each launch (the compiled kernel,
# the grid, the arguments in signature order) and later calls replay the record with their own
# tensors swapped in (loki_decode.py). A record is only valid for arguments that specialize the same
# way: same shapes, strides and dtypes, and pointers with the same 16-byte alignment.


class Recorded:
    """The launches of one call, in order: (runner of a compiled kernel at its grid, arguments)."""

    def __init__(self):
        self.launches: list[tuple[object, list]] = []
        self.complete = True  # False if a launch could not be recorded (the interpreter compiles nothing)
        self.addresses = True  # the runners take a tensor's address in its place (compiled kernels do)


_recording: Recorded | None = None


@contextlib.contextmanager
def recording():
    """Record the launches made inside the block (see `Recorded`)."""
    global _recording
    rec = _recording = Recorded()
    try:
        yield rec
    finally:
        _recording = None


def _record(jit_fn, compiled, grid, args: dict) -> None:
    if _recording is None:
        return
    if compiled is None or interpreting():
        _recording.complete = False
        return
    if callable(grid):
        grid = grid(args)
    grid = (*grid, 1, 1)[:3]
    _recording.launches.append((compiled[grid], [args[name] for name in jit_fn.arg_names]))


def launch(kernel, grid, **args) -> None:
    """kernel[grid](**args), recorded while a `recording()` is open."""
    compiled = kernel[grid](**args)
    _record(kernel, compiled, grid, args)


class Pinned:
    """An autotuned kernel launched through its chosen config, pinned per autotune key after the
    first launch: later launches skip the autotuner's per-call work (it rebuilds its key and copies
    the arguments into dicts on every call). The key is the autotuner's (its `key` arguments) plus
    the dtypes the launcher passes; the config is the one the autotuner chose for that key, so
    results are those of the autotuned launch.

        _SCORE = Pinned(_score_kernel)
        _SCORE.launch(grid, (q.dtype, k.dtype), q_ptr=q, ..., S_HINT=pow2(s))
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self.configs: dict[tuple, object] = {}

    def launch(self, grid, dtypes: tuple, **args) -> None:
        key = (dtypes, *(args[name] for name in self.kernel.keys))
        config = self.configs.get(key)
        if config is None:
            compiled = self.kernel[grid](**args)
            config = self.configs[key] = self.kernel.best_config
        else:
            compiled = self.kernel.fn[grid](**args, **config.all_kwargs())
        _record(self.kernel.fn, compiled, grid, {**args, **config.kwargs})


# ----------------------------------------------------------------------------------------------
# JIT helpers shared by the kernel files


@triton.jit
def dot_f32(a, b, UPCAST: tl.constexpr):
    """a @ b with float32 accumulation. UPCAST is set only under the CPU interpreter for bfloat16,
    which it would multiply as raw uint16 bits (triton 3.9): bf16 -> fp32 is exact, so the result
    matches the GPU's bf16 MMA."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


def upcast_dot(dtype) -> bool:
    import torch

    return interpreting() and dtype == torch.bfloat16


@triton.jit
def write_budgets(lengths_ptr, budgets_ptr, kf_bits, num_seqs, BLOCK: tl.constexpr):
    """budgets[b] = max(1, floor(kf x lengths[b])) for b < num_seqs (BLOCK >= num_seqs), in float64:
    kf arrives as its int64 bit pattern (a float scalar argument would be rounded to float32)."""
    offs = tl.arange(0, BLOCK)
    ok = offs < num_seqs
    n = tl.load(lengths_ptr + offs, mask=ok, other=0)
    tl.store(budgets_ptr + offs, token_budget(n, kf_bits), mask=ok)


@triton.jit
def token_budget(n, kf_bits):
    """max(1, floor(kf x n)) in float64 for int32 n (any shape); kf as its int64 bit pattern."""
    kf = kf_bits.to(tl.int64).to(tl.float64, bitcast=True)
    return tl.maximum(tl.floor(n.to(tl.float64) * kf).to(tl.int32), 1)


def float_bits(x: float) -> int:
    """A float64's bit pattern as an int64 (for write_budgets' kf_bits)."""
    import struct

    return struct.unpack("<q", struct.pack("<d", x))[0]
