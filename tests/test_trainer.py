"""ATRLTrainer on the tiny Qwen2.5-VL, on CPU: every mode, exactness of `uniform`, where the weights go,
robustness, resume after a kill, and two processes."""

import gc
import json
import logging
import math
import os
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from atrl.credit import assign_credit
from atrl.data.synthetic import generate, to_hf_dataset
from atrl.models.zoo import build_tiny_vlm
from atrl.rl.checkpoints import checkpoints
from atrl.credit import credit_mode_names
from atrl.rl.config import AnchorConfig
from atrl.rl.handoff import CreditInFlight
from atrl.rl.trainer import ATRLTrainer, grads_finite

ROOT = Path(__file__).resolve().parents[1]


def diversity_reward(prompts, completions, **columns):
    """Varies between completions of an untrained model, so that advantages are not all zero."""
    return [len(set(c[-1]["content"])) / 10 for c in completions]


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=12,
                max_steps=2, use_cpu=True, report_to=[], logging_steps=1, bf16=False, save_strategy="no",
                learning_rate=1e-2, disable_tqdm=True, seed=0)
    base.update(kw)
    return GRPOConfig(**base)


def _trainer(tmp_path, cls=ATRLTrainer, reward=diversity_reward, n=8, anchor=None, **kw):
    torch.manual_seed(0)
    model, processor = build_tiny_vlm("qwen2_5_vl", seed=0)
    extra = {} if cls is not ATRLTrainer else {"anchor_config": anchor or AnchorConfig()}
    return cls(model=model, processing_class=processor, reward_funcs=[reward], args=_args(tmp_path, **kw),
               train_dataset=to_hf_dataset(generate(n, seed=0)), **extra)


def _params(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters()}


def assert_same_step(ours, reference, plain, atol: float, changed: float, what: str) -> None:
    """Three trainers, each trained: `ours` took the step `reference` took (parameters within `atol`), and that
    step differs from `plain`'s somewhere by more than `changed` (the change under test did something)."""
    po, pr, pp = _params(ours), _params(reference), _params(plain)
    for k in po:
        assert torch.allclose(po[k], pr[k], atol=atol, rtol=0), k
    assert any((po[k] - pp[k]).abs().max() > changed for k in po), f"{what} should change the step"


@pytest.mark.parametrize("mode", credit_mode_names())
def test_every_mode_trains_a_few_steps(tmp_path, mode):
    trainer = _trainer(tmp_path, anchor=AnchorConfig(mode=mode, report_steps=1))
    before = _params(trainer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    after = _params(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before), "parameters did not change"
    reports = sorted(p.name for p in (tmp_path / "anchors").glob("*.html"))
    if mode != "uniform":
        assert all("atrl/anchor_fraction" in h and 0 < h["atrl/anchor_fraction"] <= 1 for h in logs)
        assert trainer.last_credit["result"].weights.shape == trainer.last_credit["mask"].shape
        assert reports == ["step-000000.html", "step-000001.html"]  # anchor.report_steps=1: every step
        # the anchors' share of the credit, logged per step: here one micro-batch a step, the last one's inputs
        last = trainer.last_credit
        adv = last["advantages_in"].float()
        magnitude = (last["result"].weights * (adv if adv.dim() == 2 else adv[:, None])).abs()
        if magnitude.sum() > 0:
            expected = float((magnitude * last["result"].boosted_mask).sum() / magnitude.sum())
            assert logs[-1]["atrl/anchor_credit_share"] == pytest.approx(expected, rel=1e-5)
    else:
        assert {k for h in logs for k in h if k.startswith("atrl/")} == {"atrl/skipped_rows"}  # no credit metrics
        assert reports == []  # nothing weighted, nothing to show


def test_anchor_report_shows_the_step_s_tokens_anchors_and_weights(tmp_path):
    """The last step's report against the credit the trainer applied to that step (one micro-batch per step)."""
    import re

    trainer = _trainer(tmp_path, anchor=AnchorConfig(report_steps=1))
    trainer.train()
    page = (tmp_path / "anchors" / "step-000001.html").read_text()
    credit = trainer.last_credit
    blocks = page.split("<h3>")[1:]
    assert len(blocks) == credit["mask"].shape[0] == 4
    for i, block in enumerate(blocks):
        keep = credit["mask"][i]
        hovers = re.findall(r"title='c=(\S+) w=(\S+)'", block)
        assert len(hovers) == int(keep.sum())  # one span per completion token, padding left out
        assert [float(c) for c, _ in hovers] == pytest.approx(credit["conn"][i][keep].tolist(), abs=1e-4)
        assert [float(w) for _, w in hovers] == pytest.approx(credit["result"].weights[i][keep].tolist(), abs=1e-3)
        assert block.count("tok anchor") == int(credit["result"].boosted_mask[i][keep].sum())
        advantage = float(re.match(r"A\(i\) = (\S+),", block).group(1))
        assert advantage == pytest.approx(float(credit["advantages_in"][i]), abs=1e-3)
    with pytest.raises(ValueError, match="anchor.report_steps=-1"):
        AnchorConfig(report_steps=-1)


def test_anchor_report_reaches_tensorboard_and_wandb(tmp_path, monkeypatch):
    """Where the run logs, the report's PNG preview goes with it: TensorBoard gets the image `atrl/anchors` at each
    report step (read back from the event file), a live W&B run the image and the page. No logger: no PNG drawn."""
    import types

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    quiet = tmp_path / "quiet"
    _trainer(quiet, anchor=AnchorConfig(report_steps=1)).train()
    assert sorted(p.suffix for p in (quiet / "anchors").iterdir()) == [".html", ".html"]

    from atrl.rl import trainer as trainer_module

    logged = []  # a live W&B run (faked) beside the real TensorBoard writer
    fake = types.SimpleNamespace(Image=lambda path: ("image", path), Html=lambda text: ("html", text),
                                 log=logged.append)
    real = trainer_module.run_loggers
    monkeypatch.setattr(trainer_module, "run_loggers", lambda trainer: [*real(trainer), fake])
    tb = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tb))
    _trainer(tmp_path, anchor=AnchorConfig(report_steps=1), report_to=["tensorboard"]).train()
    events = EventAccumulator(str(tb), size_guidance={IMAGES: 0}).Reload()
    images = events.Images("atrl/anchors")
    assert [e.step for e in images] == [0, 1]
    for event in images:
        on_disk = Image.open(tmp_path / "anchors" / f"step-{event.step:06d}.png")
        assert (event.width, event.height) == on_disk.size
    assert [entry["train/global_step"] for entry in logged] == [0, 1]
    for entry in logged:
        step = entry["train/global_step"]
        assert entry["atrl/anchors"] == ("image", str(tmp_path / "anchors" / f"step-{step:06d}.png"))
        assert entry["atrl/anchors_page"] == ("html", (tmp_path / "anchors" / f"step-{step:06d}.html").read_text())


