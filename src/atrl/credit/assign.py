"""Batched credit assignment: connectivity and region profiles in, per-token weights out.

Shape legend: B responses, T response positions (padded), R image regions, n valid tokens of one
response. Masks are boolean, True = the token counts.

    weights_BT, result = assign_credit(conn_BT, profile_BTR, mask_BT, options)
    advantages_BT = weights_BT * advantages_B[:, None]          # A_AT(i, t) = W(C_k(t)) * A(i)

Credit modes are registered in `credit.modes` (`credit_mode_names()` lists them): each declares what it needs
and a weight function for one response; this module runs them over a batch, on worker processes if asked.

Every mode's weights have mean 1 over each response's valid tokens and are 0 on padding. When a
response's connectivity is all equal (no signal), the graph-based modes give uniform weights and the
response is flagged `degenerate` in the statistics.

CPU work: the per-response partition runs in numpy / METIS on the CPU; `n_workers > 1` spreads
responses over a persistent pool of worker processes (METIS holds the GIL, so threads would not help).
`PendingCredit` is the asynchronous form a trainer uses: it hands each block of rows to the workers as soon
as its connectivity exists and waits only when a row's weights are needed (see docs/ALGORITHM.md).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from .._workers import exit_with_parent, stop_signals_blocked
from .graph import PARTITION_METHODS
from .modes import CreditMode, ResponseScores, credit_mode
from .weights import bimodality_coefficient, mean_one


@dataclass(frozen=True)
class CreditOptions:
    """How connectivity becomes per-token weights. Defaults are this project's reconstruction.

    Attributes:
        mode: a registered credit mode (`credit.modes.credit_mode_names()`).
        partition: "metis" (token graph + METIS, the paper's choice), "kmeans" or "threshold" (quantile bins).
        anchor_ratio: share of a response's tokens in anchor clusters (paper: about 0.15), or "auto" for a
            two-class (Otsu) split of the connectivity distribution.
        weighting: "two_level" (w_anchor / w_other) or "smooth" (clip(1 + beta * z_k, w_min, w_max)).
        w_anchor, w_other: two_level weights before the mean-one rescaling; need 0 < w_other.
        beta, w_min, w_max: smooth weighting slope and clip range.
        target_cluster_size: tokens per part; K = round(n / target_cluster_size) clamped to [min_parts, max_parts].
        knn, seq_weight, sim_scale: token-graph construction (see `credit.graph.token_graph`).
        metis_ufactor: METIS load imbalance in thousandths (see `credit.graph.partition_metis`).
        metis_recursive: recursive bisection instead of k-way METIS (faster, coarser; see partition_metis).
        entropy_top: share of highest-entropy tokens kept by the `entropy_per_response` (per response) and
            `entropy_8020` (per micro-batch) modes (the 80/20 paper: 0.2).
        vppo_top: share of each response's tokens, by visual dependency, the `vppo` mode trains on (VPPO's
            published runs: 0.4).
        vppo_scale_min: the smallest advantage scale of VPPO's trajectory shaping (published runs: 0.9).
        seed: seeds METIS, k-means and the `random` mode (which also mixes in the response's batch index).
            METIS takes seeds 0 and 1 as the same seed, and on random token graphs of 40 to 1,000 tokens
            the partition did not change with the seed at all (seeds 0-2).
        n_workers: worker processes for the per-response work (1 = in the calling process).
    """

    mode: str = "atrl"
    partition: str = "metis"
    anchor_ratio: float | str = 0.15
    weighting: str = "two_level"
    w_anchor: float = 3.0
    w_other: float = 1.0
    beta: float = 1.0
    w_min: float = 0.25
    w_max: float = 4.0
    target_cluster_size: int = 8
    min_parts: int = 2
    max_parts: int = 64
    knn: int = 8
    seq_weight: int = 4
    sim_scale: int = 16
    metis_ufactor: int = 500
    metis_recursive: bool = False
    entropy_top: float = 0.2
    vppo_top: float = 0.4
    vppo_scale_min: float = 0.9
    seed: int = 0
    n_workers: int = 1

    def __post_init__(self) -> None:
        credit_mode(self.mode)  # raises naming the registered modes
        if self.partition not in PARTITION_METHODS:
            raise ValueError(f"partition {self.partition!r} is unknown; choose from {PARTITION_METHODS}")
        if self.anchor_ratio != "auto" and not (isinstance(self.anchor_ratio, (int, float))
                                                and 0 < self.anchor_ratio < 1):
            raise ValueError(f"anchor_ratio={self.anchor_ratio!r}: use a share in (0, 1) or 'auto'")
        if self.weighting not in ("two_level", "smooth"):
            raise ValueError(f"weighting {self.weighting!r} is unknown; choose 'two_level' or 'smooth'")
        if not 0 < self.w_other:
            raise ValueError(f"w_other={self.w_other} must be > 0 (use mode='anchors_only' to zero the rest)")
        if self.w_anchor < self.w_other:
            raise ValueError(f"w_anchor={self.w_anchor} < w_other={self.w_other}: anchors would get less credit; "
                             "use mode='low_only' for that ablation")
        if not 0 < self.w_min <= 1 <= self.w_max:
            raise ValueError(f"need 0 < w_min <= 1 <= w_max, got w_min={self.w_min}, w_max={self.w_max}")
        for name in ("entropy_top", "vppo_top"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in (0, 1]")
        if not 0 <= self.vppo_scale_min <= 1:
            raise ValueError(f"vppo_scale_min={self.vppo_scale_min} must be in [0, 1]")
        for name in ("target_cluster_size", "min_parts", "max_parts", "knn", "n_workers", "metis_ufactor"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_parts < self.min_parts:
            raise ValueError(f"max_parts={self.max_parts} < min_parts={self.min_parts}")


@dataclass
class CreditResult:
    """Per-token outputs (B, T) and per-response statistics (B,). NaN marks a statistic that does not
    apply (e.g. anchor connectivity in `uniform` mode, or an empty response)."""

    weights: torch.Tensor  # (B, T) float32, 0 on padding
    boosted_mask: torch.Tensor  # (B, T) bool: anchors (or the mode's chosen set)
    parts: torch.Tensor  # (B, T) int64 part id, -1 on padding or when no partition was made
    anchor_fraction: torch.Tensor  # (B,)
    num_parts: torch.Tensor  # (B,) int64
    anchor_conn: torch.Tensor  # (B,) mean connectivity of boosted tokens
    other_conn: torch.Tensor  # (B,) mean connectivity of the rest
    bimodality: torch.Tensor  # (B,) Sarle's coefficient of the connectivity
    degenerate: torch.Tensor  # (B,) bool: connectivity all equal, uniform weights used
    densities: list[np.ndarray] = field(default_factory=list)  # per response, (K,) cluster densities

    def summary(self) -> dict[str, float]:
        """Batch means for logging (NaNs ignored)."""
        def m(x: torch.Tensor) -> float:
            x = x.float()
            ok = ~torch.isnan(x)
            return float(x[ok].mean()) if ok.any() else float("nan")

        return {"anchor_fraction": m(self.anchor_fraction), "num_parts": m(self.num_parts),
                "anchor_conn": m(self.anchor_conn), "other_conn": m(self.other_conn),
                "bimodality": m(self.bimodality), "degenerate": m(self.degenerate)}


def _check_inputs(conn_BT, profile_BTR, mask_BT, entropy_BT, mode: str) -> None:
    if conn_BT.ndim != 2:
        raise ValueError(f"conn_BT must be (B, T), got shape {tuple(conn_BT.shape)}")
    if mask_BT.shape != conn_BT.shape:
        raise ValueError(f"mask_BT shape {tuple(mask_BT.shape)} != conn_BT shape {tuple(conn_BT.shape)}")
    if mask_BT.dtype != torch.bool:
        raise ValueError(f"mask_BT must be bool (True = token counts), got {mask_BT.dtype}")
    if profile_BTR.ndim != 3 or profile_BTR.shape[:2] != conn_BT.shape:
        raise ValueError(f"profile_BTR must be (B, T, R) with (B, T) = {tuple(conn_BT.shape)}, "
                         f"got {tuple(profile_BTR.shape)}")
    named = [("conn_BT", conn_BT, mask_BT), ("profile_BTR", profile_BTR, mask_BT[..., None])]
    if credit_mode(mode).needs_entropy:
        if entropy_BT is None:
            raise ValueError(f"credit mode {mode!r} needs entropy_BT (per-token entropies)")
        if entropy_BT.shape != conn_BT.shape:
            raise ValueError(f"entropy_BT shape {tuple(entropy_BT.shape)} != conn_BT shape {tuple(conn_BT.shape)}")
        named.append(("entropy_BT", entropy_BT, mask_BT))
    for name, x, m in named:
        bad = ~torch.isfinite(x) & m
        if bad.any():
            where = tuple(int(i) for i in bad.nonzero()[0][:2])
            raise ValueError(f"{name} has a non-finite value (NaN or inf) at (batch, token) = {where}")


def _one_response(conn_n: np.ndarray, profile_nR: np.ndarray, entropy_n: np.ndarray | None,
                  o: CreditOptions, row: int, spec: CreditMode, batch: Any = None) -> dict:
    """Weights for one response's n valid tokens by the mode `spec` (passed along, its function by reference, so
    that a worker process runs a mode registered in any importable module). `row` (its batch index) only seeds
    the `random` mode, so every other mode gives a response the same weights whatever batch it sits in."""
    n = conn_n.size
    out = {"weights": np.ones(n), "boosted": np.zeros(n, dtype=bool), "parts": np.full(n, -1),
           "densities": np.zeros(0), "degenerate": False}
    if n == 0 or not spec.weighs:
        return out
    if spec.decides_from_score and np.ptp(conn_n) <= 1e-12 * max(1.0, float(np.abs(conn_n).max())):
        out["degenerate"] = True
        return out
    choice = spec.weigh(ResponseScores(conn_n, profile_nR, entropy_n, batch), o, row)
    weights = np.asarray(choice.weights, dtype=np.float64)
    out.update(boosted=choice.boosted, weights=mean_one(weights) if spec.normalize else weights,
               densities=choice.densities)
    if choice.parts is not None:
        out["parts"] = choice.parts
    return out


def _job(args_list: list[tuple]) -> list[tuple[dict, float]]:
    """Worker-side: several responses, each with the CPU seconds it took."""
    out = []
    for args in args_list:
        t0 = time.process_time()
        out.append((_one_response(*args), time.process_time() - t0))
    return out


_POOLS: dict[int, ProcessPoolExecutor] = {}


def _worker_pool(n_workers: int) -> ProcessPoolExecutor:
    """A persistent pool of `n_workers` processes (spawned, one BLAS/torch thread each). METIS holds the
    GIL, so threads would not run partitions in parallel; processes do."""
    if n_workers not in _POOLS:
        import multiprocessing

        _POOLS[n_workers] = ProcessPoolExecutor(max_workers=n_workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_init_worker)
    return _POOLS[n_workers]


def _init_worker() -> None:
    exit_with_parent()
    torch.set_num_threads(1)
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


@dataclass
class _Row:
    mask_T: np.ndarray
    args: tuple  # _one_response's arguments: (conn_n, profile_nR, entropy_n, options, row, mode)
    job: Future | None = None  # the worker job holding this row (None: computed in this process on demand)
    slot: int = 0  # position in that job's output
    error: BaseException | None = None

    @property
    def conn_n(self) -> np.ndarray:
        """The valid tokens' connectivity."""
        return self.args[0]


