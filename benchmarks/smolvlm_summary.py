"""The SmolLM2 miniature's runs side by side (docs/benchmarks.md, The SmolLM2 miniature).

    python benchmarks/smolvlm_summary.py OUT

OUT holds `rl-<mode>-s<seed>/` folders written by benchmarks/smolvlm.sh. Prints, per run, the held-out accuracies
before and after, the analysis of the trained model, and over training the anchors' and the other tokens'
connectivity and the anchors' share of the credit (means of the first and last 10 logged steps); then, per mode,
the mean gain over seeds with its standard error, and each mode's gain against `uniform` (AT-RL's also against
`random`) paired by seed.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path


# Every mode's gain is paired by seed against uniform credit (plain DAPO); these also against other modes:
# AT-RL against `random`, which re-weights as many tokens as AT-RL's anchors but chosen at random.
ALSO_AGAINST = {"atrl": ("random",)}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _se(xs: list[float]) -> float:
    if len(xs) < 2:
        return float("nan")
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def _log_history(run: Path) -> list[dict]:
    """The run's logged steps (trainer_state.json's log_history); none when the run wrote no state."""
    state = run / "run" / "trainer_state.json"
    return json.loads(state.read_text())["log_history"] if state.is_file() else []


def _trajectory(history: list[dict], key: str) -> tuple[float, float]:
    """Means of `key` over the first and the last 10 logged steps."""
    values = [h[key] for h in history if key in h]
    return _mean(values[:10]), _mean(values[-10:])


def main(out: str) -> None:
    gains: dict[str, dict[int, tuple[float, float]]] = defaultdict(dict)
    for summary in sorted(Path(out).glob("rl-*-s*/summary.json")):
        mode, seed = re.fullmatch(r"rl-(.+)-s(\d+)", summary.parent.name).groups()
        s = json.loads(summary.read_text())
        a = s.get("analysis", {})
        greedy = 100 * (s["accuracy_after"] - s["accuracy_before"])
        sampled = 100 * (s["sampled_accuracy_after"] - s["sampled_accuracy_before"])
        gains[mode][int(seed)] = (greedy, sampled)
        line = (f"{summary.parent.name}: greedy {100 * s['accuracy_before']:.1f} -> {100 * s['accuracy_after']:.1f}"
                f" ({greedy:+.1f}), sampled {100 * s['sampled_accuracy_before']:.1f} -> "
                f"{100 * s['sampled_accuracy_after']:.1f} ({sampled:+.1f})")
        if a:
            line += (f"; anchors {a['anchor_fraction']:.2f}, precision {a['anchor_precision']:.2f} (random "
                     f"{a['random_precision']:.2f}), recall {a['anchor_recall']:.2f}, AUC {a['perception_auc']:.2f}, "
                     f"bimodality {a['bimodality']:.2f}")
        history = _log_history(summary.parent)
        for key, name in (("atrl/anchor_conn", "anchor conn"), ("atrl/other_conn", "other conn"),
                          ("atrl/anchor_credit_share", "anchors' credit share")):
            first, last = _trajectory(history, key)
            if not math.isnan(first):
                line += f"; {name} {first:.3f} -> {last:.3f}"
        print(line + f"; {s['seconds']:.0f} s")
    print()
    for mode, by_seed in sorted(gains.items()):
        g, sm = [v[0] for v in by_seed.values()], [v[1] for v in by_seed.values()]
        line = (f"{mode}: seeds {sorted(by_seed)}, mean gain greedy {_mean(g):+.1f} ± {_se(g):.1f}, sampled "
                f"{_mean(sm):+.1f} ± {_se(sm):.1f}")
        for other in (() if mode == "uniform" else ("uniform",)) + ALSO_AGAINST.get(mode, ()):
            paired = sorted(seed for seed in by_seed if seed in gains.get(other, {}))
            dg = [by_seed[k][0] - gains[other][k][0] for k in paired]
            ds = [by_seed[k][1] - gains[other][k][1] for k in paired]
            if paired:
                line += (f"; against {other}, paired over seeds {paired}: greedy {_mean(dg):+.1f} ± "
                         f"{_se(dg):.1f}, sampled {_mean(ds):+.1f} ± {_se(ds):.1f}")
        print(line)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "smolvlm-miniature")
