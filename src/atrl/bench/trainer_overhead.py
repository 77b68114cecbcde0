"""Step time of `atrl` against `uniform` on the same trainer, model shape, data and seed (not a test).

Both modes run in one process, alternating in blocks (uniform, atrl, then atrl, uniform, ...: the order flips
each round so that neither mode always follows the other) so that drift affects both; each block is a fresh
ATRLTrainer on the same random-weight model snapshot, the same synthetic data and seed, with every completion
forced to the same length (min_new_tokens = max_completion_length), so that generation costs the same in both
modes. Step time is TRL's `step_time` (generation + scoring +
forward/backward + optimizer) summed over each generation cycle (`--steps-per-generation` optimizer steps, 1 by
default); the first cycle of each block is dropped as warm-up, and one short unrecorded block runs first. The
ratio of medians is printed with the spread of the first mode's blocks (the noise floor). Target (issue 6):
ratio <= 1.005. Also printed per mode: the share of the step the training loop spent on credit
(`atrl/time/credit_s`) and the workers' CPU seconds of partitioning per step (`atrl/time/credit_cpu_s`): the
difference is what overlapping hid.

Generation (TRL's `_generate`, timed with the device synchronised before and after) is the same code in every
mode and, with HF generate, most of the step and most of its noise (on an H200 at the 3B shape: ~8.5 of ~9 s
per step, steps spread +-12%). So each cycle's generation time is also recorded, and the table gives the rest
of the step (scoring, the old-log-prob pass, forward/backward, optimizer, credit) per mode, with its ratio,
and the whole-step ratio that the rest implies when generation costs the same in every mode
(1 + (rest - rest of the first mode) / step of the first mode); the generation medians are printed beside it
so that this can be checked.

A trainer's generation runs no probe: the decoder only carries the probe's attention function, which passes every
call through outside a capture. `--generation-ab N` checks that directly before the blocks: `model.generate` on the
same prompts with the decoder on plain SDPA and with the probe's function installed, N interleaved calls each. Each
block also starts from a collected heap (`gc.collect`, `torch.cuda.empty_cache`) and records the device memory still
allocated, so that anything a finished block leaves behind shows up.

`--replay-generation` takes generation out of the measurement: the process's first call of TRL's `_generate`
runs (and is timed: the "generation s" the whole-step ratio needs), and every later call returns a copy of its
output; the data set is then one prompt repeated, so every step trains on that one generated batch. Generation
being the same code in every mode (the generation A/B above), the step is then the part the modes differ in,
without generation's +-12% noise, and many more steps fit in a time budget (~2 s each at the 3B shape instead
of ~10).

`--steps-per-generation N` (N > 1) makes TRL score each generation batch on a no-grad old-log-prob pass in
chunks and train it as N micro-batches (as it always does with vLLM): the probes ride on that pass and the
partitions overlap with the GPU. Mode `atrl-overlap-off` waits for the whole batch right after the pass.

`--phases` then runs one more block per mode (3 generation cycles, the first dropped) with the device
synchronised around TRL's scoring (`_generate_and_score_completions`, generation included), its loss
(`_compute_loss`: the training forward, where the probes ride without an old-log-prob pass, and the wait for
the weights) and `training_step` (the rest of it is the backward), the remainder of the step being the
optimizer and the loop's own work. Synchronising costs overlap, so these blocks are not timed with the others;
they say in which phase a mode's extra time lands.

    python benchmarks/trainer_overhead.py --shape 3b --steps 8 --blocks 3        # on the GPU machine
    python benchmarks/trainer_overhead.py --shape 3b --steps-per-generation 4 --modes uniform atrl atrl-overlap-off
    python benchmarks/trainer_overhead.py --shape tiny --steps 3 --blocks 2       # smoke run on a CPU
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import statistics
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Self

import torch
from transformers import TrainerCallback

from atrl.credit import credit_mode

from .probe_overhead import (
    ALLOCATOR_COUNTS,
    allocator_activity,
    build,
    kernel_table,
    profiled_step,
    profiler_activities,
    rounds_in_budget,
    timers,
)

MODES = {"uniform": {"mode": "uniform"}, "atrl": {"mode": "atrl"},
         "atrl-overlap-off": {"mode": "atrl", "overlap": False}}


def generation_ab(model, processor, examples, reps: int, tokens: int) -> dict[str, list[float]]:
    """Seconds per `model.generate` call (sampling, exactly `tokens` new tokens) with the decoder on plain SDPA
    and with the probe's attention function installed but no capture active (as during a trainer's
    generation), interleaved, one unrecorded round first."""
    from atrl.probe import ConnectivityProbe

    from .probe_overhead import timers

    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ex.question}]}]
                for ex in examples]
    texts = [processor.apply_chat_template(m, add_generation_prompt=True) for m in messages]
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=texts, images=[[ex.image] for ex in examples], return_tensors="pt", padding=True)
    device = next(model.parameters()).device
    inputs = inputs.to(device)
    times: dict[str, list[float]] = {"plain sdpa": [], "probe installed": []}
    for rep in range(reps + 1):
        for name in times:
            probe = ConnectivityProbe(model) if name == "probe installed" else None
            start, stop = timers(device)
            start()
            model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True)
            seconds = stop() / 1000
            if rep:
                times[name].append(seconds)
            if probe is not None:
                probe.detach()
    return times


def full_collection_ms(reps: int = 5) -> dict[str, float]:
    """Median milliseconds of one full garbage collection (`gc.collect()`) with the process's heap as it is and
    with it frozen as `ATRLTrainer.train` keeps it (`heap_frozen`), interleaved: what each full collection in a
    training step costs without and with the freeze. "already frozen": the objects the process had frozen before
    (`gc.freeze` by its start-up or a library); `heap_frozen` leaves such a process as it is, so then both
    timings are of the heap as it is."""
    from atrl.rl.trainer import heap_frozen

    times: dict[str, list[float]] = {"as it is": [], "frozen": []}
    already = gc.get_freeze_count()
    for _ in range(reps):
        for name, ms in times.items():
            with heap_frozen(name == "frozen"):
                t0 = time.perf_counter()
                gc.collect()
                ms.append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ms) for name, ms in times.items()} | {"already frozen": already}


def gc_note(full_gc: dict[str, float]) -> str:
    """What the side-by-side collection timings mean when the process had frozen objects before."""
    if not full_gc["already frozen"]:
        return ""
    return (f" -- NOT APPLIED: the process had {int(full_gc['already frozen'])} objects frozen before (its start-up "
            "or a library called gc.freeze), and training leaves such a process's collector as it is")


def paired_block_ratios(block_rest: list[tuple[int, str, float]], base: str) -> dict[str, list[float]]:
    """Per mode, one ratio per round: the mode's block-median rest over `base`'s in the same round (the blocks of
    one round run back to back, so a slow stretch of the machine that spans the round cancels)."""
    by_round: dict[int, dict[str, float]] = {}
    for block, mode, rest in block_rest:
        by_round.setdefault(block, {})[mode] = rest
    modes = list(dict.fromkeys(mode for _, mode, _ in block_rest))
    return {mode: [r[mode] / r[base] for r in by_round.values() if mode in r and base in r] for mode in modes}


def cycle_sums(values: list[float], per_cycle: int) -> list[float]:
    """Per-optimizer-step values summed over generation cycles (`per_cycle` steps each), the first one dropped."""
    return [sum(values[i:i + per_cycle]) for i in range(per_cycle, len(values) - per_cycle + 1, per_cycle)]


# phase -> the trainer method whose calls it times (see --phases)
PHASES = {"scoring": "_generate_and_score_completions", "loss": "_compute_loss", "backward": "accelerator.backward",
          "training_step": "training_step"}


def phase_table_rows(steps: list[dict[str, float]], step_times: list[float], generation: list[float],
                     per_cycle: int) -> dict[str, float]:
    """Median seconds per generation cycle (the first dropped) of: generation; scoring without it; the loss's
    forward; the backward; the rest of the training step; the training step itself (device synchronised at
    each boundary) and TRL's step time (`step_time`, which is the training step unsynchronised: the optimizer
    step is in neither)."""
    scoring, loss, backward, train = (cycle_sums([s[k] for s in steps], per_cycle) for k in PHASES)
    gen = generation[1:]
    rows = {"generation": gen, "scoring, generation aside": [s - g for s, g in zip(scoring, gen)],
            "forward + loss (probes, wait for the weights)": loss, "backward": backward,
            "rest of the training step": [t - s - f - b for t, s, f, b in zip(train, scoring, loss, backward)],
            "training step (synchronised)": train, "TRL's step_time": cycle_sums(step_times, per_cycle)}
    return {name: statistics.median(v) for name, v in rows.items()}


def phase_table(phase_times: dict[str, dict[str, float]], base: str) -> list[str]:
    """Markdown rows: each phase's seconds per cycle in every mode, and each mode's difference from `base`."""
    modes = list(phase_times)
    others = [m for m in modes if m != base]
    lines = ["| phase | " + " | ".join(f"{m} s" for m in modes) + "".join(f" | {m} - {base} s" for m in others)
             + " |", "|---" * (1 + len(modes) + len(others)) + "|"]
    for phase in phase_times[base]:
        row = [phase_times[m][phase] for m in modes]
        diffs = [phase_times[m][phase] - phase_times[base][phase] for m in others]
        lines.append(f"| {phase} | " + " | ".join(f"{v:.4f}" for v in row)
                     + "".join(f" | {d:+.4f}" for d in diffs) + " |")
    return lines


# where a synchronising call is attributed: the innermost frame in one of these packages, in this order of
# preference after the innermost frame outside torch (see sync_site)
_SITE_PACKAGES = ("/atrl/", "/trl/", "/transformers/", "/accelerate/")


def sync_site(frames: list[traceback.FrameSummary]) -> tuple[str, str]:
    """(the innermost frame outside torch, this benchmark and `warnings`; the innermost frame in atrl's own code, or
    "-") of the Python stack at a synchronising CUDA call: the first names the call that synchronised, the second
    the atrl line that led to it (a sync inside TRL reached from an atrl override names both)."""
    def where(f: traceback.FrameSummary) -> str:
        for package in _SITE_PACKAGES:
            if package in f.filename:
                return f"{package.strip('/')}/{f.filename.rsplit(package, 1)[1]}:{f.lineno} ({f.name})"
        return f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} ({f.name})"

    outside = [f for f in frames if "/torch/" not in f.filename and "/atrl/bench/" not in f.filename
               and f.filename != warnings.__file__]  # the warning machinery's own frames
    ours = [f for f in frames if "/atrl/" in f.filename and "/atrl/bench/" not in f.filename]
    return (where(outside[-1]) if outside else "-"), (where(ours[-1]) if ours else "-")


class SyncSites:
    """Counts host-device synchronisations by calling site while active (torch's sync debug mode, "warn")."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}

    def record(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message):
            return self._show(message, category, filename, lineno, file, line)
        site = sync_site(traceback.extract_stack()[:-1])
        self.counts[site] = self.counts.get(site, 0) + 1
        return None

    def __enter__(self) -> Self:
        self._filters = warnings.catch_warnings()
        self._filters.__enter__()
        warnings.simplefilter("always")
        self._show, warnings.showwarning = warnings.showwarning, self.record
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = self._show
        self._filters.__exit__(*exc)


def sync_table(counts: dict[str, dict[tuple[str, str], int]], cycles: int, base: str) -> list[str]:
    """Markdown rows: synchronisations per generation cycle by site, per mode, and each mode's difference from
    `base`, the sites with a difference first."""
    modes = list(counts)
    others = [m for m in modes if m != base]
    sites = sorted({site for c in counts.values() for site in c},
                   key=lambda site: (-max((abs(counts[m].get(site, 0) - counts[base].get(site, 0)) for m in others),
                                          default=0), -counts[base].get(site, 0), site))
    lines = ["| call that synchronised | atrl line that led to it | " + " | ".join(f"{m} per cycle" for m in modes)
             + "".join(f" | {m} - {base}" for m in others) + " |", "|---" * (2 + len(modes) + len(others)) + "|"]
    for site in sites:
        per = [counts[m].get(site, 0) / cycles for m in modes]
        diffs = [(counts[m].get(site, 0) - counts[base].get(site, 0)) / cycles for m in others]
        lines.append(f"| {site[0]} | {site[1]} | " + " | ".join(f"{v:.1f}" for v in per)
                     + "".join(f" | {d:+.1f}" for d in diffs) + " |")
    totals = [sum(counts[m].values()) / cycles for m in modes]
    lines.append("| all | | " + " | ".join(f"{v:.1f}" for v in totals)
                 + "".join(f" | {(sum(counts[m].values()) - sum(counts[base].values())) / cycles:+.1f}"
                           for m in others) + " |")
    return lines


def sync_net_table(counts: dict[str, dict[tuple[str, str], int]], cycles: int, base: str) -> list[str]:
    """Markdown rows: per call that synchronised, whatever atrl line led to it, the synchronisations per generation
    cycle in each mode, only the calls whose count differs from `base` in some mode. A mode that reaches the same
    call by another route (atrl's probed forward in place of TRL's plain one) shows in `sync_table` as a pair of
    rows that cancel; here it does not show."""
    modes = list(counts)
    others = [m for m in modes if m != base]
    per_call = {m: {} for m in modes}
    for m, c in counts.items():
        for (call, _), n in c.items():
            per_call[m][call] = per_call[m].get(call, 0) + n
    calls = sorted(c for c in {c for p in per_call.values() for c in p}
                   if any(per_call[m].get(c, 0) != per_call[base].get(c, 0) for m in others))
    if not calls:
        return [f"no call synchronises more or less often in {', '.join(others)} than in {base}"]
    lines = ["| call that synchronised (any atrl line) | " + " | ".join(f"{m} per cycle" for m in modes)
             + "".join(f" | {m} - {base}" for m in others) + " |", "|---" * (1 + len(modes) + len(others)) + "|"]
    for call in calls:
        lines.append(f"| {call} | " + " | ".join(f"{per_call[m].get(call, 0) / cycles:.1f}" for m in modes)
                     + "".join(f" | {(per_call[m].get(call, 0) - per_call[base].get(call, 0)) / cycles:+.1f}"
                               for m in others) + " |")
    return lines


class StepMeter(TrainerCallback):
    """Per optimizer step: TRL's step time, the credit times the trainer logs, and the pauses of Python's garbage
    collector (`gc.callbacks`: seconds, and full collections, which walk every object of the process); the
    generation calls' seconds (`timed`); `close()` unhooks the collector meter."""

    def __init__(self, steps_per_generation: int, cuda: bool):
        self.spg, self.cuda = steps_per_generation, cuda
        self.times, self.credit, self.cpu, self.generation = [], [], [], []
        self.wait: list[float] = []
        self.gc_seconds, self.gc_full = [], []
        self._gc = [0.0, 0, 0.0]  # pause seconds and full collections since the last step, start of the current
        self.allocator_start: dict | None = None  # memory_stats() once the warm-up cycle has ended
        gc.callbacks.append(self._collecting)

    def _collecting(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc[2] = time.perf_counter()
        else:
            self._gc[0] += time.perf_counter() - self._gc[2]
            self._gc[1] += info["generation"] == 2

    def close(self) -> None:
        gc.callbacks.remove(self._collecting)

    def on_step_end(self, a, state, control, **kw):
        if self.cuda and state.global_step == self.spg:  # the warm-up cycle (not timed) ends
            self.allocator_start = torch.cuda.memory_stats()
            torch.cuda.reset_peak_memory_stats()

    def on_log(self, a, state, control, logs=None, **kw):
        if logs and "step_time" in logs:  # one micro-batch per optimizer step; steps without credit log none
            self.times.append(logs["step_time"])
            self.credit.append(logs.get("atrl/time/credit_s", 0.0))
            self.cpu.append(logs.get("atrl/time/credit_cpu_s", 0.0))
            self.wait.append(logs.get("atrl/time/credit_wait_s", 0.0))
            self.gc_seconds.append(self._gc[0])
            self.gc_full.append(self._gc[1])
            self._gc[:2] = [0.0, 0]

    def cycles(self, values: list[float]) -> list[float]:
        return cycle_sums(values, self.spg)

    def timed(self, generate):
        """TRL's `_generate` (one call per generation cycle), timed with the device synchronised."""
        def call(*a, **kw):
            if self.cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = generate(*a, **kw)
            if self.cuda:
                torch.cuda.synchronize()
            self.generation.append(time.perf_counter() - t0)
            return out
        return call


class Replay:
    """--replay-generation: the first `_generate` call runs (and is timed); every later call returns a copy."""

    def __init__(self, device: torch.device):
        self.device = device
        self.output, self.seconds, self.prompts, self.calls = None, None, 0, 0

    def wrap(self, generate):
        def call(prompts):
            if self.output is None:
                start, stop = timers(self.device)
                start()
                self.output = generate(prompts)
                self.seconds = stop() / 1000
                self.prompts = len(prompts)
            if len(prompts) != self.prompts:
                raise RuntimeError(f"replaying a generation of {self.prompts} prompts for {len(prompts)}")
            self.calls += 1
            return copy.deepcopy(self.output)  # TRL may edit what it gets
        return call


class ProfileCycle(TrainerCallback):
    """Profiles the block's second generation cycle (optimizer steps spg + 1 .. 2 spg): the first one warms up."""

    def __init__(self, steps_per_generation: int, device: torch.device):
        self.spg, self.device, self.cuda = steps_per_generation, device, device.type == "cuda"
        self.steps, self.prof, self.t0, self.result = 0, None, 0.0, None

    def on_step_begin(self, a, state, control, **kw):
        self.steps += 1
        if self.steps == self.spg + 1:
            if self.cuda:
                torch.cuda.synchronize()
            self.prof = torch.profiler.profile(activities=profiler_activities(self.device))
            self.prof.start()
            self.t0 = time.perf_counter()

    def on_step_end(self, a, state, control, **kw):
        if self.steps == 2 * self.spg and self.prof is not None:
            if self.cuda:
                torch.cuda.synchronize()
            wall_ms = 1000 * (time.perf_counter() - self.t0)
            self.prof.stop()
            self.result = profiled_step(self.prof, 1, wall_ms, self.cuda)
            self.prof = None


class Phases(TrainerCallback):
    """Seconds per optimizer step in TRL's phases, the device synchronised at each boundary (see --phases)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.open = {name: 0.0 for name in PHASES}
        self.steps: list[dict[str, float]] = []

    def wrap(self, trainer) -> None:
        def timed(name, method):
            def call(*a, **kw):
                if self.cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                try:
                    return method(*a, **kw)
                finally:
                    if self.cuda:
                        torch.cuda.synchronize()
                    self.open[name] += time.perf_counter() - t0
            return call
        for name, path in PHASES.items():
            owner, attr = (trainer.accelerator, path.split(".")[1]) if "." in path else (trainer, path)
            setattr(owner, attr, timed(name, getattr(owner, attr)))

    def on_step_end(self, a, state, control, **kw):
        self.steps.append(self.open)
        self.open = dict.fromkeys(PHASES, 0.0)


@dataclass
class TrainerResults:
    """One run of the bench. Per mode (a key of MODES): step seconds per generation cycle (`results`, the first
    cycle of each block dropped), generation seconds per cycle, the loop's credit seconds, share of the step,
    partition CPU seconds and time blocked on partitions per cycle (modes that weigh tokens), collector pauses and
    full collections per cycle. Per block: (mode, median step), (round, mode, median rest), device memory at its
    start and the allocator's activity. Then the optional tables: generation A/B, phases, syncs, profiles."""

    device: str
    shape: str
    modes: list[str]
    workers: int
    region_grid: list[int]
    steps_per_generation: int
    batch: int
    results: dict[str, list[float]] = field(default_factory=dict)
    generation: dict[str, list[float]] = field(default_factory=dict)
    credit_share: dict[str, list[float]] = field(default_factory=dict)
    credit_loop: dict[str, list[float]] = field(default_factory=dict)
    credit_cpu: dict[str, list[float]] = field(default_factory=dict)
    credit_wait: dict[str, list[float]] = field(default_factory=dict)
    gc_seconds: dict[str, list[float]] = field(default_factory=dict)
    gc_full: dict[str, list[float]] = field(default_factory=dict)
    blocks: list[tuple[str, float]] = field(default_factory=list)
    block_rest: list[tuple[int, str, float]] = field(default_factory=list)
    block_memory_gib: list[tuple[str, float]] = field(default_factory=list)
    allocator: list[dict] = field(default_factory=list)
    generation_ab: dict[str, list[float]] = field(default_factory=dict)
    full_collection_ms: dict[str, float] = field(default_factory=dict)
    replayed_generation_s: float | None = None
    generate_calls_served: int | None = None
    profiled: dict[str, dict] = field(default_factory=dict)
    phases: dict[str, dict[str, float]] = field(default_factory=dict)
    syncs: dict[str, list] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("results", "generation", "credit_share", "credit_loop", "credit_cpu", "credit_wait",
                     "gc_seconds", "gc_full"):
            getattr(self, name).update({m: [] for m in self.modes})

    def record(self, block: int, mode: str, meter: StepMeter) -> None:
        """A timed block's numbers, its first generation cycle (warm-up) dropped."""
        kept = meter.cycles(meter.times)
        if len(meter.generation) != len(kept) + 1:
            raise RuntimeError(f"{len(meter.generation)} generation calls for {len(kept) + 1} generation cycles")
        self.results[mode].extend(kept)
        self.generation[mode].extend(meter.generation[1:])
        self.gc_seconds[mode].extend(meter.cycles(meter.gc_seconds))
        self.gc_full[mode].extend(meter.cycles(meter.gc_full))
        if credit_mode(MODES[mode]["mode"]).weighs:
            self.credit_loop[mode].extend(meter.cycles(meter.credit))
            self.credit_share[mode].extend(c / t for c, t in zip(meter.cycles(meter.credit), kept))
            self.credit_cpu[mode].extend(meter.cycles(meter.cpu))
            self.credit_wait[mode].extend(meter.cycles(meter.wait))
        self.blocks.append((mode, statistics.median(kept)))
        self.block_rest.append((block, mode, statistics.median(t - g for t, g in zip(kept, meter.generation[1:]))))

    @property
    def paired_rest_ratios(self) -> dict[str, list[float]]:
        return paired_block_ratios(self.block_rest, self.modes[0]) if self.block_rest else {}

    def to_json(self) -> dict:
        skip = {"modes"}
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        return out | {"paired_rest_ratios": self.paired_rest_ratios}


class TrainerBench:
    """The model at a shape (random weights) or the tiny one, its data, and `train_block`: a fresh ATRLTrainer
    in one mode from the same starting weights, with the meters attached."""

    def __init__(self, args: argparse.Namespace):
        from atrl.data.synthetic import BarKnobs, CountKnobs, generate, to_hf_dataset
        from atrl.models.zoo import TinySize, build_tiny_vlm

        self.args = args
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        # byte-level text (a token per character of the questions): the prompt shapes docs/benchmarks.md reports
        tiny, self.processor = build_tiny_vlm("qwen2_5_vl", size=TinySize(image_size=args.image_size,
                                                                          vocabulary="bytes"))
        if args.shape == "tiny":
            self.model = tiny
        else:
            self.model = build(args.shape, self.device, torch.bfloat16)
            # the byte-level processor's special tokens are ids < 300, inside the big vocabulary: point the config
            tok, config = self.processor.tokenizer, self.model.config
            config.image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
            config.video_token_id = tok.convert_tokens_to_ids("<|video_pad|>")
            config.vision_start_token_id = tok.convert_tokens_to_ids("<|vision_start|>")
            config.vision_end_token_id = tok.convert_tokens_to_ids("<|vision_end|>")
        if args.vision_attention == "packed":
            from atrl.models.vision_attention import use_packed_vision_attention

            use_packed_vision_attention(self.model)
        size = args.image_size
        self.examples = generate(64, seed=0, families=["count", "bar_value"],
                                 knobs={"count": CountKnobs(image_size=size, cell=size // 5),
                                        "bar_value": BarKnobs(image_size=size)})
        # replaying one generation needs one prompt: TRL derives parts of the batch (e.g. mm_token_type_ids) from it
        self.data = to_hf_dataset([self.examples[0]] * len(self.examples) if args.replay_generation
                                  else self.examples)
        self.replay = Replay(self.device) if args.replay_generation else None
        self.snapshot: dict | None = None
        self.results = TrainerResults(
            device=torch.cuda.get_device_name() if self.cuda else "cpu", shape=args.shape, modes=list(args.modes),
            workers=args.workers, region_grid=list(args.region_grid),
            steps_per_generation=args.steps_per_generation, batch=args.batch)

    def generation_ab(self) -> dict[str, list[float]]:
        self.results.generation_ab = generation_ab(self.model, self.processor, self.examples[:self.args.batch],
                                                   self.args.generation_ab, self.args.ab_tokens)
        return self.results.generation_ab

    def train_block(self, mode: str, steps: int, profiler: ProfileCycle | None = None,
                    phases: Phases | None = None) -> StepMeter:
        from trl import GRPOConfig

        from atrl.rl.config import AnchorConfig
        from atrl.rl.rewards import accuracy_reward, format_reward
        from atrl.rl.trainer import ATRLTrainer

        args, cuda = self.args, self.cuda
        if self.snapshot is None:
            self.snapshot = copy.deepcopy(self.model.state_dict())
        gc.collect()  # the last block's trainer (reference cycles) and its optimizer state go now, not mid-block
        if cuda:
            torch.cuda.empty_cache()
            self.results.block_memory_gib.append((mode, torch.cuda.memory_allocated() / 2**30))
        self.model.load_state_dict(self.snapshot)
        meter = StepMeter(args.steps_per_generation, cuda)
        cfg = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, num_generations=8,
                         steps_per_generation=args.steps_per_generation,
                         max_completion_length=args.completion, max_steps=steps, logging_steps=1,
                         report_to=[], save_strategy="no", bf16=cuda, use_cpu=not cuda, seed=0,
                         learning_rate=1e-7, disable_tqdm=True, activation_checkpointing=True,
                         generation_kwargs={"min_new_tokens": args.completion})
        anchor = AnchorConfig(**MODES[mode], region_grid=tuple(args.region_grid), credit={"n_workers": args.workers})
        trainer = ATRLTrainer(model=self.model, processing_class=self.processor, args=cfg, train_dataset=self.data,
                              reward_funcs=[accuracy_reward, format_reward],
                              callbacks=[meter] + [c for c in (profiler, phases) if c is not None],
                              anchor_config=anchor)
        generate = self.replay.wrap(trainer._generate) if self.replay is not None else trainer._generate
        trainer._generate = meter.timed(generate)
        if phases is not None:
            phases.wrap(trainer)
        try:
            trainer.train()
        finally:
            meter.close()
        if cuda and meter.allocator_start is not None:  # what the allocator did in the timed cycles
            self.results.allocator.append({
                "mode": mode, **allocator_activity(meter.allocator_start, torch.cuda.memory_stats()),
                "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30})
        if trainer.probe is not None:
            trainer.probe.detach()
        if self.replay is not None:
            self.results.replayed_generation_s, self.results.generate_calls_served = self.replay.seconds, \
                self.replay.calls
        return meter

    def run_blocks(self, say=print) -> None:
        """An unrecorded warm-up block, one full collection timed, then rounds of blocks (a block per mode, the
        order reversed every other round), as many as --seconds allows."""
        args, spg = self.args, self.args.steps_per_generation
        # the process's first training pays one-off costs (allocator growth, kernel selection) that would
        # otherwise land on whichever mode runs first
        self.train_block(args.modes[-1], 2 * spg)
        self.results.full_collection_ms = full_collection_ms()
        say(gc_line(self.results.full_collection_ms))
        rounds, block, t0 = args.blocks, 0, time.perf_counter()
        while block < rounds:
            for mode in (args.modes if block % 2 == 0 else args.modes[::-1]):
                meter = self.train_block(mode, args.steps)
                self.results.record(block, mode, meter)
                kept = meter.cycles(meter.times)
                say(f"block {block} {mode}: median step {statistics.median(kept):.3f} s over {len(kept)} steps, "
                    f"of which generation {statistics.median(meter.generation[1:]):.3f} s")
            if block == 0 and args.seconds > 0:
                rounds = rounds_in_budget(args.seconds, time.perf_counter() - t0, args.blocks, least=2)
                say(f"{rounds} rounds of blocks fit in {args.seconds:g} s")
            block += 1

    def run_phases(self) -> None:
        spg = self.args.steps_per_generation
        for mode in self.args.modes:
            meter = Phases(self.cuda)
            step = self.train_block(mode, 3 * spg, phases=meter)
            self.results.phases[mode] = phase_table_rows(meter.steps, step.times, step.generation, spg)

    def run_sync_debug(self) -> dict[str, dict]:
        counts = {}
        for mode in self.args.modes:
            with SyncSites() as sites:
                self.train_block(mode, 3 * self.args.steps_per_generation)
            counts[mode] = sites.counts
        self.results.syncs.update({m: [[*site, n] for site, n in c.items()] for m, c in counts.items()})
        return counts

    def run_profile(self) -> None:
        for mode in self.args.modes:
            profiler = ProfileCycle(self.args.steps_per_generation, self.device)
            self.train_block(mode, 2 * self.args.steps_per_generation, profiler)
            self.results.profiled[mode] = profiler.result


def gc_line(full_gc: dict[str, float]) -> str:
    return (f"one full garbage collection, median of 5: {full_gc['as it is']:.1f} ms with the heap as it is, "
            f"{full_gc['frozen']:.2f} ms with it frozen (as training keeps it){gc_note(full_gc)}")


def generation_ab_table(ab: dict[str, list[float]], batch: int, tokens: int, reps: int) -> list[str]:
    plain = statistics.median(ab["plain sdpa"])
    lines = [f"# model.generate, {batch} prompts x {tokens} new tokens, {reps} interleaved calls each (no capture "
             "active, as in a trainer's generation)", "| decoder attention | median s | min-max s | ratio |",
             "|---|---|---|---|"]
    for name, ts in ab.items():
        lines.append(f"| {name} | {statistics.median(ts):.3f} | {min(ts):.3f}-{max(ts):.3f} | "
                     f"{statistics.median(ts) / plain:.4f} |")
    return lines


def step_report(r: TrainerResults, args: argparse.Namespace) -> list[str]:
    """The step-time table (a "step" is one generation cycle), the noise floor, the collector, memory and
    allocator lines."""
    first = r.modes[0]
    med_0 = statistics.median(r.results[first])
    first_blocks = [t for m, t in r.blocks if m == first]
    noise = (max(first_blocks) - min(first_blocks)) / med_0 if len(first_blocks) > 1 else float("nan")
    lines = [f"# trainer step time, Qwen2.5-VL-{r.shape} shape, {args.completion}-token completions, "
             f"{r.batch} x {r.steps_per_generation} completions per step, credit n_workers={r.workers}, "
             f"vision attention {args.vision_attention}, device {r.device}",
             f"| mode | median step s | steps | ratio to {first} | loop time in credit, s per step (share) | "
             "of which blocked on partitions, s | partition CPU s per step |", "|---|---|---|---|---|---|---|"]
    for mode in r.modes:
        med = statistics.median(r.results[mode])
        share, cpu, wait = r.credit_share[mode], r.credit_cpu[mode], r.credit_wait[mode]
        share_s = (f"{statistics.median(r.credit_loop[mode]):.4f} ({100 * statistics.median(share):.2f}%)"
                   if share else "-")
        wait_s = f"{statistics.median(wait):.4f}" if wait else "-"
        cpu_s = f"{statistics.median(cpu):.3f}" if cpu else "-"
        lines.append(f"| {mode} | {med:.3f} | {len(r.results[mode])} | {med / med_0:.4f} | {share_s} | {wait_s} | "
                     f"{cpu_s} |")
    full_gc = r.full_collection_ms
    lines.append(f"spread of the {first} blocks (noise floor): {100 * noise:.2f}%")
    lines.append("garbage-collector pauses per step, median (max) s, and full collections per step: "
                 + ", ".join(f"{m} {statistics.median(r.gc_seconds[m]):.4f} ({max(r.gc_seconds[m]):.4f}) s, "
                             f"{statistics.mean(r.gc_full[m]):.2f}" for m in r.modes)
                 + f"; one full collection {full_gc['as it is']:.1f} ms with the heap as it is, "
                   f"{full_gc['frozen']:.2f} ms frozen (training freezes it){gc_note(full_gc)}")
    if r.block_memory_gib:
        lines.append("device memory allocated at each block's start (GiB): "
                     + ", ".join(f"{m} {gib:.2f}" for m, gib in r.block_memory_gib))
    if r.allocator:
        def counts(a: dict) -> str:
            return "/".join("-" if a[k] is None else str(a[k]) for k in ALLOCATOR_COUNTS)

        lines.append("allocator in each block's timed cycles, the unrecorded warm-up block first (retries, "
                     "cudaMalloc, cudaFree, device syncs; peak allocated / reserved GiB): " + ", ".join(
                         f"{a['mode']} {counts(a)} {a['peak_allocated_gib']:.1f}/{a['peak_reserved_gib']:.1f}"
                         for a in r.allocator))
    return lines


def rest_report(r: TrainerResults) -> list[str]:
    """The step without generation per mode, its ratios, and the whole-step ratio it implies."""
    first = r.modes[0]
    rest = {m: [t - g for t, g in zip(r.results[m], r.generation[m])] for m in r.modes}
    rest_0 = statistics.median(rest[first])
    # the whole step (one generation cycle) the rest is set against: as measured, or, when replaying, the rest
    # with the one real generation added back
    replayed = r.replayed_generation_s
    step_0 = rest_0 + replayed if replayed is not None else statistics.median(r.results[first])
    paired = r.paired_rest_ratios
    lines = ["# the step without generation (same run; generation is the same code in every mode)"
             + (f"; generation replayed, the one real call took {replayed:.3f} s" if replayed is not None else ""),
             f"| mode | median generation s | median rest s | rest IQR s | rest ratio to {first} | "
             "paired rest ratio (min-max over rounds) | whole-step ratio implied (paired) |",
             "|---|---|---|---|---|---|---|"]
    for mode in r.modes:
        m = statistics.median(rest[mode])
        q = statistics.quantiles(rest[mode], n=4) if len(rest[mode]) > 1 else [m, m, m]
        pr = paired[mode]
        pm = statistics.median(pr)
        lines.append(f"| {mode} | {statistics.median(r.generation[mode]):.3f} | {m:.3f} | {q[0]:.3f}-{q[2]:.3f} | "
                     f"{m / rest_0:.4f} | {pm:.4f} ({min(pr):.4f}-{max(pr):.4f}) | {1 + (m - rest_0) / step_0:.4f} "
                     f"({1 + (pm - 1) * rest_0 / step_0:.4f}) |")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="atrl bench trainer", description=__doc__.split(chr(10))[0])
    ap.add_argument("--shape", default="3b", choices=["3b", "7b", "tiny"])
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per timed block")
    ap.add_argument("--blocks", type=int, default=3, help="rounds of blocks (a block per mode in each)")
    ap.add_argument("--seconds", type=float, default=0.0,
                    help="time budget for the rounds of blocks: as many as fit (at least 2, at most --blocks), "
                         "from the first round's time; 0: --blocks rounds")
    ap.add_argument("--completion", type=int, default=256, help="completion tokens (generated exactly)")
    ap.add_argument("--image-size", type=int, default=448, help="synthetic images' side in pixels")
    ap.add_argument("--workers", type=int, default=8, help="credit n_workers (the recipes' value)")
    ap.add_argument("--region-grid", type=int, nargs=2, default=(4, 4), metavar=("ROWS", "COLS"),
                    help="anchor.region_grid (a smoke run on a tiny model uses 2 2: fewer regions than head "
                         "channels, so the probe's narrow values run)")
    ap.add_argument("--steps-per-generation", type=int, default=1,
                    help="TRL's steps_per_generation (> 1: an old-log-prob pass, as with vLLM)")
    ap.add_argument("--batch", type=int, default=8, help="per-device micro-batch (completions)")
    ap.add_argument("--modes", nargs="+", default=["uniform", "atrl"], choices=list(MODES))
    ap.add_argument("--generation-ab", type=int, default=0, metavar="N",
                    help="first time N generate calls with and without the probe's attention installed")
    ap.add_argument("--ab-tokens", type=int, default=64, help="new tokens per call of --generation-ab")
    ap.add_argument("--profile", action="store_true",
                    help="after the blocks, profile one generation cycle of each mode: device busy / idle time, "
                         "the kernels and host-side ops that differ")
    ap.add_argument("--phases", action="store_true",
                    help="after the blocks, one block per mode with the device synchronised around scoring, "
                         "the loss's forward and the training step: where each mode's step time goes")
    ap.add_argument("--sync-debug", action="store_true",
                    help="after the blocks, one block per mode with torch's CUDA sync debug mode on: every host-device "
                         "synchronisation counted by the call that made it and the atrl line that led there")
    ap.add_argument("--replay-generation", action="store_true",
                    help="generate once, then train every step on a copy of that batch (see the module docstring)")
    ap.add_argument("--vision-attention", choices=["packed", "per_window"], default="packed",
                    help="the vision tower's attention: a few SDPA calls per layer, one per segment length (the "
                         "recipes' default, model.vision_attention) or transformers' call per window")
    ap.add_argument("--out", default=None, help="JSON file for the raw numbers (written after each stage)")
    args = ap.parse_args(argv)
    if args.steps % args.steps_per_generation or args.steps < 2 * args.steps_per_generation:
        ap.error("--steps must be a multiple of --steps-per-generation, at least two generation cycles")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def say(*lines: str) -> None:
        print("\n".join(lines), flush=True)

    bench = TrainerBench(args)
    r = bench.results

    def save() -> None:
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(r.to_json(), fh, indent=1)

    if args.generation_ab:
        say(*generation_ab_table(bench.generation_ab(), args.batch, args.ab_tokens, args.generation_ab))
    bench.run_blocks(say)
    say(*step_report(r, args), *rest_report(r))
    save()  # before the profiled blocks, which run last: whatever happens there, the tables above are kept
    first = args.modes[0]
    if args.phases:
        bench.run_phases()
        say("# where the step goes, per generation cycle (device synchronised at each phase; median of 2 cycles)",
            *phase_table(r.phases, first))
        save()
    if args.sync_debug and not bench.cuda:
        say("sync debug: needs CUDA (host-device synchronisations); skipped on this device")
    elif args.sync_debug:
        counts = bench.run_sync_debug()
        # the block's first cycle (warm-up, first calls) is counted too: 3 cycles
        say("# host-device synchronisations per generation cycle, by the call that synchronised (sync debug mode, "
            "one block of 3 cycles per mode)", *sync_table(counts, 3, first),
            f"# the same, net per call: the calls that synchronise more or less often than in {first}, whatever "
            "atrl line led to them", *sync_net_table(counts, 3, first))
        save()
    if args.profile:
        bench.run_profile()
        say("# one generation cycle per mode under the profiler (after the blocks)", *kernel_table(r.profiled))
        save()


if __name__ == "__main__":
    main()