class PendingCredit:
    """Credit assignment in progress, for a batch whose rows may arrive in blocks (e.g. one per forward chunk).

    `submit` checks a block and, with `n_workers > 1`, hands its responses to the worker processes at once, so
    the partitions run while the caller goes on (the GPU computes the next chunk, the rewards are scored, an
    earlier micro-batch trains); `result(rows)` waits for just those rows. With `n_workers == 1` the work
    happens in `result`, in the calling process. Rows are numbered across blocks (`row_offset`); a row's
    weights do not depend on which block or batch it came in (the `random` mode is seeded by this number).

        pending = PendingCredit(options)
        pending.submit(conn_bT, profile_bTR, mask_bT, row_offset=0)     # as each block's connectivity arrives
        pending.submit(conn_bT, profile_bTR, mask_bT, row_offset=4)
        weights_BT = pending.result([5, 0, 2]).weights                   # rows in the order asked for
    """

    def __init__(self, options: CreditOptions = CreditOptions()):
        self.options = options
        self.T: int | None = None
        self._rows: dict[int, _Row] = {}
        self._done: dict[int, dict] = {}
        self.cpu_seconds = 0.0  # partition work finished so far, summed over responses (in workers or here)

    @property
    def rows(self) -> list[int]:
        return sorted(self._rows)

    def submit(self, conn_BT: torch.Tensor, profile_BTR: torch.Tensor, mask_BT: torch.Tensor,
               entropy_BT: torch.Tensor | None = None, row_offset: int = 0) -> "PendingCredit":
        """Add rows `row_offset .. row_offset + B - 1` (shapes as in `assign_credit`); raises on bad input."""
        _check_inputs(conn_BT, profile_BTR, mask_BT, entropy_BT, self.options.mode)
        B, T = conn_BT.shape
        if self.T is None:
            self.T = T
        elif T != self.T:
            raise ValueError(f"rows {row_offset}..{row_offset + B - 1} have {T} response positions, earlier rows "
                             f"{self.T}")
        taken = [row_offset + b for b in range(B) if row_offset + b in self._rows]
        if taken:
            raise ValueError(f"rows {taken} were already submitted")
        conn = conn_BT.detach().float().cpu().numpy().astype(np.float64)
        prof = profile_BTR.detach().float().cpu().numpy().astype(np.float64)
        mask = mask_BT.detach().cpu().numpy()
        ent = entropy_BT.detach().float().cpu().numpy() if entropy_BT is not None else None
        new = []
        spec = credit_mode(self.options.mode)
        for b in range(B):
            m = mask[b]
            args = (conn[b, m], prof[b, m], ent[b, m] if ent is not None else None, self.options, row_offset + b,
                    spec)
            self._rows[row_offset + b] = row = _Row(m, args)
            new.append(row)
        workers = self.options.n_workers
        if workers > 1 and B > 1 and spec.weighs and spec.batch_stat is None:
            size = max(1, B // (4 * workers))
            pool = _worker_pool(workers)
            for i in range(0, B, size):
                chunk = new[i:i + size]
                with stop_signals_blocked():  # a worker this starts cannot die of a stop signal before it ignores it
                    job = pool.submit(_job, [r.args for r in chunk])
                for slot, r in enumerate(chunk):
                    r.job, r.slot = job, slot
        return self

    def fail(self, rows: Sequence[int], error: BaseException) -> None:
        """Mark rows whose inputs could not be produced; `result` on any of them raises `error`."""
        for r in rows:
            self._rows[r] = _Row(np.zeros(0, dtype=bool), (), error=error)

    def done(self) -> bool:
        return all(r.job is None or r.job.done() for r in self._rows.values())

    def _row_result(self, r: int) -> dict:
        if r not in self._done:
            if r not in self._rows:
                raise KeyError(f"row {r} was never submitted (rows: {self.rows})")
            row = self._rows[r]
            if row.error is not None:
                raise row.error
            if row.job is None:
                t0 = time.process_time()
                self._done[r] = _one_response(*row.args)
                self.cpu_seconds += time.process_time() - t0
            else:
                self._done[r], seconds = row.job.result()[row.slot]
                self.cpu_seconds += seconds
        return self._done[r]

    def inputs(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(conn_BT, profile_BTR, mask_BT, entropy_BT or None) of `rows` as submitted (zeros on padding;
        profiles padded with zero regions to the widest block's R)."""
        picked = [self._rows[int(r)] for r in rows]
        if any(row.error is not None for row in picked):
            raise ValueError("inputs of rows marked failed are unknown")
        B, T = len(picked), self.T or 0
        R = max((row.args[1].shape[1] for row in picked), default=1)
        conn, prof = torch.zeros(B, T, dtype=torch.float64), torch.zeros(B, T, R, dtype=torch.float64)
        mask = torch.zeros(B, T, dtype=torch.bool)
        has_ent = bool(picked) and picked[0].args[2] is not None
        ent = torch.zeros(B, T, dtype=torch.float32) if has_ent else None
        for b, row in enumerate(picked):
            m = torch.from_numpy(row.mask_T)
            mask[b] = m
            conn[b, m] = torch.from_numpy(row.conn_n)
            prof[b, m, :row.args[1].shape[1]] = torch.from_numpy(row.args[1])
            if ent is not None:
                ent[b, m] = torch.from_numpy(row.args[2])
        return conn, prof, mask, ent

    def wait(self, rows: Sequence[int] | None = None) -> None:
        """Wait for the partitions of `rows` (default: all); with `n_workers == 1`, compute them. A failed row
        raises its error here. (A mode with a `batch_stat` is computed in `result`, over the rows asked for.)"""
        if credit_mode(self.options.mode).batch_stat is not None:
            for r in self.rows if rows is None else rows:
                self._checked_row(int(r))
            return
        for r in self.rows if rows is None else rows:
            self._row_result(int(r))

    def _checked_row(self, r: int) -> _Row:
        if r not in self._rows:
            raise KeyError(f"row {r} was never submitted (rows: {self.rows})")
        row = self._rows[r]
        if row.error is not None:
            raise row.error
        return row

    def _batch_results(self, rows: list[int]) -> list[dict]:
        """A batch-level mode's weights for `rows`: its statistic over them (and over every submitted row), then
        each row's weights with it (in this process: such modes do no per-response graph work)."""
        t0 = time.process_time()
        spec = credit_mode(self.options.mode)
        now = [self._checked_row(r) for r in rows]

        def scores(row: _Row) -> ResponseScores:
            return ResponseScores(row.args[0], row.args[1], row.args[2])

        everyone = [scores(row) for row in self._rows.values() if row.error is None]
        stat = spec.batch_stat(everyone, [scores(row) for row in now], self.options)
        out = [_one_response(*row.args, batch=stat) for row in now]
        self.cpu_seconds += time.process_time() - t0
        return out

    def result(self, rows: Sequence[int] | None = None) -> CreditResult:
        """CreditResult for `rows` (default: all, in order), waiting for their partitions to finish."""
        rows = self.rows if rows is None else [int(r) for r in rows]
        if credit_mode(self.options.mode).batch_stat is not None:
            results = self._batch_results(rows)
        else:
            results = [self._row_result(r) for r in rows]  # a failed row raises its error here
        if self.T is None:
            raise ValueError("no rows were submitted")
        return _assemble([self._rows[r] for r in rows], results, self.T, self.options)


def assign_credit(
    conn_BT: torch.Tensor,
    profile_BTR: torch.Tensor,
    mask_BT: torch.Tensor,
    options: CreditOptions = CreditOptions(),
    entropy_BT: torch.Tensor | None = None,
) -> CreditResult:
    """Per-token weights W(C_k(t)) for a batch of responses.

    Args:
        conn_BT: (B, T) connectivity density c_t of each response token (from `atrl.probe`).
        profile_BTR: (B, T, R) region masses (or profiles) of each token.
        mask_BT: (B, T) bool, True on real response tokens.
        options: the credit mode and its knobs.
        entropy_BT: (B, T) per-token entropies, needed by modes that read them (`CreditMode.needs_entropy`).
    Returns:
        CreditResult with (B, T) weights (mean 1 over each response's valid tokens, 0 on padding).
    """
    return PendingCredit(options).submit(conn_BT, profile_BTR, mask_BT, entropy_BT).result()


def _assemble(rows: list[_Row], results: list[dict], T: int, options: CreditOptions) -> CreditResult:
    B = len(rows)
    weights = np.zeros((B, T))
    boosted = np.zeros((B, T), dtype=bool)
    parts = np.full((B, T), -1, dtype=np.int64)
    stats = {k: np.full(B, np.nan) for k in ("anchor_fraction", "anchor_conn", "other_conn", "bimodality")}
    n_parts = np.zeros(B, dtype=np.int64)
    degenerate = np.zeros(B, dtype=bool)
    weighs = credit_mode(options.mode).weighs
    for b, (row, r) in enumerate(zip(rows, results)):
        m, c = row.mask_T, row.conn_n
        weights[b, m], boosted[b, m], parts[b, m] = r["weights"], r["boosted"], r["parts"]
        n_parts[b] = len(r["densities"])
        degenerate[b] = r["degenerate"]
        if c.size:
            stats["bimodality"][b] = bimodality_coefficient(c)
        if c.size and weighs and not r["degenerate"]:
            stats["anchor_fraction"][b] = r["boosted"].mean()
            if r["boosted"].any():
                stats["anchor_conn"][b] = c[r["boosted"]].mean()
            if (~r["boosted"]).any():
                stats["other_conn"][b] = c[~r["boosted"]].mean()
    t = torch.from_numpy
    return CreditResult(
        weights=t(weights).to(torch.float32),
        boosted_mask=t(boosted),
        parts=t(parts),
        anchor_fraction=t(stats["anchor_fraction"]),
        num_parts=t(n_parts),
        anchor_conn=t(stats["anchor_conn"]),
        other_conn=t(stats["other_conn"]),
        bimodality=t(stats["bimodality"]),
        degenerate=t(degenerate),
        densities=[r["densities"] for r in results],
    )
