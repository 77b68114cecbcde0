"""The published baselines: the 80/20 rule against TRL's own top_entropy_quantile, VPPO's score, mask and trajectory
shaping against independent computations, the patch masking against the processor, and the extra forwards each
mode adds to a step, counted."""

import math

import numpy as np
import pytest
import torch

from atrl.credit import CreditOptions, PendingCredit, assign_credit
from atrl.models.masking import black_value, mask_image_patches
from atrl.models.zoo import build_tiny_vlm
from atrl.probe.dependency import sampled_token_dependency
from atrl.rl.config import AnchorConfig


def _batch(seed=0, B=6, T=30):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(torch.randint(5, T + 1, (B,), generator=g).tolist()):
        mask[b, :n] = True
    score = torch.rand(B, T, generator=g).masked_fill(~mask, 0.0)
    ent = (3 * torch.rand(B, T, generator=g)).masked_fill(~mask, 0.0)
    return score, torch.zeros(B, T, 4), mask, ent


def test_entropy_8020_masks_the_batch_top_share_without_rescaling():
    """An independent computation: the 0.8 quantile of all valid entropies (torch.quantile), tokens at or above it
    weight 1, the rest 0; padding changes nothing."""
    score, prof, mask, ent = _batch()
    res = assign_credit(score, prof, mask, CreditOptions(mode="entropy_8020", entropy_top=0.2), entropy_BT=ent)
    q = torch.quantile(ent[mask].float(), 0.8)
    expected = ((ent >= q) & mask).float()
    assert torch.equal(res.weights, expected)
    assert res.weights[mask].sum() == pytest.approx(0.2 * mask.sum(), abs=1.0)  # a fifth of the tokens, not rescaled
    padded = assign_credit(torch.nn.functional.pad(score, (0, 7)), torch.nn.functional.pad(prof, (0, 0, 0, 7)),
                           torch.nn.functional.pad(mask, (0, 7)), CreditOptions(mode="entropy_8020"),
                           entropy_BT=torch.nn.functional.pad(ent, (0, 7), value=99.0))
    assert torch.equal(padded.weights[:, :30], res.weights) and (padded.weights[:, 30:] == 0).all()


def _vppo_reference(dep, mask, rows_now, top=0.4, scale_min=0.9):
    """VPPO's token gradient filtering and trajectory advantage shaping as its paper's code computes them, in batch
    form: a sort-based top-k per response, the per-response mean dependency min-max normalised over the whole batch,
    and the scale range set so that the scales of the rows at hand average 1."""
    n = mask.sum(1)
    k = torch.ceil(n * top).int()
    keyed = dep.masked_fill(~mask, -torch.inf)
    _, order = torch.sort(keyed, dim=1, descending=True)
    ranks = torch.arange(dep.shape[1]).expand_as(dep) < k[:, None]
    top_mask = torch.zeros_like(mask).scatter(1, order, ranks) & mask
    s = (dep * mask).sum(1) / n.clamp(min=1)
    lo, hi = torch.quantile(s[n > 0], 0.0), torch.quantile(s[n > 0], 1.0)
    normed = ((s - lo) / (hi - lo)).clamp(0, 1)
    mu = normed[rows_now].mean()
    top_scale = scale_min + (1 - scale_min) / (mu + 1e-8)
    scale = scale_min + normed * (top_scale - scale_min)
    return (top_mask.double() * scale[:, None].double())[rows_now]


def test_vppo_filters_and_shapes_as_an_independent_computation_does():
    dep, prof, mask, _ = _batch(1)
    res = assign_credit(dep, prof, mask, CreditOptions(mode="vppo"))
    ref = _vppo_reference(dep, mask, list(range(6)))
    assert torch.allclose(res.weights.double(), ref, atol=1e-6)
    scales = res.weights.max(1).values
    assert scales.mean().item() == pytest.approx(1.0, abs=1e-5)  # the shaping averages 1 over the batch
    assert scales.min().item() == pytest.approx(0.9, abs=1e-6)  # ... with its floor on the least dependent response
    # a micro-batch: the range is the generation batch's, the mean-1 constraint the micro-batch's
    pending = PendingCredit(CreditOptions(mode="vppo")).submit(dep, prof, mask)
    micro = [4, 1, 2]
    assert torch.allclose(pending.result(micro).weights.double(), _vppo_reference(dep, mask, micro), atol=1e-6)