def test_a_batch_mixing_prompts_with_and_without_images_trains(tmp_path):
    """TRL 1.16 handed None as the image list of a text-only prompt to the processor, which refused it: a data
    set with some text-only rows stopped at the first mixed batch. Each step here holds both kinds; the
    text-only prompt's completions read no image (zero connectivity), the other's do."""
    import io

    from atrl.data.formats import ImageRef, Sample, to_trl_dataset

    buffer = io.BytesIO()
    generate(1, seed=0)[0].image.save(buffer, format="PNG")
    samples = [Sample("img", "What colour is the shape in the top-left quadrant?", "red", "text",
                      [ImageRef(data=buffer.getvalue())]),
               Sample("txt", "What is 2 + 3?", "5", "integer", [])]
    torch.manual_seed(0)
    model, processor = build_tiny_vlm("qwen2_5_vl", seed=0)
    trainer = ATRLTrainer(model=model, processing_class=processor, reward_funcs=[diversity_reward],
                          args=_args(tmp_path, per_device_train_batch_size=8, max_steps=2, temperature=1.5),
                          train_dataset=to_trl_dataset(samples), anchor_config=AnchorConfig(overlap=False))
    trainer.train()
    assert trainer.state.global_step == 2
    conn, mask = trainer.last_credit["conn"], trainer.last_credit["mask"]
    per_completion = (conn * mask).abs().amax(1)
    assert (per_completion == 0).sum() == 4 and (per_completion > 0).sum() == 4  # 4 generations of each prompt


def test_blank_image_kl_on_a_batch_without_images_is_zero(tmp_path):
    """`blank_image_kl` on prompts without images: nothing to read, so the KL with and without the image is 0
    (it raised "needs image inputs", stopping a run at the first text-only batch)."""
    from atrl.data.formats import Sample, to_trl_dataset

    samples = [Sample(f"t{i}", f"What is {i} + 3?", str(i + 3), "integer", []) for i in range(2)]
    torch.manual_seed(0)
    model, processor = build_tiny_vlm("qwen2_5_vl", seed=0)
    trainer = ATRLTrainer(model=model, processing_class=processor, reward_funcs=[diversity_reward],
                          args=_args(tmp_path, per_device_train_batch_size=8, temperature=1.5),
                          train_dataset=to_trl_dataset(samples),
                          anchor_config=AnchorConfig(mode="blank_image_kl", overlap=False))
    trainer.train()
    assert trainer.state.global_step == 2
    assert trainer.last_credit["conn"].abs().max() == 0 and trainer.last_credit["mask"].any()


def test_run_loggers_finds_a_live_wandb_run(monkeypatch):
    import types

    from atrl.rl.trainer import run_loggers

    trainer = types.SimpleNamespace(callback_handler=types.SimpleNamespace(callbacks=[]))
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    assert run_loggers(trainer) == []  # not imported: no W&B
    wandb = types.SimpleNamespace(run=None)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    assert run_loggers(trainer) == []  # imported, no run started
    wandb.run = object()
    assert run_loggers(trainer) == [wandb]


def test_gradient_checkpointing_keeps_one_embedding_hook(tmp_path):
    """TRL re-enables gradient checkpointing after each generation; transformers then adds a forward hook to the
    input embeddings without removing the last one. The trainer keeps their number bounded; training works."""
    trainer = _trainer(tmp_path, anchor=AnchorConfig(mode="atrl"), gradient_checkpointing=True, max_steps=4)
    embeddings = trainer.model.get_input_embeddings()

    def grad_hooks() -> int:
        hooks = embeddings._forward_hooks.values()
        return sum("make_inputs_require_grads" in getattr(h, "__qualname__", "") for h in hooks)

    before = _params(trainer)
    trainer.train()
    assert 1 <= grad_hooks() <= 2  # unbounded (9 after these 4 steps) without `keep_one_input_grad_hook`
    after = _params(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before), "parameters did not change"
    assert trainer.model.is_gradient_checkpointing


