"""Cluster densities, anchor clusters and per-token weights for one response (docs/ALGORITHM.md, Credit).

Shapes: n valid tokens of one response, K parts. The paper (arXiv 2602.11455) states the form
`A_AT(i, t) = W(C_k(t)) * A(i)` and that about 15% of tokens are anchors; the selection rule, the two
weightings and the mean-one rescaling below are this project's reconstruction.
"""

from __future__ import annotations

import numpy as np
import torch


def cluster_densities(conn_n: np.ndarray, parts_n: np.ndarray) -> np.ndarray:
    """(K,) rho_k = mean connectivity of the tokens in part k (parts numbered 0..K-1, none empty)."""
    sizes = np.bincount(parts_n)
    return np.bincount(parts_n, weights=conn_n) / np.maximum(sizes, 1)


def otsu_threshold(values: np.ndarray, bins: int = 64) -> float:
    """Two-class split of a 1-D sample that maximises the between-class variance (Otsu, 1979)."""
    values = np.asarray(values, dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return hi
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)[:-1].astype(np.float64)
    w1 = values.size - w0
    s0 = np.cumsum(hist * centres)[:-1]
    m0 = s0 / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(edges[1:-1][int(np.argmax(between))])


def bimodality_coefficient(values: np.ndarray) -> float:
    """Sarle's bimodality coefficient (g^2 + 1) / (k + 3(n-1)^2 / ((n-2)(n-3))), g skewness, k excess
    kurtosis (both bias-corrected). Above 5/9 (0.555, the uniform distribution's value) suggests
    bimodality. NaN for fewer than 4 values or zero variance."""
    x = np.asarray(values, dtype=np.float64)
    n = x.size
    if n < 4 or np.ptp(x) == 0:
        return float("nan")
    d = x - x.mean()
    m2, m3, m4 = (d**2).mean(), (d**3).mean(), (d**4).mean()
    g1 = m3 / m2**1.5 * np.sqrt(n * (n - 1)) / (n - 2)
    g2 = (n - 1) / ((n - 2) * (n - 3)) * ((n + 1) * (m4 / m2**2 - 3) + 6)
    return float((g1**2 + 1) / (g2 + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3))))


def select_anchor_clusters(densities_K: np.ndarray, sizes_K: np.ndarray, anchor_ratio: float | str,
                           conn_n: np.ndarray) -> np.ndarray:
    """(K,) bool: which parts are anchors.

    `anchor_ratio` a float: the densest parts, in order, until their tokens reach that share of the
    response (at least one part). `"auto"`: parts whose density is at or above the Otsu split of the
    token connectivities (at least the densest part).
    """
    anchors = np.zeros(len(densities_K), dtype=bool)
    order = np.argsort(-densities_K, kind="stable")
    if anchor_ratio == "auto":
        anchors[densities_K >= otsu_threshold(conn_n)] = True
        anchors[order[0]] = True
        return anchors
    budget = float(anchor_ratio) * sizes_K.sum()
    taken = 0
    for k in order:
        anchors[k] = True
        taken += sizes_K[k]
        if taken >= budget:
            break
    return anchors


def cluster_weights(densities_K: np.ndarray, sizes_K: np.ndarray, anchors_K: np.ndarray, *, weighting: str,
                    w_anchor: float, w_other: float, beta: float, w_min: float, w_max: float) -> np.ndarray:
    """(K,) W(C_k) before rescaling.

    `two_level`: w_anchor on anchor parts, w_other elsewhere. `smooth`: clip(1 + beta * z_k, w_min, w_max)
    with z_k the density standardised over tokens (each part counted by its size).
    """
    if weighting == "two_level":
        return np.where(anchors_K, w_anchor, w_other).astype(np.float64)
    if weighting == "smooth":
        mean = np.average(densities_K, weights=sizes_K)
        std = np.sqrt(np.average((densities_K - mean) ** 2, weights=sizes_K))
        z = (densities_K - mean) / std if std > 0 else np.zeros_like(densities_K)
        return np.clip(1.0 + beta * z, w_min, w_max)
    raise ValueError(f"unknown weighting {weighting!r}; choose 'two_level' or 'smooth'")


def mean_one(weights_n: np.ndarray) -> np.ndarray:
    """Rescale so that the mean over the response's tokens is 1 (all-zero stays zero)."""
    m = weights_n.mean() if weights_n.size else 0.0
    return weights_n / m if m > 0 else weights_n



def anchor_credit_sums(credit_BT, boosted_mask):
    """(2,) tensor: sum over anchor tokens (`boosted_mask`, bool (B, T)) of |credit|, and the sum over all tokens,
    for `credit_BT` = W(C_k(t)) * A(i) (zero on padding). A token's policy gradient is its log-prob gradient
    scaled by its credit, so their ratio is the share of the gradient's scale the anchors get (uniform weights
    give the anchors' token share among rows with A != 0). On the device of `credit_BT`; nothing is read back."""
    magnitude = credit_BT.detach().abs().float()
    return torch.stack([(magnitude * boosted_mask).sum(), magnitude.sum()])