def test_vppo_dependency_is_the_k3_kl_of_the_sampled_token():
    logp = torch.tensor([[-0.1, -2.0, -0.5, -3.0]])
    masked = torch.tensor([[-0.1, -0.5, -2.5, -40.0]])
    mask = torch.tensor([[True, True, True, False]])
    d = sampled_token_dependency(logp, masked, mask)
    by_hand = [0.0, math.exp(1.5) - 1.5 - 1, math.exp(-2.0) + 2.0 - 1, 0.0]  # the last: padding
    assert d[0].tolist() == pytest.approx(by_hand, rel=1e-6)
    big = sampled_token_dependency(torch.tensor([[-30.0]]), torch.tensor([[0.0]]), torch.tensor([[True]]))
    assert big.item() == 10.0  # log-ratio clamped at 20, then the estimate at 10


def test_masked_patches_hold_what_the_processor_makes_of_black():
    from PIL import Image

    _, processor = build_tiny_vlm("qwen2_5_vl")
    ip = processor.image_processor
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8))
    pixels = ip(images=[image], return_tensors="pt")["pixel_values"]
    black = ip(images=[Image.new("RGB", (112, 112), (0, 0, 0))], return_tensors="pt")["pixel_values"]
    masked, chosen = mask_image_patches(pixels, ip, prob=0.5, generator=torch.Generator().manual_seed(0))
    assert 0.3 < chosen.float().mean() < 0.7
    assert torch.allclose(masked[chosen], black[chosen], atol=1e-5)  # the processor's own black patches
    assert torch.equal(masked[~chosen], pixels[~chosen]) and not torch.equal(masked, pixels)
    images = torch.randn(2, 3, 28, 42)
    out, blocks = mask_image_patches(images, ip, prob=0.5, generator=torch.Generator().manual_seed(1))
    assert blocks.shape == (2, 2, 3)
    b, r, c = [int(i) for i in blocks.nonzero()[0]]
    assert torch.allclose(out[b, :, 14 * r:14 * r + 14, 14 * c:14 * c + 14],
                          black_value(ip)[:, None, None].expand(3, 14, 14))
    with pytest.raises(ValueError, match="neither flattened patches"):
        mask_image_patches(torch.zeros(3), ip)
    with pytest.raises(ValueError, match="anchor.mask_prob=1.5"):
        AnchorConfig(mode="vppo", mask_prob=1.5)


def test_entropy_8020_takes_trls_own_top_entropy_quantile_step(tmp_path):
    """TRL's GRPOTrainer with top_entropy_quantile=0.2 and ATRLTrainer in `entropy_8020` mode (TRL's quantile off)
    take the same SGD step from the same rollouts: the same loss, the same gradients."""
    from test_trainer import _trainer, assert_same_step
    from trl import GRPOTrainer

    sgd = dict(max_steps=1, optim="sgd", learning_rate=1.0)
    theirs = _trainer(tmp_path / "trl", cls=GRPOTrainer, top_entropy_quantile=0.2, **sgd)
    theirs.train()
    ours = _trainer(tmp_path / "atrl", anchor=AnchorConfig(mode="entropy_8020"), **sgd)
    ours.train()
    plain = _trainer(tmp_path / "plain", cls=GRPOTrainer, **sgd)
    plain.train()
    lt = [h["loss"] for h in theirs.state.log_history if "loss" in h]
    lo = [h["loss"] for h in ours.state.log_history if "loss" in h]
    assert lt == pytest.approx(lo, abs=1e-7)
    assert_same_step(ours, theirs, plain, atol=1e-6, changed=1e-5, what="the 80/20 mask")
    kept = ours.last_credit["result"].weights[ours.last_credit["mask"]]
    assert set(kept.unique().tolist()) <= {0.0, 1.0} and 0.1 < kept.mean() < 0.35


def _forward_rows(trainer) -> list[int]:
    """Rows through the policy's forward outside generation, counted by a pre-hook."""
    rows, counting = [0], [True]
    trainer.model.register_forward_pre_hook(
        lambda module, args, kwargs: rows.__setitem__(0, rows[0] + (kwargs.get("input_ids", args[0] if args else None)
                                                                    .shape[0] if counting[0] else 0)),
        with_kwargs=True)
    generate = trainer._generate

    def quiet(*a, **kw):
        counting[0] = False
        try:
            return generate(*a, **kw)
        finally:
            counting[0] = True

    trainer._generate = quiet
    return rows