def test_capture_rides_on_the_old_logps_pass_when_trl_makes_one(tmp_path):
    trainer = _trainer(tmp_path, num_iterations=2)
    assert trainer.capture_site == "old_logps"
    calls = []
    original = trainer.probe.record_forwards

    def counting(*a, **k):
        calls.append(trainer._scoring)
        return original(*a, **k)

    trainer.probe.record_forwards = counting
    trainer.train()
    assert calls and all(calls), "probes must only run on the scoring pass, never add a forward"
    with pytest.raises(ValueError, match="makes no old-log-prob pass"):
        _trainer(tmp_path, anchor=AnchorConfig(capture="old_logps"))


def test_overlapped_credit_waits_per_micro_batch_and_changes_nothing(tmp_path, monkeypatch):
    # TRL scores 8 rows in two chunks of 4 and trains them as two shuffled micro-batches of 4. With overlap,
    # each chunk's rows are handed to the workers from inside its forward and each micro-batch waits for its own
    # rows; without, the whole batch is partitioned and waited for right after scoring. Same weights, same step.
    kw = dict(steps_per_generation=2, max_steps=2, optim="sgd", learning_rate=1.0)
    credit = {"n_workers": 2}
    off = _trainer(tmp_path / "off", anchor=AnchorConfig(overlap=False, credit=credit, skip_zero_advantage=False), **kw)
    off.train()
    on = _trainer(tmp_path / "on", anchor=AnchorConfig(credit=credit, skip_zero_advantage=False), **kw)
    assert on.capture_site == "old_logps"
    waits, handed = [], []
    original_weighted, original_hand_on = on._weighted_advantages, CreditInFlight.hand_on

    def weighted(advantages, credit, rows=None, **kw):
        waits.append((on._scoring, None if rows is None else sorted(rows)))
        return original_weighted(advantages, credit, rows, **kw)

    def hand_on(self, start, mask_BT, *a):
        handed.append((start, mask_BT.shape[0], torch.is_grad_enabled()))
        return original_hand_on(self, start, mask_BT, *a)

    on._weighted_advantages = weighted
    monkeypatch.setattr(CreditInFlight, "hand_on", hand_on)
    on.train()
    assert handed == [(0, 4, False), (4, 4, False)], "each scored chunk is handed on by itself, from its forward"
    assert all(not scoring and len(rows) == 4 for scoring, rows in waits), waits
    assert sorted(waits[0][1] + waits[1][1]) == list(range(8)), "the two micro-batches share the batch's rows"
    p_off, p_on = _params(off), _params(on)
    assert all(torch.equal(p_off[k], p_on[k]) for k in p_off)
    logs = [h for h in on.state.log_history if "loss" in h]
    assert all(h["atrl/time/credit_cpu_s"] > 0 for h in logs)
    assert all(0 <= h["atrl/time/credit_wait_s"] <= h["atrl/time/credit_s"] for h in logs)
    rec = on.last_credit
    again = assign_credit(rec["conn"], rec["profile"], rec["mask"], on.credit_options)
    assert torch.equal(again.weights, rec["result"].weights)


LOSS_TYPES = ("dapo", "grpo", "dr_grpo")  # the recipes' default, and the two others the issue names


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_uniform_is_exactly_trls_loss(tmp_path, loss_type):
    plain = _trainer(tmp_path / "trl", cls=GRPOTrainer, loss_type=loss_type)  # built and trained one after the
    plain.train()                                          # other: the sampling RNG is global and seeded at construction
    ours = _trainer(tmp_path / "atrl", anchor=AnchorConfig(mode="uniform"), loss_type=loss_type)
    ours.train()
    lp = [h["loss"] for h in plain.state.log_history if "loss" in h]
    lo = [h["loss"] for h in ours.state.log_history if "loss" in h]
    assert lp == lo
    p1, p2 = _params(plain), _params(ours)
    assert all(torch.equal(p1[k], p2[k]) for k in p1)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_atrl_changes_the_gradient_only_through_the_recorded_weights(tmp_path, loss_type):
    # SGD: the step is proportional to the gradient (Adam's first step is about lr * sign(g), which turns
    # 1e-7 rounding differences in near-zero gradient entries into full-size steps)
    sgd = dict(max_steps=1, optim="sgd", learning_rate=1.0, loss_type=loss_type)
    ours = _trainer(tmp_path / "atrl", **sgd)
    ours.train()
    rec = ours.last_credit
    # 1. the weights used are those atrl.credit returns for the recorded connectivity
    again = assign_credit(rec["conn"], rec["profile"], rec["mask"], ours.credit_options)
    assert torch.equal(again.weights, rec["result"].weights)
    assert not torch.allclose(rec["result"].weights[rec["mask"]], torch.ones(int(rec["mask"].sum())))
    weights, adv = rec["result"].weights, rec["advantages_in"]
    assert adv.abs().sum() > 0

    # 2. an unmodified GRPOTrainer fed W * A as its advantages takes the same step
    class Weighted(GRPOTrainer):
        def _compute_loss(self, model, inputs):
            inputs = dict(inputs, advantages=weights.to(inputs["advantages"]) * inputs["advantages"][:, None])
            return super()._compute_loss(model, inputs)

    reference = _trainer(tmp_path / "ref", cls=Weighted, **sgd)
    reference.train()
    uniform = _trainer(tmp_path / "uni", cls=GRPOTrainer, **sgd)
    uniform.train()
    assert_same_step(ours, reference, uniform, atol=1e-6, changed=1e-5, what="atrl")


