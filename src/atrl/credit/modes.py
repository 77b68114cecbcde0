"""The registry of credit modes: each mode declared once, with what it needs and its weight function.

A credit mode turns one response's per-token scores into per-token weights. Every mode shares one signature,

    weigh(scores: ResponseScores, options: CreditOptions, row: int) -> Choice

and declares how the trainer obtains the score it reads (`measure`):

    "none"            no score: every token weight 1 (plain GRPO / DAPO)
    "probes"          connectivity from the attention probes, on a forward the trainer makes anyway
    "entropy"         the policy's per-token entropy, from the same forward (no probes)
    "blank_image_kl"  KL(policy with the image || policy with a blank image) over the vocabulary: two extra
                      no-grad forwards
    "masked_image"    VPPO's visual dependency: the k3 estimate of KL on the sampled token between the policy with
                      the image and with random patches blacked out; one extra no-grad forward beside an
                      old-log-prob pass (two without one)

The trainer, the config checks, the demo and the CLI read these declarations; no other module compares mode
names. Adding a mode is one function and one `register_credit_mode` call:

    @register_credit_mode("first_half", measure="probes", help="the first half of each response, x2")
    def _first_half(s: ResponseScores, o: CreditOptions, row: int) -> Choice:
        chosen = np.arange(s.n) < s.n // 2
        return Choice(boosted=chosen, weights=np.where(chosen, 2.0, 1.0))

Weights returned by `weigh` are rescaled to mean 1 over the response's tokens by the caller, unless the mode says
`normalize=False` (a 0/1 gradient mask, as the 80/20 rule and VPPO apply it). A mode that needs a statistic of the
batch (a quantile, a range) gives `batch_stat(all_rows, rows_now, options)`: it is computed over the responses at
hand when the weights are assembled (`rows_now`: the micro-batch whose loss is formed; `all_rows`: every response
submitted, the generation batch) and handed to `weigh` as `scores.batch`. A mode whose weights come from the
score (`decides_from_score`) is given uniform weights, and the response is flagged `degenerate`, when the score is
all equal (no signal); `weigh` is not called then. The modes' sources (paper or
reconstruction) are in docs/ALGORITHM.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import numpy as np
import torch

from .graph import num_parts, partition_tokens
from .weights import cluster_densities, cluster_weights, otsu_threshold, select_anchor_clusters

if TYPE_CHECKING:
    from .assign import CreditOptions

Measure = Literal["none", "probes", "entropy", "blank_image_kl", "masked_image"]
MEASURES: tuple[str, ...] = ("none", "probes", "entropy", "blank_image_kl", "masked_image")


@dataclass
class ResponseScores:
    """One response's n valid tokens: what a mode may read.

    conn_n: (n,) the score the mode decides from: connectivity (measure "probes"), or a visual-dependency KL.
    profile_nR: (n, R) region profiles (zeros when the measure gives none).
    entropy_n: (n,) per-token entropies, or None when the mode's measure is not "entropy".
    batch: the mode's `batch_stat` over the responses at hand (None for modes without one).
    """

    conn_n: np.ndarray
    profile_nR: np.ndarray
    entropy_n: np.ndarray | None
    batch: Any = None

    @property
    def n(self) -> int:
        return int(self.conn_n.size)


@dataclass
class Choice:
    """A mode's decision for one response: `boosted` (n,) bool, the tokens it favours (the anchors, or its own
    set); `weights` (n,) non-negative, before the mean-one rescaling; `parts` (n,) the partition, -1 if none;
    `densities` (K,) the parts' mean connectivity."""

    boosted: np.ndarray
    weights: np.ndarray
    parts: np.ndarray | None = None
    densities: np.ndarray = field(default_factory=lambda: np.zeros(0))


WeighFn = Callable[[ResponseScores, "CreditOptions", int], Choice]
BatchStat = Callable[[Sequence[ResponseScores], Sequence[ResponseScores], "CreditOptions"], Any]


@dataclass(frozen=True)
class CreditMode:
    """One credit mode: its name, its weight function, and what it needs from the trainer."""

    name: str
    weigh: WeighFn
    measure: Measure
    help: str
    graph: bool = False  # partitions the token graph (the per-response CPU work the credit workers take)
    normalize: bool = True  # weights rescaled to mean 1 over each response (False: used as returned)
    batch_stat: BatchStat | None = None  # a statistic of the responses at hand, handed to `weigh` as `batch`

    @property
    def needs_probes(self) -> bool:
        """The attention probes are installed and record connectivity."""
        return self.measure == "probes"

    @property
    def needs_entropy(self) -> bool:
        """`assign_credit` needs `entropy_BT`; the trainer asks TRL's forward for entropies."""
        return self.measure == "entropy"

    @property
    def scored_in_forward(self) -> bool:
        """The score comes out of a forward TRL makes anyway (the old-log-prob pass or the training forward)."""
        return self.measure in ("probes", "entropy")

    def extra_forwards(self, old_logps: bool) -> int:
        """No-grad forwards per generation batch that the mode adds to TRL's, where TRL makes an old-log-prob pass
        (`old_logps`) or not: `blank_image_kl` runs the policy with the image and with a blank one; `masked_image`
        runs it with the masked image, and with the image too when TRL has no old log-probs to reuse."""
        return {"blank_image_kl": 2, "masked_image": 1 if old_logps else 2}.get(self.measure, 0)

    @property
    def weighs(self) -> bool:
        """The mode chooses a set of tokens (anchor statistics apply); false for plain uniform credit."""
        return self.measure != "none"

    @property
    def decides_from_score(self) -> bool:
        """The weights come from `conn_BT` (connectivity or a visual-dependency score), so they carry the
        connectivity statistics and degenerate to uniform on a constant score."""
        return self.measure in ("probes", "blank_image_kl", "masked_image")


