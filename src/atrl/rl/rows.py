"""The training forward on the rows that learn: a micro-batch without its zero-advantage rows, the same gradient.

A completion whose advantage is 0 at every token (its group's rewards all equal, the usual case for most groups
of an RL batch) adds exactly 0 to the policy loss and to its gradient: every loss TRL's GRPOTrainer forms is the
advantage times a ratio term. Leaving those rows out of the training forward and backward therefore changes the
step only through the loss's normaliser, which `loss_scale` restores, and saves their share of the compute. It
holds as long as nothing else in the loss reads every row: no KL term (beta 0), no entropy bonus, no
`top_entropy_quantile` mask (a quantile of the micro-batch), no auxiliary router loss, no PAPO terms, and a credit
mode without a statistic of the rows at hand (`CreditMode.batch_stat`). `skips_rows` checks these.

Rows are cut as TRL cuts a generation batch into micro-batches (`split_pixel_values_by_grid`, index,
`unsplit_pixel_values_by_grid`), so the image inputs follow their rows. That is exact per row when the images'
tensors can be split by row: a Qwen-style `image_grid_thw`, or one image per row; otherwise (several images in a
row of a family without a grid) every row is kept.
"""

from __future__ import annotations

import torch
from trl.trainer.utils import split_pixel_values_by_grid, unsplit_pixel_values_by_grid

# how each loss type normalises its sum over the micro-batch (TRL 1.16, GRPOTrainer._compute_loss)
FIXED_NORMALISER = ("dapo", "cispo", "vespo")  # num_items_in_batch: the generation batch's tokens
ROW_MEAN = ("grpo", "sapo", "luspo", "dr_grpo")  # a mean over the micro-batch's rows
TOKEN_MEAN = ("bnpo",)  # a mean over the micro-batch's completion tokens


def skips_rows(args, credit_mode, papo, aux_loss: bool, entropy_bonus: bool) -> str | None:
    """None when zero-advantage rows may leave the training forward under GRPOConfig `args`; else the reason."""
    if args.loss_type not in FIXED_NORMALISER + ROW_MEAN + TOKEN_MEAN:
        return f"loss_type {args.loss_type!r} is not one whose normaliser is known here"
    if args.beta != 0.0:
        return f"beta={args.beta}: the KL term reads every row"
    if getattr(args, "top_entropy_quantile", 1.0) < 1.0:
        return "top_entropy_quantile < 1: the entropy mask is a quantile over the micro-batch"
    if entropy_bonus:
        return "the entropy bonus reads every row"
    if aux_loss:
        return "the router's auxiliary loss reads every row"
    if papo is not None:
        return "PAPO's terms read every row"
    if credit_mode.batch_stat is not None:
        return f"credit mode {credit_mode.name!r} weighs with a statistic of the rows at hand"
    return None


def learning_rows(advantages: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the rows with a non-zero advantage at some token ((B,) or (B, T) advantages)."""
    a = advantages if advantages.dim() == 2 else advantages[:, None]
    return (a != 0).any(dim=1)


def rows_to_keep(learns: torch.Tensor, num_images: list[int] | None, image_grid: bool) -> list[int] | None:
    """The rows of a micro-batch that its forward needs, from `learns` (B,) (`learning_rows`, on the host), or None
    to keep them all (nothing to leave out, or images that cannot be split by row: several in a row of a family
    without an image grid). At least one row stays, one with an image if the micro-batch has any: under data
    parallelism every process runs the forward, and the vision tower, for the gradient all-reduce."""
    B = int(learns.numel())
    if bool(learns.all()):
        return None
    if num_images is not None and not image_grid and any(int(n) != 1 for n in num_images):
        return None
    rows = learns.nonzero().flatten().tolist()
    with_image = [i for i in range(B) if num_images is not None and int(num_images[i]) > 0]
    if with_image and not any(i in with_image for i in rows):
        rows = sorted({*rows, with_image[0]})
    return rows or [0]


def pad_rows(rows: list[int] | None, B: int, count: int) -> list[int] | None:
    """`rows` with rows left out added back (in order) up to `count`, the most any process keeps: TRL gathers
    per-row metrics across processes, which needs the same number of rows on each. None when that is all B."""
    if count >= B or rows is None:
        return None
    kept = set(rows)
    extra = [i for i in range(B) if i not in kept][:count - len(rows)]
    return sorted(rows + extra)


def select_rows(inputs: dict, rows: list[int]) -> dict:
    """The micro-batch `inputs` (as TRL hands it to `_compute_loss`) cut to `rows`, image inputs included."""
    B = int(inputs["completion_ids"].shape[0])
    split = split_pixel_values_by_grid(dict(inputs))
    index = torch.tensor(rows, dtype=torch.long)
    out = {}
    for key, value in split.items():
        if isinstance(value, list) and len(value) == B:
            out[key] = [value[i] for i in rows]
        elif isinstance(value, torch.Tensor) and value.dim() > 0:
            if value.shape[0] != B:
                raise ValueError(f"rows: input {key!r} has {value.shape[0]} entries along its first axis for a "
                                 f"micro-batch of {B} rows; it cannot be cut by row")
            out[key] = value[index.to(value.device)]
        elif isinstance(value, list):
            raise ValueError(f"rows: input {key!r} is a list of {len(value)} for a micro-batch of {B} rows")
        else:
            out[key] = value
    return unsplit_pixel_values_by_grid(out)


def loss_scale(loss_type: str, inputs: dict, kept: dict) -> float:
    """The factor that turns the loss of the kept rows into the loss of the whole micro-batch `inputs`."""
    if loss_type in FIXED_NORMALISER:
        return 1.0
    if loss_type in ROW_MEAN:
        return kept["completion_ids"].shape[0] / inputs["completion_ids"].shape[0]

    def tokens(batch: dict) -> float:
        mask = batch["completion_mask"] if "tool_mask" not in batch else batch["completion_mask"] * batch["tool_mask"]
        return max(float(mask.sum()), 1.0)

    return tokens(kept) / tokens(inputs)