def half_flat_reward(prompts, completions, **columns):
    """All equal in the group of one prompt (the first of the batch's two); in the other's a checksum of the text,
    so that no completion there scores its group's mean (advantage 0)."""
    first = prompts[0][-1]["content"]

    def checksum(text: str) -> float:
        return sum((i + 1) * ord(ch) for i, ch in enumerate(text)) % 997 / 997

    return [0.5 if p[-1]["content"] == first else checksum(c[-1]["content"]) for p, c in zip(prompts, completions)]


@pytest.mark.parametrize("mode, loss_type, micro", [("atrl", "dapo", 8), ("atrl", "grpo", 8), ("atrl", "bnpo", 8),
                                                    ("atrl", "dr_grpo", 8), ("uniform", "dapo", 8),
                                                    ("atrl", "dapo", 4), ("atrl", "grpo", 4)])
def test_rows_without_advantage_leave_the_forward_and_the_step_stays(tmp_path, mode, loss_type, micro):
    # two prompts x 4 generations; one group's rewards all equal: 4 of 8 rows carry no advantage. In one
    # micro-batch of 8 (connectivity on the training forward), or two shuffled micro-batches of 4, one optimizer
    # step each (connectivity on TRL's old-log-prob pass, each micro-batch waiting for its own rows' credit)
    sgd = dict(max_steps=8 // micro, optim="sgd", learning_rate=1.0, max_grad_norm=0.0, loss_type=loss_type,
               per_device_train_batch_size=micro, steps_per_generation=8 // micro)  # no clipping: the step is
    runs = {}                                                                     # the gradient itself
    for skip in (True, False):
        trainer = _trainer(tmp_path / str(skip), reward=half_flat_reward,
                           anchor=AnchorConfig(mode=mode, skip_zero_advantage=skip), **sgd)
        before = _params(trainer)
        trainer.train()
        runs[skip] = trainer
    skipped = [h["atrl/skipped_rows"] for h in runs[True].state.log_history if "atrl/skipped_rows" in h]
    assert sum(skipped) / len(skipped) == 0.5 and len(skipped) == 8 // micro
    assert not any("atrl/skipped_rows" in h for h in runs[False].state.log_history)
    if micro == 4:
        assert runs[True].capture_site == "old_logps"
    elif mode == "atrl":  # the probes saw the 4 rows that train, and the credit weighed those alone
        assert runs[True].last_credit["mask"].shape[0] == 4
        assert runs[False].last_credit["mask"].shape[0] == 8
        assert runs[False].last_credit["advantages_in"].eq(0).sum() == 4
    # the same step (SGD: proportional to the gradient), and a step that moved the weights
    on, off = _params(runs[True]), _params(runs[False])
    for k in on:
        assert torch.allclose(on[k], off[k], atol=1e-6, rtol=0), k
    assert any((on[k] - before[k]).abs().max() > 1e-4 for k in on)


def test_a_loss_that_reads_every_row_trains_every_row(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="atrl"):
        trainer = _trainer(tmp_path, reward=half_flat_reward, top_entropy_quantile=0.8, per_device_train_batch_size=8)
    assert "every row is trained (top_entropy_quantile < 1: the entropy mask is a quantile over the micro-batch)" \
        in caplog.text
    trainer.train()
    assert not any("atrl/skipped_rows" in h for h in trainer.state.log_history)
    assert trainer.last_credit["mask"].shape[0] == 8


def test_nonfinite_loss_and_flat_rewards_are_handled(tmp_path, caplog):
    def constant(prompts, completions, **columns):
        return [1.0] * len(completions)

    trainer = _trainer(tmp_path, reward=diversity_reward, max_steps=3)
    state = {"calls": 0}

    def poison(module, args, output):
        if module.training and torch.is_grad_enabled() and state["calls"] == 0:
            state["calls"] += 1
            name = "log_probs" if getattr(output, "log_probs", None) is not None else "logits"  # TRL's fused head
            setattr(output, name, getattr(output, name) * float("nan"))
        return output

    handle = trainer.model.register_forward_hook(poison)
    trainer.train()
    handle.remove()
    assert trainer.nonfinite_losses == 1
    assert any(h.get("atrl/nonfinite_loss") == 1.0 for h in trainer.state.log_history)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())

    flat = _trainer(tmp_path / "flat", reward=constant)
    flat.stall_watch.steps = 2  # warn after 2 such steps (20 by default)
    with caplog.at_level(logging.WARNING, logger="atrl"):
        flat.train()
    logs = [h for h in flat.state.log_history if "loss" in h]
    assert all(h["frac_reward_zero_std"] == 1.0 and h["loss"] == 0.0 for h in logs)
    warned = [r.getMessage() for r in caplog.records if "rewards were equal" in r.getMessage()]
    assert warned == [("steps 1-2: in every group of trl.num_generations=4 completions the rewards were equal "
                      "(frac_reward_zero_std 1, mean reward 1): every advantage is 0, so nothing is learned from the "
                      "rewards. Read a few completions and their rewards (anchors/step-N.html; a reward function "
                      "returning a constant does this), or use data the model solves sometimes but not always.")]


