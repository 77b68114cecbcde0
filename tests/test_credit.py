"""atrl.credit: hand-computed cases, planted structure, invariants and bad input."""

import numpy as np
import pytest
import scipy.stats
import torch

from atrl.credit import (
    CreditOptions,
    PendingCredit,
    assign_credit,
    bimodality_coefficient,
    cluster_densities,
    credit_mode,
    credit_mode_names,
    num_parts,
    otsu_threshold,
    select_anchor_clusters,
    token_graph,
)
from atrl.credit.graph import partition_tokens


def planted(rng, T=96, R=8, n_groups=3, group_len=5, noise=0.05):
    """Background tokens with diffuse profiles and low connectivity; `n_groups` runs of `group_len` anchor
    tokens, each run reading its own region with high connectivity. Returns conn (T,), profile (T, R), anchors."""
    conn = rng.uniform(0.01, 0.05, T)
    prof = rng.dirichlet(np.ones(R) * 5, T)
    step = min(12, (T - group_len - 1) // n_groups)
    starts = rng.choice(np.arange(0, T - group_len - 1, step), n_groups, replace=False)
    groups = []
    for g, s in enumerate(starts):
        idx = np.arange(s, s + group_len)
        conn[idx] = rng.uniform(0.4, 0.6, group_len)
        p = np.full(R, 0.01)
        p[g % R] = 1
        prof[idx] = p / p.sum()
        groups.append(idx)
    prof = prof + noise * rng.random((T, R))
    return conn, prof, np.sort(np.concatenate(groups))


def _batch(*responses):
    T = max(len(c) for c, _ in responses)
    R = responses[0][1].shape[1]
    conn = torch.zeros(len(responses), T, dtype=torch.float64)
    prof = torch.zeros(len(responses), T, R, dtype=torch.float64)
    mask = torch.zeros(len(responses), T, dtype=torch.bool)
    for b, (c, p) in enumerate(responses):
        conn[b, : len(c)] = torch.as_tensor(c)
        prof[b, : len(c)] = torch.as_tensor(p)
        mask[b, : len(c)] = True
    return conn, prof, mask


# --- hand-computed ---------------------------------------------------------------------------------


def test_cluster_densities_by_hand():
    conn = np.array([1.0, 3.0, 10.0, 0.0, 2.0])
    parts = np.array([0, 0, 1, 2, 2])
    assert np.allclose(cluster_densities(conn, parts), [2.0, 10.0, 1.0])


def test_num_parts_clamps():
    assert num_parts(100, 8, 2, 64) == 12
    assert num_parts(5, 8, 2, 64) == 2
    assert num_parts(1, 8, 2, 64) == 1  # never more parts than tokens
    assert num_parts(10_000, 8, 2, 64) == 64
    with pytest.raises(ValueError):
        num_parts(10, 0, 2, 64)


def test_token_graph_is_symmetric_with_sequence_edges():
    rng = np.random.default_rng(0)
    prof = rng.dirichlet(np.ones(4), 12)
    conn = rng.uniform(0, 1, 12)
    g = token_graph(prof, conn, knn=3, seq_weight=5)
    dense = g.dense()
    assert (dense == dense.T).all()
    assert (np.diag(dense) == 0).all()
    assert (g.weights >= 1).all() and g.weights.dtype == np.int64
    assert all(dense[i, i + 1] >= 5 for i in range(11))
    assert ((dense > 0).sum(axis=1) >= 3).all()  # each token keeps its k neighbours after symmetrising


def test_select_anchor_clusters_by_hand():
    dens = np.array([0.1, 0.9, 0.5, 0.05])
    sizes = np.array([10, 3, 4, 3])
    # Densest first: part 1 (3 tokens = 15% of 20) reaches 0.15 alone.
    assert select_anchor_clusters(dens, sizes, 0.15, np.zeros(20)).tolist() == [False, True, False, False]
    # 0.2 needs 4 tokens: part 1 (3) then part 2 (4).
    assert select_anchor_clusters(dens, sizes, 0.2, np.zeros(20)).tolist() == [False, True, True, False]


def test_bimodality_coefficient_matches_scipy():
    rng = np.random.default_rng(1)
    for x in (rng.normal(size=50), np.concatenate([rng.normal(0, 1, 80), rng.normal(8, 1, 20)]), rng.random(7)):
        n = x.size
        g = scipy.stats.skew(x, bias=False)
        k = scipy.stats.kurtosis(x, bias=False)
        expected = (g**2 + 1) / (k + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3)))
        assert bimodality_coefficient(x) == pytest.approx(expected, rel=1e-10)
    bimodal = np.concatenate([rng.normal(0, 0.05, 85), rng.normal(1, 0.05, 15)])
    assert bimodality_coefficient(bimodal) > 5 / 9 > bimodality_coefficient(rng.normal(size=1000))


