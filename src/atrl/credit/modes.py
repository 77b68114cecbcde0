"""The registry of credit modes: each mode declared once, with what it needs and its weight function.

A credit mode turns one response's per-token scores into per-token weights. Every mode shares one signature,

    weigh(scores: ResponseScores, options: CreditOptions, row: int) -> Choice

and declares how the trainer obtains the score it reads (`measure`):

    "none"               no score: every token weight 1 (plain GRPO / DAPO)
    "probes"             connectivity from the attention probes, on a forward the trainer makes anyway
    "entropy"            the policy's per-token entropy, from the same forward (no probes)
    "visual_dependency"  KL(policy with the image || policy with a blank image): extra forwards

The trainer, the config checks, the demo and the CLI read these declarations; no other module compares mode
names. Adding a mode is one function and one `register_credit_mode` call:

    @register_credit_mode("first_half", measure="probes", help="the first half of each response, x2")
    def _first_half(s: ResponseScores, o: CreditOptions, row: int) -> Choice:
        chosen = np.arange(s.n) < s.n // 2
        return Choice(boosted=chosen, weights=np.where(chosen, 2.0, 1.0))

Weights returned by `weigh` are rescaled to mean 1 over the response's tokens by the caller. A mode whose
weights come from the score (`decides_from_score`) is given uniform weights, and the response is flagged
`degenerate`, when the score is all equal (no signal); `weigh` is not called then. The modes' sources (paper or
reconstruction) are in docs/ALGORITHM.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Literal

import numpy as np

from .graph import num_parts, partition_tokens
from .weights import cluster_densities, cluster_weights, otsu_threshold, select_anchor_clusters

if TYPE_CHECKING:
    from .assign import CreditOptions

Measure = Literal["none", "probes", "entropy", "visual_dependency"]
MEASURES: tuple[str, ...] = ("none", "probes", "entropy", "visual_dependency")


@dataclass
class ResponseScores:
    """One response's n valid tokens: what a mode may read.

    conn_n: (n,) the score the mode decides from: connectivity (measure "probes"), or the visual-dependency KL.
    profile_nR: (n, R) region profiles (zeros when the measure gives none).
    entropy_n: (n,) per-token entropies, or None when the mode's measure is not "entropy".
    """

    conn_n: np.ndarray
    profile_nR: np.ndarray
    entropy_n: np.ndarray | None

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


@dataclass(frozen=True)
class CreditMode:
    """One credit mode: its name, its weight function, and what it needs from the trainer."""

    name: str
    weigh: WeighFn
    measure: Measure
    help: str
    graph: bool = False  # partitions the token graph (the per-response CPU work the credit workers take)

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

    @property
    def extra_forwards(self) -> int:
        """No-grad forwards per generation batch that the mode adds to TRL's (visual dependency: the policy
        with the image and with a blank image)."""
        return 2 if self.measure == "visual_dependency" else 0

    @property
    def weighs(self) -> bool:
        """The mode chooses a set of tokens (anchor statistics apply); false for plain uniform credit."""
        return self.measure != "none"

    @property
    def decides_from_score(self) -> bool:
        """The weights come from `conn_BT` (connectivity or a visual-dependency score), so they carry the
        connectivity statistics and degenerate to uniform on a constant score."""
        return self.measure in ("probes", "visual_dependency")


_MODES: dict[str, CreditMode] = {}


def register_credit_mode(name: str, *, measure: Measure, help: str, graph: bool = False
                         ) -> Callable[[WeighFn], WeighFn]:
    """Decorator: register `weigh` as credit mode `name` (see the module docstring)."""
    if measure not in MEASURES:
        raise ValueError(f"credit mode {name!r}: measure {measure!r} is unknown; choose from {MEASURES}")

    def add(weigh: WeighFn) -> WeighFn:
        if name in _MODES:
            raise ValueError(f"credit mode {name!r} is already registered")
        _MODES[name] = CreditMode(name=name, weigh=weigh, measure=measure, help=help, graph=graph)
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


@register_credit_mode("entropy", measure="entropy",
                      help="the top entropy_top tokens of each response by entropy share the weight, the rest 0")
def _entropy(s: ResponseScores, o: CreditOptions, row: int) -> Choice:
    chosen = _top_set(s.entropy_n, max(1, int(np.ceil(o.entropy_top * s.n))))
    return Choice(boosted=chosen, weights=chosen.astype(np.float64))


@register_credit_mode("visual_dependency", measure="visual_dependency",
                      help="VPPO-style: the top anchor_ratio tokens by KL(with image || blank image), two_level "
                           "weights (two extra no-grad forwards)")
def _visual_dependency(s: ResponseScores, o: CreditOptions, row: int) -> Choice:
    return _threshold_choice(s, o)