def _collector_sees(obj) -> bool:
    """Whether `obj` is in one of the collector's generations (a frozen object is in none of them)."""
    return any(o is obj for o in gc.get_objects())


class _HeapDuringTraining(TrainerCallback):
    """At the first step's end: whether the model (alive before training) is out of the collector's
    generations, and whether a reference cycle made and dropped there is collected."""

    def __init__(self):
        self.model_frozen: bool | None = None
        self.cycle_collected: bool | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.model_frozen is None:
            class Node:
                pass
            a, b = Node(), Node()
            a.other, b.other = b, a
            ref = weakref.ref(a)
            del a, b
            gc.collect()
            self.model_frozen, self.cycle_collected = not _collector_sees(model), ref() is None


def _train_watching_the_heap(folder: Path, freeze_heap: bool = True) -> _HeapDuringTraining:
    trainer = _trainer(folder, anchor=AnchorConfig(mode="uniform"), max_steps=1)
    if not freeze_heap:
        trainer.freeze_heap = False  # else the class's default
    heap = _HeapDuringTraining()
    trainer.add_callback(heap)
    assert _collector_sees(trainer.model)
    trainer.train()
    assert _collector_sees(trainer.model)  # the heap is given back to the collector at the end
    assert heap.cycle_collected  # garbage made while training is collected, frozen heap or not
    return heap


def test_training_keeps_the_heap_it_found_out_of_full_collections(tmp_path, caplog):
    assert gc.get_freeze_count() == 0
    with caplog.at_level(logging.INFO, logger="atrl"):
        assert _train_watching_the_heap(tmp_path / "on").model_frozen
        assert gc.get_freeze_count() == 0
        assert not _train_watching_the_heap(tmp_path / "off", freeze_heap=False).model_frozen
        assert "collector left as it is" not in caplog.text
        gc.freeze()  # a process that froze objects itself keeps those frozen (some die meanwhile), and nothing more
        try:
            mine = gc.get_freeze_count()
            assert not _train_watching_the_heap(tmp_path / "mine").model_frozen
            assert 0.9 * mine < gc.get_freeze_count() <= mine
        finally:
            gc.unfreeze()
    # and says so (a Python whose start-up froze objects, as one GPU machine's did)
    assert "collector left as it is: the process already holds" in caplog.text


def test_run_summary_compares_the_first_and_last_logged_steps():
    from atrl.rl.health import run_summary

    history = [{"step": i, "reward": 0.1 * i, "atrl/anchor_fraction": 0.2, "atrl/time/credit_share": 0.01 * (i % 2)}
               for i in range(1, 31)] + [{"step": 30, "eval_reward": 0.9}, {"train_runtime": 5.0}]
    # by hand: steps 1-10 mean reward 0.55, steps 21-30 mean 2.55; credit share mean 0.005
    assert run_summary(history) == ("reward 0.55 -> 2.55, anchor fraction 0.20 -> 0.20 (means of the first and last "
                                    "10 logged steps); credit 0.5% of step time")
    assert run_summary(history[:3]) == ("reward 0.1 -> 0.3, anchor fraction 0.20 -> 0.20 (the first and the last "
                                        "logged step); credit 0.7% of step time")  # shares 0.01, 0, 0.01
    assert run_summary([{"train_runtime": 1.0}]) is None


def test_stall_watch_warns_once_per_stretch_the_condition_holds_throughout():
    from atrl.rl.health import StallWatch

    watch = StallWatch(max_completion_length=48, num_generations=8, steps=3)
    clipped = {"completions/clipped_ratio": 1.0, "frac_reward_zero_std": 0.5}
    fine = {"completions/clipped_ratio": 0.4, "frac_reward_zero_std": 0.5}
    seen = [watch.observe(step, logs) for step, logs in enumerate([clipped, clipped, fine, clipped, clipped, clipped,
                                                                   clipped, clipped, fine, clipped], start=1)]
    assert [step for step, due in enumerate(seen, start=1) if due] == [6]  # 1-2 broken at 3; 4-6 holds; once
    assert seen[5][0].startswith("steps 4-6: every completion reached trl.max_completion_length=48 without ending")
    # with logging every 10 steps, a log stands for the window up to its step
    sparse = StallWatch(steps=20)
    flat = {"frac_reward_zero_std": 1.0, "reward": 0.0}
    assert [bool(sparse.observe(step, flat)) for step in (10, 20, 30)] == [False, True, False]
    assert StallWatch(steps=1).observe(1, {}) == []  # metrics not logged: nothing to say


