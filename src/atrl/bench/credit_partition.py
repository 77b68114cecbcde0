"""Time per response and planted-anchor recovery of each partition method (not a test; CI does not run it).

64 responses x 1,024 tokens, R image regions; each response has T/64 planted anchor runs of 8 tokens that
read one region with high connectivity. Single core: BLAS/OpenMP and torch limited to one thread and one
worker. All cores: one BLAS thread per worker thread, `n_workers = os.cpu_count()`.
Target (issue 5): METIS at most 30 ms per response on one core.

    python benchmarks/credit_partition.py [--responses 64] [--tokens 1024] [--regions 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from atrl.credit import CreditOptions, assign_credit

VARIANTS = {
    "metis k-way, max 64 parts (default)": CreditOptions(),
    "metis k-way, max 32 parts": CreditOptions(max_parts=32),
    "metis recursive, max 64 parts": CreditOptions(metis_recursive=True),
    "kmeans": CreditOptions(partition="kmeans"),
    "threshold (quantile bins)": CreditOptions(partition="threshold"),
}


def make_batch(B: int, T: int, R: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    conn = rng.uniform(0.01, 0.05, (B, T))
    prof = rng.dirichlet(np.ones(R) * 5, (B, T))
    planted = np.zeros((B, T), dtype=bool)
    for b in range(B):
        for g, s in enumerate(rng.choice(np.arange(0, T - 8, 16), T // 64, replace=False)):
            conn[b, s:s + 8] = rng.uniform(0.4, 0.6, 8)
            p = np.full(R, 0.01)
            p[g % R] = 1
            prof[b, s:s + 8] = p / p.sum()
            planted[b, s:s + 8] = True
    return (torch.tensor(conn), torch.tensor(prof), torch.ones(B, T, dtype=torch.bool)), torch.tensor(planted)


def time_it(batch, options, repeats):
    result = assign_credit(*batch, options)  # warm-up (imports, allocator)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        assign_credit(*batch, options)
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs), min(runs), max(runs), result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="atrl bench credit", description=__doc__.split(chr(10))[0])
    ap.add_argument("--responses", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--regions", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    batch, planted = make_batch(args.responses, args.tokens, args.regions)
    cores = os.cpu_count() or 1
    print(f"# {args.responses} responses x {args.tokens} tokens, R={args.regions}, planted anchors "
          f"{planted.float().mean():.3f} of tokens; {platform.machine()}, {cores} cores, torch {torch.__version__}")
    print(f"| partition | ms/response, 1 core (min-max) | ms/response, {cores} cores | anchor recall | "
          "anchor precision |")
    print("|---|---|---|---|---|")
    torch.set_num_threads(1)
    for name, options in VARIANTS.items():
        cells = []
        for workers in (1, cores):
            with threadpool_limits(1):
                med, lo, hi, result = time_it(batch, CreditOptions(**{**options.__dict__, "n_workers": workers}),
                                              args.repeats)
            per = 1000 / args.responses
            cells.append(f"{med * per:.1f} ({lo * per:.1f}-{hi * per:.1f})" if workers == 1 else f"{med * per:.1f}")
        hit = (result.boosted_mask & planted).sum(1).float()
        recall = (hit / planted.sum(1)).mean()
        precision = (hit / result.boosted_mask.sum(1).clamp(min=1)).mean()
        print(f"| {name} | {cells[0]} | {cells[1]} | {recall:.3f} | {precision:.3f} |", flush=True)


if __name__ == "__main__":
    main()
