"""Checkpoints that are either complete or ignored, and finding the one to resume from.

The Hugging Face Trainer writes `checkpoint-N/` file by file; a run killed while writing leaves a folder that
looks like a checkpoint but is not. atrl writes a marker, `atrl_complete.json`, into the folder only after
everything else is on disk (marker written to a temporary name, flushed, then renamed: atomic on POSIX), and
resumes only from folders that carry it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .._workers import STOP_SIGNALS

logger = logging.getLogger("atrl")

MARKER = "atrl_complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def mark_checkpoint_complete(folder: str | os.PathLike, step: int) -> Path:
    folder = Path(folder)
    tmp = folder / (MARKER + ".tmp")
    with tmp.open("w") as fh:
        json.dump({"step": step}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    final = folder / MARKER
    os.replace(tmp, final)
    return final


def checkpoint_step(folder: Path) -> int:
    """The step N of a `checkpoint-N` folder."""
    return int(_CHECKPOINT.match(folder.name).group(1))


def checkpoints(output_dir: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """(complete, incomplete) checkpoint folders under `output_dir`, each sorted by step."""
    root = Path(output_dir)
    if not root.is_dir():
        return [], []
    found = sorted((checkpoint_step(p), p) for p in root.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name))
    complete = [p for _, p in found if (p / MARKER).is_file()]
    incomplete = [p for _, p in found if not (p / MARKER).is_file()]
    return complete, incomplete


STATE = "trainer_state.json"


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (typically a full disk): the message says how much space one takes."""


def folder_bytes(folder: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def free_space_line(output_dir: str | os.PathLike, need: int) -> str:
    import shutil

    free = shutil.disk_usage(output_dir).free
    size = f"a checkpoint takes about {need / 2**20:,.0f} MiB (the last one's size)" if need else \
        "the first checkpoint's size is not known yet"
    return (f"{free / 2**20:,.0f} MiB free in {output_dir}, {size}: free space, lower trl.save_total_limit, or "
            "set another trl.output_dir; resume: auto continues from the last complete checkpoint")


def check_checkpoint_space(output_dir: str | os.PathLike, margin: float = 1.1) -> int:
    """Before a checkpoint is written: the bytes the latest complete one takes (0 when there is none), and a
    CheckpointSaveError when less than `margin` times that is free, before anything is written."""
    import shutil

    complete, _ = checkpoints(output_dir)
    need = folder_bytes(complete[-1]) if complete else 0
    if need and shutil.disk_usage(output_dir).free < margin * need:
        raise CheckpointSaveError(f"not enough space for the next checkpoint: {free_space_line(output_dir, need)}")
    return need


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why a checkpoint marked complete cannot be resumed from (its trainer state unreadable or without its step),
    or None when it can."""
    path = Path(folder) / STATE
    if not path.is_file():
        return f"it has no {STATE}"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        int(state["global_step"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        return f"its {STATE} cannot be read ({type(err).__name__}: {err})"
    return None


def resumable_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The latest complete checkpoint that can be resumed from; each later complete one that cannot is named in a
    warning with the one used instead. None: there is no complete checkpoint. All of them broken: an error naming
    each (starting over would overwrite them)."""
    complete, _ = checkpoints(output_dir)
    broken = []
    for folder in reversed(complete):
        problem = checkpoint_problem(folder)
        if problem is None:
            for bad, why in broken:
                logger.warning("%s is marked complete but %s: resuming from %s instead", bad, why, folder)
            return folder
        broken.append((folder, problem))
    if broken:
        raise ValueError("no checkpoint can be resumed from: " + "; ".join(f"{f}: {why}" for f, why in broken)
                         + ". Restore one, or set resume: false to train from the start (they are overwritten)")
    return None


def run_history(folder: str | os.PathLike) -> tuple[list[dict], Path]:
    """The log history of a training run, and the file it was read from.

    `folder` is a run's output folder or one checkpoint folder. Read from the `trainer_state.json` with the most
    steps among the folder's own (a finished run writes one there) and its complete checkpoints' (a run still
    going, or killed, has only those); half-written checkpoints are not read."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"run folder {str(root)!r} does not exist")
    best: tuple[int, list[dict], Path] | None = None
    for path in [root / STATE, *(p / STATE for p in checkpoints(root)[0])]:
        if not path.is_file():
            continue
        try:
            state = json.loads(path.read_text())
            history, step = state["log_history"], int(state.get("global_step", 0))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: not a trainer state with a log_history ({type(err).__name__}: {err})") from err
        if not isinstance(history, list):  # a bad file is bad input (ValueError), as everywhere in atrl
            raise ValueError(f"{path}: log_history is a {type(history).__name__}, not a list")  # noqa: TRY004
        if best is None or step > best[0]:
            best = (step, history, path)
    if best is None:
        raise FileNotFoundError(f"{root}: no {STATE} in the folder or in a complete checkpoint-N/ under it; give a "
                                "training run's output folder (trl.output_dir) or one of its checkpoints")
    return best[1], best[2]


# ------------------------------------------------------------------------------------------------ stop on a signal

class StopOnSignal(TrainerCallback):
    """SIGTERM, SIGUSR1 or Ctrl-C during training: the step in progress finishes, a checkpoint is saved, training
    stops. A second Ctrl-C raises KeyboardInterrupt at once, as without this callback.

    Without it the process dies at once, and the steps since the last `save_steps` checkpoint are lost. The handler
    only sets a flag; at each step's end the processes agree on it (one all-reduce of a single number, so that all
    save the same step together, as DeepSpeed and FSDP need), and the Trainer's own save path writes the checkpoint
    (complete once marked, as any other). `received` names the signal afterwards. Installed by `run_training`, in
    the main thread only; a signal at the last step lets the run finish as usual. Under `torchrun` / `accelerate
    launch` the launcher passes the signal on and kills its processes 30 s later; a checkpoint that takes longer to
    write needs the signal sent to the processes themselves (SLURM's `srun` does).
    """

    def __init__(self):
        self.received: str | None = None
        self.stopped_at: int | None = None  # the step whose checkpoint was saved for the signal
        self._previous: dict[int, Any] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, number, frame) -> None:
        if number == signal.SIGINT:
            if self.received == "SIGINT":  # the second Ctrl-C: now
                signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.default_int_handler))
                raise KeyboardInterrupt
            logger.warning("Ctrl-C: the step in progress finishes and a checkpoint is saved; Ctrl-C again to stop "
                           "at once")
        self.received = signal.Signals(number).name

    def _agreed(self) -> str | None:
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.received
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([0 if self.received is None else getattr(signal, self.received)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        number = int(flag.item())
        if number and self.received is None:
            self.received = signal.Signals(number).name  # another process was signalled
        return self.received

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed() is not None and not control.should_training_stop:
            if state.is_world_process_zero:
                logger.warning("%s received: step %d is done; saving checkpoint-%d and stopping (`resume: auto` "
                               "continues from it)", self.received, state.global_step, state.global_step)
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        """Give the signals their handlers from before training (also after training raised)."""
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()