def test_grads_finite_equals_a_check_of_every_entry():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, dtype=dt)) for n, dt in
              ((7, torch.float32), (300, torch.bfloat16), (1, torch.float32), (64, torch.float64))]
    assert grads_finite(params)  # no gradients yet
    for p in params:
        p.grad = torch.randn_like(p) * 1e30 if p.dtype != torch.bfloat16 else torch.randn_like(p)
    params[2].grad = None
    for bad in (None, float("nan"), float("inf"), -float("inf"), 3e38):
        for i in (0, 1, 3):
            g = params[i].grad
            saved = g.clone()
            if bad is not None:
                g.view(-1)[min(5, g.numel() - 1)] = bad
            expected = all(bool(p.grad.isfinite().all()) for p in params if p.grad is not None)
            assert grads_finite(params) == expected, (bad, i)
            g.copy_(saved)


def test_credit_handoff_submits_from_the_helper_thread_and_keeps_errors():
    """Rows go on as connectivity parts, are finished where they land (the helper thread for a GPU's rows) and
    give the weights of the connectivity computed in one piece; unusable rows raise when read, and a hand-off's
    own error is raised by `ready()`."""
    from atrl.credit import CreditOptions
    from atrl.probe import connectivity_from_masses, connectivity_parts

    g = torch.Generator().manual_seed(0)
    masses = torch.rand(2, 6, 30, 3, 5, generator=g)  # (L, B, T, H, R)
    mask = torch.ones(6, 30, dtype=torch.bool)
    mask[1, 20:] = False
    masses[1, 4, 3, 0, 2] = float("nan")  # rows 4-5 arrive unusable
    conn, prof = connectivity_from_masses(masses, mask)
    credit = CreditInFlight(CreditOptions(n_workers=2), helper=True)  # the thread a GPU's rows take
    threads = []
    submit = credit.pending.submit
    credit.pending.submit = lambda *a, **k: threads.append(threading.current_thread().name) or submit(*a, **k)
    for start in (0, 2, 4):
        rows = slice(start, start + 2)
        credit.hand_on(start, mask[rows], connectivity_parts(masses[:, rows], mask[rows]))
    pending = credit.ready()
    assert len(threads) == 3 and all(t.startswith("atrl-credit-handoff") for t in threads)
    on_cpu = CreditInFlight(CreditOptions())  # rows already on the CPU: submitted on the calling thread
    on_cpu.pending.submit = lambda *a, **k: threads.append(threading.current_thread().name)
    on_cpu.hand_on(0, mask[:2], connectivity_parts(masses[:, :2], mask[:2]))
    assert threads[-1] == threading.current_thread().name and not on_cpu._handoffs
    assert pending.rows == list(range(6))
    got_conn, got_prof, _, _ = pending.inputs([0, 1, 2, 3])
    assert torch.equal(got_conn.float(), conn[:4]) and torch.equal(got_prof.float(), prof[:4])
    expected = assign_credit(conn[:4], prof[:4], mask[:4], CreditOptions())
    assert torch.equal(pending.result([0, 1, 2, 3]).weights, expected.weights)
    with pytest.raises(ValueError, match=r"conn_BT has a non-finite value .* at \(batch, token\) = \(0, 3\)"):
        pending.result([5, 4])

    broken = CreditInFlight(CreditOptions(), helper=True)
    parts = connectivity_parts(masses[:, :2], mask[:2])
    broken.hand_on(0, mask[:2, :29], parts)  # a mask one token short of the parts: finishing them fails
    with pytest.raises(RuntimeError):
        broken.ready()


def _run(out, steps, crash, *extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests" / "scripts"))
    return subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "run_recipe.py"), str(out), str(steps),
                           str(crash), *extra], capture_output=True, text=True, env=env, timeout=600,
                          start_new_session=True)  # its own process group: the SIGTERM test signals the group


def _final(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "final" / "model.safetensors"))


