"""Running a recipe: where a run resumes from (and whether its recipe may continue that checkpoint), the
training loop with stop signals, and the final save with the run's training report."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .recipe import Recipe, recipe_text, run_recipe_file

logger = logging.getLogger("atrl")


def resolve_resume(recipe: Recipe, output_dir: str) -> str | None:
    from .checkpoints import checkpoint_step, checkpoints, resumable_checkpoint

    if recipe.resume in (False, None, "false", "no"):
        return None
    if recipe.resume == "auto":
        _, incomplete = checkpoints(output_dir)
        latest_complete = resumable_checkpoint(output_dir)
        for folder in incomplete:
            if latest_complete is None or checkpoint_step(folder) > checkpoint_step(latest_complete):
                logger.warning("ignoring %s: it was not finished (no completion marker); resuming from %s",
                               folder, latest_complete or "the start")
        return str(latest_complete) if latest_complete else None
    path = Path(str(recipe.resume))
    if not path.is_dir():
        raise FileNotFoundError(f"resume={str(path)!r} is not a checkpoint folder")
    return str(path)


# Fields a resumed run may change: how long it trains, how often it saves, logs and evaluates, where it reports,
# and how the credit work is scheduled (same numbers either way). Any other change mixes two runs in one folder.
RESUME_MAY_CHANGE = ("resume", "trl.output_dir", "trl.max_steps", "trl.num_train_epochs", "trl.save_steps",
                     "trl.save_total_limit", "trl.logging_steps", "trl.eval_steps", "trl.report_to",
                     "trl.disable_tqdm", "trl.run_name", "trl.dataloader_num_workers",
                     "anchor.credit.n_workers", "anchor.overlap", "anchor.report_steps")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def check_resume_recipe(recipe: Recipe, out: Path, resume: str | None) -> None:
    """Resuming (resume: auto) continues the run whose recipe.yaml the checkpoint holds (its output folder's, for
    checkpoints of older versions): a recipe that differs in more than RESUME_MAY_CHANGE (e.g. another anchor.mode,
    learning rate or data file) is an error naming the fields, not a checkpoint of one run silently continued as
    another. A checkpoint named explicitly is resumed with a warning listing the differences."""
    # the checkpoint's own recipe first: a folder trained again with resume: false holds checkpoints of two runs
    saved_file = run_recipe_file(resume) if resume else None
    if saved_file is None:
        return
    from .._io import read_yaml

    try:
        saved = _flat(read_yaml(saved_file, "the checkpoint's recipe") or {})
    except ValueError as err:
        raise ValueError(f"{err}. It says which recipe trained {resume}; restore it, or set resume: false (train "
                         "from the start) or resume: <another checkpoint>") from None
    now = _flat(yaml.safe_load(recipe_text(recipe)))
    differ = {key for key in saved.keys() & now.keys() if saved[key] != now[key]}
    # a key on one side only: a field another atrl version did not have (ignored), or a section one side leaves
    # null (lora: {...} against lora: null), which is a change of that section
    for key in saved.keys() ^ now.keys():
        other = now if key in saved else saved
        differ.update(p for p in other if key.startswith(p + "."))

    def shown(side: dict[str, Any], key: str) -> Any:  # a value, or the fields of a section
        return side[key] if key in side else {k[len(key) + 1:]: v for k, v in side.items() if k.startswith(key + ".")}

    changed = [f"{key}: {shown(saved, key)!r} -> {shown(now, key)!r}" for key in sorted(differ)
               if not key.startswith(RESUME_MAY_CHANGE)]
    if not changed:
        return
    where = f"{resume}, which belongs to a run of another recipe ({saved_file}): " + "; ".join(changed)
    if recipe.resume != "auto":
        logger.warning("resume=%s continues %s", recipe.resume, where)
        return
    raise ValueError(f"resume: auto would continue {where}. Give this run its own trl.output_dir, set resume: "
                     "false to train from the start in this folder (its checkpoints are then overwritten), or name "
                     "the checkpoint in resume: to continue it with this recipe all the same")


class TrainingStopped(RuntimeError):
    """An error raised inside the training loop, with the step it stopped at and the checkpoint to resume from.
    Not a ValueError: the CLI prints input errors as one line, and this one with the traceback of its cause."""


def run_training(recipe: Recipe, callbacks: list | None = None, progress: bool = True):
    """Train according to `recipe`; returns the trainer. Saves the final model + processor to
    `<output_dir>/final`, the resolved recipe to `<output_dir>/recipe.yaml`, the trainer state (log history) to
    `<output_dir>/trainer_state.json` and a figure of what training did to `<output_dir>/training_report.png`.

    SIGTERM, SIGUSR1 or Ctrl-C stops training after the step in progress, with a checkpoint (`StopOnSignal`): then
    no final/ is written and `trainer.stopped_by_signal` names the signal.

    From a script of your own, call it under `if __name__ == "__main__":`: the credit workers are spawned
    processes, which import the main module again (Python's rule for spawned processes)."""
    from .._io import ensure_writable_dir
    from .progress import install_progress

    out = ensure_writable_dir(recipe.trl["output_dir"], argument="trl.output_dir")
    resume = resolve_resume(recipe, str(out))
    check_resume_recipe(recipe, out, resume)  # every rank reads the old recipe.yaml: none writes on a mismatch
    text = recipe_text(recipe)
    # every rank of a launch writes the same text: each to its own temporary file, renamed into place (atomic)
    tmp = out / f"recipe.yaml.{os.getpid()}.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / "recipe.yaml")
    from .checkpoints import StopOnSignal
    from .trainer import RecipeLogCallback

    stopper = StopOnSignal()
    from .build import build_trainer

    trainer = build_trainer(recipe, [*(callbacks or []), stopper])
    trainer.stopped_by_signal = None
    trainer.recipe_yaml = text
    trainer.add_callback(RecipeLogCallback(trainer, text))
    if progress:
        install_progress(trainer)
    if resume and trainer.is_world_process_zero():
        logger.warning("resuming from %s", resume)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except Exception as err:  # e.g. a reward function's bug at step 57: its traceback, the step, where to resume
        from .checkpoints import resumable_checkpoint

        try:
            latest = resumable_checkpoint(out)
        except ValueError:
            latest = None
        where = f"`resume: auto` continues from {latest}" if latest else "no complete checkpoint yet"
        raise TrainingStopped(f"training stopped at step {trainer.state.global_step} by {type(err).__name__}: "
                              f"{err} ({where})") from err
    finally:
        stopper.restore()  # a run that raised never reached on_train_end
    if stopper.stopped_at is not None:  # checkpoint-N holds the run; final/ is for a finished one
        trainer.stopped_by_signal = stopper.received
        return trainer
    final = out / "final"
    trainer.save_model(str(final))  # on every rank: DeepSpeed and FSDP gather the weights together
    trainer.save_state()  # <output_dir>/trainer_state.json: the whole log history, whatever save_steps was
    if trainer.is_world_process_zero():
        from ..viz.plots import training_report

        trainer.processing_class.save_pretrained(str(final))
        training_report({run_label(out): trainer.state.log_history}, out / "training_report.png")
    return trainer


def run_label(folder: str | Path, depth: int = 1) -> str:
    """A run's name in plots: the last `depth` parts of its folder's path, with the credit mode its recipe.yaml
    names (a checkpoint folder's recipe is its run's)."""
    name, recipe_file = "/".join(Path(folder).resolve().parts[-depth:]), run_recipe_file(folder)
    mode = ((yaml.safe_load(recipe_file.read_text()) or {}).get("anchor") or {}).get("mode") if recipe_file else None
    return f"{name} ({mode})" if mode else name


def run_labels(folders: Sequence[str | Path]) -> list[str]:
    """`run_label` of each folder, with as many trailing parts of the paths as tell them apart: runs that are
    all `.../<name>/run` are labelled `<name>/run`. The same folder given twice gets the same label twice."""
    resolved = [Path(f).resolve() for f in folders]
    depth = 1
    while depth < max(len(p.parts) for p in resolved) and \
            len({p.parts[-depth:] for p in resolved}) < len(set(resolved)):
        depth += 1
    return [run_label(folder, depth) for folder in folders]
