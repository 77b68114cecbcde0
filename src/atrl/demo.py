"""`atrl demo`: the embedded default, end to end on two CPU cores in about 4 minutes.

1. the base: the warm-started tiny Qwen2.5-VL shipped with the package (or the one `atrl sft` cached);
2. held-out accuracy of the base on tasks of the training mix it never saw: greedy, and sampled at the rollout
   temperature (the policy that RL trains);
3. AT-RL (`atrl train` with configs/demo.yaml's settings) for `--steps` steps;
4. the same accuracies after, printed next to the base's, by task family;
5. a report folder: reward and anchor-fraction curves, the connectivity histogram with its bimodality
   coefficient, anchor-highlighted responses (HTML and PNG), one token's attention heatmap, and
   summary.json with every number printed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch


SAMPLES = 4  # responses sampled per held-out task for the sampled accuracy
N_EVAL = 200  # held-out tasks


# `atrl demo --video`: the synthetic video task, from the video base (atrl.models.default.VIDEO_BASE_RECIPE), with
# configs/demo-video.yaml's settings over the embedded default's
VIDEO_OVERRIDES = ["--data.families", "[colour_change]", "--data.knobs", "null", "--anchor.time_bins", "3"]
VIDEO_STEPS = 60


def run_demo(out_dir: Path, seed: int = 0, n_eval: int = N_EVAL, steps: int | None = None, mode: str = "atrl",
             overrides: list[str] | None = None, base: str | Path | None = None, video: bool = False) -> dict:
    from rich.console import Console
    from rich.table import Table

    from .data.synthetic import generate, to_hf_dataset
    from .eval import evaluate
    from .eval.analyze import analyze
    from .models.default import ensure_default_base
    from ._io import ensure_writable_dir
    from .models.zoo import load_model
    from .rl.recipe import load_recipe
    from .rl.run import run_training
    from .viz.grid import task_grid
    from .viz.plots import training_curves, write_analysis_report

    console = Console()
    steps = steps if steps is not None else (VIDEO_STEPS if video else 150)
    out = ensure_writable_dir(out_dir, argument="--out")
    t_start = time.time()
    torch.manual_seed(seed)
    subject = "a tiny Qwen2.5-VL" if base is None else str(base)
    console.rule(f"[bold]atrl demo[/bold]: AT-RL on {subject}, synthetic "
                 + ("video tasks" if video else "visual-reasoning tasks"))
    if base is not None:
        from .models.zoo import check_model_path

        check_model_path(base)
    if base is not None:
        base_path = Path(base)
    elif video:
        from .models.default import ensure_video_base

        base_path = ensure_video_base(console=console)
    else:
        base_path = ensure_default_base(console=console)
    console.print(f"base model: {base_path}")
    run_dir = out / "run"
    recipe = load_recipe(None, [
        "--model.path", str(base_path), "--anchor.mode", mode, "--trl.output_dir", str(run_dir),
        "--trl.max_steps", str(steps), "--trl.seed", str(seed), "--data.seed", str(seed + 1), "--resume", "false",
        "--trl.save_steps", str(max(steps, 1)), "--trl.report_to", "[tensorboard]",
        *(VIDEO_OVERRIDES if video else []), *(overrides or [])])
    # Held-out tasks: the training mix (families and knobs), drawn with a seed that training never uses.
    held_out = generate(n_eval, seed=10_000 + seed, families=recipe.data.families, knobs=recipe.data.synthetic_knobs())
    held_rows = [dict(r) for r in to_hf_dataset(held_out)]
    task_grid(held_out[:10], out / "tasks.png")

    # Greedy accuracy, and the accuracy of the policy RL trains: responses sampled at the rollout temperature.
    temperature = float(recipe.trl.get("temperature", 1.0))
    limit = int(recipe.trl.get("max_completion_length", 256))  # the rollouts' own limit

    def accuracies(model):
        greedy = evaluate(model, processor, held_rows, max_new_tokens=limit, batch_size=50)
        sampled = evaluate(model, processor, held_rows, max_new_tokens=limit, batch_size=50, temperature=temperature,
                           samples=SAMPLES, seed=seed)
        return greedy, sampled

    phases: dict[str, float] = {}  # wall seconds of the demo's parts, for its closing timing line
    t0 = time.perf_counter()
    model, processor = load_model(base_path)
    before, before_s = accuracies(model)
    phases["evaluation before"] = time.perf_counter() - t0
    console.print(f"held-out accuracy of the base: {_pct(before)} greedy, {_pct(before_s)} sampled "
                  f"(temperature {temperature:g}, {SAMPLES} per task; ± one standard error)")
    del model

    console.print(f"RL: {steps} steps, credit mode {mode} (recipe: {run_dir / 'recipe.yaml'})")
    t0 = time.perf_counter()
    trainer = run_training(recipe)
    trainer.close_rollouts()
    phases["training"] = time.perf_counter() - t0
    history = trainer.state.log_history
    trained = trainer.accelerator.unwrap_model(trainer.model)
    t0 = time.perf_counter()
    after, after_s = accuracies(trained)
    phases["evaluation after"] = time.perf_counter() - t0

    table = Table(title=f"held-out accuracy, {n_eval} tasks")
    table.add_column("family")
    for kind in ("greedy", f"sampled x{SAMPLES}, t={temperature:g}"):
        table.add_column(f"base, {kind}", justify="right")
        table.add_column(f"after {steps} steps, {kind}", justify="right")

    def cell(result, fam):
        return f"{100 * result.by_category.get(fam, {'accuracy': float('nan')})['accuracy']:.1f}%"

    for fam in sorted(before.by_category):
        table.add_row(fam, *(cell(r, fam) for r in (before, after, before_s, after_s)))
    if len(before.by_category) > 1:
        table.add_row("[bold]all[/bold]", *(f"[bold]{100 * r.accuracy:.1f}%[/bold]"
                                            for r in (before, after, before_s, after_s)))
    console.print(table)
    console.print(f"after {steps} steps ({mode}): greedy {_pct(before)} -> {_pct(after)}, "
                  f"sampled {_pct(before_s)} -> {_pct(after_s)}")

    # Modes whose tokens are not chosen from connectivity (uniform, the entropy and image-damage baselines) are
    # analysed with AT-RL's partition of the trained model.
    credit = trainer.credit_options
    if not recipe.anchor.credit_mode.needs_probes:  # its tokens are not chosen from connectivity
        credit = dataclasses.replace(credit, mode="atrl")
    t0 = time.perf_counter()
    analysis = analyze(trained, processor, held_out[:40], credit=credit, sink_debias=recipe.anchor.sink_debias,
                       region_grid=recipe.anchor.region_grid, layers=recipe.anchor.probe_layers,
                       time_bins=recipe.anchor.time_bins)
    phases["analysis and figures"] = time.perf_counter() - t0
    files = {"training_curves": training_curves(history, out / "training_curves.png"),
             "training_report": run_dir / "training_report.png",  # written by run_training: every logged metric
             **write_analysis_report(analysis, out, html_views=12)}
    s = analysis.summary()
    console.print(f"anchors vs perception spans (reference traces, {s['tokens']} tokens): precision "
                  f"{s['anchor_precision']:.2f} (random {s['random_precision']:.2f}), recall {s['anchor_recall']:.2f} "
                  f"(random {s['random_recall']:.2f}); ROC AUC of connectivity for perception tokens "
                  f"{s['perception_auc']:.2f} (random 0.50); bimodality {s['bimodality']:.3f}")
    summary = {
        "base_model": str(base_path), "mode": mode, "steps": steps, "seed": seed, "n_eval": n_eval,
        "accuracy_before": before.accuracy, "accuracy_after": after.accuracy,
        "sampled_accuracy_before": before_s.accuracy, "sampled_accuracy_after": after_s.accuracy,
        "standard_errors": {"before": before.standard_error, "after": after.standard_error,
                            "sampled_before": before_s.standard_error, "sampled_after": after_s.standard_error},
        "sampling": {"temperature": temperature, "samples_per_task": SAMPLES},
        "by_family_before": before.by_category, "by_family_after": after.by_category,
        "analysis": s, "seconds": round(time.time() - t_start, 1),
        "phases_s": {k: round(v, 1) for k, v in phases.items()},
        "files": {k: str(v) for k, v in files.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    from .rl.health import step_time_summary

    steps_line = step_time_summary(history)
    console.print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items())
                  + (f"; in training, {steps_line}" if steps_line else ""))
    anchors = run_dir / "anchors"  # written by the trainer in modes that weight tokens
    console.print(f"report: {out} ({summary['seconds']} s); open {files['responses_html']} in a browser; training: "
                  f"{files['training_report']}" + (f" and {anchors}/ (sampled completions, credited tokens marked)"
                                                   if anchors.is_dir() else ""))
    return summary


def _pct(result) -> str:
    return f"{100 * result.accuracy:.1f}% ± {100 * result.standard_error:.1f}"
