"""Time per response and planted-anchor recovery of each partition method (not a test; CI does not run it).

64 responses x 1,024 tokens, R image regions; each response has T/64 planted anchor runs of 8 tokens that
read one region with high connectivity. Single core: BLAS/OpenMP and torch limited to one thread and one
worker. All cores: one BLAS thread per worker thread, `n_workers = os.cpu_count()`.
Target (issue 5): METIS at most 30 ms per response on one core.

    python benchmarks/credit_partition.py [--responses 64] [--tokens 256 1024 2048 4096] [--regions 16] [--repeats 3]
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


def measure(responses: int, tokens: int, regions: int, repeats: int, cores: int) -> dict[str, dict]:
    """Per partition variant at one response length: ms per response on one core (median, min, max) and with
    `cores` worker processes, and the planted anchors' recall and precision."""
    batch, planted = make_batch(responses, tokens, regions)
    torch.set_num_threads(1)
    out = {}
    for name, options in VARIANTS.items():
        row = {}
        for workers in (1, cores):
            with threadpool_limits(1):
                med, lo, hi, result = time_it(batch, CreditOptions(**{**options.__dict__, "n_workers": workers}),
                                              repeats)
            per = 1000 / responses
            row["1 core" if workers == 1 else "all cores"] = (med * per, lo * per, hi * per)
        hit = (result.boosted_mask & planted).sum(1).float()
        row["recall"] = float((hit / planted.sum(1)).mean())
        row["precision"] = float((hit / result.boosted_mask.sum(1).clamp(min=1)).mean())
        row["planted"] = float(planted.float().mean())
        out[name] = row
    return out


def report(results: dict[int, dict[str, dict]], responses: int, regions: int, cores: int) -> list[str]:
    """A table per length, then each variant's one-core cost per 1,024 tokens against the length (linear growth
    keeps it flat)."""
    lines = []
    for tokens, rows in results.items():
        planted = next(iter(rows.values()))["planted"]
        lines += [f"# {responses} responses x {tokens} tokens, R={regions}, planted anchors {planted:.3f} of tokens; "
                  f"{platform.machine()}, {cores} cores, torch {torch.__version__}",
                  f"| partition | ms/response, 1 core (min-max) | ms/response, {cores} cores | anchor recall | "
                  "anchor precision |", "|---|---|---|---|---|"]
        for name, r in rows.items():
            med, lo, hi = r["1 core"]
            lines.append(f"| {name} | {med:.1f} ({lo:.1f}-{hi:.1f}) | {r['all cores'][0]:.1f} | {r['recall']:.3f} | "
                         f"{r['precision']:.3f} |")
    if len(results) > 1:
        lengths = list(results)
        lines += ["# one core, ms per 1,024 tokens of response, against the length (flat: linear in the length)",
                  "| partition | " + " | ".join(f"{t} tokens" for t in lengths) + " |",
                  "|---" * (1 + len(lengths)) + "|"]
        for name in VARIANTS:
            lines.append(f"| {name} | " + " | ".join(f"{results[t][name]['1 core'][0] * 1024 / t:.1f}"
                                                     for t in lengths) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="atrl bench credit", description=__doc__.split(chr(10))[0])
    ap.add_argument("--responses", type=int, default=64, help="responses per batch")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024], help="response lengths, one table each")
    ap.add_argument("--regions", type=int, default=16, help="image regions (R)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions (the median is reported)")
    args = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    results = {}
    for tokens in args.tokens:
        results[tokens] = measure(args.responses, tokens, args.regions, args.repeats, cores)
        print("\n".join(report({tokens: results[tokens]}, args.responses, args.regions, cores)), flush=True)
    if len(results) > 1:
        print("\n".join(report(results, args.responses, args.regions, cores)[-(3 + len(VARIANTS)):]))


if __name__ == "__main__":
    main()
