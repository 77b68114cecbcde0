"""ATRLTrainer: TRL's GRPOTrainer with anchor-token credit assignment.

What it adds to GRPOTrainer, and where (the overrides are small on purpose):

1. Measuring. `atrl.probe` rides on a forward pass TRL already makes: the no-grad old-log-prob pass in
   `_generate_and_score_completions` when TRL makes one, else the training forward in `_compute_loss`.
   Both go through `_get_per_token_logps_and_entropies`, which this class wraps in `record_forwards`.
2. Deciding. `atrl.credit.assign_credit` turns (B, T) connectivity and (B, T, R) region profiles into (B, T)
   weights with mean 1 over each completion.
3. Applying. The (B,) group-normalised advantages become (B, T) per-token advantages
   `A_AT(i, t) = W(C_k(t)) * A(i)`; TRL's loss (GRPO, DAPO, Dr.GRPO, ...) accepts (B, T) advantages as they are.
   `mode: uniform` skips all of it, so it is exactly TRL's loss.

Also: metrics every step (anchor fraction, anchor / other connectivity, bimodality, weight statistics, time in
credit assignment), a non-finite loss zeroes that step's gradients and is counted instead of corrupting the
weights, checkpoints are marked complete only after every file is written (see `checkpoints.py`), and with
gradient checkpointing the input embeddings keep one `requires_grad` hook instead of gaining two per step.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate.utils import gather
from torch.nn.utils import get_total_norm
from transformers import TrainerCallback
from trl import GRPOTrainer
from trl.data_utils import is_conversational

from ..credit import anchor_credit_sums
from ..models.masking import mask_image_patches
from ..probe import ConnectivityParts, ConnectivityProbe, ProbeError
from ..probe.dependency import blank_image_kl, perception_kl, sampled_token_dependency
from .checkpoints import CheckpointSaveError, check_checkpoint_space, free_space_line, mark_checkpoint_complete
from .config import AnchorConfig
from .dynamic import GroupFiller
from .handoff import CreditInFlight
from .health import StallWatch
from .rows import learning_rows, loss_scale, pad_rows, rows_to_keep, select_rows, skips_rows
from ..data.video import decode_row_videos
from .videos import VIDEO_KEYS, VideoForward, WithBatchVideos, tokenize_with_videos
from .vllm_rollouts import template_ids

logger = logging.getLogger("atrl")


def mixes_images_and_text(dataset, unknown: bool = True) -> bool:
    """Whether a data set has both rows with images and rows without, read from its Arrow columns (`images`
    lists, or an `image` column with nulls) without decoding an image; `unknown` where that cannot be read (an
    iterable data set). A selection is judged by the whole table it was taken from: it may be called mixed when
    its own rows are not, never the reverse."""
    import pyarrow.compute as pc

    table = getattr(dataset, "data", None)
    names = getattr(dataset, "column_names", None) or []
    if table is None:
        return unknown
    if "images" in names:
        has = pc.greater(pc.fill_null(pc.list_value_length(table.column("images")), 0), 0)
        return bool(pc.any(has).as_py()) and not bool(pc.all(has).as_py())
    if "image" in names:
        nulls, n = table.column("image").null_count, len(dataset)
        return 0 < nulls < n
    return False


def _has_videos(dataset) -> bool:
    """Whether a data set has a `videos` column (read from its features, without reading rows)."""
    features = getattr(dataset, "features", None)
    return features is not None and "videos" in features


def run_loggers(trainer) -> list:
    """The loggers of a run that take atrl's own records (anchor reports, the recipe): TensorBoard's writer (once
    training began) and a live W&B run (the `wandb` module)."""
    import sys

    from transformers.integrations import TensorBoardCallback

    found = [cb.tb_writer for cb in trainer.callback_handler.callbacks
             if isinstance(cb, TensorBoardCallback) and cb.tb_writer is not None]
    wandb = sys.modules.get("wandb")  # imported by transformers' W&B callback when it logs
    if wandb is not None and getattr(wandb, "run", None) is not None:
        found.append(wandb)
    return found


class RecipeLogCallback(TrainerCallback):
    """At the start of training, the resolved recipe (YAML text) goes where the run logs: TensorBoard text
    `atrl/recipe`, and W&B's run config under `atrl` (runs filtered and grouped by anchor.mode, credit options,
    data)."""

    def __init__(self, trainer, recipe_yaml: str):
        self.trainer, self.recipe_yaml = trainer, recipe_yaml

    def on_train_begin(self, args, state, control, **kwargs):
        import yaml

        if not state.is_world_process_zero:
            return
        for sink in run_loggers(self.trainer):
            if hasattr(sink, "add_text"):
                sink.add_text("atrl/recipe", "```yaml\n" + self.recipe_yaml + "```", state.global_step)
                sink.flush()
            else:
                sink.config.update({"atrl": yaml.safe_load(self.recipe_yaml)}, allow_val_change=True)


def grads_finite(parameters) -> bool:
    """Whether every gradient entry is finite: one fused max-abs reduction (a few kernels, one host sync) rather
    than a check per parameter tensor. The inf-norm cannot overflow, so only a NaN or an inf makes it non-finite."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return bool(torch.isfinite(get_total_norm(grads, float("inf")))) if grads else True


def keep_one_input_grad_hook(model) -> None:
    """Make `enable_input_require_grads` replace its embedding hook rather than add another.

    transformers' version registers a new forward hook on the input embeddings each time and forgets the old
    one without removing it; TRL turns gradient checkpointing off and on around generation, which calls it, so
    with `gradient_checkpointing` the embeddings collect two more hooks per step (1 + 2 n after n steps, tiny
    model, CPU), each run on every forward, generated tokens included: 0.7 ms per call after 1,000 steps (CPU).
    """
    from transformers import PreTrainedModel

    for module in model.modules():
        if not isinstance(module, PreTrainedModel) or getattr(module.enable_input_require_grads, "atrl_once", False):
            continue

        def enable_once(module=module, enable=module.enable_input_require_grads) -> None:
            module.disable_input_require_grads()
            enable()

        enable_once.atrl_once = True
        module.enable_input_require_grads = enable_once