_MODES: dict[str, CreditMode] = {}


def register_credit_mode(name: str, *, measure: Measure, help: str, graph: bool = False, normalize: bool = True,
                         batch_stat: BatchStat | None = None) -> Callable[[WeighFn], WeighFn]:
    """Decorator: register `weigh` as credit mode `name` (see the module docstring)."""
    if measure not in MEASURES:
        raise ValueError(f"credit mode {name!r}: measure {measure!r} is unknown; choose from {MEASURES}")

    def add(weigh: WeighFn) -> WeighFn:
        if name in _MODES:
            raise ValueError(f"credit mode {name!r} is already registered")
        _MODES[name] = CreditMode(name=name, weigh=weigh, measure=measure, help=help, graph=graph,
                                  normalize=normalize, batch_stat=batch_stat)
        return weigh

    return add


def credit_mode(name: str) -> CreditMode:
    """The registered mode `name`; a clear error naming the registered ones otherwise."""
    try:
        return _MODES[name]
    except (KeyError, TypeError):
        raise ValueError(f"credit mode {name!r} is unknown; choose from {credit_mode_names()}") from None


def credit_mode_names() -> tuple[str, ...]:
    """The registered modes, in registration order."""
    return tuple(_MODES)


# ------------------------------------------------------------------------------------------------ the modes


def _top_set(scores_n: np.ndarray, count: int) -> np.ndarray:
    chosen = np.zeros(scores_n.size, dtype=bool)
    chosen[np.argsort(-scores_n, kind="stable")[:count]] = True
    return chosen


@dataclass
class _Partition:
    parts: np.ndarray  # (n,) part id of each token
    densities: np.ndarray  # (K,) mean connectivity of each part
    sizes: np.ndarray  # (K,) tokens per part
    anchors_K: np.ndarray  # (K,) bool: anchor parts

    @property
    def anchors(self) -> np.ndarray:
        return self.anchors_K[self.parts]

    def choice(self, boosted: np.ndarray, weights: np.ndarray) -> Choice:
        return Choice(boosted=boosted, weights=weights, parts=self.parts, densities=self.densities)


def _partition(s: ResponseScores, o: CreditOptions) -> _Partition:
    """The token graph's partition and its anchor clusters (see credit.graph and credit.weights)."""
    k = num_parts(s.n, o.target_cluster_size, o.min_parts, o.max_parts)
    parts = partition_tokens(o.partition, s.conn_n, s.profile_nR, k, knn=o.knn, seq_weight=o.seq_weight,
                             sim_scale=o.sim_scale, ufactor=o.metis_ufactor, recursive=o.metis_recursive,
                             seed=o.seed)
    dens = cluster_densities(s.conn_n, parts)
    sizes = np.bincount(parts)
    return _Partition(parts, dens, sizes, select_anchor_clusters(dens, sizes, o.anchor_ratio, s.conn_n))


@register_credit_mode("uniform", measure="none", help="every valid token 1 (plain GRPO / DAPO, exactly TRL's loss)")
def _uniform(s: ResponseScores, o: CreditOptions, row: int) -> Choice:
    return Choice(boosted=np.zeros(s.n, dtype=bool), weights=np.ones(s.n))


@register_credit_mode("atrl", measure="probes", graph=True,
                      help="W(C_k) from the graph partition, anchor clusters up-weighted (default)")
def _atrl(s: ResponseScores, o: CreditOptions, row: int) -> Choice:
    p = _partition(s, o)
    w_K = cluster_weights(p.densities, p.sizes, p.anchors_K, weighting=o.weighting, w_anchor=o.w_anchor,
                          w_other=o.w_other, beta=o.beta, w_min=o.w_min, w_max=o.w_max)
    return p.choice(p.anchors, w_K[p.parts])


@register_credit_mode("anchors_only", measure="probes", graph=True,
                      help="the anchor tokens share the whole weight, the rest 0")
def _anchors_only(s: ResponseScores, o: CreditOptions, row: int) -> Choice:
    p = _partition(s, o)
    return p.choice(p.anchors, p.anchors.astype(np.float64))


@register_credit_mode("low_only", measure="probes", graph=True,
                      help="the complement of the anchors, anchors 0 (the paper's degradation ablation)")
def _low_only(s: ResponseScores, o: CreditOptions, row: int) -> Choice:
    p = _partition(s, o)
    return p.choice(~p.anchors, (~p.anchors).astype(np.float64))


