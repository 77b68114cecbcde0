"""Colour alignment of a VLM's vision side: `atrl sft --align-steps N`, before the supervised pass.

A random vision tower and connector beside a pretrained decoder learn slowly from reference traces: the one word
a trace takes from the image (the colour) is a small part of its loss, and the decoder does not yet look at the
image tokens, so little gradient reaches them. This stage trains the tower and connector alone, with no decoder
forward: each image token's output is pulled (mean squared error) towards the decoder's input embedding of the
word naming the colour under it in the picture (" red", " white" for the background). Which part of the picture
a token shows comes from the probes' layout (`atrl.probe.layout`: the region under each token, with the region
grid set to the token grid), so it holds for every family the probes lay out. After it, the image tokens read to
the decoder like the colour words of their places, and the supervised pass teaches it to name the asked one.
"""

from __future__ import annotations

import inspect
import math
import random
from typing import Any

import torch

from ..data.synthetic import BACKGROUND, COLOURS


def colour_words() -> dict[str, tuple[int, int, int]]:
    """The synthetic images' palette by name, the background as "white"."""
    return {**COLOURS, "white": BACKGROUND}


def _region_colours(image, grid: tuple[int, int], palette: dict[str, tuple[int, int, int]]) -> list[str]:
    """The palette name most pixels of each of the grid's rectangles are nearest to, in raster order."""
    import numpy as np

    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    names = list(palette)
    centres = np.array([palette[n] for n in names], dtype=np.float32)
    nearest = ((pixels[:, :, None, :] - centres) ** 2).sum(-1).argmin(-1)  # (H, W) palette index per pixel
    h, w = nearest.shape
    rows, cols = grid
    out = []
    for r in range(rows):
        for c in range(cols):
            cell = nearest[r * h // rows:(r + 1) * h // rows, c * w // cols:(c + 1) * w // cols]
            out.append(names[int(np.bincount(cell.ravel(), minlength=len(names)).argmax())])
    return out


def _image_features(model, batch: dict[str, Any]) -> torch.Tensor:
    """(N, hidden) features of the batch's image tokens, in the order the model puts them in the sequence."""
    wanted = inspect.signature(model.get_image_features).parameters
    out = model.get_image_features(**{k: v for k, v in batch.items() if k in wanted and k != "input_ids"})
    out = getattr(out, "pooler_output", out)
    if isinstance(out, (list, tuple)):
        out = torch.cat([f.reshape(-1, f.shape[-1]) for f in out])
    return out.reshape(-1, out.shape[-1])


def align_vision(model, processor, rows: list[dict[str, Any]], *, steps: int, batch_size: int = 32,
                 learning_rate: float = 3e-3, seed: int = 0, token_grid: int | None = None,
                 progress: bool = True) -> list[float]:
    """Train `model`'s vision tower and connector for `steps` batches of `rows` (dicts with `prompt`, `image`)
    so that each image token's feature is the decoder's embedding of the colour word under it. Returns the loss
    per step. `token_grid`: the side of an image's token grid (default: from the first image)."""
    from rich.progress import Progress

    from ..probe.layout import VisionLayout
    from .sft import decoder_parameter_ids, language_model

    if steps <= 0 or batch_size <= 0:
        raise ValueError(f"align_vision: steps ({steps}) and batch_size ({batch_size}) must be positive")
    layout = VisionLayout.from_model(model, processor)
    tok = processor.tokenizer
    palette = colour_words()
    ids = {}
    for name in palette:
        word = tok(" " + name, add_special_tokens=False).input_ids
        if len(word) != 1:
            raise ValueError(f"align_vision: the tokenizer spells {' ' + name!r} as {len(word)} tokens; the "
                             "alignment needs each colour word as one token (a BPE vocabulary such as SmolLM2's)")
        ids[name] = word[0]
    embeddings = language_model(model).get_input_embeddings().weight.detach()
    targets = {name: embeddings[i].clone() for name, i in ids.items()}
    decoder = decoder_parameter_ids(model)
    params = [p for p in model.parameters() if id(p) not in decoder]
    saved = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) not in decoder)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    rng = random.Random(seed)
    losses: list[float] = []
    model.train()
    try:
        with Progress(disable=not progress) as bar:
            task = bar.add_task("aligning the vision side", total=steps)
            for _ in range(steps):
                chosen = [rows[rng.randrange(len(rows))] for _ in range(batch_size)]
                texts = [processor.apply_chat_template(r["prompt"], add_generation_prompt=True) for r in chosen]
                batch = processor(text=texts, images=[[r["image"]] for r in chosen], return_tensors="pt",
                                  padding=True)
                grid = token_grid or math.isqrt(int((batch["input_ids"][0] == layout.image_token_id).sum()))
                indicators = layout.region_indicators(batch["input_ids"], batch.get("image_grid_thw"), (grid, grid),
                                                      image_sizes=batch.get("image_sizes"))
                target_rows = []
                for b, row in enumerate(chosen):
                    names = _region_colours(row["image"], (grid, grid), palette)
                    where = batch["input_ids"][b] == layout.image_token_id
                    regions = indicators[b][where].argmax(-1)
                    target_rows.append(torch.stack([targets[names[int(r)]] for r in regions]))
                target = torch.cat(target_rows)
                features = _image_features(model, batch)
                if features.shape != target.shape:
                    raise ValueError(f"align_vision: {features.shape[0]} image features for {target.shape[0]} image "
                                     "tokens: this family's get_image_features is not laid out as its tokens")
                loss = torch.nn.functional.mse_loss(features, target)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
                bar.update(task, advance=1, description=f"aligning the vision side (loss {loss.item():.4f})")
    finally:
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
        model.eval()
    return losses