@pytest.mark.parametrize("spg, expected", [(1, {"uniform": 0, "atrl": 0, "entropy_8020": 0, "vppo": 2,
                                                "blank_image_kl": 2, "atrl+papo": 1}),
                                           (2, {"uniform": 0, "atrl": 0, "vppo": 1, "atrl+papo": 1})])
def test_extra_forwards_per_generation_batch_are_what_the_registry_declares(tmp_path, spg, expected):
    """Forward passes over the generation batch beyond uniform's, per mode: without an old-log-prob pass (spg 1)
    and with one (spg 2, the vLLM path); each equals `CreditMode.extra_forwards`."""
    from test_trainer import _trainer

    from atrl.credit import credit_mode

    rows = {}
    for mode in expected:  # every row trained: rows left out of the training forward would cut the count
        name, _, papo = mode.partition("+")
        anchor = AnchorConfig(mode=name, report_steps=0, papo={} if papo else None, skip_zero_advantage=False)
        trainer = _trainer(tmp_path / mode, anchor=anchor, max_steps=spg, steps_per_generation=spg)
        counted = _forward_rows(trainer)
        trainer.train()
        rows[mode] = counted[0]
        logs = [h for h in trainer.state.log_history if "loss" in h]
        assert len(logs) == spg and all(math.isfinite(h["loss"]) for h in logs)
    batch = 4 * spg  # one generation batch of 4 completions per optimizer step
    extra = {mode: (n - rows["uniform"]) / batch for mode, n in rows.items()}
    assert extra == expected
    declared = {m: credit_mode(m.partition("+")[0]).extra_forwards(old_logps=spg > 1) + ("+papo" in m)
                for m in expected}  # PAPO: one forward per micro-batch, so one per generation batch
    assert extra == declared


def _every_other_patch(pixel_values, image_processor, prob, generator=None):
    """A fixed mask for the PAPO test (both trainers draw the same): every other patch blacked."""
    chosen = torch.arange(pixel_values.shape[0]) % 2 == 0
    out = pixel_values.clone()
    out[chosen] = black_value(image_processor).repeat_interleave(pixel_values.shape[1] // 3).to(out)
    return out, chosen


def test_papo_adds_its_perception_and_entropy_terms_as_an_independent_computation_does(tmp_path, monkeypatch):
    """One SGD step of ATRLTrainer (uniform credit) with PAPO against a GRPOTrainer whose loss adds PAPO's terms
    computed from explicit logits (log-softmax, gathered sampled tokens, entropies): the same parameters."""
    from test_trainer import _trainer, assert_same_step
    from trl import GRPOTrainer

    from atrl.rl import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "mask_image_patches", _every_other_patch)
    papo = {"coef": 0.5, "mask_prob": 0.5, "entropy_coef": 0.1, "masked_entropy_coef": 0.2}

    class Reference(GRPOTrainer):
        def _compute_loss(self, model, inputs):
            loss = super()._compute_loss(model, inputs)
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
            att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
            T = inputs["completion_ids"].shape[1]
            extra = {k: inputs[k] for k in ("image_grid_thw", "mm_token_type_ids") if k in inputs}

            def branch(pixels):
                logits = model(input_ids=ids, attention_mask=att, pixel_values=pixels, logits_to_keep=T + 1,
                               **extra).logits[:, :-1] / self.temperature
                logp_all = torch.log_softmax(logits.float(), -1)
                logp = logp_all.gather(-1, inputs["completion_ids"][..., None])[..., 0]
                return logp, -(logp_all.exp() * logp_all).sum(-1)

            logp, ent = branch(inputs["pixel_values"])
            masked_pixels, _ = _every_other_patch(inputs["pixel_values"], self.processing_class.image_processor, 0.5)
            masked_logp, masked_ent = branch(masked_pixels)
            d = masked_logp.detach() - logp
            mask = inputs["completion_mask"].float()
            n = mask.sum() * self.current_gradient_accumulation_steps
            return (loss - papo["coef"] * ((d.exp() - d - 1) * mask).sum() / n
                    + papo["entropy_coef"] * (ent * mask).sum() / n
                    + papo["masked_entropy_coef"] * (masked_ent * mask).sum() / n)

    sgd = dict(max_steps=1, optim="sgd", learning_rate=1.0)
    ours = _trainer(tmp_path / "atrl", anchor=AnchorConfig(mode="uniform", papo=papo), **sgd)
    ours.train()
    reference = _trainer(tmp_path / "ref", cls=Reference, **sgd)
    reference.train()
    plain = _trainer(tmp_path / "plain", cls=GRPOTrainer, **sgd)
    plain.train()
    assert_same_step(ours, reference, plain, atol=1e-5, changed=1e-4, what="PAPO")
    logs = [h for h in ours.state.log_history if "loss" in h]
    assert logs[0]["atrl/papo/kl"] > 0 and logs[0]["atrl/papo/entropy"] > 0
    with pytest.raises(ValueError, match=r"anchor.papo.mask_prob=1.0"):
        AnchorConfig(papo={"mask_prob": 1.0})
    with pytest.raises(ValueError, match=r"anchor.papo.*unknown.*'gamma'|gamma"):
        AnchorConfig(papo={"gamma": 0.01})


