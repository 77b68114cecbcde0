"""The README's library example runs as written, and does what the README says it does."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block(after: str) -> str:
    text = README.read_text()
    section = text[text.index(after):]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_own_trainer_example_runs_and_gives_weighted_token_advantages():
    from atrl.credit import CreditOptions, assign_credit

    scope: dict = {}
    exec(compile(_python_block("## Use the probes and the credit in your own trainer"), "README.md", "exec"), scope)
    mask, credit, conn = scope["mask"], scope["credit"], scope["conn"]
    B, T = mask.shape
    assert scope["logits"].shape[:2] == (B, scope["batch"]["input_ids"].shape[1])
    assert conn.shape == (B, T) and scope["profile"].shape[:2] == (B, T)
    assert (conn[~mask] == 0).all() and (conn[mask] > 0).any()
    weights = credit.weights
    assert torch.allclose((weights * mask).sum(1) / mask.sum(1), torch.ones(B))  # mean 1 over each response
    assert (weights[~mask] == 0).all() and credit.boosted_mask[mask].any()
    assert torch.equal(scope["token_advantages"], weights * scope["advantages"][:, None])
    with torch.no_grad():  # the same forward without a capture: the probe changed nothing in the logits
        plain = scope["model"](**scope["batch"]).logits
    assert torch.allclose(plain, scope["logits"], atol=1e-6, rtol=0)
    again = assign_credit(conn, scope["profile"], mask, CreditOptions(mode="atrl"))
    assert torch.equal(again.weights, weights)  # deterministic: the same connectivity, the same weights