@contextmanager
def heap_frozen(enabled: bool = True) -> Iterator[None]:
    """Keeps the objects alive at the start of the block out of Python's full garbage collections until it ends.

    A full collection walks every object the collector tracks: about 470,000 once torch, transformers, TRL and a
    trainer are loaded: about 0.2-0.3 s each (`atrl bench trainer`'s collector meter; docs/benchmarks.md,
    Trainer overhead), and where a step's allocations fill the oldest generation, one per optimizer step in
    every credit mode, and a source of step-to-step noise. Frozen after a collection (`gc.freeze`), those
    objects are skipped;
    the objects made while training are collected as before. A process that has frozen objects itself is
    left as it is (logged: its full collections still walk the rest of its heap), since `gc.unfreeze` at the
    end would give back its objects with ours."""
    if enabled and gc.get_freeze_count():
        logger.info("Python's garbage collector left as it is: the process already holds %d frozen objects "
                    "(gc.freeze), so training does not freeze its heap; full collections walk the %d objects "
                    "still tracked", gc.get_freeze_count(), len(gc.get_objects()))
        enabled = False
    if not enabled:
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class ATRLTrainer(GRPOTrainer):
    """GRPOTrainer + AT-RL. Takes every GRPOTrainer argument, plus `anchor_config`.

    `freeze_heap` (True): training runs under `heap_frozen`; set it False on the instance or a subclass to
    leave Python's garbage collector as it is."""

    freeze_heap = True

    def __init__(self, *args, anchor_config: AnchorConfig | None = None, video_bounds=None, **kwargs):
        processing_class = kwargs.get("processing_class")
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if tokenizer is not None and getattr(tokenizer, "padding_side", "left") != "left":
            # TRL left-pads prompt_ids but re-runs the processor for the image inputs with the tokenizer's own
            # padding side; with right padding, mm_token_type_ids no longer line up with the prompt and Qwen's
            # M-RoPE positions are wrong (or get_rope_index fails when an image's tokens are cut).
            tokenizer.padding_side = "left"
        args_ = kwargs.get("args", args[2] if len(args) > 2 else None)
        if getattr(args_, "use_vllm", False):  # vLLM rollouts from the trainer's exact prompts (atrl.rl.vllm_rollouts)
            from .vllm_rollouts import generation_class, llm_kwargs_for, make_generation_class, media_token_ids

            model = kwargs.get("model", args[0] if args else None)
            if isinstance(model, str):
                raise ValueError("ATRLTrainer with trl.use_vllm=true takes a loaded model, not a path")
            media = media_token_ids(processing_class, model.config)
            device = "cpu" if getattr(args_, "use_cpu", False) or not torch.cuda.is_available() else "cuda"
            with generation_class(make_generation_class(llm_kwargs_for(model, device), media)):
                super().__init__(*args, **kwargs)
        else:
            super().__init__(*args, **kwargs)
        self._suppress_video_tokens()
        self.anchor = anchor_config or AnchorConfig()
        self.credit_options = self.anchor.credit_options()
        self.papo = self.anchor.papo_options()
        self._papo_capture: list | None = None  # the training forward's (logps, entropies), while PAPO needs them
        self._papo_draws = 0  # masks drawn for PAPO so far (each micro-batch gets its own)
        self._generation_seconds = 0.0  # rollout time since the last optimizer step (time/generation_s)
        self.capture_site = self.anchor.capture_site(self.args)
        keep_one_input_grad_hook(self.model)
        self.probe: ConnectivityProbe | None = None
        if self.anchor.needs_probe:
            self.probe = ConnectivityProbe(self.accelerator.unwrap_model(self.model), layers=self.anchor.probe_layers,
                                           region_grid=self.anchor.region_grid, processor=self.processing_class,
                                           time_bins=self.anchor.time_bins)
        self._scoring = False
        self._scored: CreditInFlight | None = None  # rows scored on the old-log-prob pass, being partitioned
        self._pending: dict[str, Any] | None = None  # the micro-batch whose training forward is being probed
        self._credit_batch = 0
        self._credit_batches: dict[str, tuple[int, CreditInFlight]] = {}  # "train" / "eval" -> (number, credit)
        self._credit_seconds = 0.0  # trainer time in credit since the last weights were applied
        self.last_credit: dict[str, Any] | None = None  # the latest micro-batch's credit inputs and outputs
        self._credit_share: list[torch.Tensor] = []  # (2,) per micro-batch since the last log: anchors', all
        self.nonfinite_losses = 0
        self.stall_watch = StallWatch(self.args.max_completion_length, self.args.num_generations)  # warns a run
        # whose completions are all cut, or whose groups all score alike, for STALL_STEPS steps
        self._reported_step = -1  # the step whose anchor report is written (anchor.report_steps)
        self._pregenerated = None  # dynamic sampling: the chosen rows' rollouts, which _generate hands TRL once
        self._prescored: torch.Tensor | None = None  # and their rewards per function, for _calculate_rewards
        self.dynamic: GroupFiller | None = None
        # the training forward leaves out zero-advantage rows (atrl.rl.rows) unless the loss reads every row
        self._skip_rows = False
        if self.anchor.skip_zero_advantage:
            why_not = skips_rows(self.args, self.anchor.credit_mode, self.papo, self.aux_loss_enabled,
                                 self._entropy_bonus_enabled)
            self._skip_rows = why_not is None
            if why_not is not None and self.accelerator.is_main_process:
                logger.info("anchor.skip_zero_advantage: every row is trained (%s)", why_not)
        if self.anchor.dynamic_sampling:
            self.dynamic = self._group_filler()
        self.recipe_yaml: str | None = None  # set by atrl.rl.run.run_training: saved into each checkpoint
        # video prompts (atrl.rl.videos): the bounds they are decoded within, this batch's decoded videos, and the
        # video inputs of the rows being scored or trained
        from ..data.video import VideoBounds

        self.video_bounds = video_bounds or VideoBounds()
        self._batch_videos: list | None = None
        self._video_rows: list | None = None
        if any(_has_videos(d) for d in (self.train_dataset, self.eval_dataset) if d is not None):
            self._check_video_support()
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if self.accelerator.num_processes > 1 and plugin is not None and plugin.zero_stage == 3 and any(
                mixes_images_and_text(d, unknown=False) for d in (self.train_dataset, self.eval_dataset)
                if d is not None):
            raise ValueError(
                f"DeepSpeed ZeRO-3 with {self.accelerator.num_processes} processes on data that mixes prompts with "
                "and without images: ZeRO-3 gathers each layer's weights with a collective as the layer runs, and "
                "a process whose batch has no image skips the vision tower, so the processes wait on each other "
                "(a hang under NCCL). Use ZeRO-2 (configs/accelerate/zero2.yaml) or DDP, or keep the rows with images")
        if self.accelerator.num_processes > 1 and self.log_multimodal and any(
                mixes_images_and_text(d) for d in (self.train_dataset, self.eval_dataset) if d is not None):
            # TRL gathers a batch's images for its completion logs only on the ranks whose batch has one: with
            # some text-only rows, a rank holding only those skips the collective and the ranks deadlock
            self.log_multimodal = False
            if self.accelerator.is_main_process:
                logger.info("trl.log_multimodal off: the data mix prompts with and without images, and TRL's "
                            "image logging would hang a multi-process run on a batch without images on one rank")

    def _suppress_video_tokens(self) -> None:
        """Rollouts never sample a video token, as TRL's never sample an image token: a sampled one would count
        against the video's features in every forward given the video ("video features and video tokens do not
        match" at some step N)."""
        video = getattr(self.accelerator.unwrap_model(self.model).config, "video_token_id", None)
        config = getattr(self, "generation_config", None)
        if video is None or config is None or getattr(config, "suppress_tokens", None) is None:
            return
        if video not in config.suppress_tokens:
            config.suppress_tokens = [*config.suppress_tokens, video]
            self.generation_kwargs["suppress_tokens"] = list(config.suppress_tokens)

    def _check_video_support(self) -> None:
        """A data set with videos: the processor must take them, and the run must use only the paths that carry
        them (not yet: dynamic sampling, vLLM, tools, the masked- or blank-image measures, PAPO)."""
        if getattr(self.processing_class, "video_processor", None) is None:
            raise ValueError(f"the data has videos, and the processor ({type(self.processing_class).__name__}) takes "
                             "none: use a checkpoint whose processor has a video processor (Qwen2-VL, Qwen2.5-VL, "
                             "Qwen3-VL families)")
        if getattr(self.model.config, "video_token_id", None) is None:
            raise ValueError("the data has videos, and the model's config names no video_token_id")
        unsupported = [name for name, on in (
            ("anchor.dynamic_sampling", self.anchor.dynamic_sampling), ("trl.use_vllm", self.use_vllm),
            ("tools", bool(self.tools)), ("anchor.papo", self.papo is not None),
            (f"anchor.mode {self.anchor.mode!r} (it masks or blanks images)",
             self.anchor.credit_mode.measure in ("blank_image_kl", "masked_image"))) if on]
        if unsupported:
            raise ValueError(f"video rows do not run with {', '.join(unsupported)} yet: turn it off, or train on "
                             "image rows")

    def _group_filler(self) -> GroupFiller:
        """Dynamic sampling's state, after checking the run can have it."""
        if self.tools or self.environment_factories is not None or self.rollout_func is not None:
            raise ValueError("anchor.dynamic_sampling works on plain rollouts: not with tools, environments or a "
                             "rollout_func (their rollouts are not TRL's _generate of the row's prompt alone)")
        dataset = self.train_dataset
        if dataset is None or not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise ValueError("anchor.dynamic_sampling draws prompts at random from the training set, which needs a "
                             f"data set with a length and rows by index (got {type(dataset).__name__})")
        return GroupFiller(self.anchor.dynamic_sampling_rounds,
                           seed=self.args.seed * 1_000_003 + 104_729 + self.accelerator.process_index)

    # ---------------------------------------------------------------------------------------------- measuring

    def _records_here(self, model) -> bool:
        if not self.anchor.credit_mode.scored_in_forward:
            return False
        if self._scoring:
            return self.capture_site == "old_logps" and model is self.model
        return self._pending is not None and self.capture_site == "train_forward"

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args,
                                           compute_entropy: bool = False, **kwargs):
        out = self._measured_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *args,
                                                 compute_entropy=compute_entropy, **kwargs)
        if self._papo_capture is not None:  # the loss's own forward, for PAPO's terms (gradients kept)
            self._papo_capture.append(out)
        return out

    def _measured_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args,
                                      compute_entropy: bool = False, **kwargs):
        if not self._records_here(model):
            return self._scoring_forward(model, input_ids, attention_mask, logits_to_keep, *args,
                                         compute_entropy=compute_entropy, **kwargs)
        want_entropy = compute_entropy or self.anchor.credit_mode.needs_entropy
        mask = attention_mask[:, -logits_to_keep:].bool()
        credit = CreditInFlight(self.credit_options)
        if self.probe is None:  # entropy mode: no probes, the entropies decide
            logps, ent, aux = self._scoring_forward(
                model, input_ids, attention_mask, logits_to_keep, *args, compute_entropy=want_entropy, **kwargs)
            with self._credit_clock():
                credit.submit_now(0, mask.cpu(), None, None, ent.detach().cpu())
        else:
            records: list = []

            def rows_of(capture, start: int) -> tuple[torch.Tensor, ConnectivityParts]:
                """The call's rows of the mask and their connectivity parts (on the device: 3 kernels)."""
                rows_mask = mask[start:start + capture.batch_size]
                return rows_mask, capture.connectivity_parts(rows_mask, self.anchor.sink_debias)

            def hand_on(capture) -> None:  # inside the forward, right after the call's last probed layer
                if self.anchor.overlap:
                    start = sum(c.batch_size for c in records)
                    with self._credit_clock():
                        credit.hand_on(start, *rows_of(capture, start))
                records.append(capture)

            with self.probe.record_forwards(logits_to_keep, on_record=hand_on):
                logps, ent, aux = self._scoring_forward(
                    model, input_ids, attention_mask, logits_to_keep, *args, compute_entropy=want_entropy, **kwargs)
            if sum(c.batch_size for c in records) != mask.shape[0]:
                raise ProbeError(f"the probes recorded {sum(c.batch_size for c in records)} rows in "
                                 f"{len(records)} forward calls, the batch has {mask.shape[0]}")
            if not self.anchor.overlap:  # the whole batch, now
                with self._credit_clock():
                    start = 0
                    for capture in records:
                        credit.submit_parts_now(start, *rows_of(capture, start))
                        start += capture.batch_size
        if self._scoring:
            self._scored = credit
        else:
            self._pending["advantages"] = self._weighted_advantages(self._pending["advantages"], credit,
                                                                    completion_ids=input_ids[:, -logits_to_keep:])
        return logps, (ent if compute_entropy else None), aux

    def _scoring_forward(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        """TRL's scoring loop, the model called with the rows' video inputs when the batch has videos."""
        for key in VIDEO_KEYS:  # TRL's own processing of a mixed batch made them for the whole batch: by row below
            kwargs.pop(key, None)
        if self._video_rows is not None:
            if len(self._video_rows) != input_ids.shape[0]:
                raise RuntimeError(f"video inputs for {len(self._video_rows)} rows, a forward of {input_ids.shape[0]}")
            config = self.accelerator.unwrap_model(self.model).config
            model = VideoForward(model, self._video_rows, getattr(config, "image_token_id", None),
                                 config.video_token_id)
        return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *args,
                                                          **kwargs)

    @contextmanager
    def _credit_clock(self) -> Iterator[None]:
        """Adds the block's wall time to the credit time logged with the next applied weights."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._credit_seconds += time.perf_counter() - t0

    # ---------------------------------------------------------------------------------------------- deciding

    def _weighted_advantages(self, advantages: torch.Tensor, credit: CreditInFlight,
                             rows: list[int] | None = None, completion_ids: torch.Tensor | None = None
                             ) -> torch.Tensor:
        """(b,) or (b, T) advantages of `rows` (default: all) -> (b, T) `W(C_k(t)) * A(i)`.

        Waits for those rows' partitions; logs the step's credit statistics and the time the trainer spent on
        credit (submitting, waiting, assembling: `atrl/time/credit_s`; the part of it spent blocked on the hand-offs
        and the partitions: `atrl/time/credit_wait_s`) next to the workers' CPU time. On a report step
        (`anchor.report_steps`), `completion_ids` (b, T) of the rows go into the step's anchor report."""
        t0 = time.perf_counter()
        pending = credit.ready()
        cpu0 = pending.cpu_seconds
        measured = self.anchor.credit_mode.decides_from_score
        try:
            pending.wait(rows)
            waited = time.perf_counter() - t0
            result = pending.result(rows)
        except (ValueError, ProbeError) as err:
            if not self.anchor.fallback_to_uniform:
                raise
            logger.warning("step %d: credit assignment failed (%s); these rows use uniform weights",
                           self.state.global_step, err)
            self._credit_seconds = 0.0
            # every process reduces the same metric names in the same order, whatever happened on it
            self._log_metric_values({name: [] for name in self._metric_names(measured)} |
                                    {"atrl/credit_fallback": [1.0]})
            return advantages
        weights = result.weights.to(dtype=advantages.dtype)
        if advantages.is_cuda:
            weights = weights.pin_memory()  # so that the copy to the device does not wait for the device's queue
        weights = weights.to(advantages.device, non_blocking=True)
        conn, prof, mask, entropy = pending.inputs(rows if rows is not None else pending.rows)
        # advantages_in stays on the trainer's device: reading it back would sync with the device every step
        self.last_credit = {"conn": conn, "profile": prof, "mask": mask, "entropy": entropy, "result": result,
                            "advantages_in": advantages.detach()}
        credit_s = self._credit_seconds + time.perf_counter() - t0
        self._credit_seconds = 0.0
        w = result.weights[mask]
        stats = {
            "atrl/credit_fallback": [0.0],
            "atrl/anchor_fraction": result.anchor_fraction.tolist(),
            "atrl/weight_max": [float(w.max())] if w.numel() else [],
            "atrl/weight_min": [float(w.min())] if w.numel() else [],
            "atrl/weight_std": [float(w.std())] if w.numel() > 1 else [],
            "atrl/time/credit_s": [credit_s],
            "atrl/time/credit_wait_s": [waited],
            "atrl/time/credit_cpu_s": [pending.cpu_seconds - cpu0],
        }
        if measured:  # statistics of the connectivity (or visual-dependency score) itself
            stats.update({
                "atrl/anchor_conn": result.anchor_conn.tolist(),
                "atrl/other_conn": result.other_conn.tolist(),
                "atrl/bimodality": result.bimodality.tolist(),
                "atrl/num_parts": result.num_parts.float().tolist(),
                "atrl/degenerate": result.degenerate.float().tolist(),
                "atrl/mean_conn": [float(conn[mask].mean())] if mask.any() else [],
            })
        assert list(stats) == self._metric_names(measured)
        self._log_metric_values(stats)
        if completion_ids is not None and self._report_due():
            self._anchor_report(completion_ids, advantages, conn, mask, result)
        base = advantages if advantages.dim() == 2 else advantages[:, None]
        weighted = weights * base
        if self.model.training:  # the anchors' share of the credit, read back at the next log (no sync here)
            self._credit_share.append(anchor_credit_sums(
                weighted, result.boosted_mask.to(weighted.device, non_blocking=True)))
        return weighted

    def _report_due(self) -> bool:
        every, step = self.anchor.report_steps, self.state.global_step
        return bool(every) and step % every == 0 and step != self._reported_step and self.model.training \
            and self.is_world_process_zero()

    def _anchor_report(self, completion_ids: torch.Tensor, advantages: torch.Tensor, conn: torch.Tensor,
                       mask: torch.Tensor, result) -> None:
        """`<output_dir>/anchors/step-N.html`: up to 8 of this micro-batch's completions as AT-RL weighted them
        (N optimizer steps done before it); a PNG preview of it goes to TensorBoard and W&B where they log."""
        from ..viz.plots import sampled_anchors_html, sampled_anchors_png, sampled_views

        step, self._reported_step = self.state.global_step, self.state.global_step
        n = min(8, completion_ids.shape[0])
        ids = completion_ids[:n].cpu()  # waits for the device: a report step's sync (the next copy finds it drained)
        adv = advantages[:n].float().cpu()
        adv = adv if adv.dim() == 1 else adv.sum(1) / mask[:n].sum(1).clamp(min=1)  # per-token advantages: mean
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        keep = [mask[i] for i in range(n)]
        folder = Path(self.args.output_dir) / "anchors"
        folder.mkdir(parents=True, exist_ok=True)
        views = sampled_views(
            tokens=[[tokenizer.decode([t]) for t in ids[i][keep[i]].tolist()] for i in range(n)],
            conn=[conn[i][keep[i]].numpy() for i in range(n)],
            anchors=[result.boosted_mask[i][keep[i]].numpy() for i in range(n)],
            weights=[result.weights[i][keep[i]].numpy() for i in range(n)],
            advantages=adv.tolist())
        page = sampled_anchors_html(views, folder / f"step-{step:06d}.html",
                                    title=f"Anchor tokens at step {step} (mode {self.anchor.mode})")
        loggers = run_loggers(self)
        if loggers:
            self._publish_report(page, sampled_anchors_png(views, folder / f"step-{step:06d}.png"), step, loggers)

    @staticmethod
    def _publish_report(page: Path, png: Path, step: int, loggers: list) -> None:
        """The report's PNG preview as the image `atrl/anchors` at the optimizer step (TensorBoard), and the
        page itself with it (W&B, which shows HTML)."""
        import numpy as np
        from PIL import Image

        for sink in loggers:
            if hasattr(sink, "add_image"):
                image = np.asarray(Image.open(png).convert("RGB"))
                sink.add_image("atrl/anchors", image, step, dataformats="HWC")
                sink.flush()
            else:
                sink.log({"atrl/anchors": sink.Image(str(png)), "atrl/anchors_page": sink.Html(page.read_text()),
                          "train/global_step": step})

    @staticmethod
    def _metric_names(measured: bool) -> list[str]:
        names = ["atrl/credit_fallback", "atrl/anchor_fraction", "atrl/weight_max", "atrl/weight_min",
                 "atrl/weight_std", "atrl/time/credit_s", "atrl/time/credit_wait_s", "atrl/time/credit_cpu_s"]
        if measured:
            names += ["atrl/anchor_conn", "atrl/other_conn", "atrl/bimodality", "atrl/num_parts", "atrl/degenerate",
                      "atrl/mean_conn"]
        return names

    def _log_metric_values(self, values: dict[str, list[float]]) -> None:
        """Append the mean over all processes of each metric's finite values (nothing where none).

        A collective: every process must call it with the same names in the same order. One reduction for all the
        metrics, and none (nor any device round trip) on a single process."""
        mode = "train" if self.model.training else "eval"
        sums_counts = []
        for vals in values.values():
            finite = [v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
            sums_counts += [sum(finite), len(finite)]
        totals = torch.tensor(sums_counts, dtype=torch.float64)
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals.to(self.accelerator.device), reduction="sum").cpu()
        for name, (total, count) in zip(values, totals.view(-1, 2).tolist()):
            if count > 0:
                self._metrics[mode][name].append(total / count)

    # ---------------------------------------------------------------------------------------------- applying

    def _generate(self, prompts: list):
        """TRL's rollouts; a batch mixing prompts with and without images gets [] for the image list of a prompt
        without, after generation (where vLLM wants None). TRL 1.16 hands None to the processor for the training
        forward's inputs, which transformers 5.24's processor refuses ("only a single or a list of entries is
        supported"): a data set with some text-only rows stopped at the first batch that mixed them."""
        if self._pregenerated is not None:  # dynamic sampling rolled these rows out already
            rollouts, self._pregenerated = self._pregenerated, None
            if len(rollouts[1]) != len(prompts):
                raise RuntimeError(f"dynamic sampling: {len(rollouts[1])} rollouts made for {len(prompts)} prompts")
            return rollouts
        t0 = time.perf_counter()
        *head, images, tool_images = super()._generate(prompts)
        self._generation_seconds += time.perf_counter() - t0
        if images is not None and any(imgs is None for imgs in images):
            images = [[] if imgs is None else imgs for imgs in images]
        return (*head, images, tool_images)

    def _tokenize_prompts(self, prompts: list):
        """TRL's, or for a batch with videos the prompts processed with their images and videos together
        (`atrl.rl.videos.tokenize_with_videos`); the rows' video inputs are kept for the forwards that score them."""
        if self._batch_videos is None:
            prompt_ids, images, fields = super()._tokenize_prompts(prompts)
            if self.use_vllm and self.vllm_mode == "colocate" and is_conversational({"prompt": prompts[0]}):
                self.vllm_generation.template_prompts = dict(zip(map(tuple, prompt_ids), template_ids(
                    self.processing_class, prompts, tools=self.tools or None, chat_template=self.chat_template,
                    **self.chat_template_kwargs)))
            return prompt_ids, images, fields
        if len(self._batch_videos) != len(prompts):
            raise RuntimeError(f"{len(self._batch_videos)} rows of videos for {len(prompts)} prompts")
        processor = getattr(self.processing_class, "_processor", self.processing_class)
        prompt_ids, images, fields, self._video_rows = tokenize_with_videos(
            processor, prompts, self._batch_videos, chat_template=self.chat_template, **self.chat_template_kwargs)
        return prompt_ids, images, fields

    def _decode_batch_videos(self, inputs: list[dict]) -> list[list] | None:
        """The batch's videos, decoded within `video_bounds` (None when no row has one); a row's repeats (TRL's
        num_generations, each fetched from the data set anew) share one decoding, found by the row's source and
        uid (a row without either is decoded for each repeat)."""
        if not inputs or "videos" not in inputs[0] or not any(x.get("videos") for x in inputs):
            return None
        decoded: dict[Any, list] = {}
        out = []
        for x in inputs:
            key = (x.get("source"), x.get("uid"))
            if key == (None, None):
                key = id(x)
            if key not in decoded:
                decoded[key] = decode_row_videos(x, self.video_bounds)
            out.append(decoded[key])
        return out

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        if self._prescored is not None:  # dynamic sampling scored these rows already: gathered as TRL gathers
            local, self._prescored = self._prescored, None
            if local.shape[0] != len(prompts):
                raise RuntimeError(f"dynamic sampling: {local.shape[0]} rewards made for {len(prompts)} prompts")
            return gather(local)
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    def _generate_and_score_completions(self, inputs):
        if self.dynamic is not None and self.model.training:
            inputs, self._pregenerated, self._prescored, counts = self.dynamic.fill(self, inputs)
            totals = torch.tensor([float(v) for v in counts.values()], device=self.accelerator.device)
            if self.accelerator.num_processes > 1:  # groups summed over processes; rounds are the same on each
                totals = self.accelerator.reduce(totals, reduction="sum")
                totals[-1] /= self.accelerator.num_processes
            for name, value in zip(counts, totals.tolist()):
                self._metrics["train"][f"atrl/dynamic/{name}"].append(value)
        self._scoring, self._scored = True, None
        self._batch_videos = self._decode_batch_videos(inputs)
        processor = self.processing_class
        if self._batch_videos is not None:
            self.processing_class = WithBatchVideos(processor, [v for row in self._batch_videos for v in row])
        try:
            output = super()._generate_and_score_completions(inputs)
            if self._batch_videos is not None:
                output["atrl_videos"] = self._video_rows  # one entry per row: TRL's buffer cuts it with the rows
        finally:
            self._scoring = False
            self.processing_class = processor
            self._batch_videos = self._video_rows = None
        if self._skip_rows and self.model.training:  # read back here, where TRL has just read the rewards back
            output["atrl_learns"] = learning_rows(output["advantages"]).cpu()
        scorer = {"blank_image_kl": self._blank_image_kl,
                  "masked_image": self._masked_image_dependency}.get(self.anchor.credit_mode.measure)
        if scorer is not None:  # a measure made of extra no-grad forwards of the generation batch
            score, mask = scorer(output)
            credit = CreditInFlight(self.credit_options)
            with self._credit_clock():
                credit.submit_now(0, mask, score, torch.zeros(*score.shape, 1))
        elif self._scored is not None:
            credit, self._scored = self._scored, None
        else:
            return output
        if not self.anchor.overlap:
            output["advantages"] = self._weighted_advantages(output["advantages"], credit,
                                                             completion_ids=output["completion_ids"])
            return output
        # The weights are applied per micro-batch in _compute_loss. TRL shuffles and splits this batch into
        # micro-batches, so each row carries its index (and the batch its number) through the shuffle.
        B = output["completion_ids"].shape[0]
        self._credit_batch += 1
        self._credit_batches["train" if self.model.training else "eval"] = (self._credit_batch, credit)
        output["atrl_row"] = torch.arange(B)  # on the host: reading it back per micro-batch costs no device sync
        output["atrl_batch"] = torch.tensor(self._credit_batch)
        return output

    def _compute_loss(self, model, inputs):
        if "atrl_learns" not in inputs:
            return self._whole_loss(model, inputs)
        inputs = dict(inputs)
        learns = inputs.pop("atrl_learns")
        B = int(learns.numel())
        rows = rows_to_keep(learns, inputs.get("num_images"), "image_grid_thw" in inputs)
        if self.accelerator.num_processes > 1:  # the same number of rows on every process
            count = torch.tensor([B if rows is None else len(rows)], device=self.accelerator.device)
            rows = pad_rows(rows, B, int(self.accelerator.gather(count).max()))
        self._log_metric_values({"atrl/skipped_rows": [0.0 if rows is None else 1 - len(rows) / B]})
        if rows is None:
            return self._whole_loss(model, inputs)
        kept = select_rows(inputs, rows)
        return self._whole_loss(model, kept) * loss_scale(self.loss_type, inputs, kept)

    def _whole_loss(self, model, inputs):
        if "atrl_videos" in inputs:  # the micro-batch's video inputs, for the forward through VideoForward
            inputs = dict(inputs)
            self._video_rows = inputs.pop("atrl_videos")
            try:
                return self._whole_loss(model, inputs)
            finally:
                self._video_rows = None
        if self.papo is None:
            return self._policy_loss(model, inputs)
        self._papo_capture = []
        try:
            loss = self._policy_loss(model, inputs)
            (logps, entropies, _), = self._papo_capture  # one forward: TRL's, with its entropies
        finally:
            self._papo_capture = None
        return loss + self._papo_terms(model, inputs, logps, entropies)

    def _papo_terms(self, model, inputs: dict, logps: torch.Tensor, entropies: torch.Tensor) -> torch.Tensor:
        """PAPO's terms for this micro-batch (see `PapoConfig`): one more forward, on the masked images."""
        p = self.papo
        inputs = {k: v for k, v in inputs.items() if not k.startswith("atrl_")}
        input_ids, attention_mask, T, kwargs = self._sequences(inputs)
        masked = dict(kwargs)
        if "pixel_values" in kwargs:
            self._papo_draws += 1
            draw = torch.Generator().manual_seed(self.args.seed * 1_000_003 + 104_729 * self._papo_draws
                                                 + self.accelerator.process_index)
            image_processor = self.processing_class.image_processor
            masked["pixel_values"], _ = mask_image_patches(kwargs["pixel_values"], image_processor, p.mask_prob,
                                                           generator=draw)
        with torch.set_grad_enabled(torch.is_grad_enabled() and p.masked_entropy_coef > 0):
            masked_logps, masked_entropies, _ = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, T, compute_entropy=p.masked_entropy_coef > 0, **masked)
        mask = inputs["completion_mask"].to(logps.dtype)
        scale = mask.sum().clamp(min=1.0) * (self.current_gradient_accumulation_steps if self.model.training else 1)

        def mean(x: torch.Tensor) -> torch.Tensor:
            return (x * mask).sum() / scale

        kl = perception_kl(logps, masked_logps.detach())
        terms = -p.coef * mean(kl)
        if p.entropy_coef:
            terms = terms + p.entropy_coef * mean(entropies)
        if p.masked_entropy_coef:
            terms = terms + p.masked_entropy_coef * mean(masked_entropies)
        denom = mask.sum().clamp(min=1.0)
        self._log_metric_values({"atrl/papo/kl": [float((kl.detach() * mask).sum() / denom)],
                                 "atrl/papo/entropy": [float((entropies.detach() * mask).sum() / denom)]})
        return terms

    def _policy_loss(self, model, inputs):
        if "atrl_row" in inputs:  # scored earlier: wait for this micro-batch's rows only
            inputs = dict(inputs)
            rows, batch = inputs.pop("atrl_row").tolist(), int(inputs.pop("atrl_batch"))
            number, credit = self._credit_batches["train" if self.model.training else "eval"]
            if number != batch:
                raise RuntimeError(f"micro-batch of generation batch {batch} met the credit of batch {number}")
            inputs["advantages"] = self._weighted_advantages(inputs["advantages"], credit, rows,
                                                             completion_ids=inputs["completion_ids"])
            return super()._compute_loss(model, inputs)
        if not (self.capture_site == "train_forward" and self.anchor.credit_mode.scored_in_forward):
            return super()._compute_loss(model, inputs)
        self._pending = dict(inputs)  # a copy: the buffered batch keeps its plain advantages
        try:
            return super()._compute_loss(model, self._pending)
        finally:
            self._pending = None

    _FORWARD_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                     "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")

    @staticmethod
    def _sequences(output: dict) -> tuple[torch.Tensor, torch.Tensor, int, dict]:
        """(input_ids, attention_mask, completion length, the forward's image inputs) of a scored batch."""
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        kwargs = {k: output[k] for k in ATRLTrainer._FORWARD_KEYS if k in output}
        return input_ids, attention_mask, output["completion_ids"].shape[1], kwargs

    @torch.no_grad()
    def _blank_image_kl(self, output: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) KL(policy with the image || policy with a blank image) per completion token: two forwards."""
        input_ids, attention_mask, T, _ = self._sequences(output)
        kwargs = {k: output[k] for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids", "image_sizes",
                                         "pixel_attention_mask", "token_type_ids") if k in output}
        model = self.model
        with self.accelerator.autocast():
            with_image = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=T + 1,
                               **kwargs).logits[:, :-1]
            # A batch without images reads none: both forwards are the same and its KL is 0. Both still run, as on
            # every other process: a DDP or ZeRO-3 forward takes part in collectives.
            blank = dict(kwargs, pixel_values=torch.zeros_like(kwargs["pixel_values"])) if "pixel_values" in kwargs \
                else kwargs
            without = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=T + 1,
                            **blank).logits[:, :-1]
        mask = output["completion_mask"].bool()
        return blank_image_kl(with_image, without, mask).cpu(), mask.cpu()

    @torch.no_grad()
    def _masked_image_dependency(self, output: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) VPPO's visual dependency of each completion token: the sampled tokens' log-probabilities with the
        image (TRL's old log-probs where it made them, else one forward) against one forward with random patches
        blacked out (`anchor.mask_prob`, a fresh draw each generation batch)."""
        input_ids, attention_mask, T, kwargs = self._sequences(output)
        logps = output.get("old_per_token_logps")
        chunk = self.args.per_device_train_batch_size
        if logps is None:
            logps = super()._get_per_token_logps_and_entropies(self.model, input_ids, attention_mask, T, chunk,
                                                               **kwargs)[0]
        masked = dict(kwargs)
        if "pixel_values" in kwargs:  # a batch without images: the same forward, dependency 0 (every process runs it)
            draw = torch.Generator().manual_seed(
                self.args.seed * 1_000_003 + 7919 * self.state.global_step + self.accelerator.process_index)
            image_processor = getattr(self.processing_class, "image_processor", None)
            if image_processor is None:
                raise ValueError("anchor.mode with the masked_image measure needs the processor's image_processor "
                                 "(its normalisation says what a black pixel is)")
            masked["pixel_values"], _ = mask_image_patches(kwargs["pixel_values"], image_processor,
                                                           self.anchor.mask_prob, generator=draw)
        masked_logps = super()._get_per_token_logps_and_entropies(self.model, input_ids, attention_mask, T, chunk,
                                                                  **masked)[0]
        mask = output["completion_mask"].bool()
        return sampled_token_dependency(logps, masked_logps, mask).cpu(), mask.cpu()

    def train(self, *args, **kwargs):
        with heap_frozen(self.freeze_heap):
            return super().train(*args, **kwargs)

    def close_rollouts(self) -> None:
        """Shut a colocated vLLM engine down, all processes together, while the process group it joined is still
        open (its own shutdown at exit finds the group closed and raises)."""
        generation = getattr(self, "vllm_generation", None)
        if generation is None or generation.mode != "colocate" or getattr(generation, "llm", None) is None:
            return
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        generation.llm.llm_engine.engine_core.shutdown()
        generation.llm = None

    # ---------------------------------------------------------------------------------------------- robustness

    def training_step(self, model, inputs, num_items_in_batch):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._step % self.current_gradient_accumulation_steps == 0:  # as TRL's step_time: one per optimizer step
            # the rollouts' share of the step: generation runs inside the step that needs a new batch
            self._metrics["train"]["time/generation_s"].append(self._generation_seconds)
            self._generation_seconds = 0.0
            if self.use_vllm:  # rollouts cut before an image/video pad token vLLM sampled despite its mask
                self._metrics["train"]["atrl/vllm/cut_completions"].append(float(self.vllm_generation.cut))
                self.vllm_generation.cut = 0
        # Gradients are checked too: under data parallelism one process's NaN reaches every process through the
        # gradient all-reduce while their own losses stay finite, and all must skip the step alike. (Under
        # DeepSpeed ZeRO the gradients live in DeepSpeed's partitions, not in `p.grad`: only the loss is checked.)
        if not (torch.isfinite(loss).all() and grads_finite(model.parameters())):
            self.nonfinite_losses += 1
            logger.warning("step %d: non-finite loss or gradient (loss %s); this step's gradients are zeroed and "
                           "it is counted in atrl/nonfinite_loss", self.state.global_step, loss.item())
            model.zero_grad(set_to_none=False)
            self._metrics["train"]["atrl/nonfinite_loss"].append(1.0)
            return torch.zeros_like(loss)
        return loss

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Restore weights through `from_pretrained`, which maps the checkpoint's key names back.

        transformers 5 saves Qwen2-VL-family checkpoints under their legacy key names ("model.layers.0...") but
        Trainer's resume path loads the file as a raw state dict for the current names
        ("model.language_model.layers.0..."): every key is reported missing and the run silently resumes
        from the initial weights. Plain (non-sharded) models are therefore reloaded here with the model
        class's own loader; DeepSpeed, FSDP and adapter checkpoints keep Trainer's path.
        """
        from transformers import PreTrainedModel

        model = model if model is not None else self.model
        target = self.accelerator.unwrap_model(model)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or not isinstance(target, PreTrainedModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        dtype = next(target.parameters()).dtype
        restored = type(target).from_pretrained(resume_from_checkpoint, dtype=dtype)
        missing, unexpected = target.load_state_dict(restored.state_dict(), strict=False)
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {resume_from_checkpoint} does not match the model: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        del restored

    def _save_checkpoint(self, model, trial):
        folder = f"{self._get_output_dir(trial=trial)}/checkpoint-{self.state.global_step}"
        need = self._checked_space(self._get_output_dir(trial=trial))
        try:
            super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError) as err:  # a full disk shows as either (torch's zip writer: RuntimeError)
            if not self.args.should_save or not Path(folder).exists():
                raise
            import shutil

            shutil.rmtree(folder, ignore_errors=True)  # half written: it has no completion marker; free its space
            raise CheckpointSaveError(
                f"saving {folder} failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                f"the half-written folder is removed. {free_space_line(Path(folder).parent, need)}") from err
        if self.args.should_save:
            if self.recipe_yaml is not None:  # the checkpoint's own recipe: what resume: auto compares with
                Path(folder, "recipe.yaml").write_text(self.recipe_yaml)
            mark_checkpoint_complete(folder, step=self.state.global_step)

    def _checked_space(self, output_dir: str) -> int:
        """`check_checkpoint_space` on the saving process, its verdict shared with every process (a rank that went
        on into a collective save alone would wait for the others forever)."""
        problem, need = None, 0
        if self.args.should_save:
            try:
                need = check_checkpoint_space(output_dir)
            except CheckpointSaveError as err:
                problem = err
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([0.0 if problem is None else 1.0], device=self.accelerator.device)
            if float(self.accelerator.reduce(flag, reduction="sum")) > 0 and problem is None:
                problem = CheckpointSaveError("the saving process found too little space for the next checkpoint")
        if problem is not None:
            raise problem
        return need

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        metrics = self._metrics["train" if self.model.training else "eval"]
        step_time, credit = metrics.get("step_time"), metrics.get("atrl/time/credit_s")
        if step_time and credit and sum(step_time) > 0:
            # credit time summed over the logging window over step time summed over the same window
            metrics["atrl/time/credit_share"] = [sum(credit) / sum(step_time)]
        if self.model.training and self.anchor.credit_mode.weighs:
            # a collective under several processes: every rank logs at the same steps, with or without sums
            sums = torch.stack(self._credit_share).sum(0) if self._credit_share else torch.zeros(2)
            self._credit_share = []
            if self.accelerator.num_processes > 1:
                sums = self.accelerator.reduce(sums.to(self.accelerator.device), reduction="sum")
            anchors, total = sums.tolist()
            if total > 0:
                logs["atrl/anchor_credit_share"] = anchors / total
        training = self.model.training
        super().log(logs, start_time)
        if training and self.state.is_world_process_zero and self.state.log_history:
            self.stall_watch.observe(self.state.global_step, self.state.log_history[-1])