@register_credit_mode("random", measure="probes", graph=True,
                      help="as atrl's two_level, on a random token set of the anchors' size")
def _random(s: ResponseScores, o: CreditOptions, row: int) -> Choice:
    p = _partition(s, o)
    rng = np.random.default_rng([o.seed, row])  # the row number seeds it: the same weights in any batch order
    chosen = np.zeros(s.n, dtype=bool)
    chosen[rng.choice(s.n, size=int(p.anchors.sum()), replace=False)] = True
    return p.choice(chosen, np.where(chosen, o.w_anchor, o.w_other))


def _threshold_choice(s: ResponseScores, o: CreditOptions) -> Choice:
    """The top `anchor_ratio` tokens by score (or above the Otsu split for "auto"), two_level weights."""
    if o.anchor_ratio == "auto":
        chosen = s.conn_n >= otsu_threshold(s.conn_n)
    else:
        chosen = _top_set(s.conn_n, max(1, int(np.ceil(o.anchor_ratio * s.n))))
    return Choice(boosted=chosen, weights=np.where(chosen, o.w_anchor, o.w_other))


@register_credit_mode("threshold", measure="probes",
                      help="as atrl's two_level, on the top anchor_ratio tokens by connectivity (no graph)")
def _threshold(s: ResponseScores, o: CreditOptions, row: int) -> Choice:
    return _threshold_choice(s, o)


@register_credit_mode("entropy_per_response", measure="entropy",
                      help="the top entropy_top tokens of each response by entropy share the weight (rescaled to "
                           "mean 1), the rest 0")
def _entropy_per_response(s: ResponseScores, o: CreditOptions, row: int) -> Choice:
    chosen = _top_set(s.entropy_n, max(1, int(np.ceil(o.entropy_top * s.n))))
    return Choice(boosted=chosen, weights=chosen.astype(np.float64))


def _entropy_quantile(all_rows: Sequence[ResponseScores], rows_now: Sequence[ResponseScores],
                      o: CreditOptions) -> float:
    """The (1 - entropy_top) quantile of the entropies of every token at hand (torch.quantile, float32, linear
    interpolation: the threshold TRL's `top_entropy_quantile` draws on one process)."""
    values = [torch.from_numpy(np.asarray(r.entropy_n, dtype=np.float32)) for r in rows_now if r.n]
    if not values:
        return float("inf")
    return float(torch.quantile(torch.cat(values), 1.0 - o.entropy_top))


@register_credit_mode("entropy_8020", measure="entropy", normalize=False, batch_stat=_entropy_quantile,
                      help="the 80/20 rule (arXiv 2506.01939): the gradient masked to the top entropy_top of the "
                           "micro-batch's tokens by entropy, not rescaled (TRL's top_entropy_quantile)")
def _entropy_8020(s: ResponseScores, o: CreditOptions, row: int) -> Choice:
    chosen = s.entropy_n >= s.batch
    return Choice(boosted=chosen, weights=chosen.astype(np.float64))


@register_credit_mode("blank_image_kl", measure="blank_image_kl",
                      help="the top anchor_ratio tokens by KL(policy with the image || with a blank image), "
                           "two_level weights (two extra no-grad forwards)")
def _blank_image_kl(s: ResponseScores, o: CreditOptions, row: int) -> Choice:
    return _threshold_choice(s, o)


def _dependency_range(all_rows: Sequence[ResponseScores], rows_now: Sequence[ResponseScores],
                      o: CreditOptions) -> tuple[float, float, float] | None:
    """VPPO's trajectory advantage shaping statistics: each response's mean dependency, min and max over the
    generation batch, and the mean over the rows at hand of the min-max normalised means (None where fewer than
    two responses have tokens or the range is below 1e-6: no shaping)."""
    means = np.array([r.conn_n.mean() for r in all_rows if r.n])
    if means.size < 2 or means.max() - means.min() <= 1e-6:
        return None
    lo, hi = float(means.min()), float(means.max())
    now = np.array([r.conn_n.mean() for r in rows_now if r.n])
    return lo, hi, float(np.clip((now - lo) / (hi - lo), 0.0, 1.0).mean())


@register_credit_mode("vppo", measure="masked_image", normalize=False, batch_stat=_dependency_range,
                      help="VPPO (arXiv 2510.09285): the gradient masked to each response's top vppo_top tokens "
                           "by visual dependency on a patch-masked image, the advantage scaled by the response's "
                           "mean dependency (one extra no-grad forward)")
def _vppo(s: ResponseScores, o: CreditOptions, row: int) -> Choice:
    chosen = _top_set(s.conn_n, int(np.ceil(o.vppo_top * s.n)))
    scale = 1.0
    if s.batch is not None:  # trajectory advantage shaping: mean 1 over the rows at hand, floor vppo_scale_min
        lo, hi, mu = s.batch
        normalised = float(np.clip((s.conn_n.mean() - lo) / (hi - lo), 0.0, 1.0))
        top = o.vppo_scale_min + (1.0 - o.vppo_scale_min) / (mu + 1e-8)
        scale = o.vppo_scale_min + normalised * (top - o.vppo_scale_min)
    return Choice(boosted=chosen, weights=chosen * scale)
