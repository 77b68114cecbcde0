"""Images with random patches blacked out, in the processor's own pixel format (VPPO's visual-dependency probe).

VPPO (arXiv 2510.09285) blackens square 14-pixel patches of the image, each with probability 0.5, and compares the
policy's log-probabilities of the sampled tokens with and without that damage. Here the patches are the vision
tower's own: a row of Qwen-VL's flattened `pixel_values` is one 14 x 14 patch (times its temporal frames), and a
patch is blacked by writing the normalised value of a black pixel into it, channel by channel, which is what the
processor makes of a black patch. For image tensors (LLaVA: (B, C, H, W)) the same is done on 14 x 14 blocks.
VPPO blackens the image before it is resized; masking after the resize keeps the patch grid aligned with the
tower's, which is what the damage is meant to reach.
"""

from __future__ import annotations

import torch


def black_value(image_processor) -> torch.Tensor:
    """(C,) the normalised value of a black pixel: (0 - mean) / std per channel (0 when the processor does not
    normalise)."""
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float32)
    std = torch.tensor(image_processor.image_std, dtype=torch.float32)
    if not getattr(image_processor, "do_normalize", True):
        return torch.zeros_like(mean)
    return -mean / std


def mask_image_patches(pixel_values: torch.Tensor, image_processor, prob: float = 0.5, patch: int = 14,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked copy of `pixel_values`, the bool mask of blacked patches). Each patch is blacked with probability
    `prob`. `pixel_values`: Qwen-VL's (patches, C * T * P * P) rows (channel-major within a row), or an image
    batch (B, C, H, W)."""
    if not 0 <= prob <= 1:
        raise ValueError(f"prob={prob}: a probability in [0, 1]")
    black = black_value(image_processor).to(pixel_values.device, pixel_values.dtype)
    channels = black.numel()
    out = pixel_values.clone()
    if pixel_values.dim() == 2:
        per_channel, rest = divmod(pixel_values.shape[1], channels)
        if rest:
            raise ValueError(f"pixel_values rows of {pixel_values.shape[1]} values do not split into {channels} "
                             "channels: not a flattened-patch layout this knows")
        chosen = torch.rand(pixel_values.shape[0], generator=generator) < prob
        out[chosen.to(out.device)] = black.repeat_interleave(per_channel)
        return out, chosen
    if pixel_values.dim() == 4 and pixel_values.shape[1] == channels:
        B, _, H, W = pixel_values.shape
        rows, cols = -(-H // patch), -(-W // patch)
        chosen = torch.rand(B, rows, cols, generator=generator) < prob
        full = chosen.repeat_interleave(patch, 1).repeat_interleave(patch, 2)[:, :H, :W].to(out.device)
        out = torch.where(full[:, None], black[None, :, None, None], out)
        return out, chosen
    raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}: neither flattened patches (N, C*T*P*P) "
                     "nor images (B, C, H, W)")
