"""How many candidates the pivot selection's bracket holds (kernels/select_pivot.py), simulated on the CPU.

For rows of n normal scores and a sample of M keys at evenly spaced tokens (as _sample_kernel takes
them), the bracket [lo, hi] around the k-th largest key at MARGIN sampling deviations, and the count of
keys inside it: the candidates the compact kernel lists. Their mean and deviation against the MAX_CAP
slots say how often a row overflows into the slow whole-row search (select_pivot.sample_size's rule), and
against the model: mean g x n, deviation sqrt(g (1 - g) / M) x n for the bracket share g.

    python benchmarks/pivot_samples.py [--rows 1000] > reports/bench/select-profile/samples/pivot_samples.log
"""

from __future__ import annotations

import argparse
import math

import numpy as np
from lokitool.kernels.select_pivot import MARGIN, MAX_CAP, bracket_share

CASES = [(131072, 2048, 0.25), (131072, 2048, 0.5), (131072, 4096, 0.5), (65536, 1024, 0.25), (65536, 1024, 0.5), (65536, 2048, 0.25)]


def candidates(n: int, m: int, p: float, rows: int, rng, batch: int = 50) -> np.ndarray:
    """Candidates per row, as the sample, compact kernels would count them."""
    k = max(1, int(p * n))
    jstar = k / n * m
    margin = MARGIN * math.sqrt(m * (k / n) * (1 - k / n)) + 8
    hi_rank, lo_rank = math.ceil(jstar - margin), math.floor(jstar + margin)
    pos = np.arange(m) * n // m
    out = []
    for _ in range(rows // batch):
        x = rng.standard_normal((batch, n)).astype(np.float32)
        ranked = np.sort(x[:, pos], axis=1)  # ascending: the j-th largest at m - j
        hi = ranked[:, m - hi_rank] if hi_rank >= 1 else np.full(batch, np.inf, np.float32)
        lo = ranked[:, m - lo_rank] if lo_rank <= m else np.full(batch, -np.inf, np.float32)
        out.append(((x >= lo[:, None]) & (x <= hi[:, None])).sum(axis=1))
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'tokens':>7} {'sample':>6} {'kf':>5} | {'mean':>6} {'sd':>5} {'max':>6} | model {'mean':>6} {'sd':>5} | "
          f"slots {MAX_CAP}: sd above mean, rows over")
    for n, m, p in CASES:
        c = candidates(n, m, p, args.rows, rng)
        g = bracket_share(m, p)
        print(f"{n:>7} {m:>6} {p:>5} | {c.mean():>6.0f} {c.std():>5.0f} {c.max():>6} | {g * n:>12.0f} {math.sqrt(g * (1 - g) / m) * n:>5.0f} | "
              f"{(MAX_CAP - c.mean()) / c.std():>5.1f} {int((c > MAX_CAP).sum())}/{len(c)}", flush=True)


if __name__ == "__main__":
    main()
