"""AnchorConfig: how the trainer measures connectivity and turns it into per-token credit.

Everything about the RL loop itself (batch sizes, loss type GRPO / DAPO / Dr.GRPO, KL, vLLM, optimiser) is
TRL's `GRPOConfig`; this dataclass holds only what AT-RL adds. Cross-field checks run at construction and
say what to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .._checks import check_keys
from ..credit import CreditMode, CreditOptions, credit_mode, credit_mode_names
from ..probe import SINK_DEBIAS

CAPTURE_SITES = ("auto", "old_logps", "train_forward")


@dataclass
class PapoConfig:
    """PAPO's implicit perception loss (Wang et al., arXiv 2507.06448), added to the policy loss beside any credit
    mode (`anchor.papo`). Per micro-batch, the policy is run once more on its images with random 14-pixel patches
    blacked out (each with probability `mask_prob`), and the loss becomes

        loss - coef * mean_t KL_k3(t) + entropy_coef * mean_t H(t) + masked_entropy_coef * mean_t H_masked(t)

    with KL_k3(t) = exp(d) - d - 1, d = log p(y_t | masked) - log p(y_t | image), the masked log-probabilities held
    constant (the released code's default: the gradient of the KL flows through the real image's branch), H and
    H_masked the token entropies on the real and the masked image (the double entropy loss, which keeps the
    maximised KL from being hacked by a flattening policy), and each mean over the micro-batch's completion tokens,
    divided by the gradient accumulation steps. The released runs use coef 0.01-0.02, mask_prob 0.6, and, with the
    double entropy loss, 0.05 for both entropy coefficients. A batch without images gives KL 0 (the extra forward
    still runs, as on every process).

    Attributes:
        coef: gamma, the weight of the perception KL (maximised).
        mask_prob: the probability that each image patch is blacked out.
        entropy_coef: eta on the real image's token entropy.
        masked_entropy_coef: eta on the masked image's token entropy (0: the masked forward runs without
            gradients).
    """

    coef: float = 0.01
    mask_prob: float = 0.6
    entropy_coef: float = 0.0
    masked_entropy_coef: float = 0.0

    def __post_init__(self) -> None:
        for name in ("coef", "entropy_coef", "masked_entropy_coef"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"anchor.papo.{name}={value!r}: a non-negative number")
        if isinstance(self.mask_prob, bool) or not isinstance(self.mask_prob, (int, float)) or \
                not 0 < self.mask_prob < 1:
            raise ValueError(f"anchor.papo.mask_prob={self.mask_prob!r}: a probability in (0, 1)")


@dataclass
class AnchorConfig:
    """AT-RL's knobs (arXiv 2602.11455; see docs/ALGORITHM.md for which parts are the paper's).

    Attributes:
        mode: a registered credit mode (`atrl modes` lists them, `atrl.credit.modes` defines them): uniform
            (plain GRPO/DAPO, no probes), atrl (default), the ablations anchors_only, low_only, random and
            threshold, and the baselines entropy_8020 (the 80/20 rule), vppo (VPPO), entropy_per_response and
            blank_image_kl.
        probe_layers: decoder layers to probe; default: up to four spread over the second half, not the last
            (atrl.probe.default_probe_layers; the embedded 4-layer default probes layer 2).
        region_grid: (rows, cols) cells each image's token grid is pooled into for region profiles.
        time_bins: stretches of time each video is cut into for region profiles, each with its own region_grid.
        sink_debias: none | head_baseline | drop_sinks (see atrl.probe.connectivity).
        capture: where connectivity is measured. "auto": on TRL's no-grad old-log-prob pass when TRL makes one
            (num_iterations > 1, vLLM importance sampling, or more generation steps than accumulation steps),
            else on the training forward; "old_logps" / "train_forward" force one (old_logps fails when TRL
            makes no such pass: that would cost an extra forward).
        overlap: keep partitioning off the GPU's critical path: each forward chunk's rows go to the credit
            workers (`credit.n_workers` > 1) as soon as its connectivity exists, and on the old-log-prob pass a
            micro-batch waits only for its own rows, when its loss is formed. false: the whole batch is
            partitioned, and waited for, right after the pass (same weights; for comparison).
        credit: CreditOptions fields other than `mode` (partition, anchor_ratio, weighting, w_anchor, ...).
        fallback_to_uniform: when credit assignment fails on a batch (e.g. non-finite connectivity), log it
            and use uniform weights for that batch instead of stopping the run.
        report_steps: every this many optimizer steps, and at the first, write `<output_dir>/anchors/step-N.html`:
            up to 8 of the step's sampled completions, tokens shaded by connectivity, anchors (the boosted tokens)
            marked, each token's weight on hover (main process, training only; 0: never). Reading the tokens
            back costs one device sync on those steps only.
        mask_prob: for modes that measure on a masked image (`vppo`): the probability that each image patch is
            blacked out (VPPO's published runs: 0.5).
        papo: PAPO's implicit perception loss beside the credit mode (`PapoConfig` fields, e.g. {coef: 0.01});
            null: off. It costs one forward per micro-batch (and its backward with masked_entropy_coef > 0).
        dynamic_sampling: DAPO's dynamic sampling (`atrl.rl.dynamic`): a group whose rewards are all equal is
            dropped and groups of prompts drawn at random from the training set take its place (training only).
            Each process's share of the generation batch must be whole groups.
        dynamic_sampling_rounds: at most this many redraw rounds per generation batch; a batch still short after
            them is filled with all-equal groups (logged as atrl/dynamic/filled_groups).
        skip_zero_advantage: the training forward and backward leave out the rows whose advantage is 0 at every
            token (a group whose rewards are all equal): they add exactly nothing to the loss or its gradient
            (`atrl.rl.rows`), and the loss's normaliser is kept. Training only; the share left out is logged as
            atrl/skipped_rows, and the entropy, clipping and credit statistics of a step then cover the rows that
            train. Off by itself, with the reason at start, where something in the loss reads every row (beta >
            0, PAPO, an entropy mask or bonus, a credit mode weighing with a batch statistic).
    """

    mode: str = "atrl"
    probe_layers: list[int] | None = None
    region_grid: tuple[int, int] = (4, 4)
    time_bins: int = 4
    sink_debias: str = "head_baseline"
    capture: str = "auto"
    overlap: bool = True
    credit: dict[str, Any] = field(default_factory=dict)
    fallback_to_uniform: bool = True
    report_steps: int = 50
    mask_prob: float = 0.5
    papo: dict[str, Any] | None = None
    dynamic_sampling: bool = False
    dynamic_sampling_rounds: int = 3
    skip_zero_advantage: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.mode, str) or self.mode not in credit_mode_names():
            raise ValueError(f"anchor.mode={self.mode!r}: choose from {credit_mode_names()}")
        if self.sink_debias not in SINK_DEBIAS:
            raise ValueError(f"anchor.sink_debias={self.sink_debias!r}: choose from {SINK_DEBIAS}")
        if self.capture not in CAPTURE_SITES:
            raise ValueError(f"anchor.capture={self.capture!r}: choose from {CAPTURE_SITES}")
        for name in ("overlap", "fallback_to_uniform", "dynamic_sampling", "skip_zero_advantage"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"anchor.{name}={getattr(self, name)!r}: use true or false")
        if isinstance(self.report_steps, bool) or not isinstance(self.report_steps, int) or self.report_steps < 0:
            raise ValueError(f"anchor.report_steps={self.report_steps!r}: a number of steps, 0 for never")
        if isinstance(self.mask_prob, bool) or not isinstance(self.mask_prob, (int, float)) or \
                not 0 < self.mask_prob < 1:
            raise ValueError(f"anchor.mask_prob={self.mask_prob!r}: a probability in (0, 1)")
        rounds = self.dynamic_sampling_rounds
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise ValueError(f"anchor.dynamic_sampling_rounds={rounds!r}: a number of redraw rounds, 0 or more")
        self.region_grid = tuple(self.region_grid)
        if len(self.region_grid) != 2 or min(self.region_grid) < 1:
            raise ValueError(f"anchor.region_grid={self.region_grid}: two positive integers, e.g. [4, 4]")
        if isinstance(self.time_bins, bool) or not isinstance(self.time_bins, int) or self.time_bins < 1:
            raise ValueError(f"anchor.time_bins={self.time_bins!r}: a positive integer")
        check_keys(self.credit, CreditOptions, "anchor.credit", exclude=("mode",))
        if self.papo is not None:
            if not isinstance(self.papo, dict):
                raise ValueError(f"anchor.papo={self.papo!r}: a mapping of PapoConfig fields (e.g. {{coef: 0.01}}) "
                                 "or null")
            check_keys(self.papo, PapoConfig, "anchor.papo")
        self.papo_options()
        self.credit_options()  # validates the credit knobs now, not at the first step

    @property
    def credit_mode(self) -> CreditMode:
        """The mode's registry entry: what it needs (probes, entropy, extra forwards) and how it weighs."""
        return credit_mode(self.mode)

    @property
    def needs_probe(self) -> bool:
        return self.credit_mode.needs_probes

    def papo_options(self) -> PapoConfig | None:
        """PAPO's settings, or None when it is off."""
        return None if self.papo is None else PapoConfig(**self.papo)

    def credit_options(self) -> CreditOptions:
        return CreditOptions(mode=self.mode, **self.credit)

    def capture_site(self, args) -> str:
        """Where connectivity is measured under GRPOConfig `args`: "old_logps" or "train_forward" (see `capture`).

        TRL makes a no-grad old-log-prob pass when a generation batch serves more optimizer steps than it has
        accumulation steps (steps_per_generation x num_iterations not dividing gradient_accumulation_steps), or for
        vLLM's importance-sampling correction."""
        generate_every = args.steps_per_generation * args.num_iterations
        trl_scores = (args.gradient_accumulation_steps % generate_every != 0) or bool(
            args.use_vllm and getattr(args, "vllm_importance_sampling_correction", False))
        if self.capture == "auto":
            return "old_logps" if trl_scores else "train_forward"
        if self.capture == "old_logps" and not trl_scores:
            raise ValueError("anchor.capture='old_logps' but TRL makes no old-log-prob pass with these settings "
                             "(num_iterations=1, no vLLM importance sampling); use capture='auto' or "
                             "'train_forward' rather than adding a forward pass")
        return self.capture
