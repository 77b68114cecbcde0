"""DAPO's dynamic sampling for ATRLTrainer (arXiv 2503.14476, section 3.3): a group whose rewards are all equal
has zero advantage, so it carries no gradient; it is dropped, and groups of freshly drawn prompts take its place
until the generation batch is full of groups that teach something.

How it runs inside TRL's step (`fill_groups`):
1. The generation batch's rows are rolled out with TRL's own `_generate` and scored with TRL's own reward
   computation; each group of `num_generations` rows is kept or dropped by its rewards (the weighted sum of the
   reward functions, as TRL's advantage uses: all equal within 1e-8 is dropped).
2. While groups are missing and fewer than `rounds` redraws have run, prompts are drawn at random from the
   training set (a seeded stream of its own, apart from the epoch's order), rolled out and scored the same way.
3. The batch is the first kept groups in the order drawn; when the redraws run out, it is filled with dropped
   groups (counted). TRL then scores the chosen rows as usual, with the rollouts and rewards already made
   (`_generate` and `_calculate_rewards` return them), so the old-log-prob pass, the probes on it and the
   advantages see exactly the chosen batch, and a reward function is not run twice on a row (nor can a
   sampling judge score a kept group all-equal the second time).

Each process holds whole groups (its share of the generation batch is a multiple of `num_generations`) and
decides for its own; the processes run the same number of rounds, since generation and reward scoring are
collective. The completion-length metrics TRL logs while generating cover every group drawn.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch

# TRL's _generate returns, per row: prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields
# (a dict), images, tool_images; the lists may be None, tool_images [] without tools.
Rollouts = tuple


def rollout_prompts(inputs: list[dict]) -> list:
    """The prompts TRL's `_generate_and_score_completions` hands `_generate` for these rows (no tools or
    environments): the row's prompt, with its images put into the messages as TRL does."""
    from trl.data_utils import prepare_multimodal_messages

    prompts = [x["prompt"] for x in inputs]
    if "images" in inputs[0]:
        images = [x.get("images") for x in inputs]
    elif "image" in inputs[0]:
        images = [[x.get("image")] if x.get("image") is not None else None for x in inputs]
    else:
        images = None
    if images is not None and all(imgs == [] for imgs in images):
        images = None
    if images is None:
        return prompts
    return [prepare_multimodal_messages(p, images=imgs) for p, imgs in zip(prompts, images, strict=True)]


