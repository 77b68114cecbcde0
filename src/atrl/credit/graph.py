"""Token graphs and partitions for one response (docs/ALGORITHM.md, Credit; our reconstruction of arXiv 2602.11455).

Shapes (one response, valid tokens only): n tokens, R image regions.

The graph joins each token to its k nearest neighbours by cosine similarity of their region profiles
(where in the image they look), symmetrised, plus edges between neighbours in the sequence so that a
phrase tends to stay in one part. METIS needs integer edge weights >= 1, so similarities are scaled
and rounded. Alternatives without a graph: k-means on the profiles, and quantile bins of connectivity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

PARTITION_METHODS = ("metis", "kmeans", "threshold")


@dataclass(frozen=True)
class CSRGraph:
    """Undirected weighted graph in METIS's CSR form: vertex i's neighbours are
    `adjacent[adj_starts[i]:adj_starts[i+1]]` with weights `weights[...]` (both directions stored)."""

    adj_starts: np.ndarray  # (n + 1,) int64
    adjacent: np.ndarray  # (2m,) int64
    weights: np.ndarray  # (2m,) int64, >= 1

    @property
    def num_vertices(self) -> int:
        return len(self.adj_starts) - 1

    def dense(self) -> np.ndarray:
        """(n, n) weight matrix (for tests and inspection)."""
        n = self.num_vertices
        out = np.zeros((n, n), dtype=np.int64)
        rows = np.repeat(np.arange(n), np.diff(self.adj_starts))
        out[rows, self.adjacent] = self.weights
        return out


def num_parts(n_tokens: int, target_cluster_size: int, min_parts: int, max_parts: int) -> int:
    """K = round(n / target_cluster_size) clamped to [min_parts, max_parts] and to at most n (at least 1)."""
    if target_cluster_size <= 0 or min_parts <= 0 or max_parts < min_parts:
        raise ValueError(f"need target_cluster_size > 0 and 0 < min_parts <= max_parts, got "
                         f"{target_cluster_size}, {min_parts}, {max_parts}")
    k = int(round(n_tokens / target_cluster_size))
    return max(1, min(max(k, min_parts), max_parts, n_tokens))


def normalise_profiles(profile_nR: np.ndarray) -> np.ndarray:
    """Region masses -> distributions over regions; a token with no visual mass gets the uniform profile."""
    profile = np.clip(np.asarray(profile_nR, dtype=np.float64), 0.0, None)
    total = profile.sum(axis=1, keepdims=True)
    uniform = np.full_like(profile, 1.0 / max(1, profile.shape[1]))
    return np.where(total > 0, profile / np.where(total > 0, total, 1.0), uniform)


def pattern_similarity(profile_nR: np.ndarray, conn_n: np.ndarray) -> torch.Tensor:
    """(n, n) float32 similarity of attention patterns: cosine of the region profiles times the ratio of the
    two tokens' connectivities (smaller over larger), so a token that barely looks at the image is not
    similar to one that reads it, even if both glance at the same place. In [0, 1]; 1 on identical patterns.
    Two tokens with zero connectivity count as equal (ratio 1)."""
    unit = torch.from_numpy(normalise_profiles(profile_nR)).float()
    unit /= unit.norm(dim=1, keepdim=True)
    conn = torch.as_tensor(conn_n, dtype=torch.float32).clamp(min=0)
    eps = 1e-6 * float(conn.max()) + 1e-30
    lo = torch.minimum(conn[:, None], conn[None, :]).add_(eps)
    hi = torch.maximum(conn[:, None], conn[None, :]).add_(eps)
    return (unit @ unit.T).clamp_(0.0, 1.0).mul_(lo.div_(hi))


def _combine(keys: np.ndarray, weights: np.ndarray, reduce: np.ufunc) -> tuple[np.ndarray, np.ndarray]:
    """Merge duplicate edge keys, reducing their weights with `reduce` (np.maximum or np.add)."""
    order = np.argsort(keys, kind="stable")
    keys, weights = keys[order], weights[order]
    uniq, first = np.unique(keys, return_index=True)
    return uniq, reduce.reduceat(weights, first) if len(keys) else weights


def token_graph(profile_nR: np.ndarray, conn_n: np.ndarray, *, knn: int = 8, seq_weight: int = 4,
                sim_scale: int = 16) -> CSRGraph:
    """k-NN graph of attention patterns (`pattern_similarity`) plus sequence-adjacency edges.

    Args:
        profile_nR: (n, R) non-negative region masses or profiles of the n valid tokens.
        conn_n: (n,) connectivity of the tokens (scales the similarity, see `pattern_similarity`).
        knn: neighbours per token before symmetrising (clamped to n - 1).
        seq_weight: weight added to the edge between tokens t and t+1 (0 disables these edges).
        sim_scale: a k-NN edge of similarity s gets integer weight 1 + round(sim_scale * s).
    Returns:
        the symmetric graph in CSR form; edge (i, j) weight = max over the two k-NN directions + sequence term.
    Cost: O(n^2 R) for the similarities and O(n k log(n k)) for the edges; no dense n x n integer matrix.
    """
    n = profile_nR.shape[0]
    keys = np.zeros(0, dtype=np.int64)
    weights = np.zeros(0, dtype=np.int64)
    k = min(knn, n - 1)
    if k > 0:
        sim = pattern_similarity(profile_nR, conn_n)
        sim.fill_diagonal_(-1.0)
        vals, nbrs = torch.topk(sim, k, dim=1)  # (n, k)
        rows = np.repeat(np.arange(n, dtype=np.int64), k)
        cols = nbrs.numpy().ravel().astype(np.int64)
        w = 1 + np.rint(sim_scale * np.clip(vals.numpy().ravel(), 0.0, None)).astype(np.int64)
        # Both directions of every k-NN edge; a pair found from both ends keeps the larger weight.
        keys, weights = _combine(np.concatenate([rows * n + cols, cols * n + rows]), np.concatenate([w, w]),
                                 np.maximum)
    if seq_weight > 0 and n > 1:
        t = np.arange(n - 1, dtype=np.int64)
        seq = np.concatenate([t * n + t + 1, (t + 1) * n + t])
        keys, weights = _combine(np.concatenate([keys, seq]),
                                 np.concatenate([weights, np.full(seq.size, seq_weight, dtype=np.int64)]), np.add)
    rows, cols = keys // n, keys % n
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=starts[1:])
    return CSRGraph(starts, cols, weights)


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Consecutive part ids 0..K'-1 in order of first appearance (empty parts vanish)."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))
    return order[inverse].astype(np.int64)


def partition_metis(graph: CSRGraph, n_parts: int, *, seed: int = 0, ufactor: int = 500,
                    recursive: bool = False) -> np.ndarray:
    """(n,) part ids from METIS (pymetis) with a fixed seed; consecutive ids from 0.

    `recursive`: recursive bisection (METIS_PartGraphRecursive) rather than direct k-way: about 4x faster
    at 1,024 tokens and 64 parts, but planted anchor groups share a part with other tokens far more often
    (docs/benchmarks.md, Partition time), so k-way is the default.
    `ufactor` is METIS's allowed load imbalance in thousandths: a part may hold up to (1 + ufactor/1000)
    times the average. METIS's own default (30) forces nearly equal parts, which splits a small group of
    anchor tokens across parts full of other tokens; 500 lets parts follow the graph.
    """
    import pymetis

    n = graph.num_vertices
    if n_parts <= 1 or n <= 1 or len(graph.adjacent) == 0:
        return np.zeros(n, dtype=np.int64)
    _, parts = pymetis.part_graph(
        n_parts,
        adjacency=pymetis.CSRAdjacency(graph.adj_starts, graph.adjacent),
        eweights=graph.weights,
        recursive=recursive,
        options=pymetis.Options(seed=int(seed) % (2**31), ufactor=int(ufactor)),
    )
    return _relabel(np.asarray(parts))


def partition_kmeans(profile_nR: np.ndarray, n_parts: int, *, seed: int = 0) -> np.ndarray:
    """(n,) part ids from k-means (scikit-learn) on the normalised region profiles."""
    from sklearn.cluster import KMeans

    n = profile_nR.shape[0]
    features = normalise_profiles(profile_nR)
    distinct = len(np.unique(features.round(12), axis=0))
    k = min(n_parts, distinct)
    if k <= 1:
        return np.zeros(n, dtype=np.int64)
    labels = KMeans(n_clusters=k, n_init=1, random_state=seed).fit_predict(features)
    return _relabel(labels)


def partition_threshold(conn_n: np.ndarray, n_parts: int) -> np.ndarray:
    """(n,) part ids: quantile bins of connectivity (no graph); ties stay in one bin."""
    n = conn_n.shape[0]
    if n_parts <= 1 or n <= 1:
        return np.zeros(n, dtype=np.int64)
    edges = np.quantile(conn_n, np.linspace(0, 1, n_parts + 1)[1:-1])
    return _relabel(np.searchsorted(edges, conn_n, side="right"))


def partition_tokens(
    method: str, conn_n: np.ndarray, profile_nR: np.ndarray, n_parts: int, *, knn: int = 8, seq_weight: int = 4,
    sim_scale: int = 16, ufactor: int = 500, recursive: bool = False, seed: int = 0,
) -> np.ndarray:
    """Dispatch to one of `PARTITION_METHODS`; returns (n,) part ids."""
    if method == "metis":
        return partition_metis(token_graph(profile_nR, conn_n, knn=knn, seq_weight=seq_weight, sim_scale=sim_scale),
                               n_parts, seed=seed, ufactor=ufactor, recursive=recursive)
    if method == "kmeans":
        return partition_kmeans(profile_nR, n_parts, seed=seed)
    if method == "threshold":
        return partition_threshold(conn_n, n_parts)
    raise ValueError(f"unknown partition method {method!r}; choose from {PARTITION_METHODS}")
