"""Evaluating checkpoints end to end: what `atrl eval` does, as a Python call.

    from atrl.eval import run_eval

    run = run_eval(["runs/uniform/final", "runs/atrl/final"], data="testmini.parquet", out="eval-3b")
    run.results["runs/atrl/final"].accuracy, run.comparison.to_markdown("AT-RL vs uniform")

Each model's responses are kept under `<out>/<model>/responses/` as they come, so the same call after a crash
answers only what is missing; under `accelerate launch` / `torchrun` each process answers its share and the
first writes the reports (the others get no results back). Models are loaded one at a time.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Sequence

from .compare import Comparison, checkpoint_steps, compare_results
from .responses import ResponseLog, weights_fingerprint
from .score import EvalResult, evaluate

Say = Callable[[str], None]
# progress(description, total, unit) -> a context manager yielding advance(n)
ProgressFactory = Callable[[str, int, str], ContextManager[Callable[[int], None]]]


@dataclass
class EvalRun:
    """What `run_eval` produced: per model path its result (empty on processes other than the first), the
    comparison of several (None for one model), the output folder and the files written."""

    results: dict[str, EvalResult]
    comparison: Comparison | None
    out: Path
    files: list[Path] = field(default_factory=list)


def eval_rows(data: str, *, fmt: str = "auto", on_error: str = "raise", n: int | None = None, seed: int = 12345,
              families: list[str] | None = None, knobs: dict | None = None, say: Say = print):
    """The rows to answer, a `datasets.Dataset` whose images are decoded a row at a time (MathVista's 1,000 images
    held decoded would take gigabytes in every process). `data`: "synthetic" (`n` tasks of `seed`, 200 by
    default, of `families` with `knobs`) or a data file; for a file, `n` keeps its first rows."""
    from ..data.formats import load_samples, to_trl_dataset
    from ..data.synthetic import generate, to_hf_dataset

    if data == "synthetic":
        return to_hf_dataset(generate(200 if n is None else n, seed=seed, families=families, knobs=knobs))
    samples, report = load_samples(data, fmt, on_error=on_error)
    say(str(report))
    if n is not None and n < len(samples):  # a benchmark's score is over all of it unless asked otherwise
        say(f"--n {n}: the first {n} of {len(samples)} rows")
        samples = samples[:n]
    return to_trl_dataset(samples)


def processes(device: str | None) -> tuple[int, int, str | None]:
    """(rank, world size, device) of this process: under `accelerate launch` / `torchrun` (WORLD_SIZE > 1) the
    process group is started and each process takes its own GPU; otherwise one process on `device`."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        if device is not None:
            raise ValueError(f"--device {device}: under {state.num_processes} processes each takes its own "
                             f"device ({state.device} here); leave --device out")
        return state.process_index, state.num_processes, str(state.device)
    return 0, 1, device