def test_killed_run_resumes_and_ends_where_an_uninterrupted_run_would(tmp_path):
    straight = _run(tmp_path / "a", 4, 0)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = _run(tmp_path / "b", 4, 3)
    assert killed.returncode == 3  # died at the end of step 3, after the step-2 checkpoint
    assert sorted(p.name for p in (tmp_path / "b").glob("checkpoint-*")) == ["checkpoint-2"]
    # a half-written checkpoint (no completion marker) must be ignored, not resumed from
    half = tmp_path / "b" / "checkpoint-3"
    half.mkdir()
    (half / "config.json").write_text("{")
    resumed = _run(tmp_path / "b", 4, 0)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr and "checkpoint-2" in resumed.stderr
    assert "checkpoint-3: it was not finished" in resumed.stderr
    a, b = _final(tmp_path / "a"), _final(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    start = _final_from(tmp_path / "a" / "checkpoint-2")
    assert any(not torch.equal(a[k], start[k]) for k in a), "training must have moved the weights"
    history = lambda d: [(h["step"], h["reward"]) for h in  # noqa: E731
                         json.loads((d / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]]
    assert history(tmp_path / "a") == history(tmp_path / "b")


def test_sigterm_saves_the_step_in_progress_and_the_run_resumes_to_the_same_end(tmp_path):
    """A cluster's SIGTERM (to the process group: the credit workers get it too) during step 3 of 4, no checkpoint
    due before step 100: the step finishes, checkpoint-3 is saved, the run exits with 143 and no final/; run again,
    it resumes there and ends as an uninterrupted run does."""
    extra = ("--trl.save_steps", "100", "--anchor.credit", "{n_workers: 2}")
    straight = _run(tmp_path / "a", 4, 0, *extra)
    assert straight.returncode == 0, straight.stderr[-2000:]
    stopped = _run(tmp_path / "b", 4, "term3", *extra)
    assert stopped.returncode == 128 + 15, stopped.stderr[-3000:]
    assert "SIGTERM received: step 3 is done; saving checkpoint-3 and stopping" in stopped.stderr
    assert [p.name for p in checkpoints(tmp_path / "b")[0]] == ["checkpoint-3"]
    assert not (tmp_path / "b" / "final").exists()
    _resumed_to_the_same_end(_run(tmp_path / "b", 4, 0, *extra), tmp_path / "a", tmp_path / "b")


def _resumed_to_the_same_end(resumed: subprocess.CompletedProcess, straight: Path, stopped: Path) -> None:
    """The run stopped after step 3 and run again resumed from checkpoint-3 and ended with the uninterrupted run's
    weights and per-step rewards (4 steps)."""
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "checkpoint-3" in resumed.stderr
    a, b = _final(straight), _final(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)

    def history(run: Path) -> list:
        state = json.loads((run / "trainer_state.json").read_text())
        return [(h["step"], h["reward"]) for h in state["log_history"] if "reward" in h]

    assert len(history(straight)) == 4 and history(straight) == history(stopped)


def test_ctrl_c_asks_for_the_checkpoint_and_a_second_stops_at_once():
    import signal

    from transformers import TrainerControl, TrainerState

    from atrl.rl.checkpoints import StopOnSignal

    stopper, control, state = StopOnSignal(), TrainerControl(), TrainerState(global_step=7)
    stopper.on_step_end(None, state, control)
    assert not (control.should_save or control.should_training_stop) and stopper.stopped_at is None
    stopper._handle(signal.SIGINT, None)
    stopper.on_step_end(None, state, control)
    assert control.should_save and control.should_training_stop and stopper.stopped_at == 7
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(KeyboardInterrupt):
            stopper._handle(signal.SIGINT, None)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # a third Ctrl-C: Python's own
    finally:
        signal.signal(signal.SIGINT, previous)


def _final_from(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def _mixed_file(tmp_path) -> Path:
    """Two rows, one with an image and one without: with one prompt per rank and step, the two ranks of every step
    hold one kind each."""
    example = generate(1, seed=0)[0]
    example.image.save(tmp_path / "tile.png")
    rows = [{"question": example.question, "answer": example.answer, "image": "tile.png"},
            {"question": "What is 2 + 3?", "answer": "5", "answer_type": "integer"}]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "mixed.jsonl"


def _launch(config: str, port: int, script: str, *args: str, **run) -> subprocess.CompletedProcess:
    """`accelerate launch` of a tests/scripts script on two CPU processes with configs/accelerate/<config>.yaml
    (the DeepSpeed configs are for 8 GPUs in bf16: two processes in float32 here)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests" / "scripts"))
    two = [] if config == "multi_cpu" else ["--num_processes", "2", "--mixed_precision", "no"]
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "configs" / "accelerate" / f"{config}.yaml"), *two, "--main_process_port",
                           str(port), str(ROOT / "tests" / "scripts" / script), *args],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT, **run)


def _two_ranks(out: Path, every_step: bool = True) -> tuple[dict, dict]:
    """ddp_train.py's record of each rank, after the checks every launch must pass."""
    r0, r1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2)
    assert r0["steps"] == r1["steps"] == 2 and len(r0["grad_norms"]) == 2
    assert (all if every_step else any)(g > 0 for g in r0["grad_norms"])  # a real update (each step)
    assert torch.equal(r0["params"], r1["params"])  # gradients were synchronised
    assert torch.equal(r0["weights"], r1["weights"]) and torch.equal(r0["conn"], r1["conn"])
    assert not torch.equal(r0["weights"], torch.ones_like(r0["weights"]))
    return r0, r1


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> dict:
    """Two processes trained together with DDP on the synthetic tasks: rank 0's record."""
    out = tmp_path_factory.mktemp("ddp")
    proc = _launch("multi_cpu", 29541, "ddp_train.py", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _two_ranks(out)[0]


def test_two_processes_train_together_and_agree_on_weights(ddp_run, tmp_path):
    """Two ranks train together and agree (ddp_run). On a file where one rank's batch has an image and the other's
    not, each step: TRL's image logging called a collective on the first rank only, and the ranks hung."""
    mixed = ("--data.train", str(_mixed_file(tmp_path)))
    proc = _launch("multi_cpu", 29542, "ddp_train.py", str(tmp_path / "ddp"), *mixed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _two_ranks(tmp_path / "ddp")
    # ZeRO-3 cannot: a process without an image skips the vision tower's weight gathers (gloo crashed, NCCL hangs)
    proc = _launch("zero3", 29543, "ddp_train.py", str(tmp_path / "z3"), *mixed)
    assert proc.returncode != 0 and "DeepSpeed ZeRO-3 with 2 processes on data that mixes prompts" in proc.stderr
    assert "Use ZeRO-2" in proc.stderr and not (tmp_path / "z3" / "rank0.pt").exists()


def test_two_processes_fill_their_batches_by_dynamic_sampling_together(tmp_path):
    """DAPO's dynamic sampling on two ranks: each fills its own group, redrawing as often as the other (generation
    and reward scoring are collective: a rank that stopped drawing first would leave the other waiting), and the
    ranks still agree on the weights. Counts are summed over the ranks."""
    proc = _launch("multi_cpu", 29546, "ddp_train.py", str(tmp_path / "ds"), "--anchor.dynamic_sampling", "true",
                   "--anchor.dynamic_sampling_rounds", "4", "--rewards.custom", "{ddp_train:split_reward: 1.0}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = _two_ranks(tmp_path / "ds", every_step=False)
    assert r0["dynamic"] == r1["dynamic"] and len(r0["dynamic"]) == 2
    for step in r0["dynamic"]:  # two ranks of one group each: a group drawn is trained on, dropped or surplus
        assert step["drawn_groups"] == 2 + step["dropped_groups"] + step["surplus_groups"]
        assert step["frac_reward_zero_std"] == step["filled_groups"] / 2
    assert sum(step["dropped_groups"] for step in r0["dynamic"]) > 0  # groups were redrawn


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_as_ddp_does(ddp_run, tmp_path, stage):
    """The shipped ZeRO-2 / ZeRO-3 configs (DeepSpeed on the CPU, two processes): the ranks agree, and after two
    steps the weights, the connectivity the probes measure and the credit weights on a fixed batch are those of
    DDP. ZeRO-3 holds a shard of each weight per process, gathered for the forward: the probes see whole layers.
    (Adam turns the last bits of a near-zero gradient into a whole step of the learning rate, 1e-2: ZeRO-3's
    weights differ from DDP's by about 1e-4 after two steps, ZeRO-2's by about 1e-7.)"""
    proc = _launch(f"zero{stage}", 29550 + stage, "ddp_train.py", str(tmp_path / "ds"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, _ = _two_ranks(tmp_path / "ds")
    assert r0["zero_stage"] == stage and ddp_run["zero_stage"] is None  # DeepSpeed's engine, not DDP renamed
    assert (r0["sharded_params"] > 0) == (stage == 3)  # ZeRO-3: each process holds a shard of the weights
    assert torch.allclose(r0["params"], ddp_run["params"], atol=1e-3, rtol=0)
    assert torch.allclose(r0["conn"], ddp_run["conn"], atol=1e-3, rtol=0)
    assert torch.allclose(r0["weights"], ddp_run["weights"], atol=1e-4, rtol=0)


def test_lora_under_zero3_trains_the_adapter_on_every_process(tmp_path):
    """LoRA with ZeRO-3: the run's opening summary counted the adapted modules on a fresh copy of the model, built
    on the first process only, whose ZeRO-3 initialisation waited for the others: the launch hung before training."""
    lora = ("--lora", "{r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}")
    proc = _launch("zero3", 29544, "ddp_train.py", str(tmp_path / "z3"), *lora)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the second step's group happens to score alike here (no gradient), with DDP as well
    r0, _ = _two_ranks(tmp_path / "z3", every_step=False)
    assert r0["zero_stage"] == 3 and r0["lora_b_max"] > 0  # lora_B starts at 0: the adapter was trained
    proc = _launch("multi_cpu", 29545, "ddp_train.py", str(tmp_path / "ddp"), *lora)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp, _ = _two_ranks(tmp_path / "ddp", every_step=False)
    assert torch.allclose(r0["params"], ddp["params"], atol=1e-3, rtol=0)
    assert r0["lora_b_max"] == pytest.approx(ddp["lora_b_max"], rel=1e-3)


def test_zero3_stops_on_sigterm_with_one_checkpoint_and_resumes_to_the_same_end(tmp_path):
    """SIGTERM to a 2-process ZeRO-3 launch during step 3 of 4: both processes finish the step and save
    checkpoint-3 together (a collective save, sharded optimizer states); run again, it resumes there and ends with
    the weights and rewards of an uninterrupted run."""
    common = ("4", "0", "--trl.save_steps", "100")
    straight = _launch("zero3", 29561, "run_recipe.py", str(tmp_path / "a"), *common)
    assert straight.returncode == 0, straight.stderr[-3000:]
    stopped = _launch("zero3", 29562, "run_recipe.py", str(tmp_path / "b"), "4", "term3", "--trl.save_steps", "100",
                      start_new_session=True)  # the signal goes to the launch's process group
    assert stopped.returncode != 0 and "SIGTERM received: step 3 is done" in stopped.stderr, stopped.stderr[-3000:]
    assert [p.name for p in checkpoints(tmp_path / "b")[0]] == ["checkpoint-3"]
    assert (tmp_path / "b" / "checkpoint-3" / "global_step3").is_dir()  # DeepSpeed's own shards
    assert not (tmp_path / "b" / "final").exists()
    resumed = _launch("zero3", 29563, "run_recipe.py", str(tmp_path / "b"), *common)
    _resumed_to_the_same_end(resumed, tmp_path / "a", tmp_path / "b")