def test_otsu_splits_two_groups():
    x = np.concatenate([np.full(30, 0.1), np.full(10, 0.8)])
    t = otsu_threshold(x)
    assert 0.1 < t < 0.8


# --- planted structure -----------------------------------------------------------------------------


@pytest.mark.parametrize("partition", ["metis", "kmeans", "threshold"])
@pytest.mark.parametrize("anchor_ratio", [0.15, "auto"])
def test_planted_anchor_groups_are_recovered(partition, anchor_ratio):
    """Over 60 random planted responses (noise on the profiles, uneven connectivity), the anchors found
    cover the planted dense groups: mean recall and precision both at least 0.9."""
    rng = np.random.default_rng(42)
    recall, precision = [], []
    for _ in range(60):
        conn, prof, anchors = planted(rng)
        res = assign_credit(*_batch((conn, prof)), CreditOptions(partition=partition, anchor_ratio=anchor_ratio))
        got = np.nonzero(res.boosted_mask[0].numpy())[0]
        hit = np.intersect1d(got, anchors).size
        recall.append(hit / anchors.size)
        precision.append(hit / max(1, got.size))
    assert np.mean(recall) >= 0.9, np.mean(recall)
    assert np.mean(precision) >= 0.9, np.mean(precision)


def test_planted_groups_become_their_own_parts():
    """Without noise, METIS puts each planted group into parts of its own (no group shares a part with
    background tokens), and those parts are the densest."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        conn, prof, anchors = planted(rng, noise=0.0)
        parts = partition_tokens("metis", conn, prof, num_parts(96, 8, 2, 64))
        anchor_parts = set(parts[anchors])
        background = np.setdiff1d(np.arange(96), anchors)
        assert not anchor_parts & set(parts[background])
        dens = cluster_densities(conn, parts)
        assert min(dens[list(anchor_parts)]) > max(np.delete(dens, list(anchor_parts)))


# --- invariants --------------------------------------------------------------------------------------


def _random_batch(seed=0, lengths=(40, 25, 1, 60)):
    rng = np.random.default_rng(seed)
    return _batch(*[planted(rng, T=max(T, 20))[:2] if T >= 20 else (rng.random(T), rng.random((T, 8)))
                    for T in lengths])


@pytest.mark.parametrize("mode", credit_mode_names())
def test_padding_zero_and_mean_one(mode):
    conn, prof, mask = _random_batch()
    ent = torch.rand(conn.shape, generator=torch.Generator().manual_seed(0))
    res = assign_credit(conn, prof, mask, CreditOptions(mode=mode), entropy_BT=ent)
    w = res.weights
    assert (w[~mask] == 0).all()
    assert (w >= 0).all()
    for b in range(w.shape[0]):
        if credit_mode(mode).normalize:  # the modes that mask without rescaling (80/20, VPPO) are tested apart
            assert w[b, mask[b]].mean().item() == pytest.approx(1.0, abs=1e-6)
    if mode == "uniform":
        assert torch.equal(w[mask], torch.ones(int(mask.sum())))


def test_low_only_is_the_complement_of_the_anchors_and_random_matches_budget():
    conn, prof, mask = _random_batch(1)
    anchors = assign_credit(conn, prof, mask, CreditOptions(mode="anchors_only"))
    low = assign_credit(conn, prof, mask, CreditOptions(mode="low_only"))
    atrl = assign_credit(conn, prof, mask, CreditOptions(mode="atrl"))
    rand = assign_credit(conn, prof, mask, CreditOptions(mode="random"))
    real = ~anchors.degenerate  # the 1-token response has no signal: uniform weights, nothing boosted
    assert real.sum() == 3
    assert torch.equal(low.boosted_mask[real], (~anchors.boosted_mask & mask)[real])
    assert torch.equal(low.weights[real] > 0, (~anchors.boosted_mask & mask)[real])
    assert torch.equal(anchors.boosted_mask, atrl.boosted_mask)
    assert torch.equal(rand.boosted_mask.sum(1), atrl.boosted_mask.sum(1))
    assert not torch.equal(rand.boosted_mask, atrl.boosted_mask)
    # anchors_only zeroes exactly the non-anchors
    assert torch.equal(anchors.weights[real] > 0, anchors.boosted_mask[real])


def test_atrl_up_weights_anchors_by_w_anchor_over_w_other():
    conn, prof, mask = _random_batch(2)
    res = assign_credit(conn, prof, mask, CreditOptions(w_anchor=3.0, w_other=1.0))
    checked = 0
    for b in range(conn.shape[0]):
        a, m = res.boosted_mask[b], mask[b]
        if a[m].all() or not a[m].any():
            continue
        ratio = res.weights[b, a].mean() / res.weights[b, m & ~a].mean()
        assert ratio.item() == pytest.approx(3.0, rel=1e-6)
        checked += 1
    assert checked == 3


def test_smooth_weighting_orders_by_density_and_clips():
    conn, prof, mask = _random_batch(3)
    res = assign_credit(conn, prof, mask, CreditOptions(weighting="smooth", beta=0.5, w_min=0.5, w_max=2.0))
    for b in range(conn.shape[0]):
        m = mask[b]
        if m.sum() < 2:
            continue
        dens = res.densities[b][res.parts[b, m].numpy()]
        w = res.weights[b, m].numpy()
        order = np.argsort(dens)
        assert np.all(np.diff(w[order]) >= -1e-9)  # monotone in cluster density
        assert w.max() / w.min() <= 4.0 + 1e-9  # the clip range bounds the spread


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("mode", ["atrl", "threshold", "low_only"])
def test_padding_invariance(side, mode):
    rng = np.random.default_rng(5)
    conn, prof, _ = planted(rng, T=50)
    base = assign_credit(*_batch((conn, prof)), CreditOptions(mode=mode))
    pad = 13
    c = torch.zeros(1, 50 + pad, dtype=torch.float64)
    p = torch.zeros(1, 50 + pad, 8, dtype=torch.float64)
    m = torch.zeros(1, 50 + pad, dtype=torch.bool)
    sl = slice(pad, None) if side == "left" else slice(0, 50)
    c[0, sl], p[0, sl], m[0, sl] = torch.as_tensor(conn), torch.as_tensor(prof), True
    c[0, ~m[0]] = 123.0  # garbage under the padding must not matter
    padded = assign_credit(c, p, m, CreditOptions(mode=mode))
    assert torch.equal(padded.weights[0, sl], base.weights[0])
    assert (padded.weights[0, ~m[0]] == 0).all()


def test_batched_equals_per_sample_and_permutation():
    rng = np.random.default_rng(6)
    responses = [planted(rng, T=T)[:2] for T in (30, 64, 48)]
    batched = assign_credit(*_batch(*responses))
    for b, r in enumerate(responses):
        single = assign_credit(*_batch(r))
        assert torch.equal(batched.weights[b, : len(r[0])], single.weights[0])
    perm = [2, 0, 1]
    permuted = assign_credit(*_batch(*[responses[i] for i in perm]))
    for new, old in enumerate(perm):
        n = len(responses[old][0])
        assert torch.equal(permuted.weights[new, :n], batched.weights[old, :n])


def test_deterministic_and_threads_equal_serial():
    conn, prof, mask = _random_batch(7, lengths=(64,) * 8)
    for mode in ("atrl", "random"):
        a = assign_credit(conn, prof, mask, CreditOptions(mode=mode, seed=3))
        b = assign_credit(conn, prof, mask, CreditOptions(mode=mode, seed=3, n_workers=4))
        assert torch.equal(a.weights, b.weights)
    r1 = assign_credit(conn, prof, mask, CreditOptions(mode="random", seed=1))
    r2 = assign_credit(conn, prof, mask, CreditOptions(mode="random", seed=2))
    assert not torch.equal(r1.boosted_mask, r2.boosted_mask)


def test_pending_credit_in_blocks_equals_one_batch():
    # rows arriving in blocks (one per forward chunk), read back in any order, in workers or in-process
    conn, prof, mask = _random_batch(8, lengths=(64, 40, 64, 12, 64, 30))
    for mode in ("atrl", "random", "threshold"):
        whole = assign_credit(conn, prof, mask, CreditOptions(mode=mode, seed=3))
        for workers in (1, 2):
            pending = PendingCredit(CreditOptions(mode=mode, seed=3, n_workers=workers))
            for start in (0, 2, 4):
                pending.submit(conn[start:start + 2], prof[start:start + 2], mask[start:start + 2], row_offset=start)
            assert pending.rows == list(range(6))
            order = [5, 0, 3]
            part = pending.result(order)
            assert torch.equal(part.weights, whole.weights[order])
            assert torch.equal(part.parts, whole.parts[order])
            assert torch.allclose(part.anchor_conn, whole.anchor_conn[order], equal_nan=True)
            assert torch.equal(pending.result().weights, whole.weights)
            assert pending.done() and pending.cpu_seconds > 0
            c, p, m, e = pending.inputs(order)
            assert torch.equal(m, mask[order]) and e is None
            sent_c, sent_p = (conn[order] * mask[order]).float().double(), prof[order].float().double()  # read as float32
            assert torch.equal(c, sent_c) and torch.equal(p, sent_p)


def test_pending_credit_errors_name_the_rows():
    conn, prof, mask = _random_batch(9, lengths=(20, 20))
    pending = PendingCredit().submit(conn, prof, mask)
    with pytest.raises(ValueError, match=r"rows \[0, 1\] were already submitted"):
        pending.submit(conn, prof, mask)
    with pytest.raises(ValueError, match="have 10 response positions, earlier rows 20"):
        pending.submit(conn[:, :10], prof[:, :10], mask[:, :10], row_offset=2)
    with pytest.raises(KeyError, match="row 7 was never submitted"):
        pending.result([7])
    pending.fail([2, 3], ValueError("connectivity of rows 2-3 is NaN"))
    assert pending.result([1]).weights.shape == (1, 20)
    with pytest.raises(ValueError, match="rows 2-3 is NaN"):
        pending.result([0, 3])


def test_edge_cases_t1_few_tokens_all_equal():
    one = assign_credit(torch.tensor([[0.7]]), torch.rand(1, 1, 4), torch.ones(1, 1, dtype=torch.bool))
    assert one.weights.tolist() == [[1.0]]
    few = assign_credit(torch.rand(1, 3), torch.rand(1, 3, 4), torch.ones(1, 3, dtype=torch.bool),
                        CreditOptions(min_parts=8))
    assert few.num_parts.item() <= 3 and few.weights.mean().item() == pytest.approx(1.0)
    flat = assign_credit(torch.full((2, 20), 0.3), torch.rand(2, 20, 4), torch.ones(2, 20, dtype=torch.bool))
    assert torch.equal(flat.weights, torch.ones(2, 20)) and flat.degenerate.all()
    empty = assign_credit(torch.rand(1, 5), torch.rand(1, 5, 4), torch.zeros(1, 5, dtype=torch.bool))
    assert (empty.weights == 0).all()


def test_entropy_mode_keeps_top_entropy_tokens():
    conn = torch.rand(1, 10)
    ent = torch.arange(10, dtype=torch.float32)[None]
    res = assign_credit(conn, torch.rand(1, 10, 4), torch.ones(1, 10, dtype=torch.bool),
                        CreditOptions(mode="entropy_per_response", entropy_top=0.2), entropy_BT=ent)
    assert res.boosted_mask[0].nonzero().flatten().tolist() == [8, 9]
    assert res.weights[0, 8:].tolist() == [5.0, 5.0]


def test_bad_inputs_name_what_is_wrong():
    conn, prof, mask = torch.rand(2, 6), torch.rand(2, 6, 3), torch.ones(2, 6, dtype=torch.bool)
    bad = conn.clone()
    bad[1, 4] = float("nan")
    with pytest.raises(ValueError, match=r"conn_BT has a non-finite value .* \(1, 4\)"):
        assign_credit(bad, prof, mask)
    bad_p = prof.clone()
    bad_p[0, 2, 1] = float("inf")
    with pytest.raises(ValueError, match=r"profile_BTR .* \(0, 2\)"):
        assign_credit(conn, bad_p, mask)
    nan_in_pad = bad.clone()
    m2 = mask.clone()
    m2[1, 4] = False
    assign_credit(nan_in_pad, prof, m2)  # NaN under padding is ignored
    with pytest.raises(ValueError, match="mask_BT shape"):
        assign_credit(conn, prof, mask[:, :5])
    with pytest.raises(ValueError, match="profile_BTR must be"):
        assign_credit(conn, prof[:1], mask)
    with pytest.raises(ValueError, match="must be bool"):
        assign_credit(conn, prof, mask.long())
    with pytest.raises(ValueError, match="needs entropy_BT"):
        assign_credit(conn, prof, mask, CreditOptions(mode="entropy_per_response"))
    with pytest.raises(ValueError, match="credit mode 'bogus'"):
        CreditOptions(mode="bogus")
    with pytest.raises(ValueError, match="w_other"):
        CreditOptions(w_other=0.0)
    with pytest.raises(ValueError, match="anchor_ratio"):
        CreditOptions(anchor_ratio=1.5)


_KILLED_PARENT = """
import os, signal, sys
from atrl.credit.assign import _worker_pool
from atrl.rl.rewards import _math_pool

