"""Print each Loki kernel (keys in the two-plane layout)'s chosen autotune config and its registers and spills, after one decode
step at the issue's main shape (B=16, H=40, D=128, S=16384, fp16, kf=df=0.25: row selection) and one at B=1, S=65536
(split selection). Needs a CUDA GPU."""

from __future__ import annotations

import torch
from lokitool.kernels import attention, loki_decode, score, select, select_radix, split_keys

from lokitool.sparse.reference import LokiSpec


def compiled_kernels(jit_fn):
    """Compiled variants of a @triton.jit function (triton 3.x caches them per device)."""
    fn = getattr(jit_fn, "fn", jit_fn)  # unwrap the autotuner
    for cache in getattr(fn, "device_caches", {}).values():
        yield from cache[0].values()


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    h, dim = 40, 128
    for b, s in ((16, 16384), (1, 65536)):
        q = torch.randn(b, h, dim, device="cuda", generator=g).half()
        k = torch.randn(b, h, s, dim, device="cuda", generator=g).half()
        v = torch.randn(b, h, s, dim, device="cuda", generator=g).half()
        lengths = torch.full((b,), s, dtype=torch.int32, device="cuda")
        loki_decode(q, split_keys(k, 32), v, lengths, spec=LokiSpec(kf=0.25, df=0.25), scaling=dim**-0.5)
        torch.cuda.synchronize()
        del q, k, v
    for name, fn in [("score", score._score_kernel), ("select", select._select_kernel), ("write", select._write_kernel),
                     ("radix", select_radix._radix_kernel),
                     ("attention", attention._sparse_attention_kernel)]:
        best = getattr(fn, "best_config", None)
        for kern in compiled_kernels(fn):
            try:
                kern._init_handles()
                regs, spills = kern.n_regs, kern.n_spills
            except Exception as err:  # noqa: BLE001 - diagnostics only
                regs, spills = f"? ({err})", "?"
            meta = {k: v for k, v in kern.src.constants.items()} if hasattr(kern, "src") else ""
            print(f"{name:10s} regs={regs} spills={spills} warps={kern.metadata.num_warps} stages={kern.metadata.num_stages} {meta}")
        print(f"{name:10s} best config: {best}")


if __name__ == "__main__":
    main()
