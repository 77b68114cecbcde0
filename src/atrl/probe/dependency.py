"""Visual dependency of each generated token from the policy run on a damaged image: pure tensor functions.

Shape legend: B responses, T response positions, V vocabulary. Masks are boolean, True = the token counts.
"""

from __future__ import annotations

import torch


def sampled_token_dependency(logp_BT: torch.Tensor, masked_logp_BT: torch.Tensor,
                             mask_BT: torch.Tensor) -> torch.Tensor:
    """(B, T) VPPO's token visual dependency (arXiv 2510.09285, as its code computes it): with
    d = log p(y_t | masked image) - log p(y_t | image) of the sampled token, clamped to [-20, 20], the k3 estimate
    of KL, exp(d) - d - 1, clamped to [0, 10]; 0 on padding."""
    diff = (masked_logp_BT.float() - logp_BT.float()).clamp(-20.0, 20.0)
    return (diff.exp() - diff - 1.0).clamp(0.0, 10.0).masked_fill(~mask_BT, 0.0)


def perception_kl(logp_BT: torch.Tensor, masked_logp_BT: torch.Tensor) -> torch.Tensor:
    """(B, T) PAPO's per-token perception KL (arXiv 2507.06448): the k3 estimate exp(d) - d - 1 with
    d = log p(y_t | masked image) - log p(y_t | image), unclamped and differentiable in both arguments."""
    d = masked_logp_BT - logp_BT
    return d.exp() - d - 1.0


def blank_image_kl(logits_BTV: torch.Tensor, blank_logits_BTV: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """(B, T) KL(policy with the image || policy with a blank image) over the vocabulary, per token; 0 on padding."""
    logp = torch.log_softmax(logits_BTV.float(), -1)
    logq = torch.log_softmax(blank_logits_BTV.float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1).masked_fill(~mask_BT, 0.0)
