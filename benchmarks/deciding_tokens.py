"""Where the anchors fall on the default task: is the token that decides the answer an anchor?

On reference traces of held-out colour-tile tasks (teacher-forced), counts how often the first letter of the
colour in `<think>` (the choice the answer copies), the first letter of the colour in `<answer>` and the first
letter of the quadrant name (copied from the question) are anchors under the default credit options.

    python benchmarks/deciding_tokens.py [MODEL]     (default: the shipped default base)
"""
import sys

import numpy as np

from atrl.data.synthetic import DEFAULT_FAMILIES, DEFAULT_KNOBS, generate, knobs_from_mapping
from atrl.eval.analyze import analyze
from atrl.models.default import default_base_model
from atrl.models.zoo import load_model


def _token_at(view, char: int) -> int:
    """Index of the token of `view` that covers character `char` of the response (a whole-word token may start
    at the space before it)."""
    return next(k for k, (start, end) in enumerate(view.spans) if start <= char < end)


def main(model_path: str, n: int = 40) -> None:
    model, processor = load_model(model_path)
    examples = generate(n, seed=10_000, families=DEFAULT_FAMILIES, knobs=knobs_from_mapping(DEFAULT_KNOBS))
    result = analyze(model, processor, examples)
    think = answer = quadrant = 0
    above = []
    for view, ex in zip(result.views, examples):
        colour = _token_at(view, ex.perception_spans[0][0])
        think += bool(view.anchor[colour])
        answer += bool(view.anchor[_token_at(view, view.response.index("<answer>") + len("<answer>"))])
        quadrant += bool(view.anchor[_token_at(view, view.response.index(ex.scene["asked"]))])
        above.append((view.conn > view.conn[colour]).mean())
    print(f"{model_path}: anchors {result.anchor_fraction:.3f} of the tokens; anchored first letters: colour in "
          f"<think> {think}/{n}, colour in <answer> {answer}/{n}, quadrant name {quadrant}/{n}; share of a "
          f"response's tokens more connected than the <think> colour letter: median {np.median(above):.2f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(default_base_model()))