def _split_reward(prompts, completions, answer, **columns):
    """All equal (1.0) within the groups of prompts whose answer has an even length; varied for the others."""
    return [1.0 if len(a) % 2 == 0 else len(set(c[-1]["content"])) / 10 for a, c in zip(answer, completions)]


def _constant_reward(prompts, completions, **columns):
    return [1.0] * len(completions)


@pytest.mark.parametrize("reward", [_split_reward, _constant_reward], ids=["some-equal", "all-equal"])
def test_dynamic_sampling_drops_all_equal_groups_and_fills_the_batch_with_fresh_ones(tmp_path, reward):
    """DAPO's dynamic sampling: the batch TRL scores and trains on holds no group whose rewards are all equal
    (TRL's own advantages and its `frac_reward_zero_std` say so), its rollouts are the ones made while choosing
    (no second generation) and so are its rewards (no second scoring), and the counts add up; when no prompt
    gives a varied group, the redraws stop at the cap and the batch is filled with all-equal groups, counted."""
    from test_trainer import _trainer
    from trl import GRPOTrainer

    from atrl.data.synthetic import generate

    answers = [ex.answer for ex in generate(8, seed=0)]
    assert {len(a) % 2 for a in answers} == {0, 1}  # both kinds of prompt are in the data
    rounds = 2
    trainer = _trainer(tmp_path, reward=reward, max_steps=3,
                       anchor=AnchorConfig(mode="uniform", report_steps=0, dynamic_sampling=True,
                                           dynamic_sampling_rounds=rounds))
    made, scored = [], []
    base_generate = GRPOTrainer._generate

    def counting_generate(self, prompts):
        made.append(len(prompts))
        return base_generate(self, prompts)

    score = trainer._generate_and_score_completions

    def keep(inputs):
        out = score(inputs)
        scored.append(out["advantages"].view(-1, 4).clone())
        return out

    trainer._generate_and_score_completions = keep
    rewarded = []
    reward_func = trainer.reward_funcs[0]

    def counting_reward(prompts, completions, **columns):
        rewarded.append(len(completions))
        return reward_func(prompts=prompts, completions=completions, **columns)

    trainer.reward_funcs[0] = counting_reward
    GRPOTrainer._generate = counting_generate
    try:
        trainer.train()
    finally:
        GRPOTrainer._generate = base_generate
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(math.isfinite(h["loss"]) for h in logs)
    counts = {k: [h[f"atrl/dynamic/{k}"] for h in logs] for k in ("drawn_groups", "dropped_groups",
                                                                   "filled_groups", "surplus_groups", "redraw_rounds")}
    assert sum(counts["redraw_rounds"]) + 3 == len(made)  # one generation per round, none when TRL scores
    assert sum(made) == 4 * sum(counts["drawn_groups"])
    assert rewarded == made  # each rollout scored once: TRL takes the rewards made while choosing
    for step, h in enumerate(logs):  # each step's batch is one group: drawn = batch + dropped + surplus
        assert counts["drawn_groups"][step] == 1 + counts["dropped_groups"][step] + counts["surplus_groups"][step]
        assert h["frac_reward_zero_std"] == counts["filled_groups"][step]  # TRL's own count on the trained batch
        if counts["filled_groups"][step]:  # filled only once the redraws ran out
            assert counts["redraw_rounds"][step] == rounds
        else:
            assert (scored[step] != 0).any()  # the trained group carries a gradient
    if reward is _constant_reward:
        assert counts["filled_groups"] == [1, 1, 1] and counts["redraw_rounds"] == [rounds] * 3
    else:
        assert sum(counts["dropped_groups"]) > 0 and counts["filled_groups"].count(0) >= 2
    with pytest.raises(ValueError, match="anchor.dynamic_sampling_rounds=-1"):
        AnchorConfig(dynamic_sampling=True, dynamic_sampling_rounds=-1)
