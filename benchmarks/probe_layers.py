"""Which probed layers and sink debiasing make connectivity single out the tokens that read the image.

On reference traces of held-out colour-tile tasks (teacher-forced, default base unless a model is given), for
each choice of probed layers and `sink_debias`: the ROC AUC of connectivity for the colour's first letter in
`<think>` (the token that reads the image; later letters follow from it) against every other response
token, the AUC for whole perception spans against the rest, and anchor precision / recall against the spans
under the default credit options (random-selection baselines in brackets). 0.5 = no separation.

    python benchmarks/probe_layers.py [MODEL] [--n 40]
"""

import argparse
import itertools

import numpy as np
from sklearn.metrics import roc_auc_score

from atrl.data.synthetic import DEFAULT_FAMILIES, DEFAULT_KNOBS, generate, knobs_from_mapping
from atrl.eval.analyze import analyze
from atrl.models.default import default_base_model
from atrl.models.zoo import load_model
from atrl.probe import SINK_DEBIAS, default_probe_layers
from deciding_tokens import _token_at


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--n", type=int, default=40)
    args = ap.parse_args()
    path = args.model or str(default_base_model())
    model, processor = load_model(path)
    examples = generate(args.n, seed=10_000, families=DEFAULT_FAMILIES, knobs=knobs_from_mapping(DEFAULT_KNOBS))
    n_layers = model.config.get_text_config().num_hidden_layers
    default = default_probe_layers(n_layers)
    choices = [default] + [[i] for i in range(n_layers)] + [list(range(n_layers))]
    print(f"# {path}: {args.n} held-out reference traces; default probe layers {default}")
    print("| layers | sink_debias | AUC colour's first letter | AUC perception spans | anchor precision (random) "
          "| anchor recall (random) |")
    print("|---|---|---|---|---|---|")
    for layers, debias in itertools.product(choices, SINK_DEBIAS):
        result = analyze(model, processor, examples, layers=layers, sink_debias=debias)
        first = np.concatenate([np.eye(len(v.conn), dtype=bool)[_token_at(v, ex.perception_spans[0][0])]
                                for v, ex in zip(result.views, examples)])
        conn = np.concatenate([v.conn for v in result.views])
        spans = np.concatenate([v.perception for v in result.views])
        print(f"| {layers} | {debias} | {roc_auc_score(first, conn):.2f} | {roc_auc_score(spans, conn):.2f} | "
              f"{result.precision:.2f} ({result.random_precision:.2f}) | "
              f"{result.recall:.2f} ({result.random_recall:.2f}) |", flush=True)


if __name__ == "__main__":
    main()