if __name__ == "__main__":
    pools = [_worker_pool(2), _math_pool()]
    for pool in pools:
        [f.result() for f in [pool.submit(os.getpid) for _ in range(8)]]
    with open(sys.argv[1], "w") as f:
        f.write(" ".join(str(pid) for pool in pools for pid in pool._processes))
    os.kill(os.getpid(), signal.SIGKILL)  # no clean-up runs: as a cluster's kill or the out-of-memory killer
"""


def test_workers_end_with_a_killed_parent(tmp_path):
    """The credit workers and the math-verify worker are spawned processes: a parent killed without clean-up
    must not leave them running as orphans. Each exits once its parent is gone."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = tmp_path / "parent.py"
    script.write_text(_KILLED_PARENT)
    # the workers would hold captured pipes open as long as they live: their output goes nowhere
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "pids")], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, timeout=120)
    assert proc.returncode == -9
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert len(pids) == 3

    def running(pid: int) -> bool:  # a zombie (exited, not yet reaped by whoever adopted it) has ended
        status = Path(f"/proc/{pid}/status")
        try:
            return "\nState:\tZ" not in status.read_text()
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 15
    while any(map(running, pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(running, pids)), [p for p in pids if running(p)]


@pytest.mark.parametrize("blocked", [True, False])
def test_a_stop_signal_while_a_worker_starts_up_does_not_kill_it(blocked):
    """A pool starts its workers at `submit`, and a worker takes seconds to import torch before its initializer
    ignores stop signals. A cluster's SIGTERM to the process group in that window killed the worker (the trainer
    then stopped with BrokenProcessPool instead of saving its checkpoint). Submitted under
    `stop_signals_blocked`, the worker starts with them blocked and survives; without it, it dies (the failure
    this guards against, shown so that the test cannot pass for another reason)."""
    import contextlib
    import multiprocessing
    import os
    import signal
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from atrl._workers import exit_with_parent, stop_signals_blocked

    before = {p.pid for p in multiprocessing.active_children()}
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                               initializer=exit_with_parent)
    try:
        with stop_signals_blocked() if blocked else contextlib.nullcontext():
            future = pool.submit(os.getpid)
        (worker,) = [p for p in multiprocessing.active_children() if p.pid not in before]
        os.kill(worker.pid, signal.SIGTERM)  # at once: the worker is still starting up
        if blocked:
            assert future.result(timeout=120) == worker.pid
        else:
            with pytest.raises(BrokenProcessPool):
                future.result(timeout=120)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def test_anchor_credit_sums_by_hand():
    from atrl.credit import anchor_credit_sums

    credit = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.0, -3.0, 1.0, 0.0]])  # W * A, zero on padding
    anchors = torch.tensor([[True, False, False, False], [False, True, False, False]])
    sums = anchor_credit_sums(credit, anchors)
    assert sums.tolist() == [5.0, 7.5]  # |2| + |-3| on anchors; 2 + 1 + 0.5 + 3 + 1 in all