def all_equal_groups(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """(N / group,) True where a group's rewards are all equal (NaN, an unscorable row, left out)."""
    grouped = rewards.view(-1, group).double()
    spread = torch.nan_to_num(grouped.nan_to_num(float("-inf")).amax(1) - grouped.nan_to_num(float("inf")).amin(1),
                              nan=0.0, posinf=0.0, neginf=0.0)
    return spread.abs() <= 1e-8


def take_rows(rollouts: Rollouts, rows: list[int]) -> Rollouts:
    """The rollouts of `rows`, in that order."""
    prompt_ids, completion_ids, tool_mask, completions, logprobs, extra, images, tool_images = rollouts

    def pick(values):
        return None if values is None else [values[i] for i in rows]

    extra = {k: [v[i] for i in rows] if isinstance(v, list) else v for k, v in (extra or {}).items()}
    return (pick(prompt_ids), pick(completion_ids), pick(tool_mask), pick(completions), pick(logprobs), extra,
            pick(images), pick(tool_images) if tool_images else tool_images)  # [] without tools


def concat_rollouts(parts: list[Rollouts]) -> Rollouts:
    """Rollouts of several calls, one after another (a part without images stands for rows with none)."""
    n = [len(p[1]) for p in parts]
    fields = []
    for k in (0, 1, 2, 3, 4, 6, 7):
        values = [p[k] for p in parts]
        if all(v is None for v in values) or (k == 7 and not any(values)):  # tool images: [] without tools
            fields.append(values[0])
            continue
        if any(v is None for v in values) and k not in (6, 7):
            raise RuntimeError(f"dynamic sampling: rollout field {k} is missing from some rounds and not others")
        empty = [] if k == 6 else None
        fields.append([x for v, m in zip(values, n) for x in (v if v is not None else [empty] * m)])
    extra: dict[str, Any] = {}
    for key in {k for p in parts for k in (p[5] or {})}:
        values = [(p[5] or {}).get(key) for p in parts]
        extra[key] = [x for v in values for x in v] if all(isinstance(v, list) for v in values) else values[0]
    prompt_ids, completion_ids, tool_mask, completions, logprobs, images, tool_images = fields
    return prompt_ids, completion_ids, tool_mask, completions, logprobs, extra, images, tool_images


@dataclass
class GroupFiller:
    """Dynamic sampling's state: its own stream of redrawn prompts, and the cap on redraw rounds."""

    rounds: int
    seed: int
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def draw(self, dataset, groups: int, group: int) -> list[dict]:
        """`groups` prompts drawn at random from `dataset`, each row repeated `group` times (fresh dicts)."""
        picks = [self.rng.randrange(len(dataset)) for _ in range(groups)]
        return [dict(dataset[i]) for i in picks for _ in range(group)]

    def fill(self, trainer, inputs: list[dict]) -> tuple[list[dict], Rollouts, torch.Tensor, dict[str, int]]:
        """The rows of a generation batch full of groups whose rewards differ, their rollouts, their rewards per
        function as `_calculate_rewards` made them for this process's rows (n, functions), and this process's
        counts: groups drawn, dropped (all equal), filled with all-equal ones when the rounds ran out, surplus
        (varied groups drawn beyond the batch, e.g. on a process that was full while another redrew), and redraw
        rounds (see the module docstring). Drawn = batch + dropped + surplus. `trainer` is the ATRLTrainer: its
        `_generate`, `_calculate_rewards`, train set and processes."""
        group = trainer.num_generations
        if len(inputs) % group:
            raise ValueError(
                f"anchor.dynamic_sampling: this process's generation batch has {len(inputs)} rows, not whole groups "
                f"of num_generations={group}; make per_device_train_batch_size x steps_per_generation a multiple of "
                "num_generations")
        wanted = len(inputs) // group
        accelerator = trainer.accelerator
        weights = trainer.reward_weights.to(accelerator.device)
        kept: list[tuple[list[dict], Rollouts, torch.Tensor]] = []  # (rows, rollouts, rewards per function)
        spare: list[tuple[list[dict], Rollouts, torch.Tensor]] = []
        pool, rounds, drawn = list(inputs), 0, 0
        while True:
            prompts = rollout_prompts(pool)
            rollouts = trainer._generate(prompts)
            per_func = trainer._calculate_rewards(pool, prompts, rollouts[3], rollouts[1])
            rewards = (per_func * weights.unsqueeze(0)).nansum(dim=1)
            rewards[torch.isnan(per_func).all(dim=1)] = torch.nan
            n = len(pool)
            mine = slice(accelerator.process_index * n, (accelerator.process_index + 1) * n)
            local, local_per_func = rewards[mine].cpu(), per_func[mine]
            for g, equal in enumerate(all_equal_groups(local, group).tolist()):
                rows = slice(g * group, (g + 1) * group)
                (spare if equal else kept).append((pool[rows], take_rows(rollouts, list(range(n))[rows]),
                                                   local_per_func[rows]))
            drawn += n // group
            missing = torch.tensor(max(wanted - len(kept), 0), device=accelerator.device)
            if accelerator.num_processes > 1:
                missing = accelerator.gather(missing.view(1)).max()
            missing = int(missing)
            if missing == 0 or rounds == self.rounds:
                break
            rounds += 1
            rate = max(len(kept), 1) / drawn  # draw enough to fill at the rate seen so far, one batch at most
            pool = self.draw(trainer.train_dataset, min(wanted, math.ceil(missing / rate)), group)
        chosen = kept[:wanted]
        filled = wanted - len(chosen)
        chosen += spare[:filled]
        counts = {"drawn_groups": drawn, "dropped_groups": len(spare) - filled, "filled_groups": filled,
                  "surplus_groups": len(kept) - (wanted - filled), "redraw_rounds": rounds}
        rows = [row for rows, _, _ in chosen for row in rows]
        return rows, concat_rollouts([r for _, r, _ in chosen]), torch.cat([f for _, _, f in chosen]), counts
