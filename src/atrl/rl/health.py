"""Warnings for a run that trains nothing: the metrics TRL logs say so, but only to someone who looks.

Two conditions leave every advantage at zero, so nothing is learned from the rewards, and both are easy to miss for hours:
every completion cut at `max_completion_length` (answers are never given, so accuracy rewards stay 0), and every
group's rewards equal (`frac_reward_zero_std` 1: all wrong, all right, or a reward function that returns a
constant). `StallWatch` reads the logged training metrics and warns once per stretch of `steps` optimizer steps
in which a condition held throughout, naming the steps, the numbers and what to change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

logger = logging.getLogger("atrl")

STALL_STEPS = 20  # optimizer steps a condition must hold before the warning


@dataclass
class _Stretch:
    first: int | None = None  # the first step of the current stretch
    warned: bool = False


@dataclass
class StallWatch:
    """Feed it each training log (`observe`); it returns the warnings due (and logs them)."""

    max_completion_length: int | None = None
    num_generations: int | None = None
    steps: int = STALL_STEPS
    _stretches: dict[str, _Stretch] = field(default_factory=dict)
    _last_step: int = 0  # the step of the previous log: a log's metrics cover the steps after it, up to its own

    def observe(self, step: int, logs: dict[str, float]) -> list[str]:
        conditions = {
            "clipped": logs.get("completions/clipped_ratio"),
            "flat": logs.get("frac_reward_zero_std"),
        }
        due = []
        for name, value in conditions.items():
            stretch = self._stretches.setdefault(name, _Stretch())
            if value is None or value < 1.0:  # a metric not logged, or the condition broken: start again
                self._stretches[name] = _Stretch()
                continue
            if stretch.first is None:
                stretch.first = self._last_step + 1
            if not stretch.warned and step - stretch.first + 1 >= self.steps:
                stretch.warned = True
                due.append(self._message(name, stretch.first, step, logs))
        self._last_step = step
        for message in due:
            logger.warning(message)
        return due

    def _message(self, name: str, first: int, step: int, logs: dict[str, float]) -> str:
        steps = f"steps {first}-{step}"
        if name == "clipped":
            return (f"{steps}: every completion reached trl.max_completion_length={self.max_completion_length} "
                    "without ending (completions/clipped_ratio 1): answers are cut before they are given, so "
                    "rewards that read the answer stay 0. Raise trl.max_completion_length, or ask for shorter "
                    "responses in the prompt.")
        reward = logs.get("reward")
        return (f"{steps}: in every group of trl.num_generations={self.num_generations} completions the rewards "
                f"were equal (frac_reward_zero_std 1, mean reward {reward if reward is None else f'{reward:.3g}'}): "
                "every advantage is 0, so nothing is learned from the rewards. Read a few completions and their rewards "
                "(anchors/step-N.html; a reward function returning a constant does this), or use data the model "
                "solves sometimes but not always.")


_SUMMARY = (("reward", "reward", "{:.3g}"), ("rewards/accuracy_reward/mean", "accuracy reward", "{:.3g}"),
            ("atrl/anchor_fraction", "anchor fraction", "{:.2f}"), ("completions/mean_length", "length", "{:.0f}"))


def step_time_summary(history: list[dict]) -> str | None:
    """Where an optimizer step's time went, as medians over the logged training steps: generation (the rollouts),
    credit (connectivity, partitions and weights: what the training loop spent on them) and the rest (scoring,
    the forward and backward passes, the optimizer). None when the run logged no step time."""
    import statistics

    logs = [h for h in history if "step_time" in h and "reward" in h]
    if not logs:
        return None
    step = statistics.median(h["step_time"] for h in logs)
    generation = statistics.median(h.get("time/generation_s", 0.0) for h in logs)
    credit = step * statistics.median(h.get("atrl/time/credit_share", 0.0) for h in logs)
    rest = max(0.0, step - generation - credit)

    def part(name: str, seconds: float) -> str:
        return f"{name} {seconds:.3f} s ({100 * seconds / step:.0f}%)" if step > 0 else f"{name} {seconds:.3f} s"

    return (f"a step took {step:.3f} s (median of {len(logs)} logged steps): " + ", ".join(
        [part("generation", generation), part("credit", credit), part("scoring, forward/backward, optimizer", rest)]))


def run_summary(history: list[dict], window: int = 10) -> str | None:
    """One line on what training did: each headline metric's mean over the first and the last `window` logged
    training steps (fewer when the run logged fewer than 2 x window), and the credit's share of step time.
    None when no training step was logged."""
    logs = [h for h in history if "reward" in h]
    if not logs:
        return None
    n = max(1, min(window, len(logs) // 2))
    parts = []
    for key, name, fmt in _SUMMARY:
        first = [h[key] for h in logs[:n] if key in h]
        last = [h[key] for h in logs[-n:] if key in h]
        if first and last:
            parts.append(f"{name} {fmt.format(sum(first) / len(first))} -> {fmt.format(sum(last) / len(last))}")
    shares = [h["atrl/time/credit_share"] for h in logs if "atrl/time/credit_share" in h]
    credit = f"; credit {100 * sum(shares) / len(shares):.1f}% of step time" if shares else ""
    span = "the first and the last logged step" if n == 1 else f"means of the first and last {n} logged steps"
    return f"{', '.join(parts)} ({span}){credit}"
