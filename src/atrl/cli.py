"""The `atrl` command line: `atrl demo | data | model`.

Each subcommand is a thin wrapper over the library; heavy imports happen inside the handlers so that
`atrl --help` is instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_model_build(args: argparse.Namespace) -> int:
    from .models.zoo import TinySize, build_tiny_vlm, save_model

    size = TinySize(num_layers=args.layers, hidden_size=args.hidden, image_size=args.image_size)
    model, processor = build_tiny_vlm(args.family, size=size, seed=args.seed)
    out = save_model(model, processor, args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"built tiny {args.family} ({n:,} parameters, seed {args.seed}) -> {out}")
    return 0


def _knob_overrides(pairs: list[str]) -> dict:
    """Parse `family.knob=value` pairs into per-family knob dataclasses."""
    import dataclasses
    import json

    from .data.synthetic import TASK_FAMILIES

    per_family: dict[str, dict] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        family, dot, knob = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"--knob {pair!r}: expected FAMILY.KNOB=VALUE, e.g. count.max_objects=10")
        if family not in TASK_FAMILIES:
            raise ValueError(f"--knob {pair!r}: unknown task family {family!r}; choose from {sorted(TASK_FAMILIES)}")
        names = {f.name for f in dataclasses.fields(TASK_FAMILIES[family].knobs)}
        if knob not in names:
            raise ValueError(f"--knob {pair!r}: {family} has no knob {knob!r}; knobs: {sorted(names)}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        per_family.setdefault(family, {})[knob] = tuple(value) if isinstance(value, list) else value
    return {f: TASK_FAMILIES[f].knobs(**kw) for f, kw in per_family.items()}


def _examples(args: argparse.Namespace):
    from .data.synthetic import generate

    return generate(args.n, seed=args.seed, families=args.families, knobs=_knob_overrides(args.knob or []))


def _cmd_data_export(args: argparse.Namespace) -> int:
    from .data.synthetic import export_jsonl, to_hf_dataset
    from .models.zoo import ensure_writable_dir

    examples = _examples(args)
    if args.format == "jsonl":
        path = export_jsonl(examples, args.out)
    else:
        path = ensure_writable_dir(args.out, argument="--out")
        to_hf_dataset(examples).save_to_disk(str(path))
    print(f"wrote {len(examples)} examples ({args.format}) -> {path}")
    return 0


def _cmd_data_preview(args: argparse.Namespace) -> int:
    from .viz.grid import task_grid

    path = task_grid(_examples(args), args.out, columns=args.columns)
    print(f"wrote a grid of {args.n} tasks -> {path}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import logging

    from .rl.recipe import load_recipe, run_training

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    recipe = load_recipe(args.config, args.overrides)
    trainer = run_training(recipe)
    out = recipe.trl["output_dir"]
    print(f"trained {trainer.state.global_step} steps (mode {recipe.anchor.mode}) -> {out}/final; "
          f"logs: tensorboard --logdir {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=Path(args.out), seed=args.seed, n_eval=args.n_eval)
    return 0


def _add_data_args(p: argparse.ArgumentParser, n: int) -> None:
    from .data.synthetic import TASK_FAMILIES

    p.add_argument("--n", type=int, default=n, help="number of examples")
    p.add_argument("--seed", type=int, default=0, help="data-set seed (same seed, same data)")
    p.add_argument("--families", nargs="+", choices=sorted(TASK_FAMILIES), default=None,
                   help="task families (default: all)")
    p.add_argument("--knob", action="append", metavar="FAMILY.KNOB=VALUE",
                   help="difficulty knob, e.g. count.max_objects=10 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    from .models.zoo import DEFAULT_FAMILY, FAMILIES

    parser = argparse.ArgumentParser(prog="atrl", description="Anchor-Token RL for vision-language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the embedded default end to end on the CPU")
    demo.add_argument("--out", default="atrl-demo", help="report folder")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--n-eval", type=int, default=10, help="held-out tasks to answer")
    demo.set_defaults(func=_cmd_demo)

    train = sub.add_parser("train", help="AT-RL training from a YAML recipe (no config: the embedded default)",
                           description="Overrides after the options: --section.key value, e.g. "
                                       "--anchor.mode uniform --trl.max_steps 100")
    train.add_argument("--config", default=None, help="YAML recipe (see configs/)")
    train.set_defaults(func=_cmd_train)

    data = sub.add_parser("data", help="synthetic visual-reasoning tasks").add_subparsers(dest="action",
                                                                                        required=True)
    export = data.add_parser("export", help="write a data set (JSONL + PNG, or a datasets folder)")
    _add_data_args(export, 100)
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--format", choices=["jsonl", "hf"], default="jsonl")
    export.set_defaults(func=_cmd_data_export)
    preview = data.add_parser("preview", help="a PNG grid of tasks with question and answer")
    _add_data_args(preview, 15)
    preview.add_argument("--out", default="tasks.png", help="PNG path")
    preview.add_argument("--columns", type=int, default=5)
    preview.set_defaults(func=_cmd_data_preview)

    model = sub.add_parser("model", help="tiny offline VLMs").add_subparsers(dest="action", required=True)
    build = model.add_parser("build", help="build a tiny random VLM and save it as a checkpoint folder")
    build.add_argument("--family", choices=sorted(FAMILIES), default=DEFAULT_FAMILY)
    build.add_argument("--out", required=True, help="checkpoint folder")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--layers", type=int, default=4)
    build.add_argument("--hidden", type=int, default=64)
    build.add_argument("--image-size", type=int, default=112)
    build.set_defaults(func=_cmd_model_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"atrl {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