def load_for_eval(path: str, *, device: str | None = None, min_pixels: int | None = None,
                  max_pixels: int | None = None):
    """A checkpoint for eval / analyze: on `device`, or the GPU when one is visible (a 7B model answering
    MathVista on the CPU takes days), its vision tower packed as training runs it, with `min_pixels` /
    `max_pixels` applied to its processor."""
    import torch

    from ..models.vision_attention import use_packed_vision_attention
    from ..models.zoo import load_model, set_pixel_range

    model, processor = load_model(path, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_packed_vision_attention(model)
    set_pixel_range(processor, min_pixels, max_pixels, names=("--min-pixels", "--max-pixels"))
    return model, processor


def free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _start_log(log: ResponseLog, *, fresh: bool, rank: int, world: int) -> None:
    """`fresh` discards earlier responses (the first process, before anyone reads); otherwise they are checked
    against this run's settings (`evaluate` then answers only the rows they do not)."""
    import torch.distributed as dist

    from .._io import ensure_writable_dir

    if rank == 0:  # now, not after an hour of answering
        ensure_writable_dir(log.folder.parent, argument="--out")
    if fresh and rank == 0:
        log.discard()
    if world > 1:
        dist.barrier()
    log.check()


def _folders(models: Sequence[str]) -> list[str]:
    """One output folder name per model (under `out` when there are several)."""
    folders = [re.sub(r"[^\w.-]+", "_", path) for path in models]
    if len(set(folders)) < len(folders):
        folders = [f"{i + 1}-{name}" for i, name in enumerate(folders)]
    return folders


@contextmanager
def _silent(description: str, total: int, unit: str) -> Iterator[None]:
    yield None


def run_eval(models: Sequence[str], data: str = "synthetic", *, out: str | os.PathLike | None = None,
             fmt: str = "auto", on_error: str = "raise", n: int | None = None, seed: int = 12345,
             families: list[str] | None = None, knobs: dict | None = None, device: str | None = None,
             min_pixels: int | None = None, max_pixels: int | None = None, max_new_tokens: int = 1024,
             batch_size: int = 16, temperature: float | None = None, samples: int = 1,
             repetition_penalty: float = 1.0, fresh: bool = False, scoring: str = "auto",
             extractions: str | os.PathLike | None = None, say: Say = print,
             progress: ProgressFactory | None = None) -> EvalRun:
    """Score `models` (checkpoint folders or hub ids) on the same rows; several are compared with the first.

    Args:
        models: the models, in order; a run's `checkpoint-*` folders are put in step order.
        data, fmt, on_error, n, seed, families, knobs: the rows (see `eval_rows`).
        out: output folder (default `atrl-eval/<model>` for one model, `atrl-eval` for several, a folder per
            model in it). Each model's folder gets `eval.json` / `eval.md` and `responses/`; several, also
            `compare.json` / `compare.md` / `compare.png`.
        device, min_pixels, max_pixels: how each model is loaded (see `load_for_eval`).
        max_new_tokens, batch_size, temperature, samples, repetition_penalty: generation (greedy unless
            `temperature`; `samples` responses per question give pass@k).
        fresh: discard responses an earlier run left in `out` instead of continuing from them.
        scoring: "auto" (MathVista's official rule on MathVista rows, the reward's rules elsewhere), "mathvista"
            or "reward" (see `atrl.eval.score.score_responses`; the report gives both where both apply).
        extractions: a file of extracted answers by question id (`atrl.eval.official.load_extractions`) that
            replaces the rule-based extraction: a finished eval is rescored with them without generating.
        say: where progress messages go (only the first process speaks).
        progress: a factory of progress bars, `progress(description, total, unit)` yielding `advance(n)`.
    """
    from .._io import ensure_writable_dir
    from ..models.zoo import pixel_range

    from .official import SCORINGS, load_extractions

    if scoring not in SCORINGS:
        raise ValueError(f"--scoring {scoring!r}: choose from {SCORINGS}")
    given = load_extractions(extractions) if extractions is not None else None
    rank, world, device = processes(device)
    speak: Say = say if rank == 0 else (lambda *_: None)
    rows = eval_rows(data, fmt=fmt, on_error=on_error, n=n, seed=seed, families=families, knobs=knobs,
                     say=speak)  # the data first: a bad row fails before the model's weights load
    models = list(models)
    if len(set(models)) != len(models):
        raise ValueError(f"--model names a checkpoint twice: {models}")
    steps = checkpoint_steps(models)
    if steps is not None and len(steps) > 1:  # a run's checkpoint-* (a shell sorts 1000 before 200): by step
        models = [path for _, path in sorted(zip(steps, models))]
        speak(f"checkpoints of one run, by step; the baseline is the earliest: {models[0]}")
    folders = _folders(models)
    if out is None:  # a folder per model by default: evaluating another model does not meet this one's responses
        out = Path("atrl-eval", folders[0]) if len(models) == 1 else Path("atrl-eval")
    out = Path(out)
    if world > 1:
        speak(f"{world} processes, each answering 1 in {world} of the questions")
    bar = progress if progress is not None and rank == 0 else _silent
    run = EvalRun(results={}, comparison=None, out=out)
    for path, name in zip(models, folders):
        model, processor = load_for_eval(path, device=device, min_pixels=min_pixels, max_pixels=max_pixels)
        folder = out if len(models) == 1 else out / name
        settings: dict[str, Any] = {"weights": weights_fingerprint(model), "max_new_tokens": max_new_tokens,
                                    "temperature": temperature, "samples": samples,
                                    "repetition_penalty": repetition_penalty,
                                    "seed": seed if temperature is not None else None,
                                    "pixels": list(pixel_range(processor) or []) or None}
        log = ResponseLog(folder / "responses", settings, rank)
        _start_log(log, fresh=fresh, rank=rank, world=world)
        with bar(f"answering ({path})" if len(models) > 1 else "answering", len(rows), "prompts") as adv:
            result = evaluate(model, processor, rows, max_new_tokens=max_new_tokens, batch_size=batch_size,
                              temperature=temperature, samples=samples, seed=seed, progress=adv,
                              repetition_penalty=repetition_penalty, log=log, scoring=scoring,
                              extractions=given, extraction_source=str(extractions) if given is not None
                              else "rule-based",
                              resumed=lambda answered, partial, log=log: speak(
                                  f"{log.folder}: {answered} questions answered by an earlier run with the same "
                                  "weights and settings are not answered again"
                                  f"{f' ({partial} cut short by a kill are)' if partial else ''} (--fresh: all)"))
        del model  # and its memory, before the next model loads (two 7B models do not fit beside each other)
        free_device_memory()
        if result is None:  # another process: the first one scores and writes
            continue
        json_path, md_path = result.write(folder, title=f"Evaluation of {path} on {data}")
        speak(result.to_markdown(f"Evaluation of {path}"))
        speak(f"-> {json_path}, {md_path} (responses as generated: {log.folder})")
        run.results[path] = result
        run.files += [json_path, md_path]
    if len(run.results) > 1:
        from ..viz.plots import comparison_plot

        run.comparison = compare_results(run.results, samples=samples, seed=seed)
        ensure_writable_dir(out, argument="--out")
        json_path, md_path = run.comparison.write(out, title=f"Checkpoints compared on {data}")
        png = comparison_plot(run.comparison, out / "compare.png")
        speak(run.comparison.to_markdown(f"Checkpoints compared on {data}"))
        speak(f"-> {json_path}, {md_path}, {png}")
        run.files += [json_path, md_path, png]
    return run
